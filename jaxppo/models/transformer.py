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
    cache = cache.extend(longer)                                     # more empty slots, as it fills

Attention is two einsums with a boolean mask over the whole cache (fixed shapes, so one compiled
step serves every decode position inside `lax.while_loop`); queries are reshaped to
`[B, S, Hkv, G, D]` so grouped K/V heads are never repeated.

The pieces: `jaxppo.models.arch` (`TransformerConfig`, re-exported here with the model it
configures), `jaxppo.models.layers` (`Dense`, `Norm`), `jaxppo.models.rope` and
`jaxppo.models.blocks` (`Attention`, `MLP`, `Block`); this module holds the `Transformer` itself,
its `KVCache` and the mask/position helpers.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jaxppo.models.arch import TransformerConfig
from jaxppo.models.blocks import Block, remat_block
from jaxppo.models.layers import WEIGHT_INIT, Dense, Norm
from jaxppo.models.rope import rope_tables

__all__ = ["HEADS", "KVCache", "Transformer", "TransformerConfig", "last_token_index", "positions_from_mask",
           "sequence_scores"]

HEADS = ("lm", "scalar")


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

    def extend(self, length: int) -> KVCache:
        """The same cache with empty slots appended up to `length` (>= max_length; a copy of every
        buffer unless equal): a decode loop grows it as it fills, so its attention reads the slots
        filled so far rather than the whole response's."""
        extra = length - self.max_length
        if extra < 0:
            raise ValueError(f"KVCache.extend: length {length} < max_length {self.max_length}")
        if extra == 0:
            return self
        grow = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0)))  # [B, Hkv, S_max, D] -> [.., length, D]
        return KVCache(keys=tuple(map(grow, self.keys)), values=tuple(map(grow, self.values)),
                       mask=jnp.pad(self.mask, ((0, 0), (0, extra))))


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
        self.embed = nnx.Embed(c.vocab_size, c.hidden_size, embedding_init=WEIGHT_INIT, **kw)
        learned_positions = c.arch == "gpt2"
        self.pos_embed = (
            nnx.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=WEIGHT_INIT, **kw)
            if learned_positions else None
        )
        self.layers = nnx.List([Block(c, **kw) for _ in range(c.num_layers)])
        self.final_norm = Norm(
            c.hidden_size, rms=c.arch == "llama", eps=c.norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        lin = dict(use_bias=False, kernel_init=WEIGHT_INIT, **kw)
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
            rope = rope_tables(c, positions)
        block = remat_block if self.remat else Block.__call__
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
    def _check(input_ids, attention_mask, name, mask_name="attention_mask"):
        if input_ids.ndim != 2:
            raise ValueError(f"Transformer.{name}: input_ids must be [B, S], got shape {input_ids.shape}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"Transformer.{name}: {mask_name} shape {attention_mask.shape} != input_ids shape {input_ids.shape}"
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

    def packed_hidden_states(self, input_ids: jax.Array, segment_ids: jax.Array, positions: jax.Array, *,
                             outputs_at=None) -> jax.Array:
        """Final-norm hidden states of rows that hold several sequences each (`[B, S]` ids,
        `segment_ids` 1, 2, ... per sequence and 0 on empty slots, `positions` restarting at 0 with
        each sequence) -> `[B, S, H]`, or `[B, Q, H]` with `outputs_at`. A token attends to the
        earlier tokens of its own sequence only (a block-diagonal causal mask), so each sequence's
        states equal those `hidden_states` gives it alone, left-padded or not."""
        self._check(input_ids, segment_ids, "packed_hidden_states", "segment_ids")
        s = input_ids.shape[1]
        causal = jnp.tril(jnp.ones((s, s), jnp.bool_))  # [S, S]
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, S, S]
        mask = causal[None, :, :] & same & (segment_ids > 0)[:, None, :]  # [B, S, S]
        h, _ = self._trunk(input_ids, positions, mask, rows=_rows(outputs_at, s))
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
