"""CPU kernels: reductions written as matmuls, and the custom backward passes that use them.

XLA:CPU runs reductions slowly: a row mean of `[384, 256]` takes ~4x as long as the same mean
written as a matmul with a ones vector, and the sums over rows that autodiff emits for bias and
norm-scale gradients become `reduce-window` ops at a fraction of a GFLOP/s. Under plain autodiff it
also gives the weight gradient of `x @ W` a transposed copy of the output cotangent and fuses the
whole chain that produces that cotangent (every later layer's norm and residual backward) into the
copy, once per consumer. Together these took ~40 % of a GPT-2 forward + backward on 8 x 48 tokens
(`python experiments/bench_ppo.py --profile DIR` lists the ops). Here:

    dense:        y = x @ W + b;  dx = g @ W^T,  dW = x^T @ g (over the flattened rows),  db = 1^T @ g
    mean_last:    a mean over the feature axis is `x @ (1/H)`
    scale_shift:  y = xhat * s + b;  ds = 1^T @ (g * xhat),  db = 1^T @ g
    column_sum:   a sum over rows is `1^T @ x`

Every matmul standing in for a reduction runs at `Precision.HIGHEST`, so it is an exact float32 sum.

They pay on XLA:CPU only; GPU and TPU run reductions well and XLA optimises the plain autodiff
graph better than these. `matmul_reductions()` is the one switch: `jaxppo.models.layers` and
`jaxppo.engine.optimizer.global_norm` use these kernels where it is true and plain `jnp` / `nnx`
maths elsewhere. This module imports only `jax`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def matmul_reductions(backend: str | None = None) -> bool:
    """Whether to use the kernels here: True on the CPU backend only. `backend=None` reads
    `jax.default_backend()`; callers ask at trace time, so a program is traced for one backend."""
    return (backend or jax.default_backend()) == "cpu"


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
    """Mean over the last axis, kept as a size-1 axis: `x [..., H] @ (1/H)` -> `[..., 1]`."""
    h = x.shape[-1]
    return _contract(x, jnp.full((h,), 1.0 / h, x.dtype), x.ndim - 1, 0, precision=_HIGHEST)[..., None]


# ----------------------------------------------------------------------------- dense


@jax.custom_vjp
def dense(x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    """`x [..., I] @ w [I, O] (+ b [O])` -> `[..., O]`, with the matmul-only backward above."""
    y = _contract(x, w, x.ndim - 1, 0)
    return y if b is None else y + _row(b, y.ndim)


def _dense_fwd(x, w, b):
    return dense(x, w, b), (x, w, b)


def _dense_bwd(res, g):
    x, w, b = res
    n_in, n_out = w.shape
    x2, g2 = x.reshape(-1, n_in), g.reshape(-1, n_out)  # [N, I], [N, O]
    dx = _contract(g, w, g.ndim - 1, 1)
    dw = _contract(x2, g2, 0, 0, preferred_element_type=jnp.float32).astype(w.dtype)
    db = None if b is None else column_sum(g2).astype(b.dtype)
    return dx.astype(x.dtype), dw, db


dense.defvjp(_dense_fwd, _dense_bwd)


# ----------------------------------------------------------------------------- scale and shift


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
    dscale = column_sum((g * xhat).reshape(-1, h)).astype(scale.dtype)  # [N, H] -> [H]
    dbias = None if bias is None else column_sum(g.reshape(-1, h)).astype(bias.dtype)
    return g * _row(scale, g.ndim), dscale, dbias


scale_shift.defvjp(_scale_shift_fwd, _scale_shift_bwd)
