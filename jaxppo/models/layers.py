"""`Dense` and `Norm`, the transformer's parametrised layers, and `WEIGHT_INIT`, their initialiser.

Each picks its maths once per trace from `jaxppo.core.kernels.matmul_reductions()`:

    XLA:CPU      the kernels of `jaxppo.core.kernels`: every reduction (norm means, bias and scale
                 gradients) a matmul, with hand-written backward passes; CPU reductions are slow.
    GPU / TPU    plain maths differentiated by ordinary autodiff: `nnx.Linear`'s `x @ W + b` at the
                 default precision, `jnp.mean` for the norm statistics.

Both compute the same function. The parameters, their names and their initialisation are those of
`nnx.Linear` and of a LayerNorm / RMSNorm with `scale` (and `bias`), so checkpoints, HF conversion
and partition rules do not depend on the backend.

A `Dense` may carry LoRA `Adapters` (`jaxppo.models.lora.add_lora` puts them there): low-rank
updates `scale * dropout(x) A B` added to column ranges of its output, one per Hugging Face
projection the fused kernel holds (q, k and v of `qkv`; gate and up of `fc_in`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxppo.core import kernels

WEIGHT_INIT = nnx.initializers.normal(stddev=0.02)
"""N(0, 0.02), HF's default `initializer_range`: every kernel and embedding of a fresh `Transformer`."""


class Adapters(nnx.Module):
    """LoRA adapters of one `Dense`: `parts[name]` (an `nnx.LoRA`, `lora_a [in, r]`, `lora_b [r, w]`,
    both `nnx.LoRAParam`) writes `scale * dropout(x) @ lora_a @ lora_b` into the output columns
    `slices[i]` of the layer (HF's `q_proj` is the first `Hq * D` columns of the fused `qkv`).

    Dropout (`rate`) acts only while `key` holds a PRNG key (the update's training forward sets
    it with `jaxppo.models.lora.set_dropout_key`); sampling and scoring run without it."""

    def __init__(self, in_features: int, width: int, slices: dict[str, tuple[int, int]], *, rank: int,
                 scale: float, rate: float, dtype: Any, rngs: nnx.Rngs):
        bound_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")   # PEFT's kaiming(a=sqrt 5)
        self.parts = nnx.Dict({name: nnx.LoRA(in_features, rank, stop - start, dtype=dtype, param_dtype=jnp.float32,
                                              a_initializer=bound_init, rngs=rngs)
                               for name, (start, stop) in slices.items()})
        self.slices = tuple(slices.items())
        self.width = width
        self.scale = scale
        self.rate = rate
        self.key = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`x [..., in]` -> the adapters' sum `[..., width]` in the compute dtype."""
        def dropped(i):    # each projection its own mask, as PEFT's per-module dropout
            if self.rate == 0 or self.key is None:
                return x
            keep = jax.random.bernoulli(jax.random.fold_in(self.key, i), 1.0 - self.rate, x.shape)
            return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros((), x.dtype)).astype(x.dtype)

        outs = [(start, stop, self.parts[name](dropped(i)) * jnp.asarray(self.scale, x.dtype))
                for i, (name, (start, stop)) in enumerate(self.slices)]
        outs.sort(key=lambda o: o[0])
        pieces, at = [], 0
        for start, stop, out in outs:     # the output columns in order, zeros where no adapter writes
            if start > at:
                pieces.append(jnp.zeros(x.shape[:-1] + (start - at,), out.dtype))
            pieces.append(out)
            at = stop
        if at < self.width:
            pieces.append(jnp.zeros(x.shape[:-1] + (self.width - at,), pieces[-1].dtype))
        return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)


class Dense(nnx.Linear):
    """`nnx.Linear` (same Params, same init); on the CPU its call goes through `kernels.dense`.
    `adapters` (None unless LoRA is on) adds the low-rank updates."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapters: Adapters | None = nnx.data(None)

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        if out_sharding is not None:    # nnx.Linear's argument; refused rather than dropped by the kernel
            raise NotImplementedError("Dense does not take out_sharding; shard its inputs instead")
        if not kernels.matmul_reductions():
            y = super().__call__(inputs)
        else:
            kernel = self.kernel[...]
            bias = self.bias[...] if self.bias is not None else None
            x, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
            y = kernels.dense(x, kernel, bias)
        if self.adapters is None:
            return y
        return y + self.adapters(inputs.astype(y.dtype)).astype(y.dtype)


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
