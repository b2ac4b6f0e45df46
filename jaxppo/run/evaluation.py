"""Evaluation of the policy on held-out prompts, in the foreground or overlapping a step.

`Evaluator.evaluate(prompts, policy)`: one compiled program (`programs.evaluate`: sampling and
the reference / reward-model forwards, no critic) dispatched per batch under fixed keys, then
reward functions, means and samples on the host. During `train`, `start` runs the device part in
an `EvalJob` thread and `join` finishes it one step later.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxppo.data.dataset import PPODataset, prompt_key
from jaxppo.data.prompts import pad_prompts
from jaxppo.engine.mesh import on_host, replicate, replicated, shard_batch, to_host

EVAL_KEY_SALT = 0x5EED  # eval draws from fold_in(PRNGKey(seed), salt): the same keys at every eval
# what an evaluation reports (logged as eval/<name>; `early_stopping.metric` may watch any of them)
EVAL_METRICS = ("objective/scores", "objective/kl", "response_length", "eos_rate", "num_prompts")


class Evaluator:
    """Evaluates a policy's parameters with `programs.evaluate` on the policy's mesh.

    encode(prompts) -> (ids, mask): the run's prompt tokenizer; score(prompts, response, mask) ->
    float32 [B]: the run's reward functions. Eval prompts are padded to at least `prompt_len`
    tokens (the train prompts' length, which `train` sets), so that one program serves both."""

    def __init__(self, *, evaluate: Callable, frozen, mesh, encode: Callable, score: Callable, decode: Callable,
                 eos_ids: tuple[int, ...], pad_id: int, seed: int, batch_size: int | None, train_batch_size: int,
                 forward_batch_size: int | None, num_samples: int):
        self.program, self.frozen, self.mesh = evaluate, frozen, mesh
        self.encode, self.score, self.decode = encode, score, decode
        self.eos_ids, self.pad_id = eos_ids, pad_id
        self.base_key = jax.random.fold_in(jax.random.PRNGKey(seed), EVAL_KEY_SALT)
        self.batch_size_setting, self.train_batch_size = batch_size, train_batch_size
        self.forward_batch_size, self.num_samples = forward_batch_size, num_samples
        self.prompt_len = 0
        self.padded: tuple[tuple, np.ndarray, np.ndarray] | None = None   # (prompts, ids, mask) of the last call

    def evaluate(self, dataset, policy, step: int, logger=None) -> dict:
        """Sample on held-out prompts (a PPODataset, whose columns reach the reward functions, or a
        list of prompts) under fixed keys; mean score, KL, length and EOS rate (and the metrics
        and samples to `logger`)."""
        dataset = as_dataset(dataset)
        if not len(dataset):
            return {}
        return self.finish(dataset, self.dispatch(dataset, policy), step, logger)

    def dispatch(self, dataset, policy) -> list:
        """Dispatch every evaluation batch: [(prompt indices, real rows, EvalOutput)]."""
        prompts = as_dataset(dataset).prompts
        ids, mask = self.arrays(prompts)
        bs = self.batch_size(len(prompts))
        if on_host(self.mesh):    # (an accelerator keeps FSDP's memory saving)
            policy = replicate(policy, self.mesh)   # whole on every device, once: no decode step gathers FSDP shards
        pending = []
        for b, start in enumerate(range(0, len(prompts), bs)):
            idx = np.arange(start, start + bs) % len(prompts)     # wrap the last batch: one shape, one compile
            key = jax.device_put(jax.random.fold_in(self.base_key, b), replicated(self.mesh))
            out = self.program(policy, self.frozen, shard_batch(ids[idx], self.mesh), shard_batch(mask[idx], self.mesh),
                               key)
            pending.append((idx, min(bs, len(prompts) - start), out))
        return pending

    def finish(self, dataset, pending, step: int, logger) -> dict:
        """Host side of an evaluation: reward functions, means, samples, logging."""
        dataset = as_dataset(dataset)
        prompts = dataset.prompts
        scores, kls, lengths, eos, samples = [], [], [], [], []
        for idx, n_real, out in pending:
            out = to_host(out)                 # whole on every process (rows of other processes gathered)
            batch_prompts = [prompts[i] for i in idx]
            m, resp = np.asarray(out.mask), np.asarray(out.response)
            s = self.score(batch_prompts, resp, m, dataset.columns_at(idx)) + np.asarray(out.rm_scores)
            has_eos = (np.isin(resp, self.eos_ids) & (m > 0)).any(-1) if self.eos_ids else np.zeros(len(m), bool)
            scores.append(s[:n_real]); kls.append(np.asarray(out.kl)[:n_real]); lengths.append(m.sum(-1)[:n_real])
            eos.append(has_eos[:n_real])
            for i in range(min(n_real, self.num_samples - len(samples))):
                samples.append({"prompt": batch_prompts[i], "response": self.decode(resp[i][m[i] > 0]),
                                "score": float(s[i])})
        metrics = {"objective/scores": float(np.concatenate(scores).mean()),
                   "objective/kl": float(np.concatenate(kls).mean()),
                   "response_length": float(np.concatenate(lengths).mean()),
                   "eos_rate": float(np.concatenate(eos).mean()),
                   "num_prompts": float(len(prompts))}
        if logger is not None:
            logger.log_metrics(metrics, step=step, split="eval")
            logger.log_samples(samples, step=step)
        return metrics

    def start(self, dataset, policy, step: int) -> EvalJob:
        """Evaluate `policy` in a background thread: its device work overlaps the next training
        step. The thread reads a copy of the policy (the next update donates the state); reward
        functions and logging run later on the caller's thread, in `join`."""
        policy = copy_tree(policy)
        return EvalJob(step, lambda: jax.device_get(self.dispatch(dataset, policy)))

    def join(self, job: EvalJob, dataset, logger) -> dict:
        metrics = self.finish(dataset, job.result(), job.step, logger)
        if logger is not None:
            logger.log(format_metrics("eval", job.step, metrics))
        return metrics

    def batch_size(self, n_prompts: int) -> int:
        """train.eval_batch_size, or all `n_prompts` (at most 4 x train.batch_size) rounded up to a
        multiple of the device count and of rollout.forward_batch_size."""
        if self.batch_size_setting:
            return self.batch_size_setting
        unit = math.lcm(self.mesh.devices.size, self.forward_batch_size or 1)
        bs = min(n_prompts, 4 * self.train_batch_size)
        return -(-bs // unit) * unit

    def arrays(self, prompts):
        """Token ids and mask of `prompts`, padded to at least `prompt_len` (cached for the last list)."""
        key = tuple(prompt_key(p) for p in prompts)
        if self.padded is None or self.padded[0] != key:
            ids, mask = self.encode(prompts)
            self.padded = (key, *pad_prompts(ids, mask, max(self.prompt_len, ids.shape[1]), self.pad_id))
        return self.padded[1], self.padded[2]


def as_dataset(rows) -> PPODataset:
    """A PPODataset as is; a list of prompts (or rows) as one."""
    return rows if isinstance(rows, PPODataset) else PPODataset(list(rows))


def format_metrics(split, step, metrics):
    """'eval step 10: objective/scores=0.5, ...': one line for the console and train.log."""
    return f"{split} step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())


copy_tree = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


class EvalJob:
    """`fn()` running in a daemon thread; `result()` joins it and re-raises what it raised."""

    def __init__(self, step: int, fn):
        self.step = step
        self.out = self.error = None

        def run():
            try:
                self.out = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self.error = e

        self.thread = threading.Thread(target=run, name=f"jaxppo-eval-{step}", daemon=True)
        self.thread.start()

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.out

    def abandon(self):
        """Wait for the thread (it holds device buffers) and drop its result or error."""
        self.thread.join()
