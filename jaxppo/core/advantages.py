"""Critic-free advantages for groups of sampled responses: GRPO, RLOO, REINFORCE++.

`scores` is `[N]` with N = groups x G: the G responses sampled for one prompt are consecutive
(rows g*G .. g*G + G - 1 form group g), as TRL's and verl's samplers lay them out. With r the
scores of one group, mean_g / std_g its mean and unbiased (ddof 1) standard deviation:

    grpo            A_i = (r_i - mean_g) / (std + eps)      std = std_g ("group") or the whole
                                                            batch's ("batch"); no division ("none")
    rloo            A_i = r_i - 1/(G-1) sum_{j != i} r_j  = G/(G-1) (r_i - mean_g)
    group_baseline  A_i = r_i - mean_g

- GRPO: Shao et al. (2024), "DeepSeekMath", sec. 4.1.2; the "batch" scale is TRL's
  `scale_rewards="batch"` (Hu et al. 2025, REINFORCE++'s global normalisation); "none" is Dr. GRPO
  (Liu et al. 2025, "Understanding R1-Zero-Like Training").
- RLOO: Kool, van Hoof, Welling (2019), "Buy 4 REINFORCE Samples, Get a Baseline for Free!";
  Ahmadian et al. (2024), "Back to Basics".
- REINFORCE++: Hu (2025), "REINFORCE++: A Simple and Efficient Approach for Aligning LLMs"
  (OpenRLHF / verl's `reinforce_plus_plus`): token-level discounted returns whitened over the
  batch. REINFORCE++-baseline = `group_baseline`, then the same whitening (`reinforce_pp` with the
  baselined score as the only token reward, gamma = 1).

Sequence-level advantages `[N]` go to the policy loss through `broadcast_to_tokens`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxppo.core.masked import check_shape, masked_whiten

GRPO_SCALES = ("group", "batch", "none")

# TRL's `torch.isclose(std, 0)`: atol 1e-8 (rtol is moot against 0).
ZERO_STD_ATOL = 1e-8


def _groups(scores, group_size: int) -> jax.Array:
    """Check and reshape scores [N] -> [N/G, G] float32."""
    scores = jnp.asarray(scores, dtype=jnp.float32)
    check_shape("scores", scores, ndim=1)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
    n = scores.shape[0]
    if n == 0 or n % group_size:
        raise ValueError(f"group_size: {group_size} does not divide the number of scores {n}")
    return scores.reshape(n // group_size, group_size)  # [N/G, G]


def _centered(grouped: jax.Array) -> jax.Array:
    """r - mean_g: [N/G, G] -> [N/G, G].

    Computed about the group's first score (mean(r) = r_0 + mean(r - r_0)) so that a group of equal
    scores gives exactly 0, whatever the float rounding of its mean; mathematically unchanged.
    """
    shifted = grouped - grouped[:, :1]
    return shifted - jnp.mean(shifted, axis=1, keepdims=True)


def _std(centered: jax.Array, axis) -> jax.Array:
    """Unbiased std (ddof 1) from deviations about the mean; 0 for a single value (as TRL)."""
    n = centered.size if axis is None else centered.shape[axis]
    if n < 2:
        return jnp.zeros(() if axis is None else centered.shape[:axis] + centered.shape[axis + 1:],
                         centered.dtype)
    return jnp.sqrt(jnp.sum(jnp.square(centered), axis=axis) / (n - 1))


def grpo(scores: jax.Array, group_size: int, scale: str = "group", eps: float = 1e-4) -> jax.Array:
    """GRPO advantages: [N] -> [N] float32 (see the module docstring).

        A_i = (r_i - mean_g) / (std + eps)

    `scale` (static): "group" (std of the group, ddof 1), "batch" (std of all N scores, ddof 1,
    about the batch mean; the centring stays per group, as TRL's `scale_rewards="batch"`) or
    "none" (A_i = r_i - mean_g, Dr. GRPO). eps = 1e-4 is TRL's. A group of equal scores gets
    exactly 0, never NaN.
    """
    if scale not in GRPO_SCALES:
        raise ValueError(f"scale: expected one of {GRPO_SCALES}, got {scale!r}")
    grouped = _groups(scores, group_size)               # [N/G, G]
    centered = _centered(grouped)                       # [N/G, G]
    if scale == "group":
        std = _std(centered, axis=1)[:, None]           # [N/G, 1]
        centered = centered / (std + eps)
    elif scale == "batch":
        flat = grouped.reshape(-1)                      # [N]
        std = _std(flat - jnp.mean(flat), axis=None)    # []
        centered = centered / (std + eps)
    return centered.reshape(-1)                         # [N]


def rloo(scores: jax.Array, group_size: int) -> jax.Array:
    """RLOO advantages: [N] -> [N] float32, r_i minus the mean of the other G - 1 scores of its group.

        A_i = r_i - (sum_g - r_i) / (G - 1) = G / (G - 1) * (r_i - mean_g)

    Needs G >= 2 (ValueError otherwise).
    """
    if isinstance(group_size, int) and not isinstance(group_size, bool) and group_size < 2:
        raise ValueError(f"group_size: RLOO needs at least 2 samples per group, got {group_size}")
    grouped = _groups(scores, group_size)               # [N/G, G]
    return (_centered(grouped) * (group_size / (group_size - 1))).reshape(-1)


def group_baseline(scores: jax.Array, group_size: int) -> jax.Array:
    """r minus its group's mean: [N] -> [N] float32 (REINFORCE++-baseline's first step, Dr. GRPO)."""
    return _centered(_groups(scores, group_size)).reshape(-1)


def group_stats(scores: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array]:
    """Per-group spread of the scores, for TRL's metrics: [N] -> (std [N/G], frac_zero_std []).

    std is each group's unbiased (ddof 1) standard deviation (0 when G = 1); TRL's `reward_std`
    is its mean over the groups (with `scale_rewards` "group" or "none"). `frac_zero_std` is the
    fraction of groups whose std is 0 (within 1e-8, TRL's `isclose`), TRL's
    `frac_reward_zero_std`: the groups that give no learning signal.
    """
    std = _std(_centered(_groups(scores, group_size)), axis=1)   # [N/G]
    frac_zero_std = jnp.mean((std <= ZERO_STD_ATOL).astype(jnp.float32))
    return std, frac_zero_std


def discounted_returns(token_rewards: jax.Array, mask: jax.Array, gamma=1.0) -> jax.Array:
    """Masked discounted reward-to-go: [N, T], [N, T] -> [N, T] float32, 0 on padding.

        G_t = m_t * (r_t + gamma * G_{t+1}),   G_T = 0

    A reverse `lax.scan` over T; the carry is cut at every masked position (verl's "reset after
    EOS"), so nothing flows from padding into a response.
    """
    token_rewards = jnp.asarray(token_rewards, dtype=jnp.float32)
    check_shape("token_rewards", token_rewards, ndim=2)
    mask = jnp.asarray(mask)
    check_shape("mask", mask, shape=token_rewards.shape)
    valid = mask != 0
    gamma = jnp.asarray(gamma, dtype=jnp.float32)
    check_shape("gamma", gamma, ndim=0)
    rewards = jnp.where(valid, token_rewards, 0.0)

    def step(carry, xs):                                # carry [N]: G_{t+1}
        r_t, v_t = xs                                   # [N], [N]
        g_t = jnp.where(v_t, r_t + gamma * carry, 0.0)
        return g_t, g_t

    _, returns = jax.lax.scan(step, jnp.zeros(rewards.shape[:1], jnp.float32),
                              (rewards.T, valid.T), reverse=True)   # [T, N]
    return returns.T                                    # [N, T]


def reinforce_pp(token_rewards: jax.Array, mask: jax.Array, gamma=1.0
                 ) -> tuple[jax.Array, jax.Array]:
    """REINFORCE++ (Hu 2025; OpenRLHF, verl): [N, T], [N, T] -> (advantages, returns), both [N, T].

        returns    G_t = r_t + gamma * G_{t+1}            over valid tokens, 0 on padding
        advantages A_t = (G_t - mean(G)) / sqrt(var(G) + 1e-8) * m_t

    with mean and unbiased var over all valid tokens of the batch (`masked_whiten`, as verl;
    OpenRLHF uses the biased var, a factor n/(n-1) apart). `token_rewards` usually holds
    -kl_coef * KL per token plus the score on the last valid token (`rewards.shape_rewards`).
    """
    returns = discounted_returns(token_rewards, mask, gamma)
    mask = jnp.asarray(mask).astype(jnp.float32)
    advantages = masked_whiten(returns, mask, shift_mean=True) * mask
    return advantages, returns


def broadcast_to_tokens(seq_adv: jax.Array, mask: jax.Array) -> jax.Array:
    """Sequence advantages onto each row's valid tokens: [N], [N, T] -> [N, T] float32 (0 on padding)."""
    seq_adv = jnp.asarray(seq_adv, dtype=jnp.float32)
    check_shape("seq_adv", seq_adv, ndim=1)
    mask = jnp.asarray(mask)
    check_shape("mask", mask, ndim=2)
    check_shape("mask", mask, shape=(seq_adv.shape[0], mask.shape[1]))
    return jnp.where(mask != 0, seq_adv[:, None] * mask.astype(jnp.float32), 0.0)
