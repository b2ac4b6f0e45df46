"""The decoder block: grouped-query `Attention`, the `MLP`, and the pre-norm `Block` around them.

Attention is two einsums with a boolean mask, queries reshaped to `[B, S, Hkv, G, D]` so grouped
K/V heads are never repeated, and writes new K/V into a cache slot when decoding; the llama family
rotates q and k with `jaxppo.models.rope`. `select_rows` lets the last block compute only the rows
whose outputs are wanted; `remat_block` runs a block under `jax.checkpoint`.
`jaxppo.models.transformer` stacks these into the `Transformer`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxppo.models.arch import ACTIVATIONS, TransformerConfig
from jaxppo.models.layers import WEIGHT_INIT, Dense, Norm
from jaxppo.models.rope import apply_rope


def select_rows(x: jax.Array, rows) -> jax.Array:
    """Rows of `x [B, S, ...]` along axis 1: `rows` is a static `(start, stop)` slice, or an int
    array `[B, Q]` of per-row indices -> `[B, stop - start or Q, ...]`."""
    if isinstance(rows, tuple):
        start, stop = rows
        return x[:, start:stop]
    index = rows.reshape(rows.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


# ----------------------------------------------------------------------------- modules


class Attention(nnx.Module):
    """Causal multi-head attention with grouped K/V heads; K/V are never repeated per query head."""

    def __init__(self, config: TransformerConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=WEIGHT_INIT, rngs=rngs)
        self.qkv = Dense(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, use_bias=c.qkv_bias, **kw)
        self.out = Dense(c.num_heads * c.head_dim, c.hidden_size, use_bias=c.o_bias, **kw)

    def __call__(self, x, rope, mask, kv=None, cache_index=None, rows=None):
        """x `[B, S, H]`; rope (cos, sin) `[B, S, D]` or None; mask `[B, S, T]` bool (True = attend);
        kv: None, or this layer's cache buffers `([B, Hkv, T, D], [B, Hkv, T, D])` into which the new
        K/V are written at `cache_index`; rows: None, or the query rows to compute (`select_rows`):
        every row still contributes its key and value. Returns (`[B, S or Q, H]`, kv)."""
        c = self.config
        b, s, _ = x.shape
        hkv, g, d = c.num_kv_heads, c.num_groups, c.head_dim
        qkv = self.qkv(x)  # [B, S, (Hq + 2 Hkv) D]
        q = qkv[..., : c.num_heads * d].reshape(b, s, hkv, g, d)  # [B, S, Hkv, G, D]
        k = qkv[..., c.num_heads * d : (c.num_heads + hkv) * d].reshape(b, s, hkv, d)  # [B, S, Hkv, D]
        v = qkv[..., (c.num_heads + hkv) * d :].reshape(b, s, hkv, d)  # [B, S, Hkv, D]
        if rope is not None:
            cos, sin = rope
            q = apply_rope(q, cos[:, :, None, None, :], sin[:, :, None, None, :])
            k = apply_rope(k, cos[:, :, None, :], sin[:, :, None, :])
        k = k.transpose(0, 2, 1, 3)  # [B, Hkv, S, D]
        v = v.transpose(0, 2, 1, 3)  # [B, Hkv, S, D]
        if kv is not None:
            # in-place slot write (XLA reuses the carried buffer inside while_loop)
            start = (0, 0, cache_index, 0)
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)  # [B, Hkv, T, D]
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
            kv = (k, v)
        if rows is not None:
            q, mask = select_rows(q, rows), select_rows(mask, rows)
            s = q.shape[1]
        q = q * jnp.asarray(d**-0.5, q.dtype)
        scores = jnp.einsum("bshgd,bhtd->bhgst", q, k, preferred_element_type=jnp.float32)  # [B, Hkv, G, S, T]
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        o = jnp.einsum("bhgst,bhtd->bshgd", probs, v)  # [B, S, Hkv, G, D]
        return self.out(o.reshape(b, s, c.num_heads * d)), kv


class MLP(nnx.Module):
    """GELU MLP (gpt2) or SwiGLU (llama family: `fc_in` holds [gate | up])."""

    def __init__(self, config: TransformerConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        c = config
        self.gated = c.arch == "llama"
        self.act = ACTIVATIONS[c.activation]
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=WEIGHT_INIT, use_bias=c.mlp_bias, rngs=rngs)
        width = (2 if self.gated else 1) * c.intermediate_size
        self.fc_in = Dense(c.hidden_size, width, **kw)
        self.fc_out = Dense(c.intermediate_size, c.hidden_size, **kw)

    def __call__(self, x):
        h = self.fc_in(x)  # [B, S, I] or [B, S, 2I]
        if self.gated:
            gate, up = jnp.split(h, 2, axis=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.fc_out(h)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: TransformerConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        norm = dict(rms=config.arch == "llama", eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = Norm(config.hidden_size, **norm)
        self.attn = Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_norm = Norm(config.hidden_size, **norm)
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, rope, mask, kv=None, cache_index=None, rows=None):
        """rows: None, or the rows (`select_rows`) whose outputs are wanted: attention still reads
        every row's key and value, the rest of the block runs for these rows only."""
        h, kv = self.attn(self.attn_norm(x), rope, mask, kv, cache_index, rows)
        x = (x if rows is None else select_rows(x, rows)) + h
        return x + self.mlp(self.mlp_norm(x)), kv


def remat_block(layer: Block, x, rope, mask, kv=None, cache_index=None, rows=None):
    """Block.__call__ under `jax.checkpoint`: activations inside the block are recomputed in the
    backward pass. The block is split into (graph, params) and merged inside the checkpointed pure
    function, so it composes with an outer `jax.grad` / `jax.jit` over merged params (nnx.remat
    would try to write the Params of an outer trace). A static `rows` slice stays a Python value."""
    graphdef, params = nnx.split(layer)
    static_rows = rows if isinstance(rows, tuple) else None

    @jax.checkpoint
    def run(params, x, rope, mask, kv, cache_index, row_index):
        rows = static_rows if row_index is None else row_index
        return Block.__call__(nnx.merge(graphdef, params), x, rope, mask, kv, cache_index, rows)

    return run(params, x, rope, mask, kv, cache_index, None if static_rows is not None else rows)
