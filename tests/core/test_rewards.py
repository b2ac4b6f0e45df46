"""jaxppo.core.rewards against NumPy and hand-computed values. Tolerance: rtol 1e-5 / atol 1e-6."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxppo.core.rewards import (KLControllerState, RunningMoments, adaptive_kl_update, clip_rewards,
                            fixed_kl_update, init_kl_controller, init_running_moments,
                            kl_per_token, missing_eos_penalty, normalize_scores, overlong_penalty,
                            shape_rewards, update_and_normalize, update_running_moments)

TOL = dict(rtol=1e-5, atol=1e-6)

# Eager dispatch compiles every op for every new shape/dtype (~1 s per call on 2 CPU cores), so
# the shaping tests run it jitted; test_shape_rewards_jit_traced_kl_coef_no_retrace compares
# against eager.
shape_rewards_eager = shape_rewards
shape_rewards = jax.jit(shape_rewards, static_argnames="estimator")


@pytest.fixture(autouse=True)
def _no_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _logps(seed=0, shape=(3, 7)):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-2.0, 1.0, size=shape).astype(np.float32)
    ref = (logp + rng.normal(0.0, 0.7, size=shape)).astype(np.float32)
    return logp, ref


# --------------------------------------------------------------------------- KL estimators

def test_kl_estimators_match_definitions():
    logp, ref = _logps()
    d = logp.astype(np.float64) - ref
    r = np.exp(ref.astype(np.float64) - logp)
    expected = {"k1": d, "k2": 0.5 * d**2, "k3": (r - 1) - np.log(r), "abs": np.abs(d)}
    for name, exp in expected.items():
        got = kl_per_token(logp, ref, name)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, exp, **TOL, err_msg=name)
    assert np.all(np.asarray(kl_per_token(logp, ref, "k3")) >= 0)
    assert np.all(np.asarray(kl_per_token(logp, ref, "k2")) >= 0)


def test_k1_k3_unbiased_monte_carlo():
    # Samples x ~ p: E[k1] = E[k3] = KL(p || q). 20k samples, tolerance 0.02 nats (~5 std errors).
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    x = rng.choice(4, size=20000, p=p)
    logp, logq = np.log(p[x]).astype(np.float32), np.log(q[x]).astype(np.float32)
    true_kl = float(np.sum(p * np.log(p / q)))
    for name in ("k1", "k3"):
        assert abs(float(jnp.mean(kl_per_token(logp, logq, name))) - true_kl) < 0.02, name


def test_unknown_estimator_raises_with_name():
    logp, ref = _logps()
    with pytest.raises(ValueError, match="k4"):
        kl_per_token(logp, ref, "k4")
    with pytest.raises(ValueError, match="k4"):
        shape_rewards(np.zeros(3), logp, ref, np.ones_like(logp), 0.1, estimator="k4")


# --------------------------------------------------------------------------- shaping

def np_shape(scores, logp, ref, mask, kl_coef, estimator):
    kl = np.where(mask > 0, np.asarray(kl_per_token(logp, ref, estimator)), 0.0)
    rewards = -kl_coef * kl
    for b, n in enumerate(mask.sum(1).astype(int)):
        if n > 0:
            rewards[b, n - 1] += scores[b]
    return rewards, kl


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_shape_rewards_ragged_and_empty_rows(estimator):
    logp, ref = _logps(shape=(4, 7))
    mask = (np.arange(7)[None, :] < np.array([7, 1, 0, 4])[:, None]).astype(np.float32)
    logp[mask == 0] = 1e4  # garbage after EOS: exp() overflows in k3, must stay masked
    scores = np.array([1.5, -0.25, 3.0, 0.75], np.float32)
    rewards, kl = shape_rewards(scores, logp, ref, mask, 0.05, estimator)
    assert rewards.dtype == kl.dtype == jnp.float32
    exp_r, exp_kl = np_shape(scores, logp, ref, mask, 0.05, estimator)
    np.testing.assert_allclose(rewards, exp_r, **TOL)
    np.testing.assert_allclose(kl, exp_kl, **TOL)
    np.testing.assert_array_equal(np.asarray(rewards)[2], np.zeros(7))  # empty row: no score
    assert np.all(np.asarray(rewards)[mask == 0] == 0)


def test_shape_rewards_score_dtypes():
    logp = ref = np.zeros((3, 5), np.float32)  # KL = 0: rewards are the scores alone
    mask = (np.arange(5)[None, :] < np.array([5, 2, 3])[:, None]).astype(np.float32)
    for scores in (np.array([1, -2, 3], np.int32), np.array([0.5, -1.75, 2.25], np.float64),
                   jnp.array([0.5, -1.75, 2.25], jnp.bfloat16)):
        rewards, _ = shape_rewards(scores, logp, ref, mask, 0.1)
        assert rewards.dtype == jnp.float32
        got = np.asarray(rewards)[[0, 1, 2], [4, 1, 2]]
        np.testing.assert_array_equal(got, np.asarray(scores, np.float32))
        assert float(np.abs(np.asarray(rewards)).sum()) == float(np.abs(got).sum())


def test_shape_rewards_jit_traced_kl_coef_no_retrace():
    traces = []

    @jax.jit
    def run(scores, logp, ref, mask, kl_coef):
        traces.append(1)
        return shape_rewards_eager(scores, logp, ref, mask, kl_coef, "k3")

    mask = (np.arange(7)[None, :] < np.array([7, 2, 5])[:, None]).astype(np.float32)
    for seed, coef in ((0, 0.1), (1, 0.2)):
        logp, ref = _logps(seed)
        scores = np.arange(3, dtype=np.float32)
        got = run(scores, logp, ref, mask, jnp.float32(coef))
        eager = shape_rewards_eager(scores, logp, ref, mask, coef, "k3")
        for g, e in zip(got, eager):
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7)
    assert len(traces) == 1


def test_shape_rewards_shape_errors():
    logp, ref = _logps()
    mask = np.ones_like(logp)
    with pytest.raises(ValueError, match="scores"):
        shape_rewards(np.zeros(4), logp, ref, mask, 0.1)
    with pytest.raises(ValueError, match="ref_logprobs"):
        shape_rewards(np.zeros(3), logp, ref[:, :-1], mask, 0.1)
    with pytest.raises(ValueError, match="mask"):
        shape_rewards(np.zeros(3), logp, ref, mask[:2], 0.1)
    with pytest.raises(ValueError, match="logprobs"):
        shape_rewards(np.zeros(3), logp[0], ref[0], mask[0], 0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        shape_rewards(np.zeros(3), logp, ref, mask, np.ones(3))


def test_missing_eos_penalty():
    scores = np.array([1.0, 2.0, -0.5], np.float32)
    has_eos = np.array([True, False, False])
    np.testing.assert_allclose(missing_eos_penalty(scores, has_eos, 1.5), [1.0, 0.5, -2.0])
    np.testing.assert_allclose(missing_eos_penalty(scores, has_eos, None), scores)
    with pytest.raises(ValueError, match="has_eos"):
        missing_eos_penalty(scores, has_eos[:2], 1.0)


# --------------------------------------------------------------------------- KL controllers

@pytest.mark.parametrize("current,expected", [
    (6.6, 0.1 * (1 + 0.1 * 512 / 10000)),    # error 0.1: inside the clip
    (100.0, 0.1 * (1 + 0.2 * 512 / 10000)),  # error 15.67 clipped to +0.2
    (0.0, 0.1 * (1 - 0.2 * 512 / 10000)),    # error -1 clipped to -0.2
    (6.0, 0.1),                              # on target: unchanged
])
def test_adaptive_kl_hand_computed(current, expected):
    state = init_kl_controller(0.1)
    new = adaptive_kl_update(state, current, 512, 6.0, 10000)
    assert isinstance(new, KLControllerState) and new.value.dtype == jnp.float32
    np.testing.assert_allclose(new.value, expected, rtol=1e-6)
    jitted = jax.jit(adaptive_kl_update)(state, jnp.float32(current), 512, 6.0, 10000.0)
    np.testing.assert_allclose(jitted.value, new.value, rtol=1e-7)


def test_fixed_kl_is_identity_and_state_is_pytree():
    state = init_kl_controller(0.05)
    assert fixed_kl_update(state, 123.0, 64) is state
    leaves = jax.tree.leaves(state)
    assert len(leaves) == 1 and leaves[0].shape == ()
    out = jax.jit(fixed_kl_update)(state, 1.0, 64)
    np.testing.assert_allclose(out.value, 0.05)


# --------------------------------------------------------------------------- score post-processing

def test_clip_rewards():
    scores = np.array([-3.0, -0.5, 0.0, 2.5], np.float32)
    np.testing.assert_array_equal(clip_rewards(scores, None), scores)
    np.testing.assert_array_equal(clip_rewards(scores, 0), scores)
    np.testing.assert_array_equal(clip_rewards(scores, 1.0), [-1.0, -0.5, 0.0, 1.0])
    np.testing.assert_array_equal(jax.jit(clip_rewards)(scores, 0.0), scores)
    np.testing.assert_array_equal(jax.jit(clip_rewards)(scores, 2.0), [-2.0, -0.5, 0.0, 2.0])


def test_running_moments_match_numpy_over_concatenation():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n).astype(np.float32) for n in (5, 1, 8, 3)]
    state = init_running_moments()
    update = jax.jit(update_running_moments)
    for i, batch in enumerate(batches):
        state = update(state, batch)
        seen = np.concatenate(batches[: i + 1]).astype(np.float64)
        assert isinstance(state, RunningMoments)
        np.testing.assert_allclose(state.count, seen.size)
        np.testing.assert_allclose(state.mean, seen.mean(), **TOL)
        np.testing.assert_allclose(state.var, seen.var(), **TOL)  # population variance
    # Eager update gives the same state.
    eager = init_running_moments()
    for batch in batches:
        eager = update_running_moments(eager, batch)
    for g, e in zip(jax.tree.leaves(state), jax.tree.leaves(eager)):
        np.testing.assert_allclose(g, e, rtol=1e-6)


def test_normalize_includes_batch_first():
    rng = np.random.default_rng(1)
    first, second = rng.normal(size=6).astype(np.float32), rng.normal(2.0, 3.0, size=4).astype(np.float32)
    state = update_running_moments(init_running_moments(), first)
    state, normed = update_and_normalize(state, second)
    seen = np.concatenate([first, second]).astype(np.float64)
    np.testing.assert_allclose(normed, (second - seen.mean()) / np.sqrt(seen.var() + 1e-8), **TOL)
    np.testing.assert_allclose(normalize_scores(state, second), normed, **TOL)
    # The empty state normalises to the identity.
    np.testing.assert_allclose(normalize_scores(init_running_moments(), second), second, **TOL)


def test_running_moments_no_retrace_and_errors():
    traces = []

    @jax.jit
    def run(state, x):
        traces.append(1)
        return update_and_normalize(state, x)

    state = init_running_moments()
    for seed in (0, 1):
        state, _ = run(state, np.random.default_rng(seed).normal(size=4).astype(np.float32))
    assert len(traces) == 1
    with pytest.raises(ValueError, match="x"):
        update_running_moments(state, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="scores"):
        normalize_scores(state, np.zeros((2, 2)))


# --------------------------------------------------------------------------- k3 in the loss, overlong

def test_k3_is_trl_and_verl_loss_kl():
    """TRL GRPO's per_token_kl / verl's "low_var_kl" (without verl's clamp to [-10, 10]):
    exp(ref - logp) - (ref - logp) - 1."""
    logp, ref = _logps(4, shape=(5, 9))
    diff = ref.astype(np.float64) - logp
    expected = np.exp(diff) - diff - 1
    np.testing.assert_allclose(jax.jit(kl_per_token, static_argnames="estimator")(logp, ref, estimator="k3"),
                               expected, **TOL)
    np.testing.assert_allclose(kl_per_token(logp, ref, "k3"), expected, **TOL)
    # no cancellation for tiny differences: (d^2 / 2) to first order
    tiny = kl_per_token(np.float32([1e-4]), np.float32([0.0]), "k3")
    np.testing.assert_allclose(tiny, 0.5e-8, rtol=1e-3)


def dapo_overlong(lengths, max_length, buffer, penalty):
    """DAPO / verl's reward manager: min(-(L - (L_max - buffer)) / buffer * penalty, 0), and
    -penalty beyond L_max (verl never sees a longer response)."""
    exceed = np.asarray(lengths, np.float64) - (max_length - buffer)
    return np.maximum(np.minimum(-exceed / buffer * penalty, 0.0), -penalty)


def test_overlong_penalty_matches_dapo():
    lengths = np.array([0, 10, 12, 13, 15, 17, 20, 21, 40], np.int32)
    expected = dapo_overlong(lengths, 20, 8, 1.5)
    np.testing.assert_allclose(jax.jit(overlong_penalty)(lengths, 20, 8, 1.5), expected, **TOL)
    np.testing.assert_allclose(overlong_penalty(lengths, 20, 8, 1.5), expected, **TOL)
    np.testing.assert_allclose(expected[[0, 1, 2, 3, 6, 7, 8]], [0, 0, 0, -0.1875, -1.5, -1.5, -1.5])
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, 20, 0, 1.0)
    with pytest.raises(ValueError, match="lengths"):
        overlong_penalty(lengths[None], 20, 4, 1.0)
