"""Process-wide JAX settings the trainer makes before it touches a device: the persistent
compilation cache and XLA:GPU's deterministic ops.

XLA reads `XLA_FLAGS` once, when JAX starts its backends (the first array, `jax.devices()`, ...),
so a flag can only be added before that; `use_deterministic_ops` says so instead of silently
running without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from jaxppo.errors import ConfigError

DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops"


def cache_root() -> Path:
    """jaxppo's cache folder: tiny demo models, compiled programs, benchmark models.
    `~/.cache/jaxppo`, or `JAXPPO_CACHE`."""
    return Path(os.environ.get("JAXPPO_CACHE", Path.home() / ".cache" / "jaxppo"))


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Persist compiled XLA programs across processes (a rerun or resume skips most compile time).

    `JAXPPO_COMPILATION_CACHE=0` turns it off; another value is the folder to use.
    """
    env = os.environ.get("JAXPPO_COMPILATION_CACHE")
    if env == "0":
        return None
    path = path or env or str(cache_root() / "xla")
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def _flag_value(flags: str, name: str) -> bool | None:
    """The boolean value `--name[=v]` has in an XLA_FLAGS string (the last one wins), None if absent."""
    value = None
    for token in flags.split():
        key, _, v = token.partition("=")
        if key == name:
            value = v.lower() not in ("false", "0") if v else True
    return value


def use_deterministic_ops() -> None:
    """Make XLA:GPU choose deterministic kernels (no atomics in reductions and scatters, no
    timing-based autotuning), so that two runs, or a run and its resume, give the same bits.

    The CPU is deterministic already and ignores the flag. Adds `--xla_gpu_deterministic_ops=true`
    to `XLA_FLAGS`; raises ConfigError if it was set to false, or if JAX's backends have already
    started in this process without it (then only a new process can have it).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    value = _flag_value(flags, DETERMINISTIC_FLAG)
    if value is True:
        return
    if value is False:
        raise ConfigError(f"train.deterministic=true but XLA_FLAGS sets {DETERMINISTIC_FLAG}=false",
                          keys=("train.deterministic",))
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise ConfigError(
            "train.deterministic=true needs XLA flags that JAX reads when it starts, and it has already "
            f"started in this process: start Python with XLA_FLAGS={DETERMINISTIC_FLAG}=true",
            keys=("train.deterministic",))
    os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}=true".strip()
