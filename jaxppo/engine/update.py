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

With `max_tokens_per_microbatch` set, the micro-batches are packed rows without padding instead
(`engine.microbatch`), with the same results up to float rounding.

Metrics are token-weighted means over every minibatch of every epoch, not the last one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxppo.core.losses import aggregate_denominator, aggregate_numerator, policy_loss, value_loss
from jaxppo.core.rewards import kl_per_token
from jaxppo.core.masked import masked_sum
from jaxppo.engine.optimizer import global_norm
from jaxppo.engine.microbatch import packed_gradients, packed_objective
from jaxppo.engine.scoring import head_logprobs, response_logprobs, response_values
from jaxppo.models.lora import merge as lora_merge, set_dropout_key


@struct.dataclass
class PPOBatch:
    """One rollout, ready for the update. P prompt slots, R response slots."""

    tokens: jax.Array         # [B, P+R] prompt + response ids
    attention_mask: jax.Array  # [B, P+R] 0 on left padding of the prompt
    response: jax.Array       # [B, R]
    mask: jax.Array           # [B, R] float32, 1 up to and including the first EOS
    old_logprobs: jax.Array   # [B, R]
    old_values: jax.Array | None   # [B, R]; None without a critic
    advantages: jax.Array     # [B, R]
    returns: jax.Array | None      # [B, R]; None without a critic
    ref_logprobs: jax.Array | None = None   # [B, R] when the KL is a term of the loss (ppo.kl_in=loss)


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
    clip_eps_high: float | None = None      # upper clip range (DAPO clip-higher); None = clip_eps
    dual_clip: float | None = None          # dual-clip constant for negative advantages; None = off
    loss_agg: str = "token-mean"            # core.losses.aggregate mode of the policy loss
    kl_coef: float = 0.0                    # weight of the KL term in the policy loss (ppo.kl_in=loss)
    kl_estimator: str = "k3"                # its per-token estimator
    max_tokens_per_microbatch: int | None = None   # packed, padding-free micro-batches (engine.microbatch)

    @classmethod
    def from_config(cls, config) -> UpdateSettings:
        p, chunk_mb = config.ppo, config.model.logits_chunk_mb
        return cls(epochs=p.epochs, num_minibatches=p.num_minibatches, grad_accum_steps=config.optim.grad_accum_steps,
                   clip_eps=p.clip_eps, clip_value=p.clip_value, vf_coef=p.vf_coef, ent_coef=p.ent_coef,
                   logits_chunk_bytes=None if chunk_mb is None else chunk_mb * 2**20,
                   clip_eps_high=p.clip_eps_high, dual_clip=p.dual_clip, loss_agg=config.algo.loss_agg,
                   kl_coef=p.kl_coef if p.kl_in == "loss" else 0.0, kl_estimator=config.kl_estimator,
                   max_tokens_per_microbatch=config.train.max_tokens_per_microbatch)

    @property
    def plain_token_mean(self) -> bool:
        """The classic PPO policy loss: token-mean, no KL term, symmetric single clip."""
        return (self.loss_agg == "token-mean" and not self.kl_coef and self.clip_eps_high is None
                and self.dual_clip is None)

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
    kl: jax.Array | None = None          # Σ per-token KL (the loss's estimator) when the KL is in the loss
    clip_low: jax.Array | None = None    # tokens clipped below (ratio < 1 - eps, advantage < 0), new modes
    clip_high: jax.Array | None = None   # tokens clipped above (ratio > 1 + eps_high, advantage > 0)


class ValueSums(NamedTuple):
    """The value objective's token sums over a micro-batch."""

    vf_loss: jax.Array
    vf_clipfrac: jax.Array
    tokens: jax.Array


class Objective(NamedTuple):
    """One model's share of the objective: `loss(model, mb, norm) -> (loss, sums)`, the micro-batch's
    share of the loss given `norm = denominator(minibatch mask)` (so that the micro-batches' losses
    add up to the minibatch's loss exactly); `guard(sums)` is the sum whose non-finiteness (or the
    gradient norm's) skips an optimiser step. `loss` is `from_outputs(forward(model, mb), mb, norm)`,
    and `head(model, h, response)` is that forward's last part, from the hidden states `[B, R, H]`
    at the positions predicting the response (`engine.microbatch` runs the trunk on packed rows)."""

    loss: Callable
    guard: Callable
    denominator: Callable
    head: Callable             # (model, h [B, R, H], response [B, R]) -> per-token outputs [B, R]
    from_outputs: Callable     # (outputs [B, R], mb, norm) -> (loss, sums)


def token_count(mask) -> jax.Array:
    """The token-mean denominator: valid tokens (at least 1)."""
    return jnp.maximum(mask.sum(), 1.0)


def policy_objective(s: UpdateSettings, temperature: float) -> Objective:
    """The clipped policy loss (clip-higher and dual-clip when set), minus the entropy bonus, plus
    the KL to the reference when it is in the loss, per token, aggregated by `s.loss_agg`
    (`core.losses.aggregate`), under softmax(logits / temperature), the distribution the sampler
    drew from. The classic case is `(Σ pg_tok - ent_coef Σ ent_tok) / N`."""

    def head(model, h, response):
        return head_logprobs(model, h, response, temperature, entropy=True, chunk_bytes=s.logits_chunk_bytes)

    def loss(model, mb: PPOBatch, norm):
        return from_outputs(response_logprobs(model, mb.tokens, mb.attention_mask, mb.response, temperature,
                                              entropy=True, chunk_bytes=s.logits_chunk_bytes), mb, norm)

    def from_outputs(outputs, mb: PPOBatch, norm):
        logprobs, ent = outputs
        if s.plain_token_mean:
            _, pg = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.mask, s.clip_eps)
        else:
            _, pg = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.mask, s.clip_eps,
                                clip_eps_high=s.clip_eps_high, dual_clip=s.dual_clip)
        if not s.ent_coef:
            ent = jax.lax.stop_gradient(ent)          # a metric only: no backward through the softmax
        ent_sum = masked_sum(ent, mb.mask)
        sums = PolicySums(pg_loss=pg["loss_sum"], pg_clipfrac=pg["clipfrac_sum"], approxkl=pg["approxkl_sum"],
                          ratio=pg["ratio_sum"], entropy=ent_sum, tokens=pg["count"])
        if s.plain_token_mean:
            return (pg["loss_sum"] - s.ent_coef * ent_sum) / norm, sums
        per_token = pg["per_token"] - s.ent_coef * ent
        kl_sum = None
        if s.kl_coef:
            kl = kl_per_token(logprobs, mb.ref_logprobs, s.kl_estimator)
            per_token = per_token + s.kl_coef * kl
            kl_sum = masked_sum(kl, mb.mask)
        sums = sums._replace(kl=kl_sum, clip_low=pg["clip_low_sum"], clip_high=pg["clip_high_sum"])
        return aggregate_numerator(per_token, mb.mask, s.loss_agg) / norm, sums

    return Objective(loss, guard=lambda sums: sums.pg_loss,
                     denominator=token_count if s.plain_token_mean else
                     lambda mask: aggregate_denominator(mask, s.loss_agg), head=head, from_outputs=from_outputs)


def value_objective(s: UpdateSettings) -> Objective:
    """`vf_coef Σ vf_tok / N`: the clipped value loss (TRL's factor 0.5 is inside `value_loss`)."""

    def loss(model, mb: PPOBatch, n_tokens):
        return from_outputs(response_values(model, mb.tokens, mb.attention_mask, mb.response.shape[1]), mb, n_tokens)

    def from_outputs(values, mb: PPOBatch, n_tokens):
        _, vf = value_loss(values, mb.old_values, mb.returns, mb.mask, s.clip_value)
        sums = ValueSums(vf_loss=vf["loss_sum"], vf_clipfrac=vf["clipfrac_sum"], tokens=vf["count"])
        return s.vf_coef * vf["loss_sum"] / n_tokens, sums

    return Objective(loss, guard=lambda sums: sums.vf_loss, denominator=token_count,
                     head=lambda model, h, response: model.apply_head(h), from_outputs=from_outputs)


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
                 s: UpdateSettings, plateau_value=None, base=None, dropout: bool = False):
    """All epochs and minibatches of one model's optimiser steps on `objective`. Pure; jit it (the
    iteration does, one program per model: `engine.programs`).

    With LoRA, `params` are the adapters (all that is differentiated and stepped) and `base` the
    frozen parameters merged with them; `dropout` turns the adapters' dropout on, with a key per
    micro-batch drawn from `key` (the minibatch permutations stay those of `key`).

    A step whose loss or gradient is not finite is skipped: the weights and the optimiser state
    stay as they were (`optax.apply_if_finite`'s rule, decided before the step so that XLA can
    update every weight in place). Returns (params, opt_state, StepStats).
    """
    B = batch.tokens.shape[0]
    M, A = s.num_minibatches, s.grad_accum_steps
    if B % (M * A):
        raise ValueError(f"batch {B} must divide into {M} minibatches x {A} micro-batches")
    micro = B // (M * A)
    if s.max_tokens_per_microbatch:     # micro-batches of packed rows (engine.microbatch): the loss takes those
        objective = packed_objective(objective)

    def micro_loss(params, mb, norm, dropout_key=None):
        model = lora_merge(graphdef, params, base)
        if dropout_key is not None:
            set_dropout_key(model, dropout_key)
        return objective.loss(model, mb, norm)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    extra = {} if plateau_value is None else {"value": plateau_value}
    tx = optax.with_extra_args_support(tx)

    def padded_gradients(params, mb, norm, step_key):     # A micro-batches of B/(M A) rows of P+R
        micro_batches = jax.tree.map(lambda x: x.reshape((A, micro) + x.shape[1:]), mb)  # [A, micro, ...]

        def accumulate(acc, xs):
            mbi, i = xs
            dropout_key = None if step_key is None else jax.random.fold_in(step_key, i)
            (_, sums), grads = grad_fn(params, mbi, norm, dropout_key)
            return jax.tree.map(jnp.add, acc, (grads, sums)), None

        first = jax.tree.map(lambda x: x[0], micro_batches)
        sums_shape = jax.eval_shape(micro_loss, params, first, norm)[1]
        zeros = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), sums_shape))
        if A == 1:
            (grads, sums), _ = accumulate(zeros, (first, 0))
        else:
            (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro_batches, jnp.arange(A)))
        return grads, sums

    def minibatch_step(carry, xs):                       # idx [B/M] (and the step's dropout key)
        params, opt_state = carry
        idx, step_key = xs if dropout else (xs, None)
        mb = _take(batch, idx)
        norm = objective.denominator(mb.mask)            # the minibatch's, shared by its micro-batches
        if s.max_tokens_per_microbatch:
            grads, sums = packed_gradients(grad_fn, params, mb, norm, s.max_tokens_per_microbatch, step_key)
        else:
            grads, sums = padded_gradients(params, mb, norm, step_key)
        norm = global_norm(grads)
        finite = jnp.isfinite(norm) & jnp.isfinite(objective.guard(sums))

        def apply(operands):
            params, opt_state, grads = operands
            # the norm goes to optimizer.clip_by_global_norm (computed once); other transforms ignore it
            updates, opt_state = tx.update(grads, opt_state, params, grad_norm=norm, **extra)
            return optax.apply_updates(params, updates), opt_state

        carry = jax.lax.cond(finite, apply, lambda ops: ops[:2], (params, opt_state, grads))
        return carry, StepStats(sums=sums, grad_norm=norm, skipped=1.0 - finite.astype(jnp.float32))

    def epoch_step(carry, perm):                         # perm [M, B/M] (and [M] step keys)
        return jax.lax.scan(minibatch_step, carry, perm)

    perms = minibatch_permutations(key, B, s)
    if dropout:        # one key per optimiser step, apart from the permutations' stream
        steps = jax.random.split(jax.random.fold_in(key, 1), s.epochs * M)
        perms = (perms, steps.reshape((s.epochs, M) + steps.shape[1:]))
    (params, opt_state), stats = jax.lax.scan(epoch_step, (params, opt_state), perms)
    return params, opt_state, stats


class UpdateMetrics(NamedTuple):
    """The update's metrics (TRL's names in `as_dict`): token-weighted means over every minibatch of
    every epoch, mean gradient norms, and the optimiser steps in which either model skipped. The
    value metrics are None without a critic; `kl` and the clip sides only with the newer loss modes."""

    policy_loss: jax.Array
    value_loss: jax.Array | None
    approxkl: jax.Array
    clipfrac: jax.Array
    entropy: jax.Array
    value_clipfrac: jax.Array | None
    ratio: jax.Array
    policy_grad_norm: jax.Array
    value_grad_norm: jax.Array | None
    nonfinite_steps: jax.Array
    kl: jax.Array | None = None
    clip_low: jax.Array | None = None
    clip_high: jax.Array | None = None

    def as_dict(self) -> dict:
        d = {"loss/policy_avg": self.policy_loss, "loss/value_avg": self.value_loss,
             "policy/approxkl_avg": self.approxkl, "policy/clipfrac_avg": self.clipfrac,
             "policy/entropy_avg": self.entropy, "val/clipfrac_avg": self.value_clipfrac,
             "val/ratio": self.ratio, "policy/grad_norm": self.policy_grad_norm,
             "val/grad_norm": self.value_grad_norm, "nonfinite_steps": self.nonfinite_steps,
             "policy/kl_avg": self.kl, "clip_ratio/low_mean": self.clip_low, "clip_ratio/high_mean": self.clip_high}
        if self.clip_low is not None:
            d["clip_ratio/region_mean"] = self.clipfrac
        return {k: v for k, v in d.items() if v is not None}


def update_metrics(policy: StepStats, critic: StepStats | None) -> UpdateMetrics:
    """Both models' `model_update` statistics (critic None when there is none) -> UpdateMetrics."""
    p = policy.sums
    n = jnp.maximum(p.tokens.sum(), 1.0)
    mean = lambda x: None if x is None else x.sum() / n
    c = None if critic is None else critic.sums
    skipped = policy.skipped if critic is None else jnp.maximum(policy.skipped, critic.skipped)
    return UpdateMetrics(
        policy_loss=mean(p.pg_loss), value_loss=None if c is None else mean(c.vf_loss), approxkl=mean(p.approxkl),
        clipfrac=mean(p.pg_clipfrac), entropy=mean(p.entropy),
        value_clipfrac=None if c is None else mean(c.vf_clipfrac), ratio=mean(p.ratio),
        policy_grad_norm=policy.grad_norm.mean(), value_grad_norm=None if critic is None else critic.grad_norm.mean(),
        nonfinite_steps=skipped.sum(), kl=mean(p.kl), clip_low=mean(p.clip_low), clip_high=mean(p.clip_high))
