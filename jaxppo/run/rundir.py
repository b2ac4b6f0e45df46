"""The run directory: opening it (and resuming), its checkpoints and logs, and stop signals.

`RunDir.open` creates the folder, the checkpointer (restoring a resumed checkpoint, refusing one
of another model), the logger and config.yaml; `save` writes a checkpoint of the TrainState and
the host state (prompt iterator, early stopping, non-finite streak, the models' fingerprint).
`StopSignals` turns SIGINT/SIGTERM into "checkpoint and return".
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from pathlib import Path

import jax

from jaxppo.config import PPOConfig, config_to_dict, save_config
from jaxppo.errors import ConfigError
from jaxppo.run.checkpoint import Checkpointer, find_checkpoint_dir
from jaxppo.run.logger import TrainingLogger


def fingerprint(cfg: PPOConfig, policy_cfg, critic_cfg) -> dict:
    """What a checkpoint must agree on with the config that resumes it."""
    return {"policy": cfg.model.policy, "policy_arch": dataclasses.asdict(policy_cfg),
            "critic_arch": None if critic_cfg is None else dataclasses.asdict(critic_cfg), "reward_model": cfg.model.reward_model,
            "critic_init": cfg.model.critic_init, "critic": cfg.model.critic}


class RunDir:
    """`config.train.output_dir` of one run: its checkpointer and logger once `open`."""

    def __init__(self, config: PPOConfig, fingerprint: dict):
        self.config = config
        self.path = Path(config.train.output_dir)
        self.fingerprint = fingerprint
        self.checkpointer: Checkpointer | None = None
        self.logger: TrainingLogger | None = None

    def log(self, message: str):
        """To train.log and the console once open; to the console before."""
        if self.logger is not None:
            self.logger.log(message)
        else:
            print(message, flush=True)

    def open(self, resume: str | None, target, on_restore=None):
        """Create the folder, the checkpointer and (after restoring `resume`: "latest" or a
        checkpoint path, into the abstract `target` state, and handing the state and host state to
        `on_restore(state, host)`) the logger and config.yaml. Nothing is written when the restore
        or `on_restore` fails."""
        c = self.config
        if resume is not None:   # a missing checkpoint is reported before the run dir is written to
            find_checkpoint_dir(self.path / "checkpoints" if resume == "latest" else resume)
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"train.output_dir={str(self.path)!r} is a file, not a directory",
                              keys=("train.output_dir",))
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"train.output_dir={str(self.path)!r}: cannot create the run directory "
                              f"({e.strerror or e})", keys=("train.output_dir",)) from None
        self.checkpointer = Checkpointer(self.path / "checkpoints", keep=c.train.keep_checkpoints,
                                         best_metric=c.early_stopping.metric, best_mode=c.early_stopping.mode)
        state = host = None
        try:
            # restore (and refuse a checkpoint of another model) before config.yaml and the logs are written
            if resume is not None:
                state, host = self.restore(None if resume == "latest" else resume, target)
                if on_restore is not None:
                    on_restore(state, host)
            self.logger = TrainingLogger(self.path, tensorboard=c.logging.tensorboard, wandb=c.logging.wandb,
                                         wandb_project=c.logging.wandb_project, wandb_mode=c.logging.wandb_mode,
                                         config=config_to_dict(c))
        except BaseException:
            self.checkpointer.close()
            raise
        save_config(c, self.path / "config.yaml")
        if state is not None:
            self.logger.truncate_after(int(state.step))
            self.log(f"resumed from step {int(state.step)}")

    def save(self, state, host: dict, metrics: dict | None = None, force: bool = False):
        """A checkpoint of `state` and `host` (+ the fingerprint); the early-stopping metric, if any,
        is recorded with it for the best checkpoint."""
        if self.checkpointer is None:
            return
        es_metric = self.config.early_stopping.metric
        ck_metrics = None
        if es_metric and metrics and es_metric in metrics and metrics[es_metric] is not None:
            ck_metrics = {es_metric: float(metrics[es_metric])}
        self.checkpointer.save(int(state.step), state, {**host, "fingerprint": self.fingerprint}, ck_metrics,
                               force=force)

    def restore(self, path: str | None, target):
        """(state, host state) of the latest checkpoint here (`path` None) or of `path`."""
        if path is None:
            directory, step, ckpt = self.path / "checkpoints", None, self.checkpointer
        else:
            directory, step = find_checkpoint_dir(path)
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
        """Finish pending checkpoint writes and close the logs."""
        if self.checkpointer is not None:
            self.checkpointer.close()
        if self.logger is not None:
            self.logger.close()


def abstract(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def param_count(params) -> int:
    """Elements in a pytree of arrays (the log's parameter counts)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def first_difference(key: str, got, want) -> str:
    """'policy_arch.hidden_size: checkpoint 64 vs config 128' for the first field that differs."""
    if isinstance(got, dict) and isinstance(want, dict):
        for k in sorted(set(got) | set(want)):
            if json.dumps(got.get(k), sort_keys=True) != json.dumps(want.get(k), sort_keys=True):
                return first_difference(f"{key}.{k}", got.get(k), want.get(k))
    return f"{key}: checkpoint {got!r} vs config {want!r}"


class StopSignals:
    """SIGINT/SIGTERM recorded instead of raised while installed (the loop checkpoints and
    returns); `received` is the last signal number, or None."""

    def __init__(self):
        self.received: int | None = None
        self.previous: dict = {}

    def install(self):
        def handler(signum, frame):
            self.received = signum
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, handler)
            except ValueError:          # not the main thread
                pass

    def restore(self):
        for sig, h in self.previous.items():
            signal.signal(sig, h)
        self.previous = {}
