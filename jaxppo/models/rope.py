"""Rotary position embeddings (RoPE; Su et al. 2021, "RoFormer") in HF's rotate-half layout.

For position p and frequency f_i = theta^(-2i / D), i < D/2, a head vector x `[D]` is rotated as

    rope(x, p) = x * cos(p f) + rotate_half(x) * sin(p f),   rotate_half([x1, x2]) = [-x2, x1]

with cos/sin tables `[D]` that repeat the D/2 angles twice (`rope_tables`). Llama-3 scaling slows
the long wavelengths by `factor`, keeps the short ones and interpolates the band between
(`rope_inv_freq`). Used by the llama family's `Attention` (`jaxppo.models.blocks`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxppo.models.arch import TransformerConfig


def rope_inv_freq(config: TransformerConfig) -> np.ndarray:
    """RoPE inverse frequencies `[D/2]` float32, with Llama-3 frequency scaling when configured."""
    dim = config.head_dim
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(
        np.float32
    )
    if config.rope_type == "llama3":
        p = dict(config.rope_scaling)
        factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old_len = float(p.get("original_max_position_embeddings", config.max_position_embeddings))
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(config: TransformerConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[B, S, D]` float32 for integer positions `[B, S]` (HF's rotate-half layout)."""
    freqs = positions.astype(jnp.float32)[:, :, None] * jnp.asarray(rope_inv_freq(config))[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, S, D]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x [B, S, ..., D]` by cos/sin already broadcast to its rank; float32 math, `x.dtype` out."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)
