"""Evaluation of a PPOTrainer's policy on held-out prompts, in the foreground or overlapping a step.

`EvaluationMixin` is the part of `PPOTrainer` behind `trainer.evaluate(prompts)`: one compiled
program (`programs.evaluate`) dispatched per batch under fixed keys, then reward functions, means
and samples on the host. During `train`, `_eval_start` runs the device part in an `EvalJob`
thread and `_eval_join` finishes it one step later.
"""

from __future__ import annotations

import math
import threading

import jax
import jax.numpy as jnp
import numpy as np

from jaxppo.data.prompts import pad_prompts
from jaxppo.engine.mesh import replicated, shard_batch

EVAL_KEY_SALT = 0x5EED  # eval draws from fold_in(PRNGKey(seed), salt): the same keys at every eval


class EvaluationMixin:
    """`evaluate` and its pieces. Reads the trainer's `config`, `state`, `frozen`, `programs`,
    `mesh`, `tokenizer`, `eos_ids`, `pad_id`, `logger` and, once `train` has set it, `_prompt_len`
    (eval prompts then pad to the train prompts' length, unless longer); keeps its padded-prompt cache in
    `_eval_cache`; calls the trainer's `_tokenize`, `_function_scores` and `_log`."""

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

    def _eval_start(self, prompts, step: int) -> EvalJob:
        """Evaluate the current policy in a background thread: its device work overlaps the next
        training step. The thread reads a copy of the policy (the next update donates the state);
        reward functions and logging run later on this thread, in `_eval_join`."""
        policy = _copy_tree(self.state.policy)
        return EvalJob(step, lambda: jax.device_get(self._eval_dispatch(prompts, policy)))

    def _eval_join(self, job: EvalJob, prompts) -> dict:
        metrics = self._eval_finish(prompts, job.result(), job.step, True)
        self._log(format_metrics("eval", job.step, metrics))
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
            length = max(getattr(self, "_prompt_len", 0), ids.shape[1])
            self._eval_cache = (key, *pad_prompts(ids, mask, length, self.pad_id))
        return self._eval_cache[1], self._eval_cache[2]


def format_metrics(split, step, metrics):
    """'eval step 10: objective/scores=0.5, ...': one line for the console and train.log."""
    return f"{split} step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())


_copy_tree = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


class EvalJob:
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
