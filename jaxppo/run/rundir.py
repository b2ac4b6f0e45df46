"""The run directory: opening it (and resuming), its checkpoints and logs, and stop signals.

`RunDir.open` takes the folder's lock, refuses a fresh run into a folder that holds one (unless
`overwrite`: the old run is moved aside) and a resume that changes what cannot change
(`jaxppo.config.resume`), then creates the checkpointer (restoring a resumed checkpoint, refusing
one of another model), the logger and config.yaml (a resume keeps it and records its changes in
overrides.jsonl); `save` writes a checkpoint of the TrainState and the host state (prompt
iterator, early stopping, non-finite streak, the models' fingerprint), `save_due` says when a
periodic one is due (train.save_every steps or train.save_every_minutes).
Several processes (`jax.distributed`): process 0 alone checks, creates and locks the folder and
writes config.yaml and the logs; every process saves and restores the checkpoints (orbax).
`StopSignals` turns SIGINT/SIGTERM into "checkpoint and return"; a second one aborts at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import jax

from jaxppo.config import PPOConfig, config_to_dict, save_config
from jaxppo.config.resume import resume_changes
from jaxppo.errors import ConfigError
from jaxppo.models.hf import weights_fingerprint
from jaxppo.run.checkpoint import Checkpointer, find_checkpoint_dir
from jaxppo.run.logger import SilentLogger, TrainingLogger
from jaxppo.run.runfolder import (
    CONFIG_FILE,
    RunLock,
    check_fresh,
    holds_run,
    move_aside,
    record_changes,
    same_folder,
    saved_config,
    source_folder,
)
from jaxppo.runtime import is_primary, on_primary


def fingerprint(cfg: PPOConfig, policy_cfg, critic_cfg, lora_base: str | None = None,
                critic_base: str | None = None) -> dict:
    """What a checkpoint must agree on with the config that resumes it. With LoRA the checkpoint
    holds the adapters only: `lora_base` (the policy's folder) is fingerprinted by its weights, and
    `critic_base` (the folder a LoRA critic's frozen backbone comes from) too."""
    out = {"policy": cfg.model.policy, "policy_arch": dataclasses.asdict(policy_cfg),
           "critic_arch": None if critic_cfg is None else dataclasses.asdict(critic_cfg),
           "reward_model": cfg.model.reward_model, "critic_init": cfg.model.critic_init, "critic": cfg.model.critic}
    if lora_base is not None:
        out["lora"] = dataclasses.asdict(cfg.model.lora)
        out["base_weights"] = weights_fingerprint(lora_base)
    if critic_base is not None:
        out["critic_base_weights"] = weights_fingerprint(critic_base)
    return out


class RunDir:
    """`config.train.output_dir` of one run: its lock, checkpointer and logger once `open`.
    `overwrite`: a fresh run into a folder that holds one moves the old run aside (else refused)."""

    def __init__(self, config: PPOConfig, fingerprint: dict, overwrite: bool = False):
        self.config = config
        self.path = Path(config.train.output_dir)
        self.fingerprint = fingerprint
        self.overwrite = overwrite
        self.lock = RunLock(self.path)
        self.checkpointer: Checkpointer | None = None
        self.logger: TrainingLogger | None = None
        self.last_saved = 0                      # the step of the newest checkpoint written or resumed
        self.last_save_time = time.monotonic()   # when it was written (or the run opened)

    def log(self, message: str):
        """To train.log and the console once open; to the console before."""
        if self.logger is not None:
            self.logger.log(message)
        elif is_primary():
            print(message, flush=True)

    def open(self, resume: str | None, target, on_restore=None):
        """Take the folder's lock, create the checkpointer and (after restoring `resume`: "latest"
        or a checkpoint path, into the abstract `target` state, and handing the state and host state
        to `on_restore(state, host)`) the logger and config.yaml. Refused, with nothing of the old
        run written: a live lock, a fresh run into a folder that holds one (unless `overwrite`), a
        resume whose config changes a field that cannot change, a failing restore or `on_restore`."""
        c = self.config
        source, changes = None, {}
        if resume is not None:   # a missing checkpoint or a forbidden change, before the run dir is written to
            source = source_folder(resume, self.path)
            saved = saved_config(source)
            if saved is not None:
                if same_folder(saved.train.output_dir, source):      # however the same folder is spelled
                    saved = saved.replace(train=dataclasses.replace(saved.train, output_dir=c.train.output_dir))
                changes = resume_changes(saved, c, str(source))
        continuing = source is not None and same_folder(source, self.path)
        notes = []
        # several processes: process 0 alone checks, creates and locks the folder; the others wait for it
        on_primary(lambda: self.take_folder(continuing, notes))
        state = host = None
        try:
            self.checkpointer = Checkpointer(self.path / "checkpoints", keep=c.train.keep_checkpoints,
                                             best_metric=c.early_stopping.metric, best_mode=c.early_stopping.mode)
            # restore (and refuse a checkpoint of another model) before config.yaml and the logs are written
            if resume is not None:
                state, host = self.restore(None if resume == "latest" else resume, target)
                newest = self.checkpointer.latest_step() if continuing and resume != "latest" else None
                if newest is not None and newest > int(state.step):
                    raise ConfigError(f"--resume-from {resume}: {self.path} has a newer checkpoint (step {newest}); "
                                      f"continuing step {int(state.step)} there would mix two histories: resume "
                                      f"into another --output-dir, or use --resume", keys=("train.output_dir",))
                if on_restore is not None:
                    on_restore(state, host)
            self.logger = SilentLogger() if not is_primary() else \
                TrainingLogger(self.path, tensorboard=c.logging.tensorboard, wandb=c.logging.wandb,
                               wandb_project=c.logging.wandb_project, wandb_mode=c.logging.wandb_mode,
                               config=config_to_dict(c))
        except BaseException:
            if self.checkpointer is not None:
                self.checkpointer.close()
            self.lock.release()
            raise
        if is_primary() and (not continuing or not (self.path / CONFIG_FILE).exists()):
            save_config(c, self.path / CONFIG_FILE)      # a resume keeps the run's own config.yaml
        for note in notes:
            self.log(note)
        self.last_save_time = time.monotonic()
        if state is not None:
            self.last_saved = step = int(state.step)
            self.logger.truncate_after(step)
            self.log(f"resumed from step {step}")
            if changes:
                if continuing and is_primary():
                    record_changes(self.path, step, changes, resume)
                self.log("changed on resume: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
                         + (" (recorded in overrides.jsonl beside config.yaml)" if continuing else ""))

    def take_folder(self, continuing: bool, notes: list) -> None:
        """Checks the folder (a file, a live lock, a fresh run into a run's folder unless
        `overwrite`), creates it, takes its lock and moves an overwritten run aside."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"train.output_dir={str(self.path)!r} is a file, not a directory",
                              keys=("train.output_dir",))
        self.lock.check()
        if not continuing:
            check_fresh(self.path, self.overwrite)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"train.output_dir={str(self.path)!r}: cannot create the run directory "
                              f"({e.strerror or e})", keys=("train.output_dir",)) from None
        self.lock.acquire(notes.append)
        try:
            if not continuing and holds_run(self.path):      # with overwrite (else check_fresh refused)
                notes.append(f"--overwrite: moved the previous run in {self.path} to {move_aside(self.path)}")
        except BaseException:
            self.lock.release()
            raise

    def save(self, state, host: dict, metrics: dict | None = None, force: bool = False) -> bool:
        """A checkpoint of `state` and `host` (+ the fingerprint); the early-stopping metric, if any,
        is recorded with it for the best checkpoint. Returns whether it saved."""
        if self.checkpointer is None:
            return False
        es_metric = self.config.early_stopping.metric
        ck_metrics = None
        if es_metric and metrics and es_metric in metrics and metrics[es_metric] is not None:
            ck_metrics = {es_metric: float(metrics[es_metric])}
        step = int(state.step)
        saved = self.checkpointer.save(step, state, {**host, "fingerprint": self.fingerprint}, ck_metrics, force=force)
        if saved:
            self.last_saved, self.last_save_time = step, time.monotonic()
        return saved

    def save_due(self, done: int) -> bool:
        """A periodic checkpoint is due after step `done`: every train.save_every steps, or
        train.save_every_minutes after the last one (the last step gets its own, in `finish`)."""
        t = self.config.train
        if done >= t.total_steps:
            return False
        late = t.save_every_minutes > 0 and time.monotonic() - self.last_save_time >= 60 * t.save_every_minutes
        return bool(t.save_every and done % t.save_every == 0) or late

    def save_before_exit(self, state, host: dict, error: BaseException, savable: bool = True) -> None:
        """On `error`: a checkpoint of the last completed step unless it has one or is not `savable`
        (logged; a failing save is logged too and does not hide the error). A KeyboardInterrupt (a
        second signal) aborts at once: nothing is saved."""
        if isinstance(error, KeyboardInterrupt):
            self.log("aborted: the last complete checkpoint stays")
            return
        reason = f"stopping on {type(error).__name__}"
        try:
            step = int(state.step)
            if not savable or not isinstance(error, Exception) or self.checkpointer is None or step <= self.last_saved:
                return
            self.save(state, host, force=True)
        except Exception as e:  # noqa: BLE001 - e.g. the state's buffers were donated to a failed step
            self.log(f"warning: {reason}: could not save a checkpoint: {type(e).__name__}: {e}")
            return
        self.log(f"{reason}: saved checkpoint at step {step}; resume with --resume")

    def resumed_state(self, resume: str | None, state):
        """`state`, or while it is still the initial one (step 0) the checkpoint `resume` ("latest"
        or a path) names: what a resuming trainer evaluates before it trains."""
        if resume is None or int(state.step) != 0:
            return state
        return self.restore(None if resume == "latest" else resume, abstract(state))[0]

    def restore(self, path: str | None, target):
        """(state, host state) of the latest checkpoint here (`path` None) or of `path`; read-only
        when the run is not open (a resumed trainer's `evaluate` before `train`)."""
        if path is None and self.checkpointer is not None:
            directory, step, ckpt = self.path / "checkpoints", None, self.checkpointer
        else:
            directory, step = find_checkpoint_dir(path or self.path)
            ckpt = Checkpointer(directory, keep=self.config.train.keep_checkpoints, async_save=False, read_only=True)
        want = self.fingerprint

        def check(host):
            got = host.get("fingerprint", {})
            for k in want:
                if json.dumps(got.get(k), sort_keys=True) != json.dumps(want[k], sort_keys=True):
                    raise ConfigError(f"checkpoint in {directory} was made with a different model "
                                      f"({first_difference(k, got.get(k), want[k])}); refusing to resume")

        try:
            return ckpt.restore(step, target, check_host=check)
        finally:
            if ckpt is not self.checkpointer:
                ckpt.close()

    def close(self):
        """Finish pending checkpoint writes, close the logs and release the folder's lock."""
        try:
            if self.checkpointer is not None:
                self.checkpointer.close()
            if self.logger is not None:
                self.logger.close()
        finally:
            self.lock.release()
            # closed: `log` goes to the console again and an `evaluate` after `train` writes nothing
            self.checkpointer = self.logger = None


def abstract(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def first_difference(key: str, got, want) -> str:
    """'policy_arch.hidden_size: checkpoint 64 vs config 128' for the first field that differs."""
    if isinstance(got, dict) and isinstance(want, dict):
        for k in sorted(set(got) | set(want)):
            if json.dumps(got.get(k), sort_keys=True) != json.dumps(want.get(k), sort_keys=True):
                return first_difference(f"{key}.{k}", got.get(k), want.get(k))
    return f"{key}: checkpoint {got!r} vs config {want!r}"


class StopSignals:
    """SIGINT/SIGTERM recorded instead of raised while installed (the run checkpoints at the next
    safe point and returns); `received` is the first signal's number, or None. A second signal
    aborts at once (KeyboardInterrupt: the last complete checkpoint stays)."""

    def __init__(self):
        self.received: int | None = None
        self.previous: dict = {}

    def install(self):
        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.received is None:
                self.received = signum
                # os.write: a handler may interrupt a print or a log write on this very thread
                say(f"received {name}: saving a checkpoint at the next safe point (send it again to abort at once)")
                return
            self.restore()
            say(f"received {name} again: aborting at once (the last complete checkpoint stays)")
            raise KeyboardInterrupt(f"second signal ({name})")

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, handler)
            except ValueError:          # not the main thread
                pass

    def restore(self):
        for sig, h in self.previous.items():
            signal.signal(sig, h)
        self.previous = {}


def say(message: str) -> None:
    """One line to stderr straight from a signal handler (no Python-level buffer to re-enter)."""
    try:
        os.write(2, (message + "\n").encode())
    except OSError:
        pass
