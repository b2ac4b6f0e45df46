"""jaxppo.core.losses against NumPy references and hand-computed clipping cases.

Tolerance: rtol 1e-5 / atol 1e-6 (float32) unless stated.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxppo.core import losses
from jaxppo.core.losses import (entropy, entropy_from_logits, logprobs_from_logits, policy_loss,
                           value_loss)

# Eager dispatch compiles every op for every new shape (~1 s per call on 2 CPU cores), so the
# numerical tests run the jitted functions; test_jit_matches_eager_* compares against eager.
entropy = jax.jit(entropy)
entropy_from_logits = jax.jit(entropy_from_logits)
logprobs_from_logits = jax.jit(logprobs_from_logits)
policy_loss = jax.jit(policy_loss)
value_loss = jax.jit(value_loss)

TOL = dict(rtol=1e-5, atol=1e-6)
EPS = 0.2


@pytest.fixture(autouse=True)
def _no_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _mask(lengths, t):
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def _policy_batch(seed=0, lengths=(7, 2, 5), t=7):
    rng = np.random.default_rng(seed)
    b = len(lengths)
    logp = rng.normal(-2.0, 0.5, size=(b, t)).astype(np.float32)
    old = (logp + rng.normal(0.0, 0.3, size=(b, t))).astype(np.float32)
    adv = rng.normal(size=(b, t)).astype(np.float32)
    return logp, old, adv, _mask(lengths, t)


def np_policy_loss(logp, old, adv, mask, eps):
    v = mask > 0
    ratio = np.exp(logp - old)[v].astype(np.float64)
    a = adv[v]
    l1, l2 = -a * ratio, -a * np.clip(ratio, 1 - eps, 1 + eps)
    return dict(loss=np.maximum(l1, l2).mean(), clipfrac=(l2 > l1).mean(),
                approxkl=0.5 * np.mean((logp - old)[v] ** 2), ratio_mean=ratio.mean(), count=v.sum())


def np_value_loss(v, old, ret, mask, c):
    m = mask > 0
    v, old, ret = v[m].astype(np.float64), old[m], ret[m]
    vc = np.clip(v, old - c, old + c)
    l1, l2 = (v - ret) ** 2, (vc - ret) ** 2
    return dict(loss=0.5 * np.maximum(l1, l2).mean(), clipfrac=(l2 > l1).mean(),
                vpred_mean=v.mean(), count=m.sum())


# --------------------------------------------------------------------------- logits helpers

def test_logprobs_and_entropy_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    tokens = rng.integers(0, 11, size=(3, 5))
    z = logits.astype(np.float64)
    logsm = z - np.log(np.exp(z).sum(-1, keepdims=True))
    expected = np.take_along_axis(logsm, tokens[..., None], axis=-1)[..., 0]
    got = logprobs_from_logits(logits, tokens)
    assert got.dtype == jnp.float32 and got.shape == (3, 5)
    np.testing.assert_allclose(got, expected, **TOL)
    ent = entropy_from_logits(logits)
    np.testing.assert_allclose(ent, -(np.exp(logsm) * logsm).sum(-1), **TOL)
    np.testing.assert_allclose(entropy_from_logits(np.zeros((2, 3, 11))), np.full((2, 3), np.log(11)),
                               rtol=1e-6)
    # bfloat16 logits are upcast: the result is float32.
    assert logprobs_from_logits(logits.astype(jnp.bfloat16), tokens).dtype == jnp.float32


def test_entropy_masked_mean():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 7)).astype(np.float32)
    mask = _mask((4, 1), 4)
    ent, stats = entropy(logits, mask)
    per_tok = np.asarray(entropy_from_logits(logits))
    np.testing.assert_allclose(ent, per_tok[mask > 0].mean(), **TOL)
    np.testing.assert_allclose(stats["entropy_sum"], per_tok[mask > 0].sum(), **TOL)
    assert float(stats["count"]) == 5.0


def test_logits_shape_errors():
    with pytest.raises(ValueError, match="logits"):
        logprobs_from_logits(np.zeros((3, 5)), np.zeros((3, 5), np.int32))
    with pytest.raises(ValueError, match="tokens"):
        logprobs_from_logits(np.zeros((3, 5, 7)), np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError, match="tokens"):
        logprobs_from_logits(np.zeros((3, 5, 7)), np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="logits"):
        entropy_from_logits(np.zeros((3, 5)))


# --------------------------------------------------------------------------- policy loss

def test_policy_loss_matches_numpy():
    logp, old, adv, mask = _policy_batch()
    loss, stats = policy_loss(logp, old, adv, mask, EPS)
    ref = np_policy_loss(logp, old, adv, mask, EPS)
    assert 0 < ref["clipfrac"] < 1  # the data exercises both branches
    np.testing.assert_allclose(loss, ref["loss"], **TOL)
    for key in ("clipfrac", "approxkl", "ratio_mean", "count"):
        np.testing.assert_allclose(stats[key], ref[key], **TOL, err_msg=key)
    n = ref["count"]
    for key, mean_key in (("loss_sum", "loss"), ("clipfrac_sum", "clipfrac"),
                          ("approxkl_sum", "approxkl"), ("ratio_sum", "ratio_mean")):
        np.testing.assert_allclose(stats[key], ref[mean_key] * n, **TOL, err_msg=key)


# (advantage, ratio, expected per-token loss, clipped?, d loss / d logp)
CASES = [
    (+1.0, 1.5, -1.2, True, 0.0),   # A>0, ratio above the band: clipped, no gradient
    (+1.0, 0.5, -0.5, False, -0.5),  # A>0, ratio below: unclipped (pessimistic), pushes ratio up
    (+1.0, 1.1, -1.1, False, -1.1),  # A>0, in the band
    (-1.0, 0.5, 0.8, True, 0.0),    # A<0, ratio below the band: clipped, no gradient
    (-1.0, 1.5, 1.5, False, 1.5),   # A<0, ratio above: unclipped, pushes ratio down
    (-1.0, 0.9, 0.9, False, 0.9),   # A<0, in the band
]


@pytest.mark.parametrize("adv,ratio,expected,clipped,grad", CASES)
def test_policy_clipping_regions(adv, ratio, expected, clipped, grad):
    # Token 0 is the case; token 1 is padding with garbage that must not matter.
    old = np.array([[-1.0, 0.0]], np.float32)
    logp = np.array([[-1.0 + np.log(ratio), 500.0]], np.float32)  # exp(500) would be inf
    advantages = np.array([[adv, np.nan]], np.float32)
    mask = np.array([[1.0, 0.0]], np.float32)
    loss, stats = policy_loss(logp, old, advantages, mask, EPS)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert float(stats["clipfrac"]) == (1.0 if clipped else 0.0)
    g = jax.jit(jax.grad(lambda lp: policy_loss(lp, old, advantages, mask, EPS)[0]))(logp)
    np.testing.assert_allclose(g[0, 0], grad, rtol=1e-5, atol=1e-7)
    assert float(g[0, 1]) == 0.0
    if grad != 0.0:
        assert np.sign(g[0, 0]) == np.sign(grad)


def test_microbatch_sums_accumulate_exactly():
    logp, old, adv, mask = _policy_batch(lengths=(7, 2, 5, 1, 6))
    _, full = policy_loss(logp, old, adv, mask, EPS)
    parts = [policy_loss(logp[s], old[s], adv[s], mask[s], EPS)[1] for s in (slice(0, 2), slice(2, 5))]
    count = sum(p["count"] for p in parts)
    for key, mean_key in (("loss_sum", "loss"), ("clipfrac_sum", "clipfrac"),
                          ("approxkl_sum", "approxkl"), ("ratio_sum", "ratio_mean")):
        np.testing.assert_allclose(sum(p[key] for p in parts) / count, full[mean_key], **TOL)


def test_empty_mask_gives_zero_not_nan():
    logp, old, adv, _ = _policy_batch()
    mask = np.zeros_like(logp)
    loss, stats = policy_loss(logp, old, adv, mask, EPS)
    assert float(loss) == 0.0 and all(np.all(np.isfinite(v)) for v in stats.values())
    g = jax.jit(jax.grad(lambda lp: policy_loss(lp, old, adv, mask, EPS)[0]))(logp)
    np.testing.assert_array_equal(g, np.zeros_like(logp))
    vloss, vstats = value_loss(logp, old, adv, mask, 0.2)
    assert float(vloss) == 0.0 and all(np.isfinite(float(v)) for v in vstats.values())


# --------------------------------------------------------------------------- value loss

def test_value_loss_matches_numpy():
    rng = np.random.default_rng(3)
    mask = _mask((7, 3, 5), 7)
    values = rng.normal(size=mask.shape).astype(np.float32)
    old = (values + rng.normal(0, 0.3, size=mask.shape)).astype(np.float32)
    ret = rng.normal(size=mask.shape).astype(np.float32)
    loss, stats = value_loss(values, old, ret, mask, 0.2)
    ref = np_value_loss(values, old, ret, mask, 0.2)
    assert 0 < ref["clipfrac"] < 1
    np.testing.assert_allclose(loss, ref["loss"], **TOL)
    for key in ("clipfrac", "vpred_mean", "count"):
        np.testing.assert_allclose(stats[key], ref[key], **TOL, err_msg=key)
    np.testing.assert_allclose(stats["loss_sum"], ref["loss"] * ref["count"], **TOL)
    np.testing.assert_allclose(stats["clipfrac_sum"], ref["clipfrac"] * ref["count"], **TOL)
    # clip_value=None: plain 0.5 * MSE.
    m = mask > 0
    np.testing.assert_allclose(value_loss(values, old, ret, mask, None)[0],
                               0.5 * np.mean((values[m] - ret[m]) ** 2), **TOL)


# (value, return, expected per-token loss, clipped?, d loss / d value); old value 0, c = 0.2
VALUE_CASES = [
    (1.0, 0.0, 0.5, False, 1.0),     # above the band, moving toward R: unclipped term is larger
    (1.0, 2.0, 1.62, True, 0.0),     # above the band, R further above: clipped (0.2 - 2)^2, no grad
    (-1.0, -2.0, 1.62, True, 0.0),   # below the band, R further below: clipped, no grad
    (-1.0, 0.0, 0.5, False, -1.0),   # below the band, moving toward R: unclipped
    (0.1, 1.0, 0.405, False, -0.9),  # in the band
]


@pytest.mark.parametrize("v,ret,expected,clipped,grad", VALUE_CASES)
def test_value_clipping_both_sides(v, ret, expected, clipped, grad):
    values = np.array([[v, np.inf]], np.float32)
    old = np.array([[0.0, np.nan]], np.float32)
    returns = np.array([[ret, 7.0]], np.float32)
    mask = np.array([[1.0, 0.0]], np.float32)
    loss, stats = value_loss(values, old, returns, mask, 0.2)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert float(stats["clipfrac"]) == (1.0 if clipped else 0.0)
    g = jax.jit(jax.grad(lambda x: value_loss(x, old, returns, mask, 0.2)[0]))(values)
    np.testing.assert_allclose(g[0, 0], grad, rtol=1e-5, atol=1e-7)
    assert float(g[0, 1]) == 0.0


# --------------------------------------------------------------------------- jit, shapes

def test_jit_matches_eager_and_no_retrace():
    # The module-level names are jitted; `losses.*` are the eager originals.
    traces = []

    @jax.jit
    def both(lp, old, adv, vals, ret, mask, eps):
        traces.append(1)
        return policy_loss(lp, old, adv, mask, eps), value_loss(vals, old, ret, mask, eps)

    for seed in (0, 1):
        logp, old, adv, mask = _policy_batch(seed=seed)
        got = both(logp, old, adv, old, adv, mask, jnp.float32(EPS))
        eager = (losses.policy_loss(logp, old, adv, mask, EPS),
                 losses.value_loss(old, old, adv, mask, EPS))
        for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(eager)):
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7)
    assert len(traces) == 1
    logits = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
    tokens = np.array([[0, 4, 2], [1, 1, 3]], np.int32)
    np.testing.assert_allclose(logprobs_from_logits(logits, tokens),
                               losses.logprobs_from_logits(logits, tokens), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(entropy_from_logits(logits), losses.entropy_from_logits(logits),
                               rtol=1e-6, atol=1e-7)


def test_shape_errors_name_argument():
    logp, old, adv, mask = _policy_batch()
    with pytest.raises(ValueError, match="logprobs"):
        policy_loss(logp[0], old, adv, mask, EPS)
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss(logp, old[:, :-1], adv, mask, EPS)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, adv[:-1], mask, EPS)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(logp, old, adv, mask[0], EPS)
    with pytest.raises(ValueError, match="clip_eps"):
        policy_loss(logp, old, adv, mask, np.ones(2))
    with pytest.raises(ValueError, match="clip_value"):
        value_loss(logp, old, adv, mask, np.ones(2))
    with pytest.raises(ValueError, match="old_values"):
        value_loss(logp, old[:, :-1], adv, mask, 0.2)
    with pytest.raises(ValueError, match="returns"):
        value_loss(logp, old, adv[:-1], mask, 0.2)
    with pytest.raises(ValueError, match="mask"):
        entropy(np.zeros((3, 7, 5)), mask[:, :-1])
