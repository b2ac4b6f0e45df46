"""The PPO update: epochs ⊃ minibatches ⊃ micro-batches as nested `lax.scan`.

`epochs x num_minibatches` optimiser steps for the policy and for the critic over one rollout
batch (Schulman et al. 2017, as in TRL's PPOTrainer):

    for epoch:                                    # a fresh permutation of the B rows
        for minibatch (B / M rows):
            g = sum over micro-batches of  d/dθ [ Σ pg_tok + vf_coef Σ vf_tok - ent_coef Σ ent_tok ] / N
            θ <- optax step(g)                    # N = valid tokens in the whole minibatch
                                                  # (skipped if that model's loss or g is not finite)

The policy and the critic share no parameters, so each model's gradient of that objective is the
gradient of its own terms: `model_update(objective, ...)` runs one model's steps on its share
(`policy_objective`, `value_objective`), and the iteration compiles one program per model, which
run side by side when the two models sit on different devices (`train.placement`). Both draw
their minibatches from the same key, so they see the same rows.

Dividing the micro-batch token sums by the minibatch's token count N makes gradient accumulation
exact: the summed gradient equals the gradient of the big minibatch's token mean, whatever the
response lengths (averaging micro-batch means would weight short responses up).

Metrics are token-weighted means over every minibatch of every epoch, not the last one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxppo.core.losses import policy_loss, value_loss
from jaxppo.core.masked import masked_sum
from jaxppo.engine.optimizer import global_norm
from jaxppo.engine.scoring import response_logprobs, response_values


@struct.dataclass
class PPOBatch:
    """One rollout, ready for the update. P prompt slots, R response slots."""

    tokens: jax.Array         # [B, P+R] prompt + response ids
    attention_mask: jax.Array  # [B, P+R] 0 on left padding of the prompt
    response: jax.Array       # [B, R]
    mask: jax.Array           # [B, R] float32, 1 up to and including the first EOS
    old_logprobs: jax.Array   # [B, R]
    old_values: jax.Array     # [B, R]
    advantages: jax.Array     # [B, R]
    returns: jax.Array        # [B, R]


@dataclasses.dataclass(frozen=True)
class UpdateSettings:
    """Static settings of the optimiser loop and the PPO losses (hashable)."""

    epochs: int = 4
    num_minibatches: int = 2
    grad_accum_steps: int = 1
    clip_eps: float = 0.2
    clip_value: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    logits_chunk_bytes: int | None = None   # head over response slices of this many logits bytes (None: whole)

    @classmethod
    def from_config(cls, config) -> UpdateSettings:
        p, chunk_mb = config.ppo, config.model.logits_chunk_mb
        return cls(epochs=p.epochs, num_minibatches=p.num_minibatches, grad_accum_steps=config.optim.grad_accum_steps,
                   clip_eps=p.clip_eps, clip_value=p.clip_value, vf_coef=p.vf_coef, ent_coef=p.ent_coef,
                   logits_chunk_bytes=None if chunk_mb is None else chunk_mb * 2**20)

    @property
    def steps_per_iteration(self) -> int:
        """Optimiser steps per model per iteration."""
        return self.epochs * self.num_minibatches


class PolicySums(NamedTuple):
    """The policy objective's token sums over a micro-batch (means divide by `tokens`)."""

    pg_loss: jax.Array
    pg_clipfrac: jax.Array
    approxkl: jax.Array
    ratio: jax.Array
    entropy: jax.Array
    tokens: jax.Array


class ValueSums(NamedTuple):
    """The value objective's token sums over a micro-batch."""

    vf_loss: jax.Array
    vf_clipfrac: jax.Array
    tokens: jax.Array


class Objective(NamedTuple):
    """One model's share of the PPO objective: `loss(model, mb, n_tokens) -> (loss, sums)`, the
    micro-batch's token sums divided by the minibatch's token count; `guard(sums)` is the sum whose
    non-finiteness (or the gradient norm's) skips an optimiser step."""

    loss: Callable
    guard: Callable


def policy_objective(s: UpdateSettings, temperature: float) -> Objective:
    """`(Σ pg_tok - ent_coef Σ ent_tok) / N`: the clipped policy loss minus the entropy bonus, under
    softmax(logits / temperature), the distribution the sampler drew from."""

    def loss(model, mb: PPOBatch, n_tokens):
        logprobs, ent = response_logprobs(model, mb.tokens, mb.attention_mask, mb.response, temperature,
                                          entropy=True, chunk_bytes=s.logits_chunk_bytes)
        _, pg = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.mask, s.clip_eps)
        if not s.ent_coef:
            ent = jax.lax.stop_gradient(ent)          # a metric only: no backward through the softmax
        ent_sum = masked_sum(ent, mb.mask)
        sums = PolicySums(pg_loss=pg["loss_sum"], pg_clipfrac=pg["clipfrac_sum"], approxkl=pg["approxkl_sum"],
                          ratio=pg["ratio_sum"], entropy=ent_sum, tokens=pg["count"])
        return (pg["loss_sum"] - s.ent_coef * ent_sum) / n_tokens, sums

    return Objective(loss, guard=lambda sums: sums.pg_loss)


def value_objective(s: UpdateSettings) -> Objective:
    """`vf_coef Σ vf_tok / N`: the clipped value loss (TRL's factor 0.5 is inside `value_loss`)."""

    def loss(model, mb: PPOBatch, n_tokens):
        values = response_values(model, mb.tokens, mb.attention_mask, mb.response.shape[1])
        _, vf = value_loss(values, mb.old_values, mb.returns, mb.mask, s.clip_value)
        sums = ValueSums(vf_loss=vf["loss_sum"], vf_clipfrac=vf["clipfrac_sum"], tokens=vf["count"])
        return s.vf_coef * vf["loss_sum"] / n_tokens, sums

    return Objective(loss, guard=lambda sums: sums.vf_loss)


class StepStats(NamedTuple):
    """What `model_update` reports per optimiser step, each leaf `[epochs, M]`."""

    sums: Any                 # the objective's sums (PolicySums / ValueSums)
    grad_norm: jax.Array
    skipped: jax.Array        # 1.0 where the step was skipped (non-finite loss or gradient)


def _take(batch: PPOBatch, idx):
    return jax.tree.map(lambda x: x[idx], batch)


def minibatch_permutations(key, batch_size: int, s: UpdateSettings) -> jax.Array:
    """`[epochs, M, B/M]` row indices: a fresh permutation of the B rows per epoch. Both models'
    updates draw them from the same key, so they step through the same minibatches."""
    perms = [jax.random.permutation(k, batch_size) for k in jax.random.split(key, s.epochs)]
    return jnp.stack(perms).reshape(s.epochs, s.num_minibatches, batch_size // s.num_minibatches)


def model_update(objective: Objective, graphdef, params, opt_state, batch: PPOBatch, key, tx,
                 s: UpdateSettings, plateau_value=None):
    """All epochs and minibatches of one model's optimiser steps on `objective`. Pure; jit it (the
    iteration does, one program per model: `engine.programs`).

    A step whose loss or gradient is not finite is skipped: the weights and the optimiser state
    stay as they were (`optax.apply_if_finite`'s rule, decided before the step so that XLA can
    update every weight in place). Returns (params, opt_state, StepStats).
    """
    B = batch.tokens.shape[0]
    M, A = s.num_minibatches, s.grad_accum_steps
    if B % (M * A):
        raise ValueError(f"batch {B} must divide into {M} minibatches x {A} micro-batches")
    micro = B // (M * A)

    def micro_loss(params, mb, n_tokens):
        return objective.loss(nnx.merge(graphdef, params), mb, n_tokens)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    extra = {} if plateau_value is None else {"value": plateau_value}
    tx = optax.with_extra_args_support(tx)

    def minibatch_step(carry, idx):                      # idx [B/M]
        params, opt_state = carry
        mb = _take(batch, idx)
        n_tokens = jnp.maximum(mb.mask.sum(), 1.0)
        micro_batches = jax.tree.map(lambda x: x.reshape((A, micro) + x.shape[1:]), mb)  # [A, micro, ...]

        def accumulate(acc, mbi):
            (_, sums), grads = grad_fn(params, mbi, n_tokens)
            return jax.tree.map(jnp.add, acc, (grads, sums)), None

        first = jax.tree.map(lambda x: x[0], micro_batches)
        sums_shape = jax.eval_shape(micro_loss, params, first, n_tokens)[1]
        zeros = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), sums_shape))
        if A == 1:
            (grads, sums), _ = accumulate(zeros, first)
        else:
            (grads, sums), _ = jax.lax.scan(accumulate, zeros, micro_batches)
        norm = global_norm(grads)
        finite = jnp.isfinite(norm) & jnp.isfinite(objective.guard(sums))

        def apply(operands):
            params, opt_state, grads = operands
            # the norm goes to optimizer.clip_by_global_norm (computed once); other transforms ignore it
            updates, opt_state = tx.update(grads, opt_state, params, grad_norm=norm, **extra)
            return optax.apply_updates(params, updates), opt_state

        carry = jax.lax.cond(finite, apply, lambda ops: ops[:2], (params, opt_state, grads))
        return carry, StepStats(sums=sums, grad_norm=norm, skipped=1.0 - finite.astype(jnp.float32))

    def epoch_step(carry, perm):                         # perm [M, B/M]
        return jax.lax.scan(minibatch_step, carry, perm)

    (params, opt_state), stats = jax.lax.scan(epoch_step, (params, opt_state),
                                              minibatch_permutations(key, B, s))
    return params, opt_state, stats


class UpdateMetrics(NamedTuple):
    """The update's metrics (TRL's names in `as_dict`): token-weighted means over every minibatch of
    every epoch, mean gradient norms, and the optimiser steps in which either model skipped."""

    policy_loss: jax.Array
    value_loss: jax.Array
    approxkl: jax.Array
    clipfrac: jax.Array
    entropy: jax.Array
    value_clipfrac: jax.Array
    ratio: jax.Array
    policy_grad_norm: jax.Array
    value_grad_norm: jax.Array
    nonfinite_steps: jax.Array

    def as_dict(self) -> dict:
        return {"loss/policy_avg": self.policy_loss, "loss/value_avg": self.value_loss,
                "policy/approxkl_avg": self.approxkl, "policy/clipfrac_avg": self.clipfrac,
                "policy/entropy_avg": self.entropy, "val/clipfrac_avg": self.value_clipfrac,
                "val/ratio": self.ratio, "policy/grad_norm": self.policy_grad_norm,
                "val/grad_norm": self.value_grad_norm, "nonfinite_steps": self.nonfinite_steps}


def update_metrics(policy: StepStats, critic: StepStats) -> UpdateMetrics:
    """Both models' `model_update` statistics -> UpdateMetrics."""
    p, c = policy.sums, critic.sums
    n = jnp.maximum(p.tokens.sum(), 1.0)
    mean = lambda x: x.sum() / n
    return UpdateMetrics(
        policy_loss=mean(p.pg_loss), value_loss=mean(c.vf_loss), approxkl=mean(p.approxkl),
        clipfrac=mean(p.pg_clipfrac), entropy=mean(p.entropy), value_clipfrac=mean(c.vf_clipfrac),
        ratio=mean(p.ratio), policy_grad_norm=policy.grad_norm.mean(), value_grad_norm=critic.grad_norm.mean(),
        nonfinite_steps=jnp.maximum(policy.skipped, critic.skipped).sum())
