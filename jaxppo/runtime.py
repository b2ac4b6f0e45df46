"""Process-wide settings, made once and explicitly: `configure()`.

Importing jaxppo changes nothing in the process (no environment variable, no JAX config, no
signal handler). The CLI and `PPOTrainer` call `configure()` before their first JAX
computation; a notebook or script that wants the same settings calls it first thing:

    import jaxppo.runtime
    jaxppo.runtime.configure()        # before anything touches JAX (an array, jax.devices(), ...)

What it sets, each only where the user has not set it already:
- two host devices on a CPU with two or more cores (`--xla_force_host_platform_device_count=2`):
  XLA:CPU runs the operations of one program one at a time, so the policy's and the critic's
  programs need devices of their own to run side by side (`train.placement`; README, Devices);
- XLA:CPU's experimental YNNPACK fusions off for every program (they made this workload 1.5-2x
  slower on the CPUs measured, experiments/README.md) and on for the update's matmuls alone
  (`update_compiler_options`);
- the persistent compilation cache (`JAXPPO_COMPILATION_CACHE=0` turns it off);
- XLA:GPU's deterministic ops when asked (`deterministic=True`);
- quieter `transformers`/`tokenizers` (jaxppo uses them for tokenizers only, without torch).

XLA reads `XLA_FLAGS` once, when JAX starts its backends, so the flags can only be added before
that. Once JAX has started, `configure()` says in one line what it could not set and carries on;
only `deterministic=True` is an error then (a run that asked for reproducibility must not go on
without it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jaxppo.errors import ConfigError

DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops"
HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"

# The XLA flags `configure` added to XLA_FLAGS itself (the others there are the user's).
_added_flags: set[str] = set()


def cache_root() -> Path:
    """jaxppo's cache folder: tiny demo models, compiled programs, benchmark models.
    `~/.cache/jaxppo`, or `JAXPPO_CACHE`."""
    return Path(os.environ.get("JAXPPO_CACHE", Path.home() / ".cache" / "jaxppo"))


def jax_started() -> bool:
    """True once JAX has created its backends in this process (XLA_FLAGS are read then)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def flag_value(flags: str, name: str) -> str | None:
    """The value `--name[=v]` has in an XLA_FLAGS string (the last one wins; '' for a bare flag),
    None if absent."""
    value = None
    for token in flags.split():
        key, _, v = token.partition("=")
        if key == name:
            value = v
    return value


def flag_enabled(flags: str, name: str) -> bool | None:
    """The boolean value of `--name[=v]` in an XLA_FLAGS string, None if absent."""
    v = flag_value(flags, name)
    return None if v is None else v.lower() not in ("false", "0") if v else True


def configure(*, host_devices: int | None = 2, cpu_fusion: bool = True, compilation_cache: bool | str = True,
              deterministic: bool = False, log=None) -> list[str]:
    """Make the process-wide settings above. Idempotent; the user's own XLA_FLAGS win.

    host_devices: host (CPU) devices to ask for when the machine has at least that many cores
        (None: leave XLA's one device). Only the CPU platform reads the flag.
    cpu_fusion: turn XLA:CPU's YNNPACK fusions off for every program but the update's matmuls.
    compilation_cache: True (`JAXPPO_COMPILATION_CACHE` or `cache_root()/xla`), a folder, or False.
    deterministic: XLA:GPU deterministic kernels (ConfigError when it can no longer be set).
    log: where the one-line notes go (default: stderr).

    Returns the notes it made (what it could not set because JAX had started)."""
    for name, value in (("TRANSFORMERS_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
                        ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(name, value)
    if deterministic:
        use_deterministic_ops()
    flags = os.environ.get("XLA_FLAGS", "")
    wanted = []
    if cpu_fusion and flag_value(flags, YNN_FLAG) is None:
        wanted.append(f"{YNN_FLAG}=")
    if host_devices and host_devices > 1 and flag_value(flags, HOST_DEVICES_FLAG) is None \
            and (os.cpu_count() or 1) >= host_devices:
        wanted.append(f"{HOST_DEVICES_FLAG}={host_devices}")
    notes = []
    if wanted and jax_started():
        notes.append("jaxppo.runtime.configure: JAX has already started in this process, so "
                      f"{' '.join(wanted)} could not be set (call it before the first JAX computation, or start "
                      f"Python with XLA_FLAGS='{' '.join(wanted)}'); carrying on without")
    elif wanted:
        os.environ["XLA_FLAGS"] = " ".join([flags, *wanted]).strip()
        _added_flags.update(w.partition("=")[0] for w in wanted)
    if compilation_cache:
        enable_compilation_cache(None if compilation_cache is True else str(compilation_cache))
    for note in notes:
        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(note)
    return notes


def update_compiler_options() -> dict | None:
    """XLA options of the programs whose matmuls have hundreds of rows: the updates, the scoring
    and value forwards, and the evaluation (its decode has every eval prompt's row, ~50). On the
    CPU their matmuls go to YNNPACK, ~5-8 % faster than XLA's own there (experiments/README.md;
    score 3 %, evaluation at 52 rows 6 %); the rollout's sampling keeps XLA's, whose decode
    matmuls at 16 rows YNNPACK runs ~10-20 % slower. Nothing when the user set the YNN flag
    themselves, or off the CPU."""
    import jax

    user_set = YNN_FLAG not in _added_flags and flag_value(os.environ.get("XLA_FLAGS", ""), YNN_FLAG) is not None
    if user_set or jax.default_backend() != "cpu":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Persist compiled XLA programs across processes (a rerun or resume skips most compile time).

    `JAXPPO_COMPILATION_CACHE=0` turns it off; another value is the folder to use.
    """
    import jax

    env = os.environ.get("JAXPPO_COMPILATION_CACHE")
    if env == "0":
        return None
    path = path or env or str(cache_root() / "xla")
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def use_deterministic_ops() -> None:
    """Make XLA:GPU choose deterministic kernels (no atomics in reductions and scatters, no
    timing-based autotuning), so that two runs, or a run and its resume, give the same bits.

    The CPU is deterministic already and ignores the flag. Adds `--xla_gpu_deterministic_ops=true`
    to `XLA_FLAGS`; raises ConfigError if it was set to false, or if JAX's backends have already
    started in this process without it (then only a new process can have it).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    value = flag_enabled(flags, DETERMINISTIC_FLAG)
    if value is True:
        return
    if value is False:
        raise ConfigError(f"train.deterministic=true but XLA_FLAGS sets {DETERMINISTIC_FLAG}=false",
                          keys=("train.deterministic",))
    if jax_started():
        raise ConfigError(
            "train.deterministic=true needs XLA flags that JAX reads when it starts, and it has already "
            f"started in this process: start Python with XLA_FLAGS={DETERMINISTIC_FLAG}=true",
            keys=("train.deterministic",))
    os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}=true".strip()


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Join a run of several processes (`jax.distributed.initialize`); call it on every process
    before the first JAX computation. Unset arguments come from JAXPPO_COORDINATOR_ADDRESS /
    JAX_COORDINATOR_ADDRESS, JAXPPO_NUM_PROCESSES / JAX_NUM_PROCESSES and JAXPPO_PROCESS_ID /
    JAX_PROCESS_ID, else from JAX's cluster detection (SLURM, TPU pods, ...). On the CPU the
    processes' collectives go through gloo. Returns False when already initialized."""
    import jax

    if jax.distributed.is_initialized():
        return False
    env = lambda *names: next((os.environ[n] for n in names if os.environ.get(n)), None)
    coordinator = coordinator or env("JAXPPO_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
    n = num_processes if num_processes is not None else env("JAXPPO_NUM_PROCESSES", "JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else env("JAXPPO_PROCESS_ID", "JAX_PROCESS_ID")
    if "cpu" in os.environ.get("JAX_PLATFORMS", "cpu").split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, None if n is None else int(n), None if pid is None else int(pid))
    return True


def is_primary() -> bool:
    """True on process 0, the one that writes logs, configs, samples, plots and exports (without
    starting JAX: before `initialize_distributed` and JAX's backends, a process is alone)."""
    if not jax_started() and ("jax" not in sys.modules or not sys.modules["jax"].distributed.is_initialized()):
        return True
    import jax

    return jax.process_index() == 0


def on_primary(fn, what: str = "the run folder"):
    """`fn()` on process 0 only (its result; None elsewhere); when it raises there, every process
    raises (process 0 its own error, the others one that points to it). One process: just `fn()`."""
    import jax

    if jax.process_count() == 1:
        return fn()
    import numpy as np
    from jax.experimental import multihost_utils

    error = result = None
    if jax.process_index() == 0:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the other processes heard of it
            error = e
    if multihost_utils.broadcast_one_to_all(np.int32(error is not None)):
        if error is not None:
            raise error
        raise ConfigError(f"process 0 failed on {what}: see its error")
    return result
