"""PPO losses over response tokens: clipped policy surrogate, clipped value loss, entropy.

Schulman, Wolski, Dhariwal, Radford, Klimov (2017), "Proximal Policy Optimization Algorithms",
eq. (7), written as a loss to minimise per token t with r_t = exp(logp_t - logp_old_t):

    L_pg = max(-A_t * r_t, -A_t * clip(r_t, 1 - eps, 1 + eps))

The value loss is the clipped form used by OpenAI baselines / lm-human-preferences / TRL:

    L_vf = 0.5 * max((V_t - R_t)^2, (clip(V_t, V_old_t - c, V_old_t + c) - R_t)^2)

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
                mask: jax.Array, clip_eps) -> tuple[jax.Array, dict]:
    """PPO clipped surrogate loss (Schulman et al. 2017), masked mean over tokens.

        r = exp(logp - logp_old)
        pg_losses  = -A * r
        pg_losses2 = -A * clip(r, 1 - eps, 1 + eps)
        loss = masked_mean(max(pg_losses, pg_losses2))

    Args: logprobs (differentiated), old_logprobs, advantages, mask: all [B, T]; clip_eps scalar.

    Returns (loss, stats) with, per token-level stat, the masked sum and the mean (= sum/count):
      loss_sum, count, clipfrac_sum / clipfrac (fraction of tokens where the clipped term is the
      strictly larger, i.e. active, one, as TRL), approxkl_sum / approxkl (0.5 * (logp - old)^2,
      TRL's), ratio_sum / ratio_mean, and loss (again, for logging).
    """
    logprobs = _tokens("logprobs", logprobs)
    shape = logprobs.shape
    old_logprobs = _tokens("old_logprobs", old_logprobs, shape)
    advantages = _tokens("advantages", advantages, shape)
    mask = _mask(mask, shape)
    clip_eps = _scalar("clip_eps", clip_eps)
    valid = mask != 0
    # Sanitise padding *before* exp: exp(garbage) = inf would turn the (zero) gradient into NaN.
    log_ratio = jnp.where(valid, logprobs - old_logprobs, 0.0)
    advantages = jnp.where(valid, advantages, 0.0)
    ratio = jnp.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = jnp.maximum(pg_losses, pg_losses2)

    count = jnp.sum(mask)
    loss_sum = masked_sum(per_token, mask)
    clipfrac_sum = masked_sum((pg_losses2 > pg_losses).astype(jnp.float32), mask)
    approxkl_sum = masked_sum(0.5 * jnp.square(log_ratio), mask)
    ratio_sum = masked_sum(ratio, mask)
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
    }
    return loss, stats


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
