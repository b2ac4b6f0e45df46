"""Generalized Advantage Estimation over response tokens, as a masked reverse `lax.scan`.

Schulman, Moritz, Levine, Jordan, Abbeel (2016), "High-Dimensional Continuous Control Using
Generalized Advantage Estimation", eq. (16):

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}        (A after the last valid token = 0)
    R_t     = A_t + V_t                              (the value target / "returns")

Each response token is one step of the MDP; `values[:, t]` is the critic's estimate for the
state before token t, and the value after the last valid token is 0 (the episode ends there).

Padding is handled as in tunix's `compute_gae_advantages`: a step with mask 0 outputs A = 0 and
passes the carry (V_{t+1}, A_{t+1}) through unchanged, so whatever sits in `rewards`/`values`
beyond the mask never leaks into the valid tokens. For a prefix mask this equals TRL's loop
run over each row's valid length only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxppo.core.masked import check_shape


def _scalar(name: str, x) -> jax.Array:
    x = jnp.asarray(x, dtype=jnp.float32)
    check_shape(name, x, ndim=0)
    return x


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma, lam
        ) -> tuple[jax.Array, jax.Array]:
    """Masked GAE.

    Args:
      rewards: [B, T] per-token rewards (shaped: -kl_coef * KL plus the score on the last token).
      values:  [B, T] critic values V(s_t) for the state before each response token.
      mask:    [B, T] 1.0 on valid tokens, 0.0 on padding.
      gamma, lam: discount and GAE lambda; Python floats or traced float scalars.

    Returns:
      (advantages, returns), both [B, T] float32 and 0 where mask is 0;
      returns = advantages + values on valid tokens.
    """
    rewards = jnp.asarray(rewards, dtype=jnp.float32)
    check_shape("rewards", rewards, ndim=2)
    values = jnp.asarray(values, dtype=jnp.float32)
    check_shape("values", values, shape=rewards.shape)
    mask = jnp.asarray(mask)
    check_shape("mask", mask, shape=rewards.shape)
    gamma = _scalar("gamma", gamma)
    lam = _scalar("lam", lam)
    valid = mask != 0

    def step(carry, xs):
        next_value, next_adv = carry                       # [B], [B]
        r_t, v_t, valid_t = xs                             # [B], [B], [B]
        delta = r_t + gamma * next_value - v_t
        adv = delta + gamma * lam * next_adv
        # Padding: emit 0 and keep the carry, so the next valid token to the left still sees
        # the value/advantage of the next *valid* token (0 past the end of the response).
        carry = (jnp.where(valid_t, v_t, next_value), jnp.where(valid_t, adv, next_adv))
        return carry, jnp.where(valid_t, adv, 0.0)

    batch = rewards.shape[0]
    init = (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.float32))
    xs = (rewards.T, values.T, valid.T)                    # each [T, B]: scan runs over tokens
    _, adv_tb = jax.lax.scan(step, init, xs, reverse=True)  # [T, B]
    advantages = adv_tb.T                                  # [B, T]
    returns = jnp.where(valid, advantages + values, 0.0)
    return advantages, returns
