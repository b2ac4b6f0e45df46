"""Per-token rewards for RLHF: KL estimators, reward shaping, KL controllers, score post-processing.

KL penalty (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; Stiennon
et al. 2020): the reward of token t is

    r_t = -kl_coef * KL_t   (+ score on the last valid token of the response)

with KL_t a per-token estimator of KL(pi || pi_ref) on samples from pi (Schulman, "Approximating
KL Divergence", 2020), d = logp - ref_logp:

    k1  = d                              unbiased, high variance, can be negative
    k2  = 0.5 * d^2                      biased, low variance, >= 0
    k3  = (r - 1) - log r,  r = exp(-d)  unbiased, low variance, >= 0
    abs = |d|

The KL controllers and the running score moments are pure functions over small pytree states,
so they run inside a jitted step and are saved with the checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from jaxppo.core.masked import check_shape

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def _f32(name: str, x, *, ndim=None, shape=None) -> jax.Array:
    x = jnp.asarray(x, dtype=jnp.float32)
    check_shape(name, x, ndim=ndim, shape=shape)
    return x


# --------------------------------------------------------------------------- KL estimators

def kl_per_token(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str) -> jax.Array:
    """Per-token KL estimate (see module docstring): [..], [..] -> [..] float32, not masked.

    `estimator` is a static string in ("k1", "k2", "k3", "abs").
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator: unknown KL estimator {estimator!r}, expected one of {KL_ESTIMATORS}")
    logprobs = jnp.asarray(logprobs, dtype=jnp.float32)
    ref_logprobs = _f32("ref_logprobs", ref_logprobs, shape=logprobs.shape)
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * jnp.square(d)
    if estimator == "k3":
        # (r - 1) - log r with log r = -d; expm1 keeps precision when d is small.
        return jnp.expm1(-d) + d
    return jnp.abs(d)


# --------------------------------------------------------------------------- reward shaping

def shape_rewards(scores: jax.Array, logprobs: jax.Array, ref_logprobs: jax.Array,
                  mask: jax.Array, kl_coef, estimator: str = "k1") -> tuple[jax.Array, jax.Array]:
    """Per-token rewards: -kl_coef * KL on valid tokens, plus each row's score on its last one.

    Args:
      scores: [B] sequence-level scores (reward model and/or reward functions); any real dtype,
        cast to float32 first so fractional values are never truncated.
      logprobs, ref_logprobs, mask: [B, T]; mask 1.0 up to and including the first EOS.
      kl_coef: scalar (Python float or traced, e.g. a KL controller's value).
      estimator: "k1" | "k2" | "k3" | "abs".

    Returns:
      (rewards, kl), both [B, T] float32 and 0 on padding. The score goes to the last position
      with mask != 0 (= sum(mask) - 1 for a prefix mask); a row without valid tokens gets none.
    """
    logprobs = _f32("logprobs", logprobs, ndim=2)
    batch, length = logprobs.shape
    ref_logprobs = _f32("ref_logprobs", ref_logprobs, shape=(batch, length))
    scores = _f32("scores", scores, shape=(batch,))
    mask = jnp.asarray(mask)
    check_shape("mask", mask, shape=(batch, length))
    kl_coef = _f32("kl_coef", kl_coef, ndim=0)
    valid = mask != 0

    kl = jnp.where(valid, kl_per_token(logprobs, ref_logprobs, estimator), 0.0)  # [B, T]
    positions = jnp.arange(length)                                              # [T]
    last = jnp.max(jnp.where(valid, positions[None, :], -1), axis=1)            # [B], -1: empty row
    is_last = positions[None, :] == last[:, None]                               # [B, T]
    rewards = -kl_coef * kl + jnp.where(is_last, scores[:, None], 0.0)
    return rewards, kl


def missing_eos_penalty(scores: jax.Array, has_eos: jax.Array, penalty: Optional[float]) -> jax.Array:
    """Subtract `penalty` from the scores of responses that never emitted EOS (TRL's
    `missing_eos_penalty`): [B], [B] bool -> [B] float32. `penalty=None` leaves scores as they are.
    """
    scores = _f32("scores", scores, ndim=1)
    has_eos = jnp.asarray(has_eos)
    check_shape("has_eos", has_eos, shape=scores.shape)
    if penalty is None:
        return scores
    return scores - jnp.where(has_eos.astype(bool), 0.0, jnp.asarray(penalty, jnp.float32))


def overlong_penalty(lengths: jax.Array, max_length, buffer, penalty) -> jax.Array:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): [B] -> [B] float32, added to the scores.

        0                                       L <= L_max - L_buffer
        -penalty * (L - (L_max - L_buffer)) / L_buffer    in between (linear from 0 to -penalty)
        -penalty                                L >= L_max

    `lengths` are the response lengths in tokens; max_length, buffer (> 0), penalty: scalars.
    (verl's DAPO reward manager computes the same ramp; it never sees L > L_max.)
    """
    lengths = _f32("lengths", lengths, ndim=1)
    if isinstance(buffer, (int, float)) and not buffer > 0:
        raise ValueError(f"buffer: expected > 0, got {buffer!r}")
    max_length = _f32("max_length", max_length, ndim=0)
    buffer = _f32("buffer", buffer, ndim=0)
    penalty = _f32("penalty", penalty, ndim=0)
    excess = jnp.clip((lengths - (max_length - buffer)) / buffer, 0.0, 1.0)
    return -penalty * excess


# --------------------------------------------------------------------------- KL controllers

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KLControllerState:
    """State of a KL controller: the current KL coefficient."""

    value: jax.Array  # [] float32


def init_kl_controller(kl_coef: float) -> KLControllerState:
    return KLControllerState(value=jnp.asarray(kl_coef, dtype=jnp.float32))


def fixed_kl_update(state: KLControllerState, current_kl, n_steps) -> KLControllerState:
    """Fixed KL coefficient: the state is returned unchanged."""
    del current_kl, n_steps
    return state


def adaptive_kl_update(state: KLControllerState, current_kl, n_steps, target, horizon
                       ) -> KLControllerState:
    """Adaptive KL controller (Ziegler et al. 2019, sec. 2.2; TRL's AdaptiveKLController).

        e     = clip(current_kl / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    `n_steps` is the number of samples (episodes) seen since the last update, `horizon` the
    number of samples over which the coefficient may change by up to 20%.
    """
    current_kl = _f32("current_kl", current_kl, ndim=0)
    n_steps = _f32("n_steps", n_steps, ndim=0)
    target = _f32("target", target, ndim=0)
    horizon = _f32("horizon", horizon, ndim=0)
    proportional_error = jnp.clip(current_kl / target - 1.0, -0.2, 0.2)
    mult = 1.0 + proportional_error * n_steps / horizon
    return KLControllerState(value=state.value * mult)


# --------------------------------------------------------------------------- score post-processing

def clip_rewards(scores: jax.Array, clip) -> jax.Array:
    """Clip scores to [-clip, clip]: [B] -> [B] float32. `clip` None or 0 (also traced 0) = off."""
    scores = _f32("scores", scores, ndim=1)
    if clip is None:
        return scores
    clip = _f32("clip", clip, ndim=0)
    return jnp.where(clip > 0, jnp.clip(scores, -clip, clip), scores)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RunningMoments:
    """Running count / mean / population variance of all scores seen so far."""

    count: jax.Array  # [] float32
    mean: jax.Array   # [] float32
    var: jax.Array    # [] float32, population variance (ddof=0)


def init_running_moments() -> RunningMoments:
    # var = 1 so that normalising with the empty state is the identity.
    return RunningMoments(count=jnp.zeros((), jnp.float32), mean=jnp.zeros((), jnp.float32),
                          var=jnp.ones((), jnp.float32))


def update_running_moments(state: RunningMoments, x: jax.Array) -> RunningMoments:
    """Merge a batch `x` [B] into the moments with Chan et al.'s parallel algorithm (1979):

        n = n_a + n_b,  delta = mean_b - mean_a
        mean = mean_a + delta * n_b / n
        M2   = var_a * n_a + var_b * n_b + delta^2 * n_a * n_b / n,   var = M2 / n
    """
    x = _f32("x", x, ndim=1)
    if x.shape[0] == 0:
        raise ValueError("x: expected at least one score, got shape (0,)")
    n_b = jnp.asarray(x.shape[0], jnp.float32)
    mean_b = jnp.mean(x)
    var_b = jnp.mean(jnp.square(x - mean_b))
    n = state.count + n_b
    delta = mean_b - state.mean
    mean = state.mean + delta * n_b / n
    m2 = state.var * state.count + var_b * n_b + jnp.square(delta) * state.count * n_b / n
    return RunningMoments(count=n, mean=mean, var=m2 / n)


def normalize_scores(state: RunningMoments, scores: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(scores - mean) / sqrt(var + eps) with the moments in `state`: [B] -> [B] float32.

    Uses the state as given: to include the current batch in the statistics (the intended use),
    call `update_running_moments` first, or `update_and_normalize`.
    """
    scores = _f32("scores", scores, ndim=1)
    return (scores - state.mean) * jax.lax.rsqrt(state.var + eps)


def update_and_normalize(state: RunningMoments, scores: jax.Array, eps: float = 1e-8
                         ) -> tuple[RunningMoments, jax.Array]:
    """Include `scores` [B] in the moments, then normalise them with the updated moments."""
    state = update_running_moments(state, scores)
    return state, normalize_scores(state, scores, eps)
