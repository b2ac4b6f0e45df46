"""Pure maths of RL for language models: arrays in, arrays out, only jax imports."""
