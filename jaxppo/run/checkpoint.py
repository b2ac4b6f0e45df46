"""Checkpoints of a PPO run: one orbax `CheckpointManager`, asynchronous saves, crash-safe resume.

    ckpt = Checkpointer(run_dir / "checkpoints", keep=3, best_metric="eval/score", best_mode="max")
    ckpt.save(step, state, host_state, metrics={"eval/score": 0.7})   # returns while the write goes on
    state, host_state = ckpt.restore(None, jax.eval_shape(lambda: state))  # newest readable step
    ckpt.close()

One step folder holds (DESIGN §3, `checkpoints/<step>/`):
  state/   the `TrainState` arrays, orbax PyTreeSave (uncompressed, `state_handler`), *packed*
           (`jaxppo.run.packing`): the small replicated leaves in one flat array per dtype, large
           or sharded leaves one by one
  layout/  JSON: each leaf's name ("policy.layers.0.attn.qkv.kernel.value"), shape, dtype and where
           it lives (packed group + offset, or its own array); restore checks it against the model
  host/    a JSON dict of host-side state (data-iterator position, early stopping, config fingerprint)
  metrics/ written by orbax when `best_metric` is set, so the "best" checkpoint survives a restart

Crash safety (DESIGN §5) rests on orbax's protocol on a local disk: a step is written under
`<step>.orbax-checkpoint-tmp` and renamed to `<step>` only once every item is on disk, and old
steps are deleted only after the new one is committed. So a run killed at any moment leaves every
`<step>` folder complete; leftover temporary folders are removed (with a warning) when a
`Checkpointer` opens the folder, and a step that still fails to read (e.g. truncated by a crash
while it was being deleted) is skipped by `restore(None, ...)` in favour of the previous one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxppo.engine.mesh import path_str
from jaxppo.errors import JaxppoError
from jaxppo.run.packing import PACK_MAX_ELEMENTS, mismatch, pack, restore_target, unpack

__all__ = ["Checkpointer", "CheckpointError", "find_checkpoint_dir", "PACK_MAX_ELEMENTS"]

_STATE, _HOST, _LAYOUT = "state", "host", "layout"   # item names inside a step folder


class CheckpointError(JaxppoError, ValueError):
    """A checkpoint that is missing, unreadable, or made for a different model."""


class _UnreadableCheckpoint(CheckpointError):
    """A step folder that exists but cannot be read; `restore(None, ...)` falls back past it."""


class Checkpointer:
    """Saves and restores the whole training state of a run in `directory`.

    Args:
      directory: the run's `checkpoints/` folder (created if missing).
      keep: the most recent checkpoints kept.
      best_metric: if set, the checkpoint with the best `metrics[best_metric]` is kept as well.
      best_mode: "max" or "min": which value of `best_metric` is best.
      async_save: write in a background thread; `save` returns once the arrays are copied off
        the device, so training goes on (and may donate the state) while the write finishes.
      read_only: never write or delete anything (to restore from another run's folder).
      pack_max_elements: fully replicated leaves up to this many elements are packed together
        (`jaxppo.run.packing`); bigger ones are saved as arrays of their own.
    """

    def __init__(self, directory, *, keep: int = 3, best_metric: str | None = None,
                 best_mode: str = "max", async_save: bool = True, read_only: bool = False,
                 pack_max_elements: int = PACK_MAX_ELEMENTS):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        self.pack_max_elements = pack_max_elements
        self._pending: int | None = None    # step of the async save that may still be writing
        self._in_save = False
        self._pack_buffers: dict = {}       # host arrays `pack` fills at every save (see packing.pack)
        if not read_only and jax.process_index() == 0:     # several processes: orbax's primary host
            _remove_temporary_dirs(self.directory)

        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        best_fn = None
        if best_metric is not None:
            best_fn = lambda m: m[best_metric]  # noqa: E731
            # BestN sorts ascending and keeps the tail; reverse flips that for "min".
            # Steps saved without the metric are kept only while they are among the latest.
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                keep_checkpoints_without_metrics=False))
        # read-only managers log a few absl WARNING lines about the options they ignore: noise on a console
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        if read_only:
            absl_logger.setLevel(logging.ERROR)
        try:
            options = ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
                # best_fn is not used for retention here (preservation_policy overrides it), but orbax
                # only writes `metrics/` when it is set; without it the best step is forgotten on restart.
                best_fn=best_fn,
                best_mode=best_mode,
                enable_async_checkpointing=async_save,
                read_only=read_only,
                create=not read_only,
            )
            registry = ocp.handlers.create_default_handler_registry(
                **{_STATE: state_handler(), _HOST: ocp.JsonCheckpointHandler(),
                   _LAYOUT: ocp.JsonCheckpointHandler()})
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  handler_registry=registry)
        finally:
            absl_logger.setLevel(level)

    # ------------------------------------------------------------------ save
    def save(self, step: int, state, host_state: dict, metrics: dict | None = None, *,
             force: bool = False) -> bool:
        """Saves `state` (a pytree of arrays) and `host_state` (JSON) as step `step`.

        Without `force` it returns as soon as the arrays are copied off the device, and skips
        (returns False) a step that is not newer than the latest one. With `force` (the last save
        before exiting, e.g. on SIGTERM) it first waits for a pending save, writes any step that
        does not exist yet and returns only once it is committed. Returns whether it saved.
        """
        if self._in_save:
            # Re-entered from a signal handler while this thread was inside save(); orbax's
            # manager is not re-entrant. The outer save goes on; let the caller save at a step
            # boundary instead (set a flag in the handler).
            warnings.warn(f"checkpoint save of step {step} skipped: another save is being started",
                          RuntimeWarning, stacklevel=2)
            return False
        try:
            json.dumps(host_state)
        except (TypeError, ValueError) as e:
            raise TypeError(f"host_state is not JSON-serialisable: {e}") from None
        step = int(step)
        self._in_save = True
        try:
            if force:
                self.wait()
                if step in self._manager.all_steps():
                    return False
            if self._pending is not None:    # its write may still read the pack buffers
                self.wait()
            arrays, layout = pack(state, self.pack_max_elements, self._pack_buffers)
            args = ocp.args.Composite(**{_STATE: ocp.args.PyTreeSave(arrays),
                                         _HOST: ocp.args.JsonSave(host_state),
                                         _LAYOUT: ocp.args.JsonSave(layout)})
            saved = self._manager.save(step, args=args, metrics=self._ranked_metrics(metrics),
                                       force=force)
            if saved:
                self._pending = step
            if force:
                self.wait()
            return saved
        finally:
            self._in_save = False

    def _ranked_metrics(self, metrics: dict | None) -> dict | None:
        """Metrics for orbax's BestN, or None (unranked) when the best metric is missing or not finite."""
        if metrics is None or self.best_metric is None:
            return None
        out = {k: float(v) for k, v in metrics.items()}
        value = out.get(self.best_metric)
        if value is None or not math.isfinite(value):   # NaN would break the ranking
            return None
        return out

    def wait(self):
        """Blocks until a pending asynchronous save is committed (re-raises its error, if any)."""
        self._manager.wait_until_finished()
        self._pending = None

    # ------------------------------------------------------------------ query
    def all_steps(self) -> list[int]:
        """The complete checkpoints that retention keeps, in increasing order."""
        steps = set(self._manager.all_steps())
        # orbax lists an async save as soon as it starts; it is complete once renamed into place.
        if self._pending is not None and not (self.directory / str(self._pending)).is_dir():
            steps.discard(self._pending)
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step with the best `best_metric` (the latest one when no metric is tracked)."""
        self.wait()
        return self._manager.best_step()

    # ------------------------------------------------------------------ restore
    def restore(self, step: int | None, abstract_state, check_host=None) -> tuple[Any, dict]:
        """Returns `(state, host_state)` of `step`, or of the newest readable step if None.

        `abstract_state` has the structure of the saved state: `jax.ShapeDtypeStruct` leaves (e.g.
        `jax.eval_shape(lambda: state)`) or concrete arrays, whose shardings are used. The result
        has that structure, shapes and dtypes. Raises CheckpointError when there is no such step,
        when it cannot be read, or when its leaves differ from `abstract_state` (names the leaf).
        `check_host(host_dict)` runs on the saved host state before any array is compared or read,
        so a caller can refuse an incompatible run with its own message.
        """
        self.wait()   # a pending save may be deleting old steps
        target = _abstract(abstract_state)
        if step is not None:
            step = int(step)
            if step not in self.all_steps():
                raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                                      f"(available: {self.all_steps() or 'none'})")
            return self._restore_step(step, target, check_host)
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        for s in reversed(steps):
            try:
                return self._restore_step(s, target, check_host)
            except _UnreadableCheckpoint as e:
                last = e
                if s != steps[0]:
                    warnings.warn(f"{e}; falling back to the previous checkpoint", RuntimeWarning,
                                  stacklevel=2)
        raise CheckpointError(f"no readable checkpoint in {self.directory} (newest error: {last})")

    def _restore_step(self, step: int, target, check_host=None) -> tuple[Any, dict]:
        where = self.directory / str(step)
        if check_host is not None:
            try:   # orbax's JsonSave writes the dict to <step>/host/metadata
                early_host = json.loads((where / _HOST / "metadata").read_text())
            except (OSError, ValueError):
                early_host = None              # unreadable here: the full restore below reports it
            if isinstance(early_host, dict):
                check_host(early_host)
        try:
            layout = json.loads((where / _LAYOUT / "metadata").read_text())
            leaves = layout["leaves"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise _UnreadableCheckpoint(f"checkpoint {where} is unreadable (no readable '{_LAYOUT}': "
                                        f"{_one_line(e)})") from e
        paths, treedef = jax.tree_util.tree_flatten_with_path(target)
        wanted = [(path_str(path), want) for path, want in paths]
        problem = mismatch(leaves, wanted)
        if problem is not None:
            raise CheckpointError(f"checkpoint {where} does not fit this model: {problem}")
        abstract = restore_target(layout, wanted)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        args = ocp.args.Composite(**{_STATE: ocp.args.PyTreeRestore(abstract, restore_args=restore_args),
                                     _HOST: ocp.args.JsonRestore()})
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 - tensorstore/json/io errors all mean unreadable
            raise _UnreadableCheckpoint(f"checkpoint {where} is unreadable ({_one_line(e)})") from e
        state = jax.tree.unflatten(treedef, unpack(restored[_STATE], layout, wanted))
        host = restored[_HOST]
        if not isinstance(host, dict):
            raise _UnreadableCheckpoint(f"checkpoint {where} is unreadable (no '{_HOST}' state)")
        return state, host

    # ------------------------------------------------------------------ lifetime
    def close(self):
        """Waits for pending writes and deletions, then releases orbax's threads."""
        self._manager.close()
        self._pending = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------- helpers
def state_handler() -> ocp.PyTreeCheckpointHandler:
    """orbax's handler of the state item, without the two costs of its defaults that buy nothing here:
    zstd compression (float32 weights hardly compress: 77 vs 71 MB for a tiny PPO state, for ~0.1 s
    of CPU per save) and the defensive host copy of every numpy array (`pack` hands orbax host
    arrays it does not touch again until the save is committed; a fresh copy of tens of MB faults in
    new pages, ~0.15 s of the training loop's time per save on the tiny PPO state). Checkpoints
    written with either default read the same (the format records its compressor)."""
    no_copy = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
    registry = ocp.type_handlers.create_type_handler_registry(
        *[(ty, no_copy if ty is np.ndarray else ocp.type_handlers.get_type_handler(ty))
          for ty in ocp.type_handlers.supported_types()])
    return ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)


def find_checkpoint_dir(path) -> tuple[Path, int | None]:
    """Resolves `--resume-from PATH` to `(checkpoints_dir, step or None for the latest)`.

    Accepts a run's `checkpoints/` folder, a run folder that contains one, or a single step
    folder such as `.../checkpoints/40`. Raises CheckpointError when none holds a checkpoint.
    """
    p = Path(path).absolute()
    if _is_step_dir(p):
        return p.parent, int(p.name)
    for candidate in (p, p / "checkpoints"):
        if candidate.is_dir() and any(_is_step_dir(c) for c in candidate.iterdir()):
            return candidate, None
    raise CheckpointError(f"no checkpoint found in {path}")


def _is_step_dir(p: Path) -> bool:
    """A committed step folder: an all-digit name (temporary ones carry a suffix) holding our state."""
    return p.name.isdigit() and (p / _STATE).is_dir()


def _remove_temporary_dirs(directory: Path):
    """Removes the folders of saves that never committed (the process died while writing)."""
    if not directory.is_dir():
        return
    for tmp in ocp.path.step.all_temporary_paths(directory):
        path = Path(os.fspath(tmp.get()))
        warnings.warn(f"removing incomplete checkpoint {path} (a save was interrupted)",
                      RuntimeWarning, stacklevel=3)
        shutil.rmtree(path, ignore_errors=True)


def _abstract(tree):
    """ShapeDtypeStruct leaves with a sharding, so arrays restore onto this process's devices
    rather than onto the devices named in the checkpoint (which may not exist here)."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            if x.sharding is not None:
                return x
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default, weak_type=x.weak_type)
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, (np.ndarray, np.generic, int, float, bool)):   # restored as arrays
            x = np.asarray(x)
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)
        return x

    return jax.tree.map(leaf, tree)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"
