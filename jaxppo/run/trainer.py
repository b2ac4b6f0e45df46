"""PPOTrainer: the host loop around the compiled PPO programs.

    trainer = PPOTrainer(config)                    # loads models, builds optimisers and programs
    summary = trainer.train(train_dataset, eval_dataset)

Per iteration the host feeds one prompt batch, runs the reward functions on decoded text (if
any), and pulls one dict of scalars (`jax.device_get`) for the logger, the progress bar, the
KL/non-finite bookkeeping, early stopping and checkpoints. Everything else is device code in
`step.PPOPrograms`. PPOTrainer's set-up (`build`), evaluation (`evaluation`) and run directory
with its checkpoints and signals (`rundir`) are mixins in modules of their own; names re-exported
here (`tiny_model_dir`, `EVAL_KEY_SALT`) are looked up where they are defined.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxppo.data import tasks
from jaxppo.run.build import BuildMixin, tiny_model_dir  # noqa: F401 (tiny_model_dir: public here too)
from jaxppo.run.checkpoint import Checkpointer
from jaxppo.config import PPOConfig
from jaxppo.data.prompts import PromptIterator, pad_prompts, tokenize_prompts
from jaxppo.errors import ConfigError, JaxppoError, RewardError  # noqa: F401 (RewardError: public here too)
from jaxppo.run.evaluation import EVAL_KEY_SALT, EvalJob, EvaluationMixin, format_metrics  # noqa: F401 (EVAL_KEY_SALT)
from jaxppo.run.logger import TrainingLogger
from jaxppo.models import hf
from jaxppo.run.rundir import RunDirMixin
from jaxppo.runtime import enable_compilation_cache, use_deterministic_ops
from jaxppo.engine.mesh import shard_batch


class NonFiniteError(JaxppoError):
    """Too many consecutive updates with non-finite losses or gradients."""


class PPOTrainer(BuildMixin, EvaluationMixin, RunDirMixin):
    """PPO for a causal LM with a separate critic, a frozen reference and reward model/functions."""

    def __init__(self, config: PPOConfig | None = None, resume_from_checkpoint: str | None = None, *,
                 reward_functions: Sequence[Callable] | None = None):
        self.config = config = config or PPOConfig()
        if config.train.deterministic:
            use_deterministic_ops()           # before anything starts JAX's backends
        if os.environ.get("JAXPPO_DISTRIBUTED") == "1" and not jax.distributed.is_initialized():
            jax.distributed.initialize()      # coordinator/process ids from the environment (SLURM, TPU, ...)
        enable_compilation_cache()
        self.run_dir = Path(config.train.output_dir)
        self.resume_from = resume_from_checkpoint
        self._load_models()
        self._reward_fns = self._build_reward_functions(reward_functions)
        if not self._reward_fns and self.reward_model is None:
            raise ConfigError("no reward source: set reward.task, reward.functions or model.reward_model")
        self._build_programs()
        self.logger: TrainingLogger | None = None
        self.checkpointer: Checkpointer | None = None
        self.early_stopping_state = {"best": None, "bad_count": 0, "stopped": False, "reason": None}
        self._nonfinite_streak = 0
        self._stop_signal: int | None = None
        self.history: list[dict] = []

    # ------------------------------------------------------------------ data
    def _tokenize(self, prompts: list[str], source: str | Sequence[str] | None = None):
        """Token ids and mask of `prompts`; `source` (a file name or one 'file:line' per prompt) names the
        culprit of a DataError. The truncation warning goes to the console and train.log, once."""
        import warnings

        d = self.config.data
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = tokenize_prompts(prompts, self.tokenizer, d.max_prompt_length, truncation=d.truncation,
                                   use_chat_template=d.use_chat_template, source=source)
        seen = self.__dict__.setdefault("_tokenize_warnings", set())
        for w in caught:
            if str(w.message) not in seen:
                seen.add(str(w.message))
                self._log(f"warning: {w.message}")
        return out

    # ------------------------------------------------------------------ rewards
    def _function_scores(self, prompts: list[str], exp) -> np.ndarray:
        """Weighted sum of the reward functions' scores on the decoded responses: float32 [B]
        (`tasks.score_responses`: rows at fault are found, named, and raised or penalised)."""
        if not self._reward_fns:
            return np.zeros(len(prompts), np.float32)
        response, mask = jax.device_get((exp.response, exp.mask))
        texts = [self.tokenizer.decode(r[m > 0], skip_special_tokens=True) for r, m in zip(response, mask)]
        r = self.config.reward
        return tasks.score_responses(self._reward_fns, prompts, texts, on_error=r.on_error,
                                     error_penalty=r.error_penalty, log=self._log,
                                     sources=getattr(self, "_prompt_sources", {}))

    # ------------------------------------------------------------------ logging helpers
    def _log(self, message: str):
        if self.logger is not None:
            self.logger.log(message)
        else:
            print(message, flush=True)

    # ------------------------------------------------------------------ early stopping
    def check_early_stopping(self, value: float) -> bool:
        """Feed the monitored metric; True when it has not improved for `patience` checks."""
        es = self.config.early_stopping
        st = self.early_stopping_state
        if es.metric is None or value is None or not math.isfinite(value):
            return False
        best = st["best"]
        improved = best is None or (value > best + es.min_delta if es.mode == "max" else value < best - es.min_delta)
        if improved:
            st["best"], st["bad_count"] = float(value), 0
        else:
            st["bad_count"] += 1
        if st["bad_count"] >= es.patience:
            st["stopped"] = True
            st["reason"] = (f"early stopping: {es.metric} has not improved on {st['best']:.6g} "
                            f"(mode {es.mode}, min_delta {es.min_delta}) for {st['bad_count']} checks")
            return True
        return False

    # ------------------------------------------------------------------ the loop
    def train(self, train_dataset=None, eval_dataset=None) -> dict:
        """Run from the current step to train.total_steps, early stopping or a signal (SIGINT/SIGTERM:
        checkpoint and return); evaluate, checkpoint, export and plot at the end. Returns the summary."""
        c = self.config
        # bad input (prompts, context length, resume target, run dir) fails here, before the run
        # directory is touched and before anything is compiled
        run = self._prepare_data(train_dataset, eval_dataset)
        start = self._open_run(run)
        previous_handlers = self._install_signal_handlers()
        bar = _progress(c, start)
        run.t_start = time.perf_counter()
        if run.eval_prompts:   # compile the evaluation program now, not in the middle of the run
            jax.block_until_ready(self._eval_dispatch(run.eval_prompts, self.state.policy))
        try:
            for step in range(start, c.train.total_steps):
                metrics = self._train_step(run, step)
                self._record(run, step + 1, metrics, bar)
                if self._after_step(run, step + 1, metrics) or self._stop_signal is not None:
                    break
            if run.eval_job is not None:          # stopped early: the last evaluation is still logged
                run.eval_metrics, run.eval_job = self._eval_join(run.eval_job, run.eval_prompts), None
        except BaseException:
            # the last complete checkpoint stays intact; finish pending writes and close the files
            if run.eval_job is not None:
                run.eval_job.abandon()
            self.checkpointer.close()
            self.logger.close()
            raise
        finally:
            if bar is not None:
                bar.close()
            for sig, h in previous_handlers.items():
                signal.signal(sig, h)
        return self._finish(run)

    def _prepare_data(self, train_dataset, eval_dataset) -> _Run:
        """Datasets, token ids padded to one prompt length, and the context-length check."""
        c = self.config
        train_ds, eval_ds = self._datasets(train_dataset, eval_dataset)
        if len(train_ds) == 0:
            from jaxppo.errors import DataError
            raise DataError("the training dataset is empty")
        train_prompts, eval_prompts = list(train_ds), list(eval_ds)
        self._prompt_sources = dict(zip(train_prompts, train_ds.sources or ()))  # reward errors name file:line
        train_ids, train_mask = self._tokenize(train_prompts, source=train_ds.sources or c.data.prompts)
        prompt_len = train_ids.shape[1]
        if eval_prompts:
            eval_ids, _ = self._tokenize(eval_prompts, source=eval_ds.sources or c.data.eval_prompts)
            prompt_len = max(prompt_len, eval_ids.shape[1])
        self._prompt_len = prompt_len
        train_ids, train_mask = pad_prompts(train_ids, train_mask, prompt_len, self.pad_id)
        max_ctx = self.policy_config.max_position_embeddings
        if prompt_len + c.rollout.max_new_tokens > max_ctx:
            raise ConfigError(f"the longest prompt ({prompt_len} tokens, data.max_prompt_length="
                              f"{c.data.max_prompt_length}) + rollout.max_new_tokens={c.rollout.max_new_tokens} "
                              f"= {prompt_len + c.rollout.max_new_tokens} tokens exceed the context of "
                              f"{self.policy_path} (max_position_embeddings={max_ctx})",
                              keys=("rollout.max_new_tokens", "data.max_prompt_length"))
        iterator = PromptIterator(len(train_prompts), c.train.batch_size, c.train.seed, shuffle=c.data.shuffle)
        return _Run(train_prompts, eval_prompts, train_ids, train_mask, iterator)

    def _train_step(self, run: _Run, step: int) -> dict:
        """One PPO iteration (rollout, reward functions, update) -> its metrics as floats."""
        c = self.config
        t0 = time.perf_counter()
        idx = next(run.iterator)
        exp = self.programs.rollout(self.state, self.frozen, shard_batch(run.train_ids[idx], self.mesh),
                                    shard_batch(run.train_mask[idx], self.mesh), self.programs.sample_key(self.state))
        fn_scores = self._function_scores([run.train_prompts[i] for i in idx], exp)
        jax.block_until_ready(exp.tokens)
        t1 = time.perf_counter()
        self.state, metrics = self.programs.update(self.state, exp, shard_batch(fn_scores, self.mesh))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}   # the one sync
        t2 = time.perf_counter()
        gen_tokens = c.train.batch_size * c.rollout.max_new_tokens
        metrics.update({"time/rollout": t1 - t0, "time/update": t2 - t1, "time/iteration": t2 - t0,
                        "tokens_per_sec": gen_tokens / (t2 - t0), "episodes": float((step + 1) * c.train.batch_size)})
        return metrics

    def _record(self, run: _Run, done: int, metrics: dict, bar) -> None:
        """History, metrics log, progress bar, and the non-finite streak (NonFiniteError at its limit)."""
        c = self.config
        nonfinite = metrics["nonfinite"] > 0
        self._nonfinite_streak = self._nonfinite_streak + 1 if nonfinite else 0
        metrics["nonfinite_streak"] = float(self._nonfinite_streak)
        if run.first_scores is None:
            run.first_scores = metrics["objective/scores"]
        run.last_metrics = metrics
        self.history.append({"step": done, **metrics})
        if nonfinite or done % c.train.log_every == 0 or done == c.train.total_steps:
            self.logger.log_metrics(metrics, step=done, split="train")
        if nonfinite:
            self._log(f"warning: step {done}: non-finite loss or gradients; "
                      f"{metrics['nonfinite_steps']:.0f} of {self.programs.updates_per_iteration} "
                      f"optimizer steps skipped "
                      f"({self._nonfinite_streak} in a row, limit {c.train.max_nonfinite_steps})")
            if self._nonfinite_streak >= c.train.max_nonfinite_steps:
                raise NonFiniteError(f"{self._nonfinite_streak} consecutive non-finite updates at step {done}; "
                                     f"stopping with the last good checkpoint intact in {self.run_dir / 'checkpoints'}")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")

    def _after_step(self, run: _Run, done: int, metrics: dict) -> bool:
        """Evaluation (joined one step later when it runs in the background), early stopping and
        periodic checkpoints. True when early stopping ends the run."""
        c = self.config
        if run.eval_job is not None:          # the evaluation started one step ago
            run.eval_metrics, run.eval_job = self._eval_join(run.eval_job, run.eval_prompts), None
        if c.train.eval_every and done % c.train.eval_every == 0 and run.eval_prompts and done < c.train.total_steps:
            # an evaluation overlaps the next step unless early stopping must see its result at once
            if c.train.async_eval and not str(c.early_stopping.metric or "").startswith("eval/"):
                run.eval_job = self._eval_start(run.eval_prompts, done)
            else:
                run.eval_metrics = self.evaluate(run.eval_prompts, step=done)
                self._log(format_metrics("eval", done, run.eval_metrics))
        es_value = self._early_stopping_value(metrics, run.eval_metrics, done)
        if es_value is not None and self.check_early_stopping(es_value):
            run.stop_reason = self.early_stopping_state["reason"]
        # a step that skipped optimizer steps is not saved: the last good checkpoint stays the latest
        if c.train.save_every and done % c.train.save_every == 0 and done < c.train.total_steps \
                and not metrics["nonfinite"] > 0:
            self._save_checkpoint(run.iterator, {**metrics, **{f"eval/{k}": v for k, v in run.eval_metrics.items()}})
        return run.stop_reason is not None

    def _finish(self, run: _Run) -> dict:
        """After the loop: a signal saves a checkpoint and returns; otherwise the final evaluation,
        checkpoint, exported model, plots and the summary."""
        if self._stop_signal is not None:
            run.stop_reason = f"received signal {signal.Signals(self._stop_signal).name}"
            self._save_checkpoint(run.iterator, None, force=True)
            self.checkpointer.wait()
            self._log(f"{run.stop_reason}: saved checkpoint at step {int(self.state.step)}; resume with --resume")
            self.logger.close()
            return {"stopped": run.stop_reason, "step": int(self.state.step)}
        if run.stop_reason:
            self._log(run.stop_reason)
        if run.eval_prompts:
            run.eval_metrics = self.evaluate(run.eval_prompts, step=int(self.state.step))
            self._log(format_metrics("eval", int(self.state.step), run.eval_metrics))
        self._save_checkpoint(run.iterator, {**run.last_metrics, **{f"eval/{k}": v for k, v in run.eval_metrics.items()}},
                              force=True)
        self.checkpointer.wait()
        self.export(self.run_dir / "final_model")
        try:
            from jaxppo.run.plots import plot_run
            plot_run(self.run_dir)
        except Exception as e:  # noqa: BLE001 - plots never cost a finished run
            self._log(f"warning: plotting failed: {type(e).__name__}: {e}")
        summary = {
            "steps": int(self.state.step),
            "first/objective/scores": run.first_scores,
            "last/objective/scores": run.last_metrics.get("objective/scores"),
            "last/objective/kl": run.last_metrics.get("objective/kl"),
            "eval": run.eval_metrics,
            "stopped": run.stop_reason,
            "wall_sec": time.perf_counter() - run.t_start,
            "run_dir": str(self.run_dir),
        }
        self._log("summary: " + json.dumps(summary, default=str))
        self.checkpointer.close()
        self.logger.close()
        return summary

    def _early_stopping_value(self, metrics, eval_metrics, step):
        name = self.config.early_stopping.metric
        if name is None:
            return None
        if name.startswith("eval/"):
            fresh = self.config.train.eval_every and step % self.config.train.eval_every == 0
            return eval_metrics.get(name[len("eval/"):]) if fresh else None
        return metrics.get(name)

    # ------------------------------------------------------------------ export
    def export(self, path) -> str:
        """Write the current policy as an HF folder (config.json, model.safetensors, tokenizer)."""
        model = nnx.merge(self._graphs["policy"], self.state.policy)
        hf.save_pretrained(model, self.tokenizer, str(path))
        return str(path)


def _progress(cfg, start):
    if not cfg.logging.progress_bar:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=cfg.train.total_steps, initial=start, desc="ppo", unit="it", dynamic_ncols=True)


@dataclasses.dataclass
class _Run:
    """What one `train` call carries from step to step."""
    train_prompts: list[str]
    eval_prompts: list[str]
    train_ids: np.ndarray          # [N, P] left-padded to the run's prompt length
    train_mask: np.ndarray
    iterator: PromptIterator       # batches of prompt indices; its position is checkpointed
    first_scores: float | None = None
    last_metrics: dict = dataclasses.field(default_factory=dict)
    eval_metrics: dict = dataclasses.field(default_factory=dict)
    stop_reason: str | None = None
    eval_job: EvalJob | None = None
    t_start: float = 0.0
