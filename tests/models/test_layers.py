"""Dense and Norm: hand-written backward passes equal plain autodiff of the textbook formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxppo.core.kernels import column_sum, dense, mean_last, scale_shift
from jaxppo.models.layers import Dense, Norm


def _rand(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(key), shape, dtype)


@pytest.mark.parametrize("with_bias", [True, False])
def test_dense_value_and_gradients_match_autodiff(with_bias):
    x, w = _rand(0, (3, 5, 8)), _rand(1, (8, 6))
    b = _rand(2, (6,)) if with_bias else None
    ct = _rand(3, (3, 5, 6))

    def ref(x, w, b):
        y = jnp.einsum("bsi,io->bso", x, w)
        return y if b is None else y + b[None, None, :]

    y, vjp = jax.vjp(dense, x, w, b)
    y_ref, vjp_ref = jax.vjp(ref, x, w, b)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(vjp(ct), vjp_ref(ct)):
        if want is None:
            assert got is None
        else:
            assert got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dense_module_has_linear_params_and_init():
    ours = Dense(8, 6, use_bias=True, rngs=nnx.Rngs(0))
    theirs = nnx.Linear(8, 6, use_bias=True, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(ours.kernel[...], theirs.kernel[...])
    def paths(m):
        return {path for path, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}

    assert paths(ours) == paths(theirs) == {("kernel",), ("bias",)}
    x = _rand(4, (2, 8))
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(NotImplementedError, match="out_sharding"):
        ours(x, out_sharding=object())


def test_dense_bfloat16_keeps_dtypes():
    x, w, b = (_rand(0, (4, 8), jnp.bfloat16), _rand(1, (8, 6), jnp.bfloat16), _rand(2, (6,), jnp.bfloat16))
    dx, dw, db = jax.grad(lambda *a: dense(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(x, w, b)
    assert dx.dtype == dw.dtype == db.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(db, np.float32), 4.0)


def test_reductions_as_matmuls():
    x = _rand(0, (7, 12))
    np.testing.assert_allclose(column_sum(x), x.sum(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mean_last(x), x.mean(-1, keepdims=True), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rms", [True, False])
def test_norm_value_and_gradients_match_reference(rms):
    norm = Norm(16, rms=rms, eps=1e-5, dtype=jnp.float32, param_dtype=jnp.float32)
    norm.scale[...] = 1.0 + 0.1 * _rand(1, (16,))
    if norm.bias is not None:
        norm.bias[...] = 0.1 * _rand(2, (16,))
    graphdef, params = nnx.split(norm)
    x = 3.0 + _rand(0, (2, 5, 16))
    ct = _rand(3, (2, 5, 16))

    def ours(params, x):
        return nnx.merge(graphdef, params)(x)

    def ref(params, x):
        scale = params["scale"][...]
        if rms:
            y = x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5)
            return y * scale[None, None, :]
        mu = jnp.mean(x, -1, keepdims=True)
        y = (x - mu) / jnp.sqrt(jnp.var(x, -1, keepdims=True) + 1e-5)
        return y * scale[None, None, :] + params["bias"][...][None, None, :]

    y, vjp = jax.vjp(ours, params, x)
    y_ref, vjp_ref = jax.vjp(ref, params, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    got, want = vjp(ct), vjp_ref(ct)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_scale_shift_without_bias():
    xhat, scale = _rand(0, (3, 4)), _rand(1, (4,))
    g = jax.grad(lambda s: scale_shift(xhat, s, None).sum())(scale)
    np.testing.assert_allclose(g, xhat.sum(0), rtol=1e-6, atol=1e-6)
