"""jaxppo.core.gae against a NumPy port of TRL's GAE loop run over each row's valid tokens.

Tolerance: rtol 1e-5 / atol 1e-5 (float32 vs float64 reference over <= 7 steps).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxppo.core.gae import gae

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _no_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def trl_gae_row(rewards, values, gamma, lam):
    """TRL's PPOTrainer loop for one row, over its valid tokens only (next value 0 at the end)."""
    n = len(rewards)
    lastgaelam, adv = 0.0, np.zeros(n)
    for t in reversed(range(n)):
        nextvalues = values[t + 1] if t < n - 1 else 0.0
        delta = rewards[t] + gamma * nextvalues - values[t]
        lastgaelam = delta + gamma * lam * lastgaelam
        adv[t] = lastgaelam
    return adv, adv + values


def reference(rewards, values, mask, gamma, lam):
    """Valid positions of each row are compressed, run through TRL's loop, and scattered back."""
    adv, ret = np.zeros(rewards.shape), np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        idx = np.flatnonzero(mask[b])
        a, r = trl_gae_row(rewards[b, idx].astype(np.float64), values[b, idx].astype(np.float64),
                           gamma, lam)
        adv[b, idx], ret[b, idx] = a, r
    return adv, ret


def _batch(lengths=(7, 1, 0, 4, 6), t=7, seed=0, garbage=1e3):
    rng = np.random.default_rng(seed)
    b = len(lengths)
    mask = (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
    rewards = rng.normal(size=(b, t)).astype(np.float32)
    values = rng.normal(size=(b, t)).astype(np.float32)
    # Garbage beyond the mask: must not change anything on the valid tokens.
    noise = rng.normal(size=(2, b, t)).astype(np.float32) * garbage
    rewards = np.where(mask > 0, rewards, noise[0])
    values = np.where(mask > 0, values, noise[1])
    return rewards, values, mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.5), (1.0, 1.0), (0.5, 0.0)])
def test_matches_trl_loop_ragged(gamma, lam):
    rewards, values, mask = _batch()
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert adv.dtype == jnp.float32 and ret.dtype == jnp.float32
    assert adv.shape == ret.shape == rewards.shape
    ref_adv, ref_ret = reference(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, **TOL)
    np.testing.assert_allclose(ret, ref_ret, **TOL)
    # Padding: exactly zero.
    assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)


def test_odd_sizes_and_nan_garbage():
    rewards, values, mask = _batch(lengths=(7, 3, 5), seed=1)
    rewards[mask == 0] = np.nan
    values[mask == 0] = np.inf
    adv, ret = gae(rewards, values, mask, 0.99, 0.95)
    clean_r, clean_v = np.where(mask > 0, rewards, 0), np.where(mask > 0, values, 0)
    ref_adv, ref_ret = reference(clean_r, clean_v, mask, 0.99, 0.95)
    np.testing.assert_allclose(adv, ref_adv, **TOL)
    np.testing.assert_allclose(ret, ref_ret, **TOL)


def test_hand_computed():
    # One row, 3 valid tokens, 1 padding; gamma = 0.5, lam = 0.5.
    rewards = np.array([[1.0, 0.0, 2.0, 99.0]], np.float32)
    values = np.array([[0.5, 1.0, 1.0, 99.0]], np.float32)
    mask = np.array([[1, 1, 1, 0]], np.float32)
    # t=2: delta = 2 + 0 - 1 = 1;              A2 = 1
    # t=1: delta = 0 + 0.5*1 - 1 = -0.5;       A1 = -0.5 + 0.25*1 = -0.25
    # t=0: delta = 1 + 0.5*1 - 0.5 = 1;        A0 = 1 + 0.25*(-0.25) = 0.9375
    adv, ret = gae(rewards, values, mask, 0.5, 0.5)
    np.testing.assert_allclose(adv, [[0.9375, -0.25, 1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[1.4375, 0.75, 2.0, 0.0]], rtol=1e-6)


def test_gamma_lam_one_is_reward_to_go_minus_value():
    rewards, values, mask = _batch(garbage=0.0)
    adv, _ = gae(rewards, values, mask, 1.0, 1.0)
    to_go = np.cumsum((rewards * mask)[:, ::-1], axis=1)[:, ::-1]
    np.testing.assert_allclose(adv, (to_go - values) * mask, **TOL)


def test_mask_with_holes_passes_carry_through():
    rewards, values, _ = _batch(lengths=(7, 7, 7))
    mask = np.array([[1, 0, 1, 1, 0, 1, 0], [0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 1]], np.float32)
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    ref_adv, ref_ret = reference(rewards, values, mask, 0.9, 0.8)
    np.testing.assert_allclose(adv, ref_adv, **TOL)
    np.testing.assert_allclose(ret, ref_ret, **TOL)


def test_jit_traced_gamma_lam_and_no_retrace():
    rewards, values, mask = _batch()
    traces = []

    @jax.jit
    def run(r, v, m, gamma, lam):
        traces.append(1)  # Python side effect: runs once per trace
        return gae(r, v, m, gamma, lam)

    for gamma, lam in [(0.99, 0.95), (0.9, 0.5)]:
        got = run(rewards, values, mask, jnp.float32(gamma), jnp.float32(lam))
        eager = gae(rewards, values, mask, gamma, lam)
        for g, e in zip(got, eager):
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7)
    assert len(traces) == 1


def test_bool_mask_equals_float_mask():
    rewards, values, mask = _batch()
    for g, e in zip(gae(rewards, values, mask > 0, 0.9, 0.9), gae(rewards, values, mask, 0.9, 0.9)):
        np.testing.assert_array_equal(g, e)


def test_shape_errors_name_argument():
    rewards, values, mask = _batch()
    with pytest.raises(ValueError, match="rewards"):
        gae(rewards[0], values[0], mask[0], 1.0, 0.95)
    with pytest.raises(ValueError, match="values"):
        gae(rewards, values[:, :-1], mask, 1.0, 0.95)
    with pytest.raises(ValueError, match="mask"):
        gae(rewards, values, mask[:-1], 1.0, 0.95)
    with pytest.raises(ValueError, match="gamma"):
        gae(rewards, values, mask, jnp.ones(2), 0.95)
    with pytest.raises(ValueError, match="lam"):
        gae(rewards, values, mask, 1.0, jnp.ones(2))
