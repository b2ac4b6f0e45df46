"""policy_loss's clip-higher / dual-clip and `aggregate` against NumPy ports of verl
(`compute_policy_loss`, `agg_loss`) and TRL's GRPO loss; the PPO path bit for bit against the
function as it was before these arguments existed.

Tolerance: rtol 1e-5 / atol 1e-6 (float32 against float64 references) unless stated.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxppo.core import losses
from jaxppo.core.losses import (
    AGG_MODES,
    aggregate,
    aggregate_denominator,
    aggregate_numerator,
)
from jaxppo.core.masked import check_shape, masked_sum, safe_div

TOL = dict(rtol=1e-5, atol=1e-6)
EPS = 0.2

policy_loss = jax.jit(losses.policy_loss)
aggregate_jit = jax.jit(aggregate, static_argnames=("mode",))


@pytest.fixture(autouse=True)
def _no_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _mask(lengths, t):
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def _batch(seed=0, lengths=(7, 2, 5, 0, 6), t=7, spread=0.5):
    rng = np.random.default_rng(seed)
    b = len(lengths)
    logp = rng.normal(-2.0, 0.5, size=(b, t)).astype(np.float32)
    old = (logp + rng.normal(0.0, spread, size=(b, t))).astype(np.float32)
    adv = rng.normal(size=(b, t)).astype(np.float32)
    return logp, old, adv, _mask(lengths, t)


# --------------------------------------------------------------------------- the PPO path, unchanged

def old_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps):
    """policy_loss as it was before clip_eps_high / dual_clip (copied verbatim, the reference)."""
    logprobs = jnp.asarray(logprobs, dtype=jnp.float32)
    check_shape("logprobs", logprobs, ndim=2)
    old_logprobs = jnp.asarray(old_logprobs, dtype=jnp.float32)
    advantages = jnp.asarray(advantages, dtype=jnp.float32)
    mask = jnp.asarray(mask).astype(jnp.float32)
    clip_eps = jnp.asarray(clip_eps, dtype=jnp.float32)
    valid = mask != 0
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
    stats = {"loss": loss, "loss_sum": loss_sum, "count": count,
             "clipfrac": safe_div(clipfrac_sum, count), "clipfrac_sum": clipfrac_sum,
             "approxkl": safe_div(approxkl_sum, count), "approxkl_sum": approxkl_sum,
             "ratio_mean": safe_div(ratio_sum, count), "ratio_sum": ratio_sum}
    return loss, stats


@pytest.mark.parametrize("jit", [True, False])
def test_ppo_path_is_bit_identical(jit):
    new = policy_loss if jit else losses.policy_loss
    ref = jax.jit(old_policy_loss) if jit else old_policy_loss
    for seed in (0, 1):
        args = _batch(seed)
        loss, stats = new(*args, EPS)
        ref_loss, ref_stats = ref(*args, EPS)
        np.testing.assert_array_equal(loss, ref_loss)
        for key, value in ref_stats.items():
            np.testing.assert_array_equal(stats[key], value, err_msg=key)
    # the gradient too
    logp, old, adv, mask = _batch(2)
    g_new = jax.grad(lambda lp: new(lp, old, adv, mask, EPS)[0])(logp)
    g_ref = jax.grad(lambda lp: ref(lp, old, adv, mask, EPS)[0])(logp)
    np.testing.assert_array_equal(g_new, g_ref)


def test_clip_eps_high_equal_to_clip_eps_changes_nothing():
    args = _batch(3)
    _, a = policy_loss(*args, EPS)
    _, b = policy_loss(*args, EPS, EPS)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert "dual_clip_sum" not in a


# --------------------------------------------------------------------------- NumPy ports

def verl_agg_loss(loss_mat, loss_mask, mode):
    """verl core_algos.agg_loss, float64. Two documented departures: an empty row's token mean is 0
    (verl: NaN), and seq-mean-token-sum-norm is returned divided by B as well (verl divides by T
    only; DESIGN / TRL's dr_grpo divide by B * T)."""
    x, m = loss_mat.astype(np.float64), loss_mask.astype(np.float64)
    if mode == "token-mean":
        return (x * m).sum() / m.sum()
    if mode == "seq-mean-token-sum":
        return np.mean(np.sum(x * m, axis=-1))
    if mode == "seq-mean-token-mean":
        counts = np.sum(m, axis=-1)
        seq = np.where(counts > 0, np.sum(x * m, axis=-1) / np.where(counts > 0, counts, 1), 0.0)
        return np.mean(seq)
    if mode == "seq-mean-token-sum-norm":
        verl = np.sum(np.sum(x * m, axis=-1)) / m.shape[-1]
        return verl / m.shape[0]
    raise ValueError(mode)


def verl_policy_loss(old_log_prob, log_prob, advantages, mask, eps_low, eps_high, clip_ratio_c):
    """verl compute_policy_loss (dual-clip PPO), float64; returns per-token losses and metrics."""
    neg_kl = np.clip(log_prob.astype(np.float64) - old_log_prob, -20.0, 20.0)
    ratio = np.exp(neg_kl)
    a = advantages.astype(np.float64)
    pg_losses1 = -a * ratio
    pg_losses2 = -a * np.clip(ratio, 1 - eps_low, 1 + eps_high)
    clip_pg_losses1 = np.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_agg_loss((pg_losses2 > pg_losses1).astype(float), mask, "token-mean")
    pg_losses3 = -a * clip_ratio_c
    clip_pg_losses2 = np.minimum(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_agg_loss(((clip_pg_losses1 > pg_losses3) & (a < 0)).astype(float), mask,
                                      "token-mean")
    pg_losses = np.where(a < 0, clip_pg_losses2, clip_pg_losses1)
    return pg_losses, dict(loss=verl_agg_loss(pg_losses, mask, "token-mean"), clipfrac=pg_clipfrac,
                           clipfrac_lower=pg_clipfrac_lower)


def trl_grpo_loss(per_token_logps, old_per_token_logps, advantages, mask, eps_low, eps_high, loss_type,
                  max_completion_length):
    """TRL GRPOTrainer._compute_loss (token-level IS, beta = 0), float64."""
    coef_1 = np.exp(per_token_logps.astype(np.float64) - old_per_token_logps)
    coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
    a = advantages.astype(np.float64)
    per_token_loss = -np.minimum(coef_1 * a, coef_2 * a)
    m = mask.astype(np.float64)
    if loss_type == "grpo":
        loss = ((per_token_loss * m).sum(-1) / np.maximum(m.sum(-1), 1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * m).sum() / max(m.sum(), 1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * m).sum() / (per_token_loss.shape[0] * max_completion_length)
    count = max(m.sum(), 1.0)
    low = ((coef_1 < 1 - eps_low) & (a < 0)).astype(float)
    high = ((coef_1 > 1 + eps_high) & (a > 0)).astype(float)
    return loss, dict(low=(low * m).sum() / count, high=(high * m).sum() / count)


# --------------------------------------------------------------------------- clip-higher, dual-clip

def test_dual_clip_and_clip_higher_match_verl():
    logp, old, adv, mask = _batch(4, spread=1.5)
    per_token_ref, ref = verl_policy_loss(old, logp, adv, mask, 0.2, 0.28, 3.0)
    loss, stats = policy_loss(logp, old, adv, mask, 0.2, 0.28, 3.0)
    assert 0 < ref["clipfrac_lower"] < ref["clipfrac"] < 1       # all branches are exercised
    np.testing.assert_allclose(loss, ref["loss"], **TOL)
    np.testing.assert_allclose(stats["clipfrac"], ref["clipfrac"], **TOL)
    np.testing.assert_allclose(stats["dual_clip_frac"], ref["clipfrac_lower"], **TOL)
    np.testing.assert_allclose(stats["dual_clip_sum"], ref["clipfrac_lower"] * mask.sum(), **TOL)
    np.testing.assert_allclose(stats["per_token"] * mask, per_token_ref * mask, **TOL)
    eager_loss, _ = losses.policy_loss(logp, old, adv, mask, 0.2, 0.28, 3.0)
    np.testing.assert_allclose(eager_loss, ref["loss"], **TOL)


@pytest.mark.parametrize("loss_type,mode", [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean"),
                                            ("dr_grpo", "seq-mean-token-sum-norm")])
def test_clip_higher_matches_trl(loss_type, mode):
    logp, old, adv, mask = _batch(5, spread=0.6)
    ref_loss, ref = trl_grpo_loss(logp, old, adv, mask, 0.2, 0.28, loss_type, mask.shape[1])
    loss, stats = policy_loss(logp, old, adv, mask, 0.2, 0.28)
    assert 0 < ref["low"] < 1 and 0 < ref["high"] < 1
    np.testing.assert_allclose(stats["clip_low_frac"], ref["low"], **TOL)
    np.testing.assert_allclose(stats["clip_high_frac"], ref["high"], **TOL)
    np.testing.assert_allclose(stats["clip_low_sum"], ref["low"] * mask.sum(), **TOL)
    np.testing.assert_allclose(stats["clip_high_sum"], ref["high"] * mask.sum(), **TOL)
    np.testing.assert_allclose(aggregate_jit(stats["per_token"], mask, mode=mode), ref_loss, **TOL)
    if mode == "token-mean":
        np.testing.assert_allclose(loss, ref_loss, **TOL)


def test_dual_clip_hand_case():
    # A = -1, ratio = 5, c = 3: PPO would give 5, dual-clip caps it at 3 with no gradient.
    old = np.array([[-1.0, 0.0]], np.float32)
    logp = np.array([[-1.0 + np.log(5.0), 300.0]], np.float32)
    advantages = np.array([[-1.0, np.nan]], np.float32)
    mask = np.array([[1.0, 0.0]], np.float32)
    loss, stats = policy_loss(logp, old, advantages, mask, EPS, None, 3.0)
    np.testing.assert_allclose(loss, 3.0, rtol=1e-6)
    assert float(stats["dual_clip_sum"]) == 1.0 and float(stats["clip_low_sum"]) == 0.0
    g = jax.jit(jax.grad(lambda lp: losses.policy_loss(lp, old, advantages, mask, EPS, None, 3.0)[0]))(logp)
    np.testing.assert_array_equal(g, np.zeros_like(g))
    # A > 0: dual-clip does not apply
    loss_pos, _ = policy_loss(logp, old, -advantages, mask, EPS, None, 3.0)
    np.testing.assert_allclose(loss_pos, -1.2, rtol=1e-6)


def test_bad_clip_arguments():
    args = _batch(0)
    with pytest.raises(ValueError, match="dual_clip"):
        losses.policy_loss(*args, EPS, None, 1.0)
    with pytest.raises(ValueError, match="clip_eps_high"):
        losses.policy_loss(*args, EPS, -0.1)
    with pytest.raises(ValueError, match="clip_eps_high"):
        losses.policy_loss(*args, EPS, np.ones(2))


def test_traced_clip_arguments_no_retrace():
    traces = []

    @jax.jit
    def f(lp, old, adv, mask, hi, c):
        traces.append(1)
        return losses.policy_loss(lp, old, adv, mask, EPS, hi, c)[0]

    args = _batch(6, spread=1.0)
    for hi, c in ((0.28, 3.0), (0.3, 2.0)):
        ref = verl_policy_loss(args[1], args[0], args[2], args[3], EPS, hi, c)[1]["loss"]
        np.testing.assert_allclose(f(*args, jnp.float32(hi), jnp.float32(c)), ref, **TOL)
    assert len(traces) == 1


# --------------------------------------------------------------------------- aggregation

@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_matches_verl(mode):
    rng = np.random.default_rng(8)
    mask = _mask((7, 0, 3, 5, 1), 7)                       # row 1 has no valid token
    x = rng.normal(size=mask.shape).astype(np.float32)
    x_garbage = np.where(mask > 0, x, np.nan).astype(np.float32)
    expected = verl_agg_loss(x, mask, mode)
    np.testing.assert_allclose(aggregate_jit(x_garbage, mask, mode=mode), expected, **TOL)
    np.testing.assert_allclose(aggregate(x, mask, mode), expected, **TOL)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_pieces_accumulate_exactly(mode):
    rng = np.random.default_rng(9)
    mask = _mask((7, 0, 3, 5, 1, 6, 2), 7)
    x = rng.normal(size=mask.shape).astype(np.float32)
    num = jax.jit(aggregate_numerator, static_argnames=("mode",))
    parts = [num(x[s], mask[s], mode=mode) for s in (slice(0, 3), slice(3, 4), slice(4, 7))]
    whole = aggregate_jit(x, mask, mode=mode)
    np.testing.assert_allclose(sum(parts) / aggregate_denominator(mask, mode), whole, **TOL)
    np.testing.assert_allclose(whole, verl_agg_loss(x, mask, mode), **TOL)


def test_aggregate_empty_mask_and_errors():
    x = np.ones((3, 4), np.float32)
    mask = np.zeros_like(x)
    for mode in AGG_MODES:
        assert float(aggregate(x, mask, mode)) == 0.0
    with pytest.raises(ValueError, match="mode"):
        aggregate(x, mask, "sum")
    with pytest.raises(ValueError, match="mode"):
        aggregate_denominator(mask, "token-sum")
    with pytest.raises(ValueError, match="mask"):
        aggregate(x, mask[:, :-1], "token-mean")
    with pytest.raises(ValueError, match="per_token"):
        aggregate(x[0], mask[0], "token-mean")


def test_aggregate_gradient_ignores_padding():
    mask = _mask((3, 0, 2), 4)
    x = np.where(mask > 0, 1.0, np.inf).astype(np.float32)
    for mode in AGG_MODES:
        g = jax.grad(lambda v, mode=mode: aggregate(v, mask, mode))(x)
        assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[mask == 0] == 0), mode
