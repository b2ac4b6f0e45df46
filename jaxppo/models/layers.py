"""`Dense` and `Norm`: the transformer's layers, written so that every reduction is a matmul.

XLA:CPU runs reductions slowly: a row mean of `[384, 256]` takes ~4x as long as the same mean
written as a matmul with a ones vector, and the sums over rows that autodiff emits for bias and
norm-scale gradients become `reduce-window` ops at a fraction of a GFLOP/s. Under plain autodiff it
also gives the weight gradient of `x @ W` a transposed copy of the output cotangent and fuses the
whole chain that produces that cotangent (every later layer's norm and residual backward) into the
copy, once per consumer. Together these took ~40 % of a GPT-2 forward + backward on 8 x 48 tokens
(`python experiments/bench_ppo.py --profile DIR` lists the ops). Here:

    Dense:  y = x @ W + b;  dx = g @ W^T,  dW = x^T @ g (over the flattened rows),  db = 1^T @ g
    Norm:   means over the feature axis are `x @ (1/H)`; the scale/bias gradients are `1^T @ (...)`

Every matmul standing in for a reduction runs at `Precision.HIGHEST`, so it is an exact float32
sum on accelerators too. The parameters, their names and their initialisation are those of
`nnx.Linear` and of the previous `Norm`, so checkpoints, HF conversion and partition rules are
unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

_HIGHEST = jax.lax.Precision.HIGHEST


def _contract(a, b, a_dim: int, b_dim: int, **kw):
    return jax.lax.dot_general(a, b, (((a_dim,), (b_dim,)), ((), ())), **kw)


def _row(v: jax.Array, ndim: int) -> jax.Array:
    """`[H]` -> `[1, ..., 1, H]` of rank `ndim` (explicit broadcasting, no rank promotion)."""
    return v.reshape((1,) * (ndim - 1) + (-1,))


def column_sum(x: jax.Array) -> jax.Array:
    """`x [N, H]` summed over its rows -> `[H]`, float32, as `1^T @ x`."""
    ones = jnp.ones((x.shape[0],), x.dtype)
    return _contract(ones, x, 0, 0, precision=_HIGHEST, preferred_element_type=jnp.float32)


def mean_last(x: jax.Array) -> jax.Array:
    """Mean over the last axis, kept as a size-1 axis: `x @ (1/H)`."""
    h = x.shape[-1]
    return _contract(x, jnp.full((h,), 1.0 / h, x.dtype), x.ndim - 1, 0, precision=_HIGHEST)[..., None]


# ----------------------------------------------------------------------------- dense


@jax.custom_vjp
def dense(x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    """`x [..., I] @ w [I, O] (+ b [O])`, with the matmul-only backward described above."""
    y = _contract(x, w, x.ndim - 1, 0)
    return y if b is None else y + _row(b, y.ndim)


def _dense_fwd(x, w, b):
    return dense(x, w, b), (x, w, b)


def _dense_bwd(res, g):
    x, w, b = res
    n_in, n_out = w.shape
    x2, g2 = x.reshape(-1, n_in), g.reshape(-1, n_out)
    dx = _contract(g, w, g.ndim - 1, 1)
    dw = _contract(x2, g2, 0, 0, preferred_element_type=jnp.float32).astype(w.dtype)
    db = None if b is None else column_sum(g2).astype(b.dtype)
    return dx.astype(x.dtype), dw, db


dense.defvjp(_dense_fwd, _dense_bwd)


class Dense(nnx.Linear):
    """`nnx.Linear` (same Params, same init) whose call goes through `dense`."""

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        if out_sharding is not None:    # nnx.Linear's argument; refused rather than silently dropped
            raise NotImplementedError("Dense does not take out_sharding; shard its inputs instead")
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        return dense(inputs, kernel, bias)


# ----------------------------------------------------------------------------- norm


@jax.custom_vjp
def scale_shift(xhat: jax.Array, scale: jax.Array, bias: jax.Array | None) -> jax.Array:
    """`xhat [..., H] * scale [H] (+ bias [H])` whose parameter gradients are matmuls."""
    y = xhat * _row(scale, xhat.ndim)
    return y if bias is None else y + _row(bias, xhat.ndim)


def _scale_shift_fwd(xhat, scale, bias):
    return scale_shift(xhat, scale, bias), (xhat, scale, bias)


def _scale_shift_bwd(res, g):
    xhat, scale, bias = res
    h = scale.shape[0]
    dscale = column_sum((g * xhat).reshape(-1, h)).astype(scale.dtype)
    dbias = None if bias is None else column_sum(g.reshape(-1, h)).astype(bias.dtype)
    return g * _row(scale, g.ndim), dscale, dbias


scale_shift.defvjp(_scale_shift_fwd, _scale_shift_bwd)


class Norm(nnx.Module):
    """LayerNorm (with bias) or RMSNorm, computed in float32, returning `dtype`."""

    def __init__(self, size: int, *, rms: bool, eps: float, dtype: Any, param_dtype: Any):
        self.rms = rms
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((size,), param_dtype))
        self.bias = None if rms else nnx.Param(jnp.zeros((size,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.rms:
            xhat = x * jax.lax.rsqrt(mean_last(jnp.square(x)) + self.eps)
        else:
            centered = x - mean_last(x)
            xhat = centered * jax.lax.rsqrt(mean_last(jnp.square(centered)) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        bias = None if self.bias is None else self.bias[...].astype(jnp.float32)
        return scale_shift(xhat, scale, bias).astype(self.dtype)
