"""jaxppo.core.advantages against NumPy ports of TRL (GRPO, RLOO), verl and OpenRLHF (REINFORCE++,
REINFORCE++-baseline), on odd sizes (3 groups x 5), jitted and eager.

Tolerance: rtol 1e-5 / atol 1e-5 (float32 against float64 references) unless stated.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxppo.core import advantages as adv
from jaxppo.core.masked import masked_whiten

TOL = dict(rtol=1e-5, atol=1e-5)
GROUPS, G, T = 3, 5, 7

grpo_jit = jax.jit(adv.grpo, static_argnames=("group_size", "scale"))
rloo_jit = jax.jit(adv.rloo, static_argnames=("group_size",))
baseline_jit = jax.jit(adv.group_baseline, static_argnames=("group_size",))
stats_jit = jax.jit(adv.group_stats, static_argnames=("group_size",))
rpp_jit = jax.jit(adv.reinforce_pp)
broadcast_jit = jax.jit(adv.broadcast_to_tokens)


@pytest.fixture(autouse=True)
def _no_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _scores(seed=0, n=GROUPS * G):
    return np.random.default_rng(seed).normal(size=n).astype(np.float32)


def _mask(lengths, t=T):
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


# --------------------------------------------------------------------------- NumPy ports

def trl_grpo(rewards, g, scale_rewards):
    """TRL GRPOTrainer._generate_and_score_completions (1.x), float64."""
    r = rewards.astype(np.float64)
    mean = np.repeat(r.reshape(-1, g).mean(axis=1), g)
    a = r - mean
    if scale_rewards in ("group", "none"):
        std = np.repeat(r.reshape(-1, g).std(axis=1, ddof=1), g) if g > 1 else np.zeros_like(r)
    else:
        std = np.full_like(r, r.std(ddof=1))
    is_std_zero = np.isclose(std, 0.0)
    if scale_rewards != "none":
        a = a / (std + 1e-4)
    return a, dict(reward_std=std.mean(), frac_reward_zero_std=is_std_zero.mean())


def trl_rloo(rewards, g):
    """TRL RLOOTrainer: leave-one-out baseline (grouped_sum - r) / (G - 1)."""
    grouped = rewards.astype(np.float64).reshape(-1, g)
    baselines = (grouped.sum(axis=1, keepdims=True) - grouped) / (g - 1)
    return (grouped - baselines).reshape(-1)


def verl_rloo(scores, g):
    """verl compute_rloo_outcome_advantage: r * G/(G-1) - mean * G/(G-1)."""
    s = scores.astype(np.float64)
    mean = np.repeat(s.reshape(-1, g).mean(axis=1), g)
    return s * g / (g - 1) - mean * g / (g - 1)


def verl_masked_whiten(x, mask):
    m = mask.astype(np.float64)
    mean = (x * m).sum() / m.sum()
    var = (((x - mean) ** 2) * m).sum() / m.sum()
    var = var * m.sum() / (m.sum() - 1)            # unbiased, as verl / TRL
    return (x - mean) / np.sqrt(var + 1e-8)


def verl_reinforce_pp(token_rewards, mask, gamma):
    """verl compute_reinforce_plus_plus_outcome_advantage (a Python loop over t)."""
    r = token_rewards.astype(np.float64)
    returns = np.zeros_like(r)
    running = np.zeros(r.shape[0])
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running
        returns[:, t] = running
        running = running * mask[:, t]               # reset after EOS
    return verl_masked_whiten(returns, mask) * mask, returns


def openrlhf_returns(token_rewards, mask, gamma):
    """OpenRLHF get_cumulative_returns: rewards masked first, no reset."""
    r = token_rewards.astype(np.float64) * mask
    returns = np.zeros_like(r)
    cum = np.zeros(r.shape[0])
    for t in reversed(range(r.shape[1])):
        cum = r[:, t] + gamma * cum
        returns[:, t] = cum
    return returns


def verl_reinforce_pp_baseline(scores, mask, g):
    """verl compute_reinforce_plus_plus_baseline_outcome_advantage (groups of G > 1)."""
    s = scores.astype(np.float64)
    s = s - np.repeat(s.reshape(-1, g).mean(axis=1), g)
    tiled = s[:, None] * mask
    return verl_masked_whiten(tiled, mask) * mask


# --------------------------------------------------------------------------- GRPO / RLOO / baseline

@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_matches_trl(scale):
    scores = _scores()
    expected, _ = trl_grpo(scores, G, scale)
    np.testing.assert_allclose(grpo_jit(scores, group_size=G, scale=scale), expected, **TOL)


def test_grpo_eager_equals_jit_and_no_retrace():
    scores = _scores(1)
    np.testing.assert_allclose(adv.grpo(scores, G), grpo_jit(scores, group_size=G), rtol=1e-6, atol=1e-6)
    fn = jax.jit(functools.partial(adv.grpo, group_size=G))
    fn(scores)
    fn(_scores(2))
    assert fn._cache_size() == 1


def test_grpo_constant_group_gives_exact_zero():
    scores = np.array([0.1] * 5 + [1 / 3] * 5 + [0.0, 1.0, 0.0, 1.0, 1.0], np.float32)
    for scale in ("group", "none"):
        out = np.asarray(grpo_jit(scores, group_size=5, scale=scale))
        assert np.all(np.isfinite(out))
        assert np.all(out[:10] == 0.0), out[:10]
    out = np.asarray(grpo_jit(np.full(6, 0.7, np.float32), group_size=3, scale="batch"))
    assert np.all(out == 0.0)


def test_grpo_group_of_one_is_zero():
    np.testing.assert_array_equal(grpo_jit(_scores(n=4), group_size=1), np.zeros(4))


@pytest.mark.parametrize("fn", [adv.grpo, adv.rloo, adv.group_baseline, adv.group_stats])
def test_group_size_must_divide(fn):
    with pytest.raises(ValueError, match="group_size"):
        fn(_scores(n=14), 5)
    with pytest.raises(ValueError, match="group_size"):
        fn(_scores(n=15), 0)
    with pytest.raises(ValueError, match="scores"):
        fn(_scores(n=15).reshape(3, 5), 5)


def test_grpo_unknown_scale():
    with pytest.raises(ValueError, match="scale"):
        adv.grpo(_scores(), G, scale="std")


def test_rloo_matches_trl_and_verl():
    scores = _scores(3)
    np.testing.assert_allclose(rloo_jit(scores, group_size=G), trl_rloo(scores, G), **TOL)
    np.testing.assert_allclose(rloo_jit(scores, group_size=G), verl_rloo(scores, G), **TOL)
    np.testing.assert_allclose(adv.rloo(scores, G), trl_rloo(scores, G), **TOL)


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match="group_size"):
        adv.rloo(_scores(n=3), 1)


def test_group_baseline():
    scores = _scores(4)
    expected = scores - np.repeat(scores.astype(np.float64).reshape(-1, G).mean(axis=1), G)
    np.testing.assert_allclose(baseline_jit(scores, group_size=G), expected, **TOL)
    np.testing.assert_allclose(adv.group_baseline(scores, G), expected, **TOL)


def test_group_stats_match_trl_metrics():
    scores = _scores(5)
    scores[5:10] = 2.0                                  # one group without spread
    std, frac = stats_jit(scores, group_size=G)
    _, metrics = trl_grpo(scores, G, "group")
    np.testing.assert_allclose(std, scores.astype(np.float64).reshape(-1, G).std(axis=1, ddof=1), **TOL)
    assert std.shape == (GROUPS,)
    np.testing.assert_allclose(jnp.mean(std), metrics["reward_std"], **TOL)
    np.testing.assert_allclose(frac, metrics["frac_reward_zero_std"], **TOL)
    np.testing.assert_allclose(frac, 1 / 3, **TOL)


# --------------------------------------------------------------------------- REINFORCE++

def _token_batch(seed=0, lengths=(7, 2, 5, 1, 4), t=T):
    rng = np.random.default_rng(seed)
    mask = _mask(lengths, t)
    rewards = rng.normal(size=mask.shape).astype(np.float32)
    rewards_padded = np.where(mask > 0, rewards, rng.normal(size=mask.shape) * 100).astype(np.float32)
    return rewards, rewards_padded, mask


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_verl_and_openrlhf(gamma):
    rewards, rewards_padded, mask = _token_batch()
    exp_adv, exp_ret = verl_reinforce_pp(rewards * mask, mask, gamma)
    for r in (rewards, rewards_padded):                 # garbage on padding changes nothing
        a, ret = rpp_jit(r, mask, gamma)
        np.testing.assert_allclose(a, exp_adv, **TOL)
        np.testing.assert_allclose(ret, exp_ret, **TOL)
        np.testing.assert_allclose(ret, openrlhf_returns(r, mask, gamma), **TOL)
        assert np.all(np.asarray(ret)[mask == 0] == 0) and np.all(np.asarray(a)[mask == 0] == 0)
    a_eager, ret_eager = adv.reinforce_pp(rewards, mask, gamma)
    np.testing.assert_allclose(a_eager, exp_adv, **TOL)
    np.testing.assert_allclose(ret_eager, exp_ret, **TOL)


def test_reinforce_pp_baseline_matches_verl():
    rng = np.random.default_rng(7)
    scores = rng.normal(size=GROUPS * G).astype(np.float32)
    mask = _mask(rng.integers(1, T + 1, size=GROUPS * G))
    expected = verl_reinforce_pp_baseline(scores, mask, G)
    baselined = baseline_jit(scores, group_size=G)
    # route 1: broadcast the baselined score, whiten over the batch's tokens
    tokens = broadcast_jit(baselined, mask)
    np.testing.assert_allclose(jax.jit(masked_whiten)(tokens, mask) * mask, expected, **TOL)
    # route 2: the baselined score as the last token's reward, gamma = 1
    last = mask.sum(axis=1).astype(int) - 1
    token_rewards = np.zeros_like(mask)
    token_rewards[np.arange(len(last)), last] = np.asarray(baselined)
    a, _ = rpp_jit(token_rewards, mask, 1.0)
    np.testing.assert_allclose(a, expected, **TOL)


def test_broadcast_to_tokens():
    seq = np.array([1.5, -2.0, 0.25], np.float32)
    mask = _mask([3, 0, 1], 4)
    expected = seq[:, None] * mask
    np.testing.assert_array_equal(broadcast_jit(seq, mask), expected)
    np.testing.assert_array_equal(adv.broadcast_to_tokens(seq, mask), expected)
    with pytest.raises(ValueError, match="mask"):
        adv.broadcast_to_tokens(seq, _mask([1, 1], 4))
    with pytest.raises(ValueError, match="seq_adv"):
        adv.broadcast_to_tokens(seq[:, None], mask)


def test_reinforce_pp_shape_errors():
    _, _, mask = _token_batch()
    with pytest.raises(ValueError, match="mask"):
        adv.reinforce_pp(np.zeros((5, T), np.float32), mask[:, :-1])
    with pytest.raises(ValueError, match="token_rewards"):
        adv.reinforce_pp(np.zeros(5, np.float32), mask)
