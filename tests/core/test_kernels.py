"""The CPU-kernel switch: `matmul_reductions` picks by backend, and the kernel path and the plain
path of `Dense`, `Norm`, a whole `Transformer` and `global_norm` compute the same values and
gradients. Each path is forced on the CPU by patching the switch. Tolerance: float32,
rtol 1e-5 / atol 1e-6 (the two paths sum in different orders)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import left_padded_batch, small_model

from jaxppo.core import kernels
from jaxppo.engine.optimizer import global_norm
from jaxppo.models.layers import Dense, Norm

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True)
def _no_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _rand(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _both_paths(monkeypatch, fn, *args, jit=False):
    """`fn(*args)` traced once with the kernels and once with the plain maths -> (kernels, plain)."""
    out = []
    for use_kernels in (True, False):
        monkeypatch.setattr(kernels, "matmul_reductions", lambda backend=None, k=use_kernels: k)
        # a fresh wrapper per path: a jitted function reused across paths would keep its first trace
        run = jax.jit(lambda *a: fn(*a)) if jit else fn
        out.append(run(*args))
    return out


def _custom_vjps(fn, *args) -> int:
    """How many custom-VJP calls `fn(*args)` traces to (a fresh wrapper: make_jaxpr caches traces)."""
    return str(jax.make_jaxpr(lambda *a: fn(*a))(*args)).count("custom_vjp_call")


def _assert_trees_close(got, want, **tol):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), **tol)


def test_switch_is_on_for_cpu_only():
    assert kernels.matmul_reductions("cpu") is True
    assert kernels.matmul_reductions("gpu") is False
    assert kernels.matmul_reductions("tpu") is False
    assert kernels.matmul_reductions() == (jax.default_backend() == "cpu")


def _value_and_grads(module):
    """(output, d loss / d params, d loss / d x) of `module(x)` under a fixed random cotangent."""
    graphdef, params = nnx.split(module)

    def f(params, x):
        y = nnx.merge(graphdef, params)(x)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    return lambda params, x: jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x), params


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_paths_agree(monkeypatch, use_bias, jit):
    layer = Dense(7, 5, use_bias=use_bias, rngs=nnx.Rngs(0))
    if use_bias:
        layer.bias[...] = _rand(1, (5,))
    x = _rand(2, (3, 4, 7))
    fn, params = _value_and_grads(layer)
    (kern, plain) = _both_paths(monkeypatch, fn, params, x, jit=jit)
    _assert_trees_close(kern, plain, **TOL)


def test_dense_paths_pick_kernel_or_plain(monkeypatch):
    layer = Dense(7, 5, rngs=nnx.Rngs(0))
    x = _rand(2, (3, 7))
    counts = _both_paths(monkeypatch, lambda x: _custom_vjps(layer, x), x)
    assert counts == [1, 0]


def test_dense_bfloat16_paths_agree(monkeypatch):
    layer = Dense(8, 6, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = _rand(2, (4, 8), jnp.bfloat16)
    fn, params = _value_and_grads(layer)
    kern, plain = _both_paths(monkeypatch, fn, params, x)
    _assert_trees_close(kern, plain, rtol=2e-2, atol=2e-2)  # bf16: 8 bits of mantissa


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("rms", [True, False])
def test_norm_paths_agree(monkeypatch, rms, jit):
    norm = Norm(16, rms=rms, eps=1e-5, dtype=jnp.float32, param_dtype=jnp.float32)
    norm.scale[...] = 1.0 + 0.1 * _rand(1, (16,))
    if norm.bias is not None:
        norm.bias[...] = 0.1 * _rand(2, (16,))
    x = 3.0 + _rand(0, (2, 5, 16))
    fn, params = _value_and_grads(norm)
    kern, plain = _both_paths(monkeypatch, fn, params, x, jit=jit)
    _assert_trees_close(kern, plain, rtol=1e-4, atol=1e-5)  # rsqrt of a variance: looser on grads
    counts = _both_paths(monkeypatch, lambda x: _custom_vjps(norm, x), x)
    assert counts == [1, 0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_transformer_paths_agree(monkeypatch, arch):
    model = small_model(seed=1, arch=arch)
    ids, mask = left_padded_batch(B=3, P=7)
    graphdef, params = nnx.split(model)

    def loss(params):
        logits = nnx.merge(graphdef, params)(ids, mask)  # [B, S, V]
        return jnp.mean(jnp.sin(logits) * logits), logits

    kern, plain = _both_paths(monkeypatch, jax.value_and_grad(loss, has_aux=True), params, jit=True)
    _assert_trees_close(kern, plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_global_norm_paths_equal_optax(monkeypatch, jit):
    tree = {"scalar": jnp.float32(-2.5), "vec": _rand(0, (7,)), "mat": _rand(1, (5, 3)),
            "stack": _rand(2, (2, 3, 4)), "bf16": _rand(3, (6, 5), jnp.bfloat16)}
    want = optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
    for got in _both_paths(monkeypatch, global_norm, tree, jit=jit):
        assert got.dtype == jnp.float32 and got.shape == ()
        np.testing.assert_allclose(got, want, **TOL)


def test_global_norm_by_hand():
    tree = [jnp.array([3.0, 0.0]), jnp.array([[0.0, 4.0], [0.0, 12.0]])]  # sqrt(9 + 16 + 144) = 13
    np.testing.assert_allclose(global_norm(tree), 13.0, rtol=1e-7)
