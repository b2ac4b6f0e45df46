"""One Flax NNX decoder-only transformer for GPT-2 and the Llama family (Llama 2/3, Mistral, Qwen2).

The switches (all read from a frozen, hashable `TransformerConfig`):

    arch "gpt2"   LayerNorm, learned positions, fused qkv, GELU MLP, biases everywhere
    arch "llama"  RMSNorm, RoPE (rope_theta, optional Llama-3 scaling), SwiGLU MLP,
                  optional q/k/v bias (Qwen2, Llama `attention_bias`), grouped-query attention

Weights are stored as `[in, out]` kernels. q/k/v live in one `qkv` kernel `[H, (Hq + 2 Hkv) D]`
and SwiGLU's gate/up in one `fc_in` kernel `[H, 2 I]` (one matmul each, which matters when
decoding one token at a time); `jaxppo.models.hf` splits and joins them for HF checkpoints.
Norms, softmax and the output head run in float32 whatever the compute dtype.

Positions follow the left-padding convention `clip(cumsum(attention_mask) - 1, 0)`, and padded
keys are never attended, so a left-padded batch gives the same per-token outputs as each row alone.

    model = Transformer(config, head="lm", rngs=nnx.Rngs(0))
    logits = model(input_ids, attention_mask)                       # [B, S, V] float32
    cache = model.init_cache(B, max_len)                             # KVCache, per layer [B, Hkv, max_len, D]
    logits, cache = model.decode(ids, mask, positions, cache, 0)     # prefill, then one token a step

Attention is two einsums with a boolean mask over the whole cache (fixed shapes, so one compiled
step serves every decode position inside `lax.while_loop`); queries are reshaped to
`[B, S, Hkv, G, D]` so grouped K/V heads are never repeated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxppo.models.layers import Dense, Norm

ARCHS = ("gpt2", "llama")
MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama"}
ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}
ROPE_TYPES = ("default", "llama3")
HEADS = ("lm", "scalar")
_INIT = nnx.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Architecture of a decoder-only LM. Hashable, so it can be a static jit argument."""

    arch: str  # "gpt2" | "llama" (the llama family: llama, mistral, qwen2)
    model_type: str = ""  # HF model_type: "gpt2" | "llama" | "mistral" | "qwen2"; "" -> arch
    vocab_size: int  # rows of the embedding / logits width; may exceed the tokenizer's vocab
    hidden_size: int  # residual stream width H
    num_layers: int  # transformer blocks
    num_heads: int  # query heads Hq
    num_kv_heads: int = 0  # key/value heads Hkv (grouped-query attention); 0 -> num_heads
    head_dim: int = 0  # D; 0 -> hidden_size // num_heads
    intermediate_size: int = 0  # MLP width I; 0 -> 4 * hidden_size
    max_position_embeddings: int = 1024  # learned positions (gpt2) / nominal context (llama)
    norm_eps: float = 1e-5  # LayerNorm / RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base (llama family)
    rope_scaling: tuple | None = None  # sorted (key, value) items of HF rope_scaling; None = plain RoPE
    qkv_bias: bool = False  # bias on q, k, v (gpt2, qwen2, llama attention_bias)
    o_bias: bool = False  # bias on the attention output projection (gpt2, llama attention_bias)
    mlp_bias: bool = False  # bias on the MLP projections (gpt2, llama mlp_bias)
    tie_word_embeddings: bool = False  # lm head reuses the token embedding
    activation: str = "gelu_new"  # MLP activation (HF name); llama family gates it (SwiGLU)
    bos_token_id: int | None = None
    eos_token_id: int | tuple | None = None
    pad_token_id: int | None = None
    hf_config: str | None = dataclasses.field(default=None, compare=False, repr=False)
    # ^ the original config.json text, kept so save_pretrained writes back every HF field

    def __post_init__(self):
        def fix(name, value):
            object.__setattr__(self, name, value)

        if self.arch not in ARCHS:
            raise ValueError(f"TransformerConfig.arch: got {self.arch!r}, expected one of {ARCHS}")
        if not self.model_type:
            fix("model_type", self.arch)
        if self.model_type not in MODEL_TYPES or MODEL_TYPES[self.model_type] != self.arch:
            raise ValueError(
                f"TransformerConfig.model_type: {self.model_type!r} does not fit arch {self.arch!r} "
                f"(supported: {sorted(MODEL_TYPES)})"
            )
        if not self.num_kv_heads:
            fix("num_kv_heads", self.num_heads)
        if not self.head_dim:
            fix("head_dim", self.hidden_size // self.num_heads)
        if not self.intermediate_size:
            fix("intermediate_size", 4 * self.hidden_size)
        if isinstance(self.eos_token_id, list):
            fix("eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, dict):
            fix("rope_scaling", tuple(sorted(self.rope_scaling.items())))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TransformerConfig.{name}: must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"TransformerConfig.num_kv_heads: {self.num_kv_heads} does not divide num_heads {self.num_heads}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"TransformerConfig.activation: {self.activation!r} unsupported (supported: {sorted(ACTIVATIONS)})"
            )
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"TransformerConfig.head_dim: RoPE needs an even head_dim, got {self.head_dim}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"TransformerConfig.rope_scaling: rope_type {self.rope_type!r} unsupported "
                f"(supported: {ROPE_TYPES})"
            )

    @property
    def rope_type(self) -> str:
        params = dict(self.rope_scaling or ())
        return params.get("rope_type", params.get("type")) or "default"

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head G."""
        return self.num_heads // self.num_kv_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)


@flax.struct.dataclass
class KVCache:
    """Per-layer key/value buffers for incremental decoding (a pytree; carried through while_loop)."""

    # Heads before slots ([B, Hkv, S_max, D], not [B, S_max, Hkv, D]): the attention dots then read
    # the buffers in place; the other order costs a transposed copy of every layer's cache per step.
    keys: tuple[jax.Array, ...]  # num_layers x [B, Hkv, S_max, D], compute dtype
    values: tuple[jax.Array, ...]  # num_layers x [B, Hkv, S_max, D], compute dtype
    mask: jax.Array  # [B, S_max] int32, 1 where the slot holds a real (non-padding) token

    @property
    def max_length(self) -> int:
        return self.mask.shape[1]


# ----------------------------------------------------------------------------- helpers


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Left-padding positions `clip(cumsum(mask) - 1, 0)`: `[B, S]` int32."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of the last 1 in each row of `attention_mask [B, S]` -> `[B]` int32 (0 for an all-zero row)."""
    if attention_mask.ndim != 2:
        raise ValueError(f"last_token_index: attention_mask must be [B, S], got shape {attention_mask.shape}")
    idx = jnp.arange(attention_mask.shape[1], dtype=jnp.int32)[None, :]
    return jnp.max(jnp.where(attention_mask > 0, idx, 0), axis=-1)


def sequence_scores(values: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Per-sequence score: `values [B, S]` taken at the last non-padding token -> `[B]`."""
    if values.ndim != 2 or values.shape != attention_mask.shape:
        raise ValueError(
            f"sequence_scores: values and attention_mask must both be [B, S], got {values.shape} and "
            f"{attention_mask.shape}"
        )
    return jnp.take_along_axis(values, last_token_index(attention_mask)[:, None], axis=1)[:, 0]


def select_rows(x: jax.Array, rows) -> jax.Array:
    """Rows of `x [B, S, ...]` along axis 1: `rows` is a static `(start, stop)` slice, or an int
    array `[B, Q]` of per-row indices -> `[B, stop - start or Q, ...]`."""
    if isinstance(rows, tuple):
        start, stop = rows
        return x[:, start:stop]
    index = rows.reshape(rows.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def _rows(outputs_at, length: int):
    """Validate `outputs_at` (None | (start, stop) | int array [B, Q]) against a length-`length` sequence."""
    if outputs_at is None or not isinstance(outputs_at, (tuple, list)):
        if outputs_at is not None and jnp.ndim(outputs_at) != 2:
            raise ValueError(f"outputs_at: an index array must be [B, Q], got shape {jnp.shape(outputs_at)}")
        return outputs_at
    start, stop = (int(v) for v in outputs_at)
    if not 0 <= start < stop <= length:
        raise ValueError(f"outputs_at: need 0 <= start < stop <= {length}, got ({start}, {stop})")
    return (start, stop)


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


def _rope_tables(config: TransformerConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[B, S, D]` float32 for integer positions `[B, S]` (HF's rotate-half layout)."""
    freqs = positions.astype(jnp.float32)[:, :, None] * jnp.asarray(rope_inv_freq(config))[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, S, D]
    return jnp.cos(emb), jnp.sin(emb)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x [B, S, ..., D]` by cos/sin already broadcast to its rank; float32 math."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


# ----------------------------------------------------------------------------- modules


class Attention(nnx.Module):
    """Causal multi-head attention with grouped K/V heads; K/V are never repeated per query head."""

    def __init__(self, config: TransformerConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=_INIT, rngs=rngs)
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
            q = _apply_rope(q, cos[:, :, None, None, :], sin[:, :, None, None, :])
            k = _apply_rope(k, cos[:, :, None, :], sin[:, :, None, :])
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
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=_INIT, use_bias=c.mlp_bias, rngs=rngs)
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


def _remat_block(layer: Block, x, rope, mask, kv=None, cache_index=None, rows=None):
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


class Transformer(nnx.Module):
    """Decoder-only LM with an `lm` head (logits) or a `scalar` head (per-token value / reward).

    `head="scalar"` adds `score = Dense(H, 1, use_bias=False)` (HF *ForSequenceClassification)
    and no LM head; it can sit on any backbone, e.g. a critic initialised from the policy.
    """

    def __init__(
        self,
        config: TransformerConfig,
        *,
        head: str = "lm",
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        if head not in HEADS:
            raise ValueError(f"Transformer: head must be one of {HEADS}, got {head!r}")
        c = config
        self.config = c
        self.head = head
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.remat = remat
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed = nnx.Embed(c.vocab_size, c.hidden_size, embedding_init=_INIT, **kw)
        learned_positions = c.arch == "gpt2"
        self.pos_embed = (
            nnx.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=_INIT, **kw) if learned_positions else None
        )
        self.layers = nnx.List([Block(c, **kw) for _ in range(c.num_layers)])
        self.final_norm = Norm(
            c.hidden_size, rms=c.arch == "llama", eps=c.norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        lin = dict(use_bias=False, kernel_init=_INIT, **kw)
        untied = head == "lm" and not c.tie_word_embeddings
        self.lm_head = Dense(c.hidden_size, c.vocab_size, **lin) if untied else None  # tied: embed^T
        self.score = Dense(c.hidden_size, 1, **lin) if head == "scalar" else None

    # -- trunk --------------------------------------------------------------------------

    def _trunk(self, input_ids, positions, mask, cache: KVCache | None = None, cache_index=None, rows=None):
        """Final-norm hidden states `[B, S, H]`, or `[B, Q, H]` at `rows` (+ updated per-layer K/V
        when decoding). With `rows` the last block runs its queries, output projection and MLP for
        those rows only; every earlier block, and every key/value, is computed for all of them."""
        c = self.config
        x = jnp.take(self.embed.embedding[...], input_ids, axis=0, mode="clip").astype(self.dtype)
        rope = None
        if c.arch == "gpt2":
            x = x + jnp.take(self.pos_embed.embedding[...], positions, axis=0, mode="clip").astype(self.dtype)
        else:
            rope = _rope_tables(c, positions)
        block = _remat_block if self.remat else Block.__call__
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, kv = block(layer, x, rope, mask, kv, cache_index, rows if i == c.num_layers - 1 else None)
            if kv is not None:
                keys.append(kv[0])
                values.append(kv[1])
        return self.final_norm(x), (tuple(keys), tuple(values))

    def head_kernel(self) -> jax.Array:
        """The output head as one `[H, V]` (lm) or `[H, 1]` (scalar) matrix, in the compute dtype.
        For a tied head this is the transposed embedding: a decode loop takes it once, before the
        loop, because a one-token matmul against `E^T` read in place runs ~3x slower on the CPU."""
        if self.head == "scalar":
            return self.score.kernel[...].astype(self.dtype)
        if self.lm_head is None:
            return self.embed.embedding[...].astype(self.dtype).T
        return self.lm_head.kernel[...].astype(self.dtype)

    def apply_head(self, h, kernel=None):
        """Hidden states `[B, S, H]` (from `hidden_states`) -> logits `[B, S, V]` or values `[B, S]`,
        float32 (`kernel`: `head_kernel()`). `model(x)` is `apply_head(hidden_states(x))`."""
        if kernel is None and self.head != "scalar" and self.lm_head is None:
            w = self.embed.embedding[...].astype(self.dtype)  # tied: logits = h @ E^T, E [V, H] read in place
            return jnp.einsum("bsh,vh->bsv", h, w, preferred_element_type=jnp.float32)
        out = jnp.einsum("bsh,ho->bso", h, self.head_kernel() if kernel is None else kernel,
                         preferred_element_type=jnp.float32)
        return out[..., 0] if self.head == "scalar" else out

    @staticmethod
    def _check(input_ids, attention_mask, name):
        if input_ids.ndim != 2:
            raise ValueError(f"Transformer.{name}: input_ids must be [B, S], got shape {input_ids.shape}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"Transformer.{name}: attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}"
            )

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                      outputs_at=None) -> jax.Array:
        """Final-norm hidden states `[B, S, H]` (compute dtype) for a whole (left-padded) sequence;
        `[B, Q, H]` with `outputs_at` (see `__call__`)."""
        self._check(input_ids, attention_mask, "hidden_states")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        s = input_ids.shape[1]
        causal = jnp.tril(jnp.ones((s, s), jnp.bool_))  # [S, S]
        mask = causal[None, :, :] & (attention_mask > 0)[:, None, :]  # [B, S, S]
        h, _ = self._trunk(input_ids, positions_from_mask(attention_mask), mask, rows=_rows(outputs_at, s))
        return h

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 outputs_at=None) -> jax.Array:
        """`input_ids [B, S]`, `attention_mask [B, S]` (1 = token, 0 = padding) -> logits `[B, S, V]`
        (lm head) or values `[B, S]` (scalar head), float32.

        `outputs_at` computes the outputs at some positions only, equal to the full call sliced there:
        a static `(start, stop)` (e.g. the positions that predict a response) -> `[B, stop - start, ...]`,
        or an int array `[B, Q]` of per-row positions (e.g. each row's last token) -> `[B, Q, ...]`.
        The head and the last block's queries, output projection and MLP then run for those positions
        only: the LM head over the prompt is the bulk of a large-vocabulary forward."""
        return self.apply_head(self.hidden_states(input_ids, attention_mask, outputs_at=outputs_at))

    # -- incremental decoding -----------------------------------------------------------

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """Empty cache: zero K/V `[B, Hkv, max_length, D]` per layer and an all-zero slot mask."""
        c = self.config
        shape = (batch_size, c.num_kv_heads, max_length, c.head_dim)
        zeros = tuple(jnp.zeros(shape, self.dtype) for _ in range(c.num_layers))
        return KVCache(keys=zeros, values=tuple(jnp.zeros(shape, self.dtype) for _ in range(c.num_layers)),
                       mask=jnp.zeros((batch_size, max_length), jnp.int32))

    def decode(self, input_ids, attention_mask, positions, cache: KVCache, cache_index, *, outputs_at=None,
               head_kernel=None):
        """Run `S_new` new tokens against the cache.

        input_ids, attention_mask, positions: `[B, S_new]`; cache_index: int32 scalar (may be traced),
        the slot of the first new token. Writes K/V and the mask at slots
        `[cache_index, cache_index + S_new)`; each new query attends to real slots up to its own.
        Returns (logits `[B, S_new, V]` or values `[B, S_new]`, updated cache); with `outputs_at`
        (as in `__call__`, over the new tokens; a prefill wants only `(S_new - 1, S_new)`) the
        outputs at those tokens only, while every new token's K/V still enter the cache.
        `head_kernel`: `self.head_kernel()` computed once outside a decode loop (optional).
        """
        self._check(input_ids, attention_mask, "decode")
        if positions.shape != input_ids.shape:
            raise ValueError(f"Transformer.decode: positions shape {positions.shape} != input_ids {input_ids.shape}")
        s_new, s_max = input_ids.shape[1], cache.max_length
        cache_index = jnp.asarray(cache_index, jnp.int32)
        slot_mask = jax.lax.dynamic_update_slice(
            cache.mask, attention_mask.astype(cache.mask.dtype), (jnp.int32(0), cache_index)
        )  # [B, S_max]
        q_slot = cache_index + jnp.arange(s_new, dtype=jnp.int32)  # [S_new]
        k_slot = jnp.arange(s_max, dtype=jnp.int32)  # [S_max]
        mask = (k_slot[None, None, :] <= q_slot[None, :, None]) & (slot_mask > 0)[:, None, :]  # [B, S_new, S_max]
        h, (keys, values) = self._trunk(input_ids, positions, mask, cache, cache_index, _rows(outputs_at, s_new))
        return self.apply_head(h, head_kernel), KVCache(keys=keys, values=values, mask=slot_mask)
