"""PPO losses over response tokens: clipped policy surrogate, clipped value loss, entropy.

Schulman, Wolski, Dhariwal, Radford, Klimov (2017), "Proximal Policy Optimization Algorithms",
eq. (7), written as a loss to minimise per token t with r_t = exp(logp_t - logp_old_t):

    L_pg = max(-A_t * r_t, -A_t * clip(r_t, 1 - eps, 1 + eps))

The value loss is the clipped form used by OpenAI baselines / lm-human-preferences / TRL:

    L_vf = 0.5 * max((V_t - R_t)^2, (clip(V_t, V_old_t - c, V_old_t + c) - R_t)^2)

`aggregate` reduces a per-token loss with verl's `loss_agg_mode` (token-mean, seq-mean-token-mean,
seq-mean-token-sum, seq-mean-token-sum-norm), in numerator / denominator pieces for exact
gradient accumulation.

Every loss is the mean over all valid tokens of the batch. `stats` also carries the token sums
(`*_sum`) and the token `count`, so micro-batches accumulate exactly (mean = sum / count) even
when their response lengths differ. A batch with no valid token gives loss 0, never NaN.
Values at masked-out positions (garbage after EOS, even NaN/inf) affect neither the losses
nor their gradients.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxppo.core.masked import check_shape, masked_sum, safe_div


def _tokens(name: str, x: jax.Array, shape=None) -> jax.Array:
    x = jnp.asarray(x, dtype=jnp.float32)
    if shape is None:
        check_shape(name, x, ndim=2)
    else:
        check_shape(name, x, shape=shape)
    return x


def _scalar(name: str, x) -> jax.Array:
    x = jnp.asarray(x, dtype=jnp.float32)
    check_shape(name, x, ndim=0)
    return x


def _check_concrete(name: str, x, ok, message: str) -> None:
    """ValueError naming `name` when a Python number fails `ok` (traced values pass unchecked)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool) and not ok(x):
        raise ValueError(f"{name}: {message}, got {x!r}")


def _mask(mask: jax.Array, shape) -> jax.Array:
    mask = jnp.asarray(mask)
    check_shape("mask", mask, shape=shape)
    return mask.astype(jnp.float32)


def logprobs_from_logits(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits)[tokens]: [B, T, V], [B, T] int -> [B, T] float32.

    Computed as logits[token] - logsumexp(logits) so the [B, T, V] log-softmax is never stored.
    """
    logits = jnp.asarray(logits)
    check_shape("logits", logits, ndim=3)
    tokens = jnp.asarray(tokens)
    check_shape("tokens", tokens, shape=logits.shape[:2])
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens: expected an integer dtype, got {tokens.dtype}")
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]  # [B, T]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Per-token entropy H = logsumexp(z) - sum_v softmax(z)_v z_v: [B, T, V] -> [B, T] float32."""
    logits = jnp.asarray(logits)
    check_shape("logits", logits, ndim=3)
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(probs * logits, axis=-1)


def entropy(logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict]:
    """Masked mean token entropy of the policy: [B, T, V], [B, T] -> (scalar, stats).

    stats: `entropy_sum`, `count`.
    """
    logits = jnp.asarray(logits)
    check_shape("logits", logits, ndim=3)
    mask = _mask(mask, logits.shape[:2])
    ent = entropy_from_logits(logits)
    ent_sum = masked_sum(ent, mask)
    count = jnp.sum(mask)
    return safe_div(ent_sum, count), {"entropy_sum": ent_sum, "count": count}


def policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                mask: jax.Array, clip_eps, clip_eps_high=None, dual_clip=None
                ) -> tuple[jax.Array, dict]:
    """PPO clipped surrogate loss (Schulman et al. 2017), masked mean over tokens.

        r = exp(logp - logp_old)
        pg_losses  = -A * r
        pg_losses2 = -A * clip(r, 1 - eps, 1 + eps_high)        eps_high = clip_eps_high or eps
        per_token  = max(pg_losses, pg_losses2)
        per_token  = min(per_token, -c * A)   where A < 0        only with dual_clip = c
        loss = masked_mean(per_token)

    clip_eps_high is DAPO's "clip-higher" (Yu et al. 2025, TRL's `epsilon_high`, verl's
    `clip_ratio_high`). dual_clip c > 1 is dual-clip PPO (Ye et al. 2020, "Mastering Complex
    Control in MOBA Games with Deep RL"; verl's `clip_ratio_c`): for a negative advantage the
    loss is capped at -c * A, however large the ratio. With both None the result is the plain
    PPO loss, bit for bit.

    Args: logprobs (differentiated), old_logprobs, advantages, mask: all [B, T]; clip_eps,
    clip_eps_high, dual_clip: scalars (or None for the last two).

    Returns (loss, stats) with, per token-level stat, the masked sum and the mean (= sum/count):
      loss_sum, count, clipfrac_sum / clipfrac (fraction of tokens where the clipped term is the
      strictly larger, i.e. active, one, as TRL), approxkl_sum / approxkl (0.5 * (logp - old)^2,
      TRL's), ratio_sum / ratio_mean, loss (again, for logging);
      clip_low_sum / clip_low_frac: tokens with r < 1 - eps and A < 0, clip_high_sum /
      clip_high_frac: tokens with r > 1 + eps_high and A > 0 (TRL's GRPO `clip_ratio/low_mean`,
      `clip_ratio/high_mean`);
      per_token: the [B, T] loss before aggregation (0 on padding, where the advantage is zeroed),
      for `aggregate` and its pieces;
      with dual_clip also dual_clip_sum / dual_clip_frac: tokens with A < 0 where the cap -c * A
      is active (verl's `pg_clipfrac_lower`).
    """
    logprobs = _tokens("logprobs", logprobs)
    shape = logprobs.shape
    old_logprobs = _tokens("old_logprobs", old_logprobs, shape)
    advantages = _tokens("advantages", advantages, shape)
    mask = _mask(mask, shape)
    clip_eps = _scalar("clip_eps", clip_eps)
    _check_concrete("clip_eps_high", clip_eps_high, lambda v: v >= 0, "expected >= 0")
    _check_concrete("dual_clip", dual_clip, lambda v: v > 1, "expected > 1 (verl's clip_ratio_c)")
    clip_high = clip_eps if clip_eps_high is None else _scalar("clip_eps_high", clip_eps_high)
    valid = mask != 0
    # Sanitise padding *before* exp: exp(garbage) = inf would turn the (zero) gradient into NaN.
    log_ratio = jnp.where(valid, logprobs - old_logprobs, 0.0)
    advantages = jnp.where(valid, advantages, 0.0)
    ratio = jnp.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_high)
    per_token = jnp.maximum(pg_losses, pg_losses2)
    negative = advantages < 0
    if dual_clip is not None:
        pg_losses3 = -advantages * _scalar("dual_clip", dual_clip)
        dual_active = negative & (per_token > pg_losses3)
        per_token = jnp.where(negative, jnp.minimum(pg_losses3, per_token), per_token)

    count = jnp.sum(mask)
    loss_sum = masked_sum(per_token, mask)
    clipfrac_sum = masked_sum((pg_losses2 > pg_losses).astype(jnp.float32), mask)
    approxkl_sum = masked_sum(0.5 * jnp.square(log_ratio), mask)
    ratio_sum = masked_sum(ratio, mask)
    clip_low_sum = masked_sum(((ratio < 1.0 - clip_eps) & negative).astype(jnp.float32), mask)
    clip_high_sum = masked_sum(((ratio > 1.0 + clip_high) & (advantages > 0)).astype(jnp.float32), mask)
    loss = safe_div(loss_sum, count)
    stats = {
        "loss": loss,
        "loss_sum": loss_sum,
        "count": count,
        "clipfrac": safe_div(clipfrac_sum, count),
        "clipfrac_sum": clipfrac_sum,
        "approxkl": safe_div(approxkl_sum, count),
        "approxkl_sum": approxkl_sum,
        "ratio_mean": safe_div(ratio_sum, count),
        "ratio_sum": ratio_sum,
        "clip_low_sum": clip_low_sum,
        "clip_low_frac": safe_div(clip_low_sum, count),
        "clip_high_sum": clip_high_sum,
        "clip_high_frac": safe_div(clip_high_sum, count),
        "per_token": per_token,
    }
    if dual_clip is not None:
        dual_clip_sum = masked_sum(dual_active.astype(jnp.float32), mask)
        stats["dual_clip_sum"] = dual_clip_sum
        stats["dual_clip_frac"] = safe_div(dual_clip_sum, count)
    return loss, stats


# --------------------------------------------------------------------------- loss aggregation

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _agg_inputs(per_token, mask, mode: str) -> tuple[jax.Array, jax.Array]:
    if mode not in AGG_MODES:
        raise ValueError(f"mode: expected one of {AGG_MODES}, got {mode!r}")
    per_token = _tokens("per_token", per_token)
    return per_token, _mask(mask, per_token.shape)


def aggregate_numerator(per_token: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
    """The additive part of `aggregate`: [B, T], [B, T] -> [] float32, a sum over rows.

        token-mean, seq-mean-token-sum, seq-mean-token-sum-norm:  sum_{b,t} x m
        seq-mean-token-mean:  sum_b (sum_t x m / sum_t m)           (0 for a row without tokens)

    Split a batch's rows into micro-batches: sum of their numerators / `aggregate_denominator`
    of the whole batch = `aggregate` of the whole batch, exactly (gradient accumulation).
    """
    per_token, mask = _agg_inputs(per_token, mask, mode)
    if mode == "seq-mean-token-mean":
        row_sums = masked_sum(per_token, mask, axis=1)                    # [B]
        return jnp.sum(safe_div(row_sums, jnp.sum(mask, axis=1)))
    return masked_sum(per_token, mask)


def aggregate_denominator(mask: jax.Array, mode: str) -> jax.Array:
    """The normaliser of `aggregate` for a whole batch: [B, T] -> [] float32.

        token-mean:               sum(m), or 1 when it is 0 (= max(sum(m), 1) for a 0/1 mask)
        seq-mean-token-mean:      B
        seq-mean-token-sum:       B
        seq-mean-token-sum-norm:  B * T
    """
    if mode not in AGG_MODES:
        raise ValueError(f"mode: expected one of {AGG_MODES}, got {mode!r}")
    mask = jnp.asarray(mask)
    check_shape("mask", mask, ndim=2)
    batch, length = mask.shape
    if mode == "token-mean":
        count = jnp.sum(mask.astype(jnp.float32))
        return jnp.where(count > 0, count, 1.0)
    if mode == "seq-mean-token-sum-norm":
        return jnp.asarray(batch * length, jnp.float32)
    return jnp.asarray(batch, jnp.float32)


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
    """Reduce a per-token loss to a scalar with verl's `loss_agg_mode`: [B, T], [B, T] -> [].

        token-mean               sum(x m) / sum(m)                 (0 when no token is valid)
        seq-mean-token-mean      1/B sum_b sum_t(x m) / sum_t(m)   (empty rows count as 0)
        seq-mean-token-sum       1/B sum_b sum_t(x m)
        seq-mean-token-sum-norm  sum(x m) / (B T)

    `mode` is a static string. Against TRL's GRPO `loss_type`: "grpo" = seq-mean-token-mean
    (per-sequence mean, then the mean over sequences; DeepSeekMath's eq.); "bnpo" = token-mean
    over the micro-batch; "dr_grpo" = seq-mean-token-sum-norm with T the maximal completion length
    (Liu et al. 2025, Dr. GRPO); "dapo" = token-mean over the whole generation batch (Yu et al. 2025,
    DAPO's token-level loss; with micro-batches use `aggregate_numerator` /
    `aggregate_denominator`). verl's own seq-mean-token-sum-norm divides by T only (a constant
    factor B from this one, TRL's dr_grpo, DESIGN's); verl's seq-mean-token-mean gives NaN for an
    empty row, where this gives 0.
    """
    return aggregate_numerator(per_token, mask, mode) / aggregate_denominator(mask, mode)


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               clip_value: Optional[float]) -> tuple[jax.Array, dict]:
    """Clipped value loss with TRL's factor 0.5, masked mean over tokens.

        v_clipped = clip(v, v_old - c, v_old + c)
        loss = 0.5 * masked_mean(max((v - R)^2, (v_clipped - R)^2))

    Args: values (differentiated), old_values (rollout-time values), returns, mask: all
    [B, T]; clip_value c: scalar, or None for the unclipped 0.5 * (v - R)^2.

    Returns (loss, stats): loss_sum (includes the 0.5, so loss = loss_sum / count), count,
    clipfrac_sum / clipfrac (tokens where the clipped term is strictly larger), vpred_sum /
    vpred_mean, and loss.
    """
    values = _tokens("values", values)
    shape = values.shape
    old_values = _tokens("old_values", old_values, shape)
    returns = _tokens("returns", returns, shape)
    mask = _mask(mask, shape)
    valid = mask != 0
    values = jnp.where(valid, values, 0.0)
    old_values = jnp.where(valid, old_values, 0.0)
    returns = jnp.where(valid, returns, 0.0)
    if clip_value is None:
        values_clipped = values
    else:
        clip_value = _scalar("clip_value", clip_value)
        values_clipped = jnp.clip(values, old_values - clip_value, old_values + clip_value)
    vf_losses1 = jnp.square(values - returns)
    vf_losses2 = jnp.square(values_clipped - returns)
    per_token = 0.5 * jnp.maximum(vf_losses1, vf_losses2)

    count = jnp.sum(mask)
    loss_sum = masked_sum(per_token, mask)
    clipfrac_sum = masked_sum((vf_losses2 > vf_losses1).astype(jnp.float32), mask)
    vpred_sum = masked_sum(values, mask)
    loss = safe_div(loss_sum, count)
    stats = {
        "loss": loss,
        "loss_sum": loss_sum,
        "count": count,
        "clipfrac": safe_div(clipfrac_sum, count),
        "clipfrac_sum": clipfrac_sum,
        "vpred_mean": safe_div(vpred_sum, count),
        "vpred_sum": vpred_sum,
    }
    return loss, stats
