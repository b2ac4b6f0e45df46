"""The run directory of a PPOTrainer: opening it (and resuming), checkpoints, and signals.

`RunDirMixin` is the part of `PPOTrainer` that opens a run (`_open_run`: run directory,
checkpointer, a resumed checkpoint, logger and config.yaml), writes checkpoints (`_save_checkpoint`:
the TrainState plus the host state - prompt iterator, early stopping, non-finite streak and the
models' fingerprint), restores one (`_load_checkpoint`, refusing a checkpoint of another model),
and turns SIGINT/SIGTERM into "checkpoint and return" (`_install_signal_handlers`).
"""

from __future__ import annotations

import dataclasses
import json
import signal
from typing import TYPE_CHECKING

import jax
import numpy as np

from jaxppo.run.checkpoint import Checkpointer, find_checkpoint_dir
from jaxppo.config import PPOConfig, save_config
from jaxppo.errors import ConfigError
from jaxppo.run.logger import TrainingLogger

if TYPE_CHECKING:
    from jaxppo.run.trainer import _Run


def _fingerprint(cfg: PPOConfig, policy_cfg, critic_cfg) -> dict:
    """What a checkpoint must agree on with the config that resumes it."""
    return {"policy": cfg.model.policy, "policy_arch": dataclasses.asdict(policy_cfg),
            "critic_arch": dataclasses.asdict(critic_cfg), "reward_model": cfg.model.reward_model,
            "critic_init": cfg.model.critic_init, "critic": cfg.model.critic}


class RunDirMixin:
    """Reads the trainer's `config`, `run_dir`, `resume_from`, `policy_path`, `policy_config`,
    `critic_config` (set by `BuildMixin`) and `_prompt_len` (set by `train` before `_open_run`);
    reads and writes `state`, `checkpointer`, `logger`, `early_stopping_state`,
    `_nonfinite_streak` and `_stop_signal`; calls the trainer's `_log`."""

    def _open_run(self, run: _Run) -> int:
        """Run directory, checkpointer (restoring a resumed run), logger and config.yaml -> first step."""
        c, resume = self.config, self.resume_from
        if resume is not None:   # a missing checkpoint is reported before the run dir is written to
            find_checkpoint_dir(self.run_dir / "checkpoints" if resume == "latest" else resume)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"train.output_dir={str(self.run_dir)!r} is a file, not a directory",
                              keys=("train.output_dir",))
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"train.output_dir={str(self.run_dir)!r}: cannot create the run directory "
                              f"({e.strerror or e})", keys=("train.output_dir",)) from None

        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=c.train.keep_checkpoints,
                                         best_metric=c.early_stopping.metric, best_mode=c.early_stopping.mode)
        start = 0
        try:
            # restore (and refuse a checkpoint of another model) before config.yaml and the logs are written
            if resume is not None:
                start = self._load_checkpoint(None if resume == "latest" else resume, run.iterator)
            self.logger = TrainingLogger(self.run_dir, tensorboard=c.logging.tensorboard, wandb=c.logging.wandb,
                                         wandb_project=c.logging.wandb_project, wandb_mode=c.logging.wandb_mode,
                                         config=_config_dict(c))
        except BaseException:
            self.checkpointer.close()
            raise
        save_config(c, self.run_dir / "config.yaml")
        if resume is not None:
            self.logger.truncate_after(start)
            self._log(f"resumed from step {start}")
        self._log(f"policy {self.policy_path} ({_count(self.state.policy) / 1e6:.2f}M params), "
                  f"critic {_count(self.state.critic) / 1e6:.2f}M; {len(run.train_prompts)} train / "
                  f"{len(run.eval_prompts)} eval prompts, prompt length {self._prompt_len}; run dir {self.run_dir}")
        return start

    # ------------------------------------------------------------------ checkpoints
    def _host_state(self, iterator) -> dict:
        return {"iterator": iterator.state_dict(), "early_stopping": dict(self.early_stopping_state),
                "nonfinite_streak": self._nonfinite_streak,
                "fingerprint": _fingerprint(self.config, self.policy_config, self.critic_config)}

    def _save_checkpoint(self, iterator, metrics: dict | None = None, force: bool = False):
        if self.checkpointer is None:
            return
        step = int(self.state.step)
        es_metric = self.config.early_stopping.metric
        ck_metrics = None
        if es_metric and metrics and es_metric in metrics and metrics[es_metric] is not None:
            ck_metrics = {es_metric: float(metrics[es_metric])}
        self.checkpointer.save(step, self.state, self._host_state(iterator), ck_metrics, force=force)

    def _load_checkpoint(self, path: str | None, iterator) -> int:
        """Restore state + host state; returns the step to continue from."""
        if path is None:
            directory, step = self.run_dir / "checkpoints", None
            ckpt = self.checkpointer
        else:
            directory, step = find_checkpoint_dir(path)
            ckpt = Checkpointer(directory, keep=self.config.train.keep_checkpoints, async_save=False, read_only=True)
        want = _fingerprint(self.config, self.policy_config, self.critic_config)

        def check(host):
            got = host.get("fingerprint", {})
            for k in want:
                if json.dumps(got.get(k), sort_keys=True) != json.dumps(want[k], sort_keys=True):
                    raise ConfigError(f"checkpoint in {directory} was made with a different model "
                                      f"({_first_difference(k, got.get(k), want[k])}); refusing to resume")

        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
        state, host = ckpt.restore(step, target, check_host=check)
        self.state = state
        iterator.load_state_dict(host["iterator"])
        self.early_stopping_state.update(host.get("early_stopping", {}))
        self._nonfinite_streak = int(host.get("nonfinite_streak", 0))
        if ckpt is not self.checkpointer:
            ckpt.close()
        return int(state.step)

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self):
        def handler(signum, frame):
            self._stop_signal = signum
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:          # not the main thread
                pass
        return previous


def _first_difference(key: str, got, want) -> str:
    """'policy_arch.hidden_size: checkpoint 64 vs config 128' for the first field that differs."""
    if isinstance(got, dict) and isinstance(want, dict):
        for k in sorted(set(got) | set(want)):
            if json.dumps(got.get(k), sort_keys=True) != json.dumps(want.get(k), sort_keys=True):
                return _first_difference(f"{key}.{k}", got.get(k), want.get(k))
    return f"{key}: checkpoint {got!r} vs config {want!r}"


def _count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _config_dict(cfg):
    from jaxppo.config import config_to_dict
    return config_to_dict(cfg)
