"""What a training run draws its batches from (`RunProgress`), and one iteration's batch: sample (`engine.programs.rollout`), score with the reward
functions on the host, and with DAPO's dynamic sampling (`algo.filter_groups`) keep only the
groups whose G rewards differ, sampling again until the batch is full.

A group whose G responses all got the same reward has zero group-relative advantage: it only
dilutes the gradient (Yu et al. 2025, DAPO, "dynamic sampling"). Each extra round draws the next
prompt batch and a key folded from the iteration's sampling key, so a resumed run draws the same.
When `algo.max_sample_rounds` rounds do not fill the batch, the rest is filled with filtered-out
groups (their advantages are zero) so that every batch has one shape; the metrics say how many.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxppo.core.advantages import ZERO_STD_ATOL
from jaxppo.data.dataset import PPODataset
from jaxppo.data.prompts import PromptIterator
from jaxppo.engine import programs as iteration
from jaxppo.engine.mesh import batch_sharding, shard_batch, to_host


class PromptBatch(NamedTuple):
    """A batch of B prompts: their text (or chat messages), padded ids and mask, dataset columns."""

    prompts: list
    ids: np.ndarray                # [B, P]
    mask: np.ndarray               # [B, P]
    columns: dict                  # name -> list of B values


def repeat_rows(batch: PromptBatch, group_size: int) -> tuple[list, dict]:
    """Prompts and columns repeated G times each, prompt-major (the rows' order after sampling)."""
    rep = lambda values: [v for v in values for _ in range(group_size)]
    return rep(batch.prompts), {k: rep(v) for k, v in batch.columns.items()}


def collect_batch(programs, state, frozen, mesh, rewards: Callable, draw: Callable[[], PromptBatch],
                  group_size: int, filter_groups: bool = False, max_rounds: int = 1):
    """(Experience [B*G rows], reward-function scores [B*G] on the host, metrics). `draw()` gives
    the next prompt batch; `rewards(prompts, response, mask, columns)` scores a sampled one."""
    key0 = iteration.iteration_key(programs, state)
    rounds, kept, dropped = [], [], []           # kept / dropped: (round, group) in sampling order
    for r in range(max_rounds if filter_groups else 1):
        batch = draw()
        key = key0 if r == 0 else jax.random.fold_in(key0, r)
        exp = iteration.rollout(programs, state, frozen, shard_batch(batch.ids, mesh), shard_batch(batch.mask, mesh),
                                key)
        prompts, columns = repeat_rows(batch, group_size)
        # every process scores the whole batch (the rows of other processes' devices gathered first)
        response, mask = (exp.response, exp.mask) if jax.process_count() == 1 else to_host((exp.response, exp.mask))
        fn_scores = rewards(prompts, response, mask, columns)
        if not filter_groups:
            return exp, fn_scores, {}
        rounds.append((exp, fn_scores))
        total = fn_scores + np.asarray(to_host(exp.rm_scores), np.float32)
        spread = total.reshape(-1, group_size).std(axis=1) > ZERO_STD_ATOL     # [B] groups with a signal
        kept += [(r, g) for g in np.flatnonzero(spread)]
        dropped += [(r, g) for g in np.flatnonzero(~spread)]
        if len(kept) >= len(spread):
            break
    n_groups = len(rounds[0][1]) // group_size
    chosen = (kept + dropped)[:n_groups]
    metrics = {"sampling/rounds": float(len(rounds)),
               "sampling/groups_with_signal_frac": len(kept) / (len(rounds) * n_groups),
               "sampling/filled_without_signal": float(max(0, n_groups - len(kept)))}
    if len(rounds) == 1 and len(chosen) == n_groups and [g for _, g in chosen] == list(range(n_groups)):
        return rounds[0][0], rounds[0][1], metrics
    rows = np.asarray([r * n_groups * group_size + g * group_size + i for r, g in chosen for i in range(group_size)])
    exps, scores = zip(*rounds)
    exp = jax.tree.map(lambda *xs: _take_rows(xs, rows, mesh), *exps)
    return exp, np.concatenate(scores)[rows], metrics


def _take_rows(arrays, rows, mesh):
    """Rows `rows` of the arrays concatenated along the batch axis, sharded as a batch again (the
    decode-step count, a scalar, is the largest of the rounds')."""
    if arrays[0].ndim == 0:
        return jnp.max(jnp.stack(arrays))
    out = jnp.concatenate(arrays, axis=0)[rows]
    return jax.device_put(out, batch_sharding(mesh, out.ndim))


@dataclasses.dataclass
class RunProgress:
    """What one `train` call carries from step to step."""
    train_dataset: PPODataset      # rows: prompts and their columns
    train_prompts: list
    eval_prompts: PPODataset       # held-out rows (prompts and columns)
    train_ids: np.ndarray          # [N, P] left-padded to the run's prompt length
    train_mask: np.ndarray
    iterator: PromptIterator       # batches of prompt indices; its position is checkpointed
    prompt_len: int
    first_scores: float | None = None
    last_metrics: dict = dataclasses.field(default_factory=dict)
    eval_metrics: dict = dataclasses.field(default_factory=dict)
    stop_reason: str | None = None
    eval_job: Any = None           # evaluation.EvalJob running in the background, if any
    final_eval: dict | None = None  # restored: the final evaluation {"step", "metrics"} a signal's checkpoint holds
    t_start: float = 0.0

    def next_batch(self) -> PromptBatch:
        """The iterator's next batch of prompts with their ids and dataset columns."""
        idx = next(self.iterator)
        return PromptBatch([self.train_prompts[i] for i in idx], self.train_ids[idx], self.train_mask[idx],
                           self.train_dataset.columns_at(idx))
