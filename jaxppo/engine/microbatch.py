"""Padding-free micro-batches for the update (`train.max_tokens_per_microbatch`).

The padded update runs every row to P + R tokens: the prompt left-padded to the batch's longest,
the response to `rollout.max_new_tokens`, however early it stopped. Here each minibatch's
sequences lose their padding and are packed, several to a row, into rows of S slots (S =
`scoring.forward_length(P + R)`, the padded forward's length). A sequence is its prompt without
the left padding and its response up to the last valid token, less that token (it predicts
nothing), so every sequence fits in one row. First-fit decreasing puts each, longest first, into
the first row with room for its tokens and its output slots (R per row, the padded head's):

    tokens       [a a a A A A A  b b B B  c C . .]      a/A: prompt/response of sequence 0 ...
    segment ids  [1 1 1 1 1 1 1  6 6 6 6  3 3 0 0]      1 + the sequence's row in the minibatch
    positions    [0 1 2 3 4 5 6  0 1 2 3  0 1 0 0]      what a left-padded row gives each token

A micro-batch is `max_tokens_per_microbatch // S` rows (at least one), and the loop runs over the
micro-batches that hold a sequence only (`fori_loop` with a traced trip count), so its time
follows the real tokens, not n x (P + R). A packed row costs what a padded row costs (same S, same
R head slots), so the update's time is the padded time x (packed rows / sequences).

In a row a token attends to the earlier tokens of its own sequence only (block-diagonal causal
mask from the segment ids, `Transformer.packed_hidden_states`), at the positions above, so the
per-token outputs are the padded path's up to float rounding, for learned positions and RoPE
alike. They are scattered back to the minibatch's `[n, R]` layout and the objective's own loss
(`Objective.from_outputs`) runs there, with the mask of the micro-batch's sequences only: every
aggregation mode's numerator is a sum over sequences and the denominator is the minibatch's, so
the micro-batches add up to the minibatch's loss and gradient exactly.

Why packing rather than length buckets (sort, then a `lax.switch` over a few static lengths):
buckets compile the forward and backward once per bucket, quantise the saving to the bucket
lengths, keep the prompts' left padding, and save little unless micro-batches are a few rows;
packing compiles one forward and backward, of the padded row's shape, and its waste is the
unfilled end of the last rows only.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxppo.engine.scoring import forward_length


@struct.dataclass
class PackedRows:
    """The sequences of a minibatch (n rows of P + R) packed into N rows of S slots."""

    tokens: jax.Array        # [N, S] ids: prompts without their left padding, then responses
    segment_ids: jax.Array   # [N, S] int32, 1 + the sequence's row in the minibatch; 0 on empty slots
    positions: jax.Array     # [N, S] int32, from 0 at each sequence's first token
    outputs_at: jax.Array    # [N, R] int32 slots whose outputs predict a response token (0 if unused)
    targets: jax.Array       # [N, R] the response tokens they predict
    scatter: jax.Array       # [N, R] int32 index into the minibatch's flat [n * R] response; n * R: unused


@struct.dataclass
class PackedMicroBatch:
    """One micro-batch: `r` packed rows, and the whole minibatch `[n, ...]` with a mask that keeps
    the tokens of the sequences in those rows only."""

    rows: PackedRows
    batch: Any


def sequence_lengths(attention_mask, mask):
    """(prompt tokens, response tokens up to the last valid one), `[n]` int32 each, of left-padded
    rows: attention_mask `[n, P+R]`, mask `[n, R]`."""
    R = mask.shape[1]
    prompt = attention_mask[:, :-R].astype(jnp.int32).sum(axis=1)
    response = jnp.max(jnp.where(mask > 0, jnp.arange(1, R + 1, dtype=jnp.int32), 0), axis=1)
    return prompt, response


def first_fit(lengths, outputs, row_tokens: int, row_outputs: int, num_rows: int):
    """First-fit decreasing: each sequence (`lengths [n]` tokens and `outputs [n]` output slots),
    longest first, goes into the first of `num_rows` rows with room for both. Each must fit an empty
    row. -> (row, token offset, output offset), `[n]` int32 each; row = num_rows for an empty
    sequence. The rows used are a prefix: a row opens only when none before it has room."""
    order = jnp.argsort(lengths, descending=True, stable=True)

    def place(used, i):
        tokens, slots = used                                        # [N] filled so far
        fits = (tokens + lengths[i] <= row_tokens) & (slots + outputs[i] <= row_outputs)
        row = jnp.where(lengths[i] > 0, jnp.argmax(fits), num_rows)
        at = jnp.minimum(row, num_rows - 1)
        placed = (row, tokens[at], slots[at])
        return (tokens.at[row].add(lengths[i], mode="drop"), slots.at[row].add(outputs[i], mode="drop")), placed

    empty = jnp.zeros(num_rows, jnp.int32)
    _, placed = jax.lax.scan(place, (empty, empty), order)
    return tuple(jnp.zeros_like(x).at[order].set(x) for x in placed)     # back to the minibatch's order


def pack(batch, row_tokens: int, num_rows: int) -> tuple[PackedRows, jax.Array]:
    """Pack a minibatch (a `PPOBatch` of n rows) into `num_rows` rows of `row_tokens` slots ->
    (PackedRows `[num_rows, ...]`, each sequence's row `[n]`: num_rows if it has no valid token)."""
    n, R = batch.mask.shape
    total = batch.tokens.shape[1]
    prompt, response = sequence_lengths(batch.attention_mask, batch.mask)
    length = jnp.where(response > 0, prompt + response - 1, 0)              # [n] tokens run
    row, offset, out_offset = first_fit(length, response, row_tokens, R, num_rows)

    seq = jnp.arange(n, dtype=jnp.int32)[:, None]                            # [n, 1]
    j = jnp.arange(row_tokens, dtype=jnp.int32)[None, :]                     # [1, S] slot in the sequence
    t = jnp.arange(R, dtype=jnp.int32)[None, :]                              # [1, R] response token
    start = total - R - prompt[:, None]                                      # [n, 1] first real token
    source = jnp.take_along_axis(batch.tokens, jnp.clip(start + j, 0, total - 1), axis=1)   # [n, S]
    dest = jnp.where(j < length[:, None], (row * row_tokens + offset)[:, None] + j, num_rows * row_tokens)
    out_dest = jnp.where(t < response[:, None], (row * R + out_offset)[:, None] + t, num_rows * R)

    def put(values, dest, width, fill=0):                                    # [n, width] -> [num_rows, width]
        values = jnp.broadcast_to(values, dest.shape)
        flat = jnp.full(num_rows * width, fill, values.dtype).at[dest.reshape(-1)].set(values.reshape(-1), mode="drop")
        return flat.reshape(num_rows, width)

    rows = PackedRows(
        tokens=put(source, dest, row_tokens), segment_ids=put(seq + 1, dest, row_tokens),
        positions=put(j, dest, row_tokens),
        outputs_at=put(offset[:, None] + prompt[:, None] - 1 + t, out_dest, R),   # the slot before each token
        targets=put(batch.response, out_dest, R), scatter=put(seq * R + t, out_dest, R, fill=n * R))
    return rows, row


def packed_objective(objective):
    """`objective` (an `update.Objective`) with its loss taking a `PackedMicroBatch`: the trunk on
    the packed rows, the head (`objective.head`) on their output slots, and the loss
    (`objective.from_outputs`) on those outputs scattered back to the minibatch's `[n, R]`."""

    def loss(model, micro: PackedMicroBatch, norm):
        rows = micro.rows
        h = model.packed_hidden_states(rows.tokens, rows.segment_ids, rows.positions,
                                       outputs_at=rows.outputs_at)               # [r, R, H]
        n, R = micro.batch.mask.shape
        index = rows.scatter.reshape(-1)
        # an add, not a set: the indices of live slots are distinct, and an add's transpose is a gather
        unpack = lambda x: jnp.zeros(n * R, x.dtype).at[index].add(x.reshape(-1), mode="drop").reshape(n, R)
        outputs = jax.tree.map(unpack, objective.head(model, h, rows.targets))
        return objective.from_outputs(outputs, micro.batch, norm)

    return objective._replace(loss=loss)


def packed_gradients(grad_fn, params, batch, norm, max_tokens: int, key=None):
    """The minibatch's gradient and sums over packed micro-batches: `grad_fn(params,
    PackedMicroBatch, norm, key)` (the gradient of `packed_objective(...).loss`) summed over the
    micro-batches that hold a sequence, `key` folded with each one's index (None: no key).
    -> (grads, sums), as the padded micro-batches' sum."""
    n = batch.mask.shape[0]
    S = forward_length(batch.tokens.shape[1])
    r = max(1, max_tokens // S)                           # rows per micro-batch
    count = -(-n // r)                                    # enough for one sequence per row
    rows, seq_row = pack(batch, S, count * r)
    rows = jax.tree.map(lambda x: x.reshape((count, r) + x.shape[1:]), rows)    # [count, r, ...]
    seq_micro = seq_row // r                              # count for a sequence without tokens
    used = (jnp.max(jnp.where(seq_row < count * r, seq_row, -1)) + r) // r   # micro-batches holding one

    def micro_batch(k):
        mask = batch.mask * (seq_micro == k)[:, None].astype(batch.mask.dtype)
        return PackedMicroBatch(rows=jax.tree.map(lambda x: x[k], rows), batch=batch.replace(mask=mask))

    def add(k, acc):
        sub = None if key is None else jax.random.fold_in(key, k)
        (_, sums), grads = grad_fn(params, micro_batch(k), norm, sub)
        return jax.tree.map(jnp.add, acc, (grads, sums))

    sub = None if key is None else jax.random.fold_in(key, 0)
    (_, sums), grads = jax.eval_shape(grad_fn, params, micro_batch(0), norm, sub)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (grads, sums))
    return jax.lax.fori_loop(0, used, add, zeros)
