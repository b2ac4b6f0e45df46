"""jaxppo.core.masked against NumPy on the valid entries. Tolerance: rtol 1e-5 / atol 1e-6 (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxppo.core.masked import masked_mean, masked_sum, masked_var, masked_whiten

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True)
def _no_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _ragged(b=3, t=7, lengths=(7, 1, 4), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, t)).astype(np.float32)
    mask = (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
    return x, mask


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_sum_and_mean_match_numpy(axis):
    x, mask = _ragged(lengths=(7, 1, 0))
    np.testing.assert_allclose(masked_sum(x, mask, axis=axis), (x * mask).sum(axis=axis), **TOL)
    count = mask.sum(axis=axis)
    expected = np.where(count > 0, (x * mask).sum(axis=axis) / np.maximum(count, 1), 0.0)
    got = masked_mean(x, mask, axis=axis)
    np.testing.assert_allclose(got, expected, **TOL)
    assert np.all(np.isfinite(got))  # the all-zero row gives 0, not NaN


@pytest.mark.parametrize("unbiased", [True, False])
def test_var_matches_numpy(unbiased):
    x, mask = _ragged()
    valid = x[mask > 0]
    np.testing.assert_allclose(masked_var(x, mask, unbiased=unbiased),
                               np.var(valid, ddof=1 if unbiased else 0), **TOL)


def test_whiten_matches_trl_formula():
    x, mask = _ragged()
    valid = x[mask > 0]
    mean, var = valid.mean(), valid.var(ddof=1)
    expected = np.where(mask > 0, (x - mean) / np.sqrt(var + 1e-8), 0.0)
    got = np.asarray(masked_whiten(x, mask))
    np.testing.assert_allclose(got, expected, **TOL)
    np.testing.assert_allclose(got[mask > 0].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(got[mask > 0].var(ddof=1), 1.0, rtol=1e-5)
    expected_keep = np.where(mask > 0, expected + mean, 0.0)
    np.testing.assert_allclose(masked_whiten(x, mask, shift_mean=False), expected_keep, **TOL)


def test_all_zero_mask_is_safe():
    x, _ = _ragged()
    mask = np.zeros_like(x)
    for value in (masked_sum(x, mask), masked_mean(x, mask), masked_var(x, mask),
                  masked_var(x, mask, unbiased=False)):
        assert float(value) == 0.0
    np.testing.assert_array_equal(masked_whiten(x, mask), np.zeros_like(x))
    grad = jax.grad(lambda v: masked_mean(v, mask) + masked_var(v, mask))(jnp.asarray(x))
    np.testing.assert_array_equal(grad, np.zeros_like(x))


def test_one_valid_token():
    x, _ = _ragged()
    mask = np.zeros_like(x)
    mask[1, 3] = 1.0
    assert float(masked_mean(x, mask)) == pytest.approx(float(x[1, 3]))
    assert float(masked_var(x, mask)) == 0.0  # Bessel skipped for n = 1 (TRL divides by 0)
    w = np.asarray(masked_whiten(x, mask))
    assert np.all(np.isfinite(w)) and np.all(w == 0.0)


def test_garbage_beyond_mask_never_leaks():
    x, mask = _ragged()
    dirty = np.where(mask > 0, x, np.nan).astype(np.float32)
    dirty[1, -1] = np.inf  # row 1 has one valid token
    for fn in (masked_sum, masked_mean, masked_var, masked_whiten):
        np.testing.assert_allclose(fn(dirty, mask), fn(x, mask), **TOL)


def test_jit_matches_eager():
    x, mask = _ragged()
    for fn in (masked_sum, masked_mean, masked_var, masked_whiten):
        np.testing.assert_allclose(jax.jit(fn)(x, mask), fn(x, mask), rtol=1e-6, atol=1e-7)


def test_shape_mismatch_names_mask():
    x, mask = _ragged()
    for fn in (masked_sum, masked_mean, masked_var, masked_whiten):
        with pytest.raises(ValueError, match="mask"):
            fn(x, mask[:, :-1])
