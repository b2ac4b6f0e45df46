"""PPOTrainer: the host loop around the compiled PPO programs.

    trainer = PPOTrainer(config)                    # loads models, builds optimisers and programs
    summary = trainer.train(train_dataset, eval_dataset)

Per iteration the host feeds one prompt batch, runs the reward functions on decoded text (if
any), and pulls one dict of scalars (`jax.device_get`) for the logger, the progress bar, the
KL/non-finite bookkeeping, early stopping and checkpoints. Everything else is device code in
`step.PPOPrograms`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxppo import tasks
from jaxppo.checkpoint import Checkpointer, find_checkpoint_dir
from jaxppo.config import PPOConfig, save_config
from jaxppo.data import PPODataset, PromptIterator, split_prompts, tokenize_prompts
from jaxppo.errors import ConfigError, JaxppoError, RewardError  # noqa: F401 (RewardError: public here too)
from jaxppo.logger import TrainingLogger
from jaxppo.models import hf
from jaxppo.optim import make_optimizer
from jaxppo.rollout import SamplingParams
from jaxppo.runtime import cache_root, enable_compilation_cache, use_deterministic_ops
from jaxppo.sharding import make_mesh, replicated, shard_batch, shard_tree, tree_shardings
from jaxppo.step import Frozen, PPOPrograms, StepSettings, init_train_state
from jaxppo.update import UpdateSettings


class NonFiniteError(JaxppoError):
    """Too many consecutive updates with non-finite losses or gradients."""


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
EVAL_KEY_SALT = 0x5EED  # eval draws from fold_in(PRNGKey(seed), salt): the same keys at every eval


def tiny_model_dir(arch: str, seed: int = 0, reward_model: bool = False) -> str:
    """A cached tiny checkpoint (made once per arch/seed; the demo's default policy)."""
    from jaxppo.models.tiny import make_tiny

    root = cache_root()
    path = root / f"tiny-{arch}-{'rm' if reward_model else 'lm'}-s{seed}"
    if not (path / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        make_tiny(str(tmp), arch=arch, reward_model=reward_model, seed=seed)
        try:
            os.replace(tmp, path)              # atomic: a concurrent maker may have won, that's fine
        except OSError:
            pass
    return str(path)


def _fingerprint(cfg: PPOConfig, policy_cfg, critic_cfg) -> dict:
    """What a checkpoint must agree on with the config that resumes it."""
    return {"policy": cfg.model.policy, "policy_arch": dataclasses.asdict(policy_cfg),
            "critic_arch": dataclasses.asdict(critic_cfg), "reward_model": cfg.model.reward_model,
            "critic_init": cfg.model.critic_init, "critic": cfg.model.critic}


class PPOTrainer:
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

    # ------------------------------------------------------------------ set-up
    def _load_models(self):
        # bad input that needs no model: fail before loading (and, on accelerators, sharding) anything
        from jaxppo.config import check_devices
        check_devices(self.config, jax.device_count())
        c = self.config.model
        dtype = _DTYPES[c.dtype]
        ref_dtype = _DTYPES[c.ref_dtype or c.dtype]
        policy_path = c.policy
        if policy_path == "tiny":
            policy_path = tiny_model_dir(c.tiny_arch, seed=self.config.train.seed)
        self.policy_path = policy_path
        policy, self.tokenizer = hf.load_causal_lm(policy_path, dtype=dtype, remat=c.remat)
        ref, _ = hf.load_causal_lm(policy_path, dtype=ref_dtype, param_dtype=ref_dtype)
        self.reward_model = None
        rm_path = c.reward_model
        if rm_path == "tiny":     # a random tiny reward model sharing the tiny tokenizer (demos, tests)
            rm_path = tiny_model_dir(c.tiny_arch, seed=self.config.train.seed + 1, reward_model=True)
        self.reward_model_path = rm_path
        if rm_path:
            self.reward_model, rm_tok = hf.load_reward_model(rm_path, dtype=dtype)
            _check_same_vocab(self.tokenizer, rm_tok, policy_path, rm_path)
        if c.critic:
            critic, critic_tok = hf.load_reward_model(c.critic, dtype=dtype, remat=c.remat)
            _check_same_vocab(self.tokenizer, critic_tok, policy_path, c.critic)
        elif c.critic_init == "reward_model":
            critic, _ = hf.load_reward_model(rm_path, dtype=dtype, remat=c.remat)
        else:
            critic = hf.load_model(policy_path, head="scalar", fresh_head=True, dtype=dtype, remat=c.remat,
                                   seed=self.config.train.seed)
        for model, path in ((policy, policy_path), (self.reward_model, c.reward_model), (critic, c.critic or "critic")):
            if model is not None and model.config.vocab_size < len(self.tokenizer):
                raise ConfigError(f"{path}: the tokenizer has {len(self.tokenizer)} tokens but the model embeds only "
                                  f"{model.config.vocab_size} (vocab_size in config.json)")
        self.policy_config = policy.config
        self.critic_config = critic.config
        self._graphs = {"policy": nnx.split(policy)[0], "critic": nnx.split(critic)[0],
                        "ref": nnx.split(ref)[0],
                        "rm": None if self.reward_model is None else nnx.split(self.reward_model)[0]}
        self._init_params = (nnx.split(policy)[1], nnx.split(critic)[1])
        self.frozen = Frozen(ref=nnx.split(ref)[1],
                             reward_model=None if self.reward_model is None else nnx.split(self.reward_model)[1])
        self._template_policy = policy     # used to export the trained weights
        eos = self.tokenizer.eos_token_id
        self.eos_ids = tuple(sorted({eos} if isinstance(eos, int) else set(eos or ())))
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos)

    def _build_reward_functions(self, extra):
        r = self.config.reward
        fns: list[tuple[str, Callable, float]] = []
        if r.task:
            fns.append((f"task:{r.task}", tasks.get_task(r.task).reward, 1.0))
        weights = list(r.weights) or [1.0] * len(r.functions)
        for spec, w in zip(r.functions, weights):
            fns.append((spec, tasks.import_function(spec), float(w)))
        for fn in extra or ():
            fns.append((getattr(fn, "__name__", repr(fn)), fn, 1.0))
        return fns

    def _build_programs(self):
        c = self.config
        updates_per_iter = c.ppo.epochs * c.ppo.num_minibatches
        total_updates = c.train.total_steps * updates_per_iter
        ptx, psched = make_optimizer(c.optim, total_updates, updates_per_iteration=updates_per_iter)
        ctx, csched = make_optimizer(c.optim, total_updates, lr=c.optim.critic_lr or c.optim.lr,
                                     updates_per_iteration=updates_per_iter)
        rc = c.rollout
        sampling = SamplingParams(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_k=rc.top_k,
                                  top_p=rc.top_p, eos_token_ids=self.eos_ids if rc.stop_at_eos else (),
                                  pad_token_id=self.pad_id, stop_at_eos=rc.stop_at_eos)
        p, chunk_mb = c.ppo, c.model.logits_chunk_mb
        upd = UpdateSettings(epochs=p.epochs, num_minibatches=p.num_minibatches,
                             grad_accum_steps=c.optim.grad_accum_steps, clip_eps=p.clip_eps,
                             clip_value=p.clip_value, vf_coef=p.vf_coef, ent_coef=p.ent_coef,
                             temperature=rc.temperature or 1.0,
                             logits_chunk_bytes=None if chunk_mb is None else chunk_mb * 2**20)
        plateau_metric = c.optim.plateau.metric if c.optim.schedule == "plateau" else None
        settings = StepSettings(
            sampling=sampling, update=upd, gamma=p.gamma, lam=p.lam, kl_estimator=p.kl_estimator,
            adaptive_kl=None if p.adaptive_kl is None else (p.adaptive_kl.target, p.adaptive_kl.horizon),
            whiten_advantages=p.whiten_advantages, missing_eos_penalty=rc.missing_eos_penalty,
            reward_clip=c.reward.clip, normalize_rewards=c.reward.normalize,
            forward_batch_size=rc.forward_batch_size, plateau_metric=plateau_metric,
            plateau_sign=-1.0 if c.optim.plateau.mode == "max" else 1.0)
        # one mesh over all local devices: batch over (data, fsdp), params/opt state FSDP-sharded
        self.mesh = make_mesh(data=c.train.mesh_data, fsdp=c.train.mesh_fsdp)
        state = init_train_state(*self._init_params, (ptx, ctx), c.train.seed, p.kl_coef)
        del self._init_params
        self.state = shard_tree(state, self.mesh)
        self.frozen = shard_tree(self.frozen, self.mesh)
        shardings = tree_shardings(self.state, self.mesh) if self.mesh.devices.size > 1 else None
        self.programs = PPOPrograms(policy_graph=self._graphs["policy"], critic_graph=self._graphs["critic"],
                                    ref_graph=self._graphs["ref"], rm_graph=self._graphs["rm"],
                                    txs=(ptx, ctx), schedules=(psched, csched), settings=settings,
                                    updates_per_iteration=updates_per_iter, state_shardings=shardings)

    # ------------------------------------------------------------------ data
    def _datasets(self, train_dataset, eval_dataset) -> tuple[PPODataset, PPODataset]:
        """(train, eval) PPODatasets; prompts read from files keep their 'file:line' sources."""
        d = self.config.data

        def as_dataset(x):
            return x if isinstance(x, PPODataset) else PPODataset(list(x))

        if train_dataset is None:
            if d.prompts:
                prompts = PPODataset.from_file(d.prompts, field=d.prompt_field)
            elif self.config.reward.task:
                prompts = PPODataset(tasks.get_task(self.config.reward.task).prompts())
            else:
                raise ConfigError("data.prompts is not set and reward.task is null: no prompts to train on",
                                  keys=("data.prompts",))
            if eval_dataset is None and d.eval_prompts:
                eval_dataset = PPODataset.from_file(d.eval_prompts, field=d.prompt_field)
            if eval_dataset is None and d.eval_fraction > 0:
                train_dataset, eval_dataset = split_prompts(prompts, d.eval_fraction, self.config.train.seed)
            else:
                train_dataset = prompts
        elif eval_dataset is None and d.eval_prompts:
            eval_dataset = PPODataset.from_file(d.eval_prompts, field=d.prompt_field)
        return as_dataset(train_dataset), as_dataset(eval_dataset if eval_dataset is not None else [])

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

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, eval_dataset, step: int | None = None, *, log: bool = True) -> dict:
        """Sample on held-out prompts under fixed keys; mean score, KL, length and EOS rate.

        Its own program (`programs.evaluate`: sampling + reference and reward-model forwards, no
        critic), compiled once for one batch size: by default every eval prompt in one batch (up to
        4 x train.batch_size), so an evaluation is a single dispatch. During `train` it runs in a
        background thread while the next step trains (`train.async_eval`)."""
        prompts = list(eval_dataset)
        if not prompts:
            return {}
        return self._eval_finish(prompts, self._eval_dispatch(prompts, self.state.policy), step, log)

    def _eval_dispatch(self, prompts, policy) -> list:
        """Dispatch every evaluation batch: [(prompt indices, real rows, EvalOutput)]."""
        ids, mask = self._eval_arrays(prompts)
        bs = self._eval_batch_size(len(prompts))
        base = jax.random.fold_in(jax.random.PRNGKey(self.config.train.seed), EVAL_KEY_SALT)
        pending = []
        for b, start in enumerate(range(0, len(prompts), bs)):
            idx = np.arange(start, start + bs) % len(prompts)     # wrap the last batch: one shape, one compile
            key = jax.device_put(jax.random.fold_in(base, b), replicated(self.mesh))
            out = self.programs.evaluate(policy, self.frozen, shard_batch(ids[idx], self.mesh),
                                         shard_batch(mask[idx], self.mesh), key)
            pending.append((idx, min(bs, len(prompts) - start), out))
        return pending

    def _eval_finish(self, prompts, pending, step, log) -> dict:
        """Host side of an evaluation: reward functions, means, samples, logging."""
        scores, kls, lengths, eos, samples = [], [], [], [], []
        for idx, n_real, out in pending:
            batch_prompts = [prompts[i] for i in idx]
            s = self._function_scores(batch_prompts, out) + np.asarray(out.rm_scores)
            m, resp = np.asarray(out.mask), np.asarray(out.response)
            has_eos = (np.isin(resp, self.eos_ids) & (m > 0)).any(-1) if self.eos_ids else np.zeros(len(m), bool)
            scores.append(s[:n_real]); kls.append(np.asarray(out.kl)[:n_real]); lengths.append(m.sum(-1)[:n_real])
            eos.append(has_eos[:n_real])
            for i in range(min(n_real, self.config.train.num_samples_logged - len(samples))):
                samples.append({"prompt": batch_prompts[i],
                                "response": self.tokenizer.decode(resp[i][m[i] > 0], skip_special_tokens=True),
                                "score": float(s[i])})
        metrics = {"objective/scores": float(np.concatenate(scores).mean()),
                   "objective/kl": float(np.concatenate(kls).mean()),
                   "response_length": float(np.concatenate(lengths).mean()),
                   "eos_rate": float(np.concatenate(eos).mean()),
                   "num_prompts": float(len(prompts))}
        if log and self.logger is not None:
            step = int(self.state.step) if step is None else step
            self.logger.log_metrics(metrics, step=step, split="eval")
            self.logger.log_samples(samples, step=step)
        return metrics

    def _eval_start(self, prompts, step: int) -> "_EvalJob":
        """Evaluate the current policy in a background thread: its device work overlaps the next
        training step. The thread reads a copy of the policy (the next update donates the state);
        reward functions and logging run later on this thread, in `_eval_join`."""
        policy = _copy_tree(self.state.policy)
        return _EvalJob(step, lambda: jax.device_get(self._eval_dispatch(prompts, policy)))

    def _eval_join(self, job: "_EvalJob", prompts) -> dict:
        metrics = self._eval_finish(prompts, job.result(), job.step, True)
        self._log(_fmt("eval", job.step, metrics))
        return metrics

    def _eval_batch_size(self, n_prompts: int) -> int:
        """train.eval_batch_size, or all `n_prompts` (at most 4 x train.batch_size) rounded up to a
        multiple of the device count and of rollout.forward_batch_size."""
        t = self.config.train
        if t.eval_batch_size:
            return t.eval_batch_size
        unit = math.lcm(self.mesh.devices.size, self.config.rollout.forward_batch_size or 1)
        bs = min(n_prompts, 4 * t.batch_size)
        return -(-bs // unit) * unit

    def _eval_arrays(self, prompts):
        key = tuple(prompts)
        if getattr(self, "_eval_cache", (None,))[0] != key:
            ids, mask = self._tokenize(prompts, source=self.config.data.eval_prompts)
            self._eval_cache = (key, *self._pad_to(ids, mask, getattr(self, "_prompt_len", ids.shape[1])))
        return self._eval_cache[1], self._eval_cache[2]

    def _pad_to(self, ids, mask, length):
        """Left-pad (or left-trim padding) to `length` columns so train and eval share one program."""
        n = ids.shape[1]
        if n == length:
            return ids, mask
        if n > length:
            return ids[:, n - length:], mask[:, n - length:]
        pad = length - n
        return (np.concatenate([np.full((ids.shape[0], pad), self.pad_id, ids.dtype), ids], axis=1),
                np.concatenate([np.zeros((mask.shape[0], pad), mask.dtype), mask], axis=1))

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

    # ------------------------------------------------------------------ the loop
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
        train_ids, train_mask = self._pad_to(train_ids, train_mask, prompt_len)
        max_ctx = self.policy_config.max_position_embeddings
        if prompt_len + c.rollout.max_new_tokens > max_ctx:
            raise ConfigError(f"the longest prompt ({prompt_len} tokens, data.max_prompt_length="
                              f"{c.data.max_prompt_length}) + rollout.max_new_tokens={c.rollout.max_new_tokens} "
                              f"= {prompt_len + c.rollout.max_new_tokens} tokens exceed the context of "
                              f"{self.policy_path} (max_position_embeddings={max_ctx})",
                              keys=("rollout.max_new_tokens", "data.max_prompt_length"))
        iterator = PromptIterator(len(train_prompts), c.train.batch_size, c.train.seed, shuffle=c.data.shuffle)
        return _Run(train_prompts, eval_prompts, train_ids, train_mask, iterator)

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
                self._log(_fmt("eval", done, run.eval_metrics))
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
            self._log(_fmt("eval", int(self.state.step), run.eval_metrics))
        self._save_checkpoint(run.iterator, {**run.last_metrics, **{f"eval/{k}": v for k, v in run.eval_metrics.items()}},
                              force=True)
        self.checkpointer.wait()
        self.export(self.run_dir / "final_model")
        try:
            from jaxppo.plots import plot_run
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


def _check_same_vocab(tok_a, tok_b, path_a, path_b):
    """The reward model and critic read the policy's token ids unchanged: vocabularies must agree."""
    if len(tok_a) != len(tok_b) or tok_a.get_vocab() != tok_b.get_vocab():
        raise ConfigError(f"tokenizer mismatch: {path_b} has a different vocabulary ({len(tok_b)} tokens) from the "
                          f"policy {path_a} ({len(tok_a)} tokens); the models must share one tokenizer")


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


def _fmt(split, step, metrics):
    return f"{split} step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def _progress(cfg, start):
    if not cfg.logging.progress_bar:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=cfg.train.total_steps, initial=start, desc="ppo", unit="it", dynamic_ncols=True)


_copy_tree = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


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
    eval_job: _EvalJob | None = None
    t_start: float = 0.0


class _EvalJob:
    """`fn()` running in a daemon thread; `result()` joins it and re-raises what it raised."""

    def __init__(self, step: int, fn):
        self.step = step
        self._out = self._error = None

        def run():
            try:
                self._out = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self._error = e

        self._thread = threading.Thread(target=run, name=f"jaxppo-eval-{step}", daemon=True)
        self._thread.start()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out

    def abandon(self):
        """Wait for the thread (it holds device buffers) and drop its result or error."""
        self._thread.join()
