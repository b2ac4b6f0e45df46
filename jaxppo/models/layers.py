"""`Dense` and `Norm`, the transformer's parametrised layers, and `WEIGHT_INIT`, their initialiser.

Each picks its maths once per trace from `jaxppo.core.kernels.matmul_reductions()`:

    XLA:CPU      the kernels of `jaxppo.core.kernels`: every reduction (norm means, bias and scale
                 gradients) a matmul, with hand-written backward passes; CPU reductions are slow.
    GPU / TPU    plain maths differentiated by ordinary autodiff: `nnx.Linear`'s `x @ W + b` at the
                 default precision, `jnp.mean` for the norm statistics.

Both compute the same function. The parameters, their names and their initialisation are those of
`nnx.Linear` and of a LayerNorm / RMSNorm with `scale` (and `bias`), so checkpoints, HF conversion
and partition rules do not depend on the backend.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxppo.core import kernels

WEIGHT_INIT = nnx.initializers.normal(stddev=0.02)
"""N(0, 0.02), HF's default `initializer_range`: every kernel and embedding of a fresh `Transformer`."""


class Dense(nnx.Linear):
    """`nnx.Linear` (same Params, same init); on the CPU its call goes through `kernels.dense`."""

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        if out_sharding is not None:    # nnx.Linear's argument; refused rather than dropped by the kernel
            raise NotImplementedError("Dense does not take out_sharding; shard its inputs instead")
        if not kernels.matmul_reductions():
            return super().__call__(inputs)
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        return kernels.dense(inputs, kernel, bias)


def _mean_last(x: jax.Array) -> jax.Array:
    """`jnp.mean` over the last axis, kept: `[..., H]` -> `[..., 1]`."""
    return jnp.mean(x, axis=-1, keepdims=True)


def _scale_shift(xhat: jax.Array, scale: jax.Array, bias: jax.Array | None) -> jax.Array:
    """`xhat [..., H] * scale [H] (+ bias [H])`, differentiated by plain autodiff."""
    row = (1,) * (xhat.ndim - 1) + (-1,)  # [H] -> [1, ..., 1, H]: explicit, no rank promotion
    y = xhat * scale.reshape(row)
    return y if bias is None else y + bias.reshape(row)


class Norm(nnx.Module):
    """LayerNorm (with bias) or RMSNorm, computed in float32, returning `dtype`.

        LayerNorm:  y = (x - mean(x)) / sqrt(var(x) + eps) * scale + bias
        RMSNorm:    y = x / sqrt(mean(x^2) + eps) * scale
    """

    def __init__(self, size: int, *, rms: bool, eps: float, dtype: Any, param_dtype: Any):
        self.rms = rms
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((size,), param_dtype))
        self.bias = None if rms else nnx.Param(jnp.zeros((size,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """`x [..., H]` -> `[..., H]` in `dtype`."""
        cpu = kernels.matmul_reductions()
        mean_last = kernels.mean_last if cpu else _mean_last
        scale_shift = kernels.scale_shift if cpu else _scale_shift
        x = x.astype(jnp.float32)
        if self.rms:
            xhat = x * jax.lax.rsqrt(mean_last(jnp.square(x)) + self.eps)
        else:
            centered = x - mean_last(x)
            xhat = centered * jax.lax.rsqrt(mean_last(jnp.square(centered)) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        bias = None if self.bias is None else self.bias[...].astype(jnp.float32)
        return scale_shift(xhat, scale, bias).astype(self.dtype)
