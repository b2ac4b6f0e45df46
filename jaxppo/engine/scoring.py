"""Teacher-forced forwards over a sampled batch: the log-probs of the response under a policy,
the critic's values, and the reward model's score at the last response token.

The scoring phase of an iteration (reference log-probs, reward-model scores, values) and the
update's training forwards both go through `response_logprobs` / `response_values`, so they
compute the same numbers the same way.

A `[B, P+R]` sequence's outputs at positions P-1 .. P+R-2 predict its R response tokens. The
last token predicts nothing and, under the causal mask, no earlier position attends to it, so it
is not run (1/(P+R) of the trunk's work) unless keeping it gives an accelerator an aligned length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxppo.core.losses import entropy_from_logits, logprobs_from_logits
from jaxppo.models.transformer import last_token_index

# On a GPU or TPU a sequence length that is a multiple of this runs faster than one token fewer
# (H200, bf16, Qwen2-0.5B shape, 32 x 384 vs 32 x 383 tokens: update 2.08 vs 2.37 s), so there the
# last token is kept when that makes the length aligned. The CPU gains nothing from alignment.
SEQ_ALIGN = 16


def forward_length(total: int, backend: str | None = None) -> int:
    """How many leading tokens of a `[B, total]` sequence the scoring and training forwards run:
    `total - 1` (the last token predicts nothing), or `total` on an accelerator when `total` is a
    multiple of `SEQ_ALIGN`. `backend` defaults to JAX's default backend (read at trace time, so
    after `jax.distributed.initialize()`)."""
    backend = backend or jax.default_backend()
    return total if backend != "cpu" and total % SEQ_ALIGN == 0 else total - 1


def predicting_prefix(tokens, attention_mask, response_len: int):
    """The `[B, S]` prefix of a `[B, P+R]` sequence that the forwards run (S = `forward_length(P+R)`,
    normally P+R-1), and the range (P-1, P+R-1) of the positions whose outputs predict the
    response tokens."""
    if tokens.ndim != 2 or attention_mask.shape != tokens.shape or not 0 < response_len < tokens.shape[1]:
        raise ValueError(f"need tokens and attention_mask of one shape [B, P+R] with P >= 1 and R = "
                         f"{response_len} >= 1; got {tokens.shape} and {attention_mask.shape}")
    S, last = forward_length(tokens.shape[1]), tokens.shape[1] - 1
    return tokens[:, :S], attention_mask[:, :S], (last - response_len, last)


def response_logprobs(model, tokens, attention_mask, response, temperature: float, *,
                      entropy: bool = False, chunk_bytes: int | None = None):
    """log p(response) under softmax(logits / temperature), and the per-token entropy of that
    distribution if `entropy`: tokens [B, P+R], response [B, R] -> ([B, R], [B, R] or None), float32.

    With `chunk_bytes`, the trunk runs once and the head, the log-softmax and the entropy run over
    slices of the response positions whose float32 logits fit `chunk_bytes`, each slice recomputed
    in the backward pass (`jax.checkpoint`): memory O(B x slice x V) instead of O(B x R x V) (5 GB
    for 32 x 256 tokens of a 152k vocabulary), for one more head matmul in the backward."""
    tokens, attention_mask, rows = predicting_prefix(tokens, attention_mask, response.shape[1])
    h = model.hidden_states(tokens, attention_mask, outputs_at=rows)  # [B, R, H]
    return head_logprobs(model, h, response, temperature, entropy=entropy, chunk_bytes=chunk_bytes)


def head_logprobs(model, h, response, temperature: float, *, entropy: bool = False, chunk_bytes: int | None = None):
    """The head part of `response_logprobs`: hidden states `[B, R, H]` at the positions that predict
    `response [B, R]` -> (log-probs, entropies or None), `[B, R]` float32, in slices of
    `chunk_bytes` of logits as there."""
    B, R = response.shape

    def stats(h, tok):
        logits = model.apply_head(h).astype(jnp.float32) / temperature
        return logprobs_from_logits(logits, tok), entropy_from_logits(logits) if entropy else None

    size = R if chunk_bytes is None else max(1, min(R, chunk_bytes // (B * model.config.vocab_size * 4)))
    if size == R:
        return stats(h, response)
    n = -(-R // size)                                     # slices of `size` positions, the last one padded
    pad = n * size - R
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(B, n, size, -1).swapaxes(0, 1)    # [n, B, size, H]
    tok = jnp.pad(response, ((0, 0), (0, pad))).reshape(B, n, size).swapaxes(0, 1)     # [n, B, size]
    lp, ent = jax.lax.map(lambda xs: jax.checkpoint(stats)(*xs), (h, tok))
    unslice = lambda x: None if x is None else x.swapaxes(0, 1).reshape(B, n * size)[:, :R]
    return unslice(lp), unslice(ent)


def response_values(model, tokens, attention_mask, response_len: int):
    """Critic values for the state before each response token -> [B, R]."""
    tokens, attention_mask, rows = predicting_prefix(tokens, attention_mask, response_len)
    return model(tokens, attention_mask, outputs_at=rows)


def reward_model_scores(model, tokens, attention_mask, response_mask):
    """The reward model's score of each row at its last valid token (the EOS if any, else the last
    sampled token): tokens/attention_mask [B, P+R], response_mask [B, R] -> [B] float32."""
    R = response_mask.shape[1]
    full_mask = jnp.concatenate([attention_mask[:, :-R], response_mask.astype(attention_mask.dtype)], axis=1)
    last = last_token_index(full_mask)
    return model(tokens, full_mask, outputs_at=last[:, None])[:, 0].astype(jnp.float32)


def chunked(fn, batch_size: int | None, *arrays):
    """Apply `fn` over the leading axis in chunks of `batch_size` (lax.map), to bound memory."""
    B = arrays[0].shape[0]
    if not batch_size or batch_size >= B:
        return fn(*arrays)
    if B % batch_size:
        raise ValueError(f"rollout.forward_batch_size={batch_size} must divide the batch size {B}")
    chunks = [a.reshape((B // batch_size, batch_size) + a.shape[1:]) for a in arrays]  # [n, f, ...]
    out = jax.lax.map(lambda xs: fn(*xs), chunks)
    return jax.tree.map(lambda y: y.reshape((B,) + y.shape[2:]), out)
