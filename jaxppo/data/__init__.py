"""Prompts and datasets, built-in tasks, reward functions."""
