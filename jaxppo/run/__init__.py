"""The host side of a run: the trainer loop, run directory, checkpoints, logger, evaluation and plots."""
