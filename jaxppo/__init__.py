"""jaxppo: PPO for language models (RLHF) in JAX.

    from jaxppo import PPOConfig, PPOTrainer, PPODataset, load_prompts
    trainer = PPOTrainer(PPOConfig())           # the demo: tiny GPT-2, built-in `vowels` task
    trainer.train()

Names are imported lazily so `import jaxppo` stays cheap for the CLI's --help and error paths.
Importing jaxppo (or any of its modules) changes no environment variable, JAX setting or signal
handler: `jaxppo.runtime.configure()` makes the process-wide settings, explicitly (the CLI and
`PPOTrainer` call it; see its docstring for a notebook).
"""

__version__ = "0.1.0"

_EXPORTS = {
    "PPOConfig": "jaxppo.config",
    "load_config": "jaxppo.config",
    "PPOTrainer": "jaxppo.run.trainer",
    "PPODataset": "jaxppo.data.prompts",
    "load_prompts": "jaxppo.data.prompts",
    "TrainingLogger": "jaxppo.run.logger",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxppo' has no attribute {name!r}")
