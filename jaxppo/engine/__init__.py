"""Compiled programs: sampling, scoring forwards, optimiser chains and loops, meshes and placement, and the one place that composes them into an RL iteration."""
