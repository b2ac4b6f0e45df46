"""PPOTrainer: the host loop around the compiled PPO programs.

    trainer = PPOTrainer(config)                    # loads models, builds optimisers and programs
    summary = trainer.train(train_dataset, eval_dataset)

A trainer holds named parts, each built from explicit arguments in `__init__`: `models`
(`load_models`), `programs` (`engine.programs.make_programs`) and the sharded `state`, the
reward functions (`rewards`), the `evaluator` and the run directory (`run_dir`: checkpoints,
logs). Per iteration the host feeds one prompt batch, runs the reward functions on decoded text
(if any), and pulls one set of scalars (`jax.device_get`) for the logger, the progress bar, the
non-finite bookkeeping, early stopping and checkpoints. Everything else is device code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
import warnings
from collections.abc import Callable, Sequence

import jax

from jaxppo import runtime
from jaxppo.config import PPOConfig, check_devices
from jaxppo.data import tasks
from jaxppo.data.prompts import PromptIterator, pad_prompts, run_datasets, tokenize_prompts
from jaxppo.engine import programs as iteration
from jaxppo.engine.mesh import shard_batch, shard_tree, to_host
from jaxppo.engine.optimizer import make_optimizer
from jaxppo.engine.placement import Placement
from jaxppo.engine.programs import Optimizers, make_programs
from jaxppo.engine.shaping import StepSettings
from jaxppo.engine.state import init_train_state
from jaxppo.errors import ConfigError, DataError, JaxppoError
from jaxppo.run.collect import RunProgress, collect_batch
from jaxppo.run.early_stopping import EarlyStopping
from jaxppo.run.evaluation import Evaluator, format_metrics
from jaxppo.run.logger import progress_bar
from jaxppo.run.models import describe_models, export_policy, load_models
from jaxppo.run.rundir import RunDir, StopSignals, abstract, fingerprint


class NonFiniteError(JaxppoError):
    """Too many consecutive updates with non-finite losses or gradients."""


class PPOTrainer:
    """PPO for a causal LM with a separate critic, a frozen reference and reward model/functions."""

    def __init__(self, config: PPOConfig | None = None, resume_from_checkpoint: str | None = None, *,
                 reward_functions: Sequence[Callable] | None = None, overwrite: bool = False):
        """`resume_from_checkpoint`: "latest" or a checkpoint path; `overwrite`: see `RunDir`."""
        self.config = c = config or PPOConfig()
        runtime.configure(deterministic=c.train.deterministic)   # before anything starts JAX's backends
        if os.environ.get("JAXPPO_DISTRIBUTED") == "1":
            runtime.initialize_distributed()  # coordinator/process ids from the environment (SLURM, TPU, ...)
        self.resume_from = resume_from_checkpoint
        # bad input that needs no model: fail before loading (and, on accelerators, sharding) anything
        check_devices(c, jax.device_count(), jax.devices()[0].platform, jax.process_count())
        m, init = load_models(c)
        self.models = m
        self.run_dir = RunDir(c, fingerprint(c, m.policy_config, m.critic_config, m.policy_path if m.lora else None,
                                             m.critic_path if m.graphs.critic_lora else None), overwrite=overwrite)
        self.rewards = tasks.RewardScorer(tasks.reward_functions(c.reward, reward_functions), m.tokenizer, c.reward,
                                          log=self.run_dir.log)
        if not self.rewards.fns and init.frozen.reward_model is None:
            raise ConfigError("no reward source: set reward.task, reward.functions or model.reward_model")
        settings = StepSettings.from_config(c, m.eos_ids, m.pad_id)
        steps, total = settings.update.steps_per_iteration, c.train.total_steps * settings.update.steps_per_iteration
        ptx, psched = make_optimizer(c.optim, total, updates_per_iteration=steps)
        ctx, csched = (None, None) if c.algo.critic_free else \
            make_optimizer(c.optim, total, lr=c.optim.critic_lr or c.optim.lr, updates_per_iteration=steps)
        # the policy's mesh and the critic's (the same one unless train.placement separates them):
        # batch over (data, fsdp), params/opt state FSDP-sharded
        self.placement = p = Placement.from_config(c)
        state = init_train_state(init.policy, init.critic, (ptx, ctx), c.train.seed, c.ppo.kl_coef)
        on_critic = ("critic", "critic_opt")
        self.state = state.replace(**{f.name: shard_tree(getattr(state, f.name), p.critic_mesh
                                                         if f.name in on_critic else p.policy_mesh)
                                      for f in dataclasses.fields(state)})
        critic_base = init.frozen.critic_base          # a LoRA critic's backbone lives with the critic
        self.frozen = shard_tree(init.frozen.replace(critic_base=None), p.policy_mesh).replace(
            critic_base=None if critic_base is None else shard_tree(critic_base, p.critic_mesh))
        del init            # the sharded copies above are the run's; the loaded ones may go
        self.programs = make_programs(
            settings, m.graphs, Optimizers(ptx, psched, ctx, csched), p,
            policy_shardings=p.pinned_shardings(self.state.policy, self.state.policy_opt, critic=False),
            critic_shardings=None if self.state.critic is None else
            p.pinned_shardings(self.state.critic, self.state.critic_opt, critic=True),
            lora_dropout=m.lora is not None and m.lora.dropout > 0)
        self.warnings_seen: set[str] = set()
        self.evaluator = Evaluator(
            evaluate=self.programs.evaluate, frozen=self.frozen, mesh=p.policy_mesh,
            encode=lambda prompts: self.tokenize(prompts, source=c.data.eval_prompts), score=self.rewards,
            decode=lambda ids: m.tokenizer.decode(ids, skip_special_tokens=True), eos_ids=m.eos_ids,
            pad_id=m.pad_id, seed=c.train.seed, batch_size=c.train.eval_batch_size,
            train_batch_size=c.train.batch_size, forward_batch_size=c.rollout.forward_batch_size,
            num_samples=c.train.num_samples_logged)
        self.early_stopping = EarlyStopping(c.early_stopping)
        self.signals = StopSignals()
        self.nonfinite_streak = 0
        self.history: list[dict] = []

    @property
    def tokenizer(self):
        return self.models.tokenizer

    # ------------------------------------------------------------------ public API
    def evaluate(self, eval_dataset, step: int | None = None, *, log: bool = True) -> dict:
        """Sample on held-out prompts under fixed keys; mean score, KL, length and EOS rate: logged
        (`log`) during `train`, only returned before or after it. Its own program (sampling + the
        reference and reward-model forwards, no critic), compiled once for one batch size: by default
        every eval prompt in one batch (up to 4 x train.batch_size), a single dispatch. During `train`
        it runs in a background thread while the next step trains (`train.async_eval`)."""
        self.state = self.run_dir.resumed_state(self.resume_from, self.state)   # untrained: the checkpoint's
        step = int(self.state.step) if step is None else step
        return self.evaluator.evaluate(eval_dataset, self.state.policy, step,
                                       self.run_dir.logger if log else None)

    def check_early_stopping(self, value: float) -> bool:
        """Feed the monitored metric; True when it has not improved for `patience` checks."""
        return self.early_stopping.check(value)

    def export(self, path, adapter_path=None) -> str:
        """Write the current policy as an HF folder (config.json, model.safetensors, tokenizer); with
        LoRA the adapters merged into the base weights, and, given `adapter_path`, the adapters alone
        in PEFT's format there too."""
        # every process takes part in gathering FSDP shards held by other processes; process 0 writes
        policy, base = self.state.policy, self.models.graphs.policy_base(self.frozen)
        if jax.process_count() > 1:
            policy, base = to_host((policy, base))
        if runtime.is_primary():
            export_policy(self.models, policy, base, path, adapter_path)
        return str(path)

    def tokenize(self, prompts: list[str], source: str | Sequence[str] | None = None):
        """Token ids and mask of `prompts`; `source` (a file name or one 'file:line' per prompt) names the
        culprit of a DataError. The truncation warning goes to the console and train.log, once."""
        d = self.config.data
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = tokenize_prompts(prompts, self.tokenizer, d.max_prompt_length, truncation=d.truncation,
                                   use_chat_template=d.use_chat_template, source=source)
        for w in caught:
            if str(w.message) not in self.warnings_seen:
                self.warnings_seen.add(str(w.message))
                self.run_dir.log(f"warning: {w.message}")
        return out

    # ------------------------------------------------------------------ the loop
    def train(self, train_dataset=None, eval_dataset=None) -> dict:
        """Run to train.total_steps, early stopping or a signal (SIGINT/SIGTERM at any phase: checkpoint
        and return; a second one aborts at once); evaluate, checkpoint, export and plot at the end. A
        caught error first checkpoints the last completed step. Returns the summary."""
        c = self.config
        # bad input (prompts, context length, resume target, run dir) fails here, before the run
        # directory is touched and before anything is compiled
        run = self.prepare_data(train_dataset, eval_dataset)
        start = self.open_run(run)
        self.signals.install()
        bar = progress_bar(c, start) if runtime.is_primary() else None
        run.t_start = time.perf_counter()
        position = run.iterator.state_dict()      # the prompt position that goes with self.state
        try:
            if run.eval_prompts:   # compile the evaluation program now, not in the middle of the run
                jax.block_until_ready(self.evaluator.dispatch(run.eval_prompts, self.state.policy))
            for step in range(start, c.train.total_steps):
                metrics = self.train_step(run, step)
                position = run.iterator.state_dict()
                self.record(run, step + 1, metrics, bar)
                if self.after_step(run, step + 1, metrics) or self.signals.received is not None:
                    break
            if run.eval_job is not None:          # stopped early: the last evaluation is still logged
                run.eval_metrics, run.eval_job = self.evaluator.join(run.eval_job, run.eval_prompts,
                                                                     self.run_dir.logger), None
            if bar is not None:
                bar.close()
            return self.finish(run)
        except BaseException as e:
            if run.eval_job is not None:
                run.eval_job.abandon()
            # not a non-finite state (NonFiniteError included): the last good checkpoint stays the latest
            self.run_dir.save_before_exit(self.state, self.host_state(position), e, savable=not self.nonfinite_streak)
            self.run_dir.close()                  # finish pending writes, close the files, release the lock
            raise
        finally:
            if bar is not None:
                bar.close()
            self.signals.restore()

    def prepare_data(self, train_dataset, eval_dataset) -> RunProgress:
        """Datasets, token ids padded to one prompt length, and the context-length check."""
        c = self.config
        train_ds, eval_ds = run_datasets(c, train_dataset, eval_dataset, columns=c.data.columns)
        if len(train_ds) == 0:
            raise DataError("the training dataset is empty")
        train_prompts, eval_prompts = list(train_ds), eval_ds          # eval: the dataset, with its columns
        self.rewards.sources = train_ds.source_map()                   # reward errors name file:line
        train_ids, train_mask = self.tokenize(train_prompts, source=train_ds.sources or c.data.prompts)
        prompt_len = train_ids.shape[1]
        if eval_prompts:
            eval_ids, _ = self.tokenize(eval_ds.prompts, source=eval_ds.sources or c.data.eval_prompts)
            prompt_len = max(prompt_len, eval_ids.shape[1])
        self.evaluator.prompt_len = prompt_len    # eval prompts pad to the train prompts' length
        train_ids, train_mask = pad_prompts(train_ids, train_mask, prompt_len, self.models.pad_id)
        max_ctx = self.models.policy_config.max_position_embeddings
        if prompt_len + c.rollout.max_new_tokens > max_ctx:
            raise ConfigError(f"the longest prompt ({prompt_len} tokens, data.max_prompt_length="
                              f"{c.data.max_prompt_length}) + rollout.max_new_tokens={c.rollout.max_new_tokens} "
                              f"= {prompt_len + c.rollout.max_new_tokens} tokens exceed the context of "
                              f"{self.models.policy_path} (max_position_embeddings={max_ctx})",
                              keys=("rollout.max_new_tokens", "data.max_prompt_length"))
        iterator = PromptIterator(len(train_prompts), c.train.batch_size, c.train.seed, shuffle=c.data.shuffle)
        return RunProgress(train_ds, train_prompts, eval_prompts, train_ids, train_mask, iterator, prompt_len)

    def open_run(self, run: RunProgress) -> int:
        """Open the run directory (restoring a resumed checkpoint) -> the first step."""
        def resume(state, host):          # before config.yaml and the logs are written
            run.iterator.load_state_dict(host["iterator"])
            self.early_stopping.load_state_dict(host.get("early_stopping", {}))
            self.nonfinite_streak = int(host.get("nonfinite_streak", 0))
            run.final_eval = host.get("final_eval")
            self.state = state

        self.run_dir.open(self.resume_from, abstract(self.state), resume)
        start = int(self.state.step) if self.resume_from is not None else 0
        self.run_dir.log(f"{describe_models(self.models, self.state, self.frozen)}; {len(run.train_prompts)} train / "
                         f"{len(run.eval_prompts)} eval prompts, prompt length {run.prompt_len}; "
                         f"run dir {self.run_dir.path}")
        return start

    def host_state(self, position: dict, **extra) -> dict:
        """A checkpoint's host side: the prompt iterator's `position`, early stopping, the non-finite streak."""
        return {"iterator": position, "early_stopping": self.early_stopping.state_dict(),
                "nonfinite_streak": self.nonfinite_streak, **extra}

    def train_step(self, run: RunProgress, step: int) -> dict:
        """One PPO iteration (rollout, reward functions, update) -> its metrics as floats."""
        c, mesh = self.config, self.placement.policy_mesh
        t0 = time.perf_counter()
        exp, fn_scores, sampling = collect_batch(
            self.programs, self.state, self.frozen, mesh, self.rewards, lambda: run.next_batch(),
            c.rollout.num_generations, c.algo.filter_groups, c.algo.max_sample_rounds)
        jax.block_until_ready(exp.tokens)
        t1 = time.perf_counter()
        self.state, metrics = iteration.update(self.programs, self.state, exp, shard_batch(fn_scores, mesh),
                                               frozen=self.frozen)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).as_dict().items()}   # the one sync
        t2 = time.perf_counter()
        rows = c.rollout_batch_size
        metrics.update({**sampling, "time/rollout": t1 - t0, "time/update": t2 - t1, "time/iteration": t2 - t0,
                        "tokens_per_sec": rows * c.rollout.max_new_tokens / (t2 - t0),
                        "episodes": float((step + 1) * rows),
                        **{f"time/reward/{k}": v for k, v in self.rewards.last_timings.items()}})
        return metrics

    def record(self, run: RunProgress, done: int, metrics: dict, bar) -> None:
        """History, metrics log, progress bar, and the non-finite streak (NonFiniteError at its limit)."""
        c = self.config
        nonfinite = metrics["nonfinite"] > 0
        self.nonfinite_streak = self.nonfinite_streak + 1 if nonfinite else 0
        metrics["nonfinite_streak"] = float(self.nonfinite_streak)
        if run.first_scores is None:
            run.first_scores = metrics["objective/scores"]
        run.last_metrics = metrics
        self.history.append({"step": done, **metrics})
        if nonfinite or done % c.train.log_every == 0 or done == c.train.total_steps:
            self.run_dir.logger.log_metrics(metrics, step=done, split="train")
        if nonfinite:
            self.run_dir.log(f"warning: step {done}: non-finite loss or gradients; "
                             f"{metrics['nonfinite_steps']:.0f} of {self.programs.steps_per_iteration} "
                             f"optimizer steps skipped "
                             f"({self.nonfinite_streak} in a row, limit {c.train.max_nonfinite_steps})")
            if self.nonfinite_streak >= c.train.max_nonfinite_steps:
                raise NonFiniteError(f"{self.nonfinite_streak} consecutive non-finite updates at step {done}; "
                                     f"stopping with the last good checkpoint intact in "
                                     f"{self.run_dir.path / 'checkpoints'}")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")

    def after_step(self, run: RunProgress, done: int, metrics: dict) -> bool:
        """Evaluation (joined one step later when it runs in the background), early stopping and
        periodic checkpoints. True when early stopping ends the run."""
        c, logger = self.config, self.run_dir.logger
        if run.eval_job is not None:          # the evaluation started one step ago
            run.eval_metrics, run.eval_job = self.evaluator.join(run.eval_job, run.eval_prompts, logger), None
        if c.train.eval_every and done % c.train.eval_every == 0 and run.eval_prompts and done < c.train.total_steps:
            # an evaluation overlaps the next step unless early stopping must see its result at once, or
            # several processes run (they must dispatch their collectives in one order)
            overlap = c.train.async_eval and jax.process_count() == 1
            if overlap and not str(c.early_stopping.metric or "").startswith("eval/"):
                run.eval_job = self.evaluator.start(run.eval_prompts, self.state.policy, done)
            else:
                run.eval_metrics = self.evaluator.evaluate(run.eval_prompts, self.state.policy, done, logger)
                self.run_dir.log(format_metrics("eval", done, run.eval_metrics))
        es_value = self.early_stopping.value(metrics, run.eval_metrics, done, c.train.eval_every)
        if es_value is not None and self.early_stopping.check(es_value):
            run.stop_reason = self.early_stopping.reason
        # a step that skipped optimizer steps is not saved: the last good checkpoint stays the latest
        if self.run_dir.save_due(done) and not metrics["nonfinite"] > 0:
            self.run_dir.save(self.state, self.host_state(run.iterator.state_dict()),
                              {**metrics, **{f"eval/{k}": v for k, v in run.eval_metrics.items()}})
        return run.stop_reason is not None

    def finish(self, run: RunProgress) -> dict:
        """After the loop: the final evaluation, checkpoint, exported model, plots and the summary. A signal
        before the export saves a checkpoint (with the final evaluation, not repeated on resume) and returns."""
        step = int(self.state.step)
        if run.stop_reason:
            self.run_dir.log(run.stop_reason)
        final = run.final_eval if run.final_eval and run.final_eval["step"] == step else None
        if final is not None:                     # resumed after its final evaluation: logged already
            run.eval_metrics = final["metrics"]
        elif run.eval_prompts and self.signals.received is None:
            run.eval_metrics = self.evaluator.evaluate(run.eval_prompts, self.state.policy, step, self.run_dir.logger)
            self.run_dir.log(format_metrics("eval", step, run.eval_metrics))
            final = {"step": step, "metrics": run.eval_metrics}
        metrics = None if self.signals.received is not None and final is None else \
            {**run.last_metrics, **{f"eval/{k}": v for k, v in run.eval_metrics.items()}}
        self.run_dir.save(self.state, self.host_state(run.iterator.state_dict(), final_eval=final), metrics, force=True)
        self.run_dir.checkpointer.wait()
        if self.signals.received is not None:
            run.stop_reason = f"received signal {signal.Signals(self.signals.received).name}"
            self.run_dir.log(f"{run.stop_reason}: saved checkpoint at step {step}; resume with --resume")
            self.run_dir.close()
            return {"stopped": run.stop_reason, "step": step}
        self.export(self.run_dir.path / "final_model",
                    self.run_dir.path / "final_adapter" if self.models.lora is not None else None)
        try:
            from jaxppo.run.plots import plot_run
            plot_run(self.run_dir.path) if runtime.is_primary() else None
        except Exception as e:  # noqa: BLE001 - plots never cost a finished run
            self.run_dir.log(f"warning: plotting failed: {type(e).__name__}: {e}")
        summary = {
            "steps": step,
            "first/objective/scores": run.first_scores,
            "last/objective/scores": run.last_metrics.get("objective/scores"),
            "last/objective/kl": run.last_metrics.get("objective/kl"),
            "eval": run.eval_metrics,
            "stopped": run.stop_reason,
            "wall_sec": time.perf_counter() - run.t_start,
            "run_dir": str(self.run_dir.path),
        }
        self.run_dir.log("summary: " + json.dumps(summary, default=str))
        self.run_dir.close()
        return summary
