"""Padding-free micro-batches (`engine.microbatch`, `train.max_tokens_per_microbatch`): the packing
lays each sequence out as it would run alone, and an update on packed rows equals the padded
update (parameters, metrics) within float tolerance for both architectures, every loss
aggregation, the clip variants, the KL in the loss, the entropy bonus, the critic and sliced logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxppo.config import load_config
from jaxppo.engine.microbatch import first_fit, pack, sequence_lengths
from jaxppo.engine.scoring import forward_length, head_logprobs, response_logprobs, response_values
from jaxppo.engine.update import (PPOBatch, UpdateSettings, model_update, policy_objective, update_metrics,
                                  value_objective)

from helpers import left_padded_batch, small_model

B, P, R = 8, 5, 7
S = forward_length(P + R)          # P + R - 1 on the CPU
T = 0.7
# response lengths: ragged, one full, one empty row (no valid token: nothing to run)
LENGTHS = np.array([7, 1, 3, 0, 2, 5, 4, 2])


def make_batch(seed=0, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    ids, pmask = left_padded_batch(B=B, P=P, seed=seed)       # row b has P - b % P prompt tokens
    response = rng.integers(4, 97, size=(B, R)).astype(np.int32)
    mask = (np.arange(R)[None] < lengths[:, None]).astype(np.float32)
    tokens = np.concatenate([ids, response], axis=1)
    attn = np.concatenate([pmask, np.ones_like(response)], axis=1)
    normal = lambda mu, sd: jnp.asarray(rng.normal(mu, sd, (B, R)).astype(np.float32)) * mask
    return PPOBatch(tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(attn), response=jnp.asarray(response),
                    mask=jnp.asarray(mask), old_logprobs=normal(-4.6, 0.3), old_values=normal(0, 0.5),
                    advantages=normal(0, 1), returns=normal(0, 1), ref_logprobs=normal(-4.6, 0.3))


def test_first_fit_decreasing():
    lengths = jnp.asarray([3, 5, 2, 4, 0], jnp.int32)
    row, offset, _ = first_fit(lengths, jnp.ones(5, jnp.int32), 6, 10, 5)
    # longest first: 5 -> row 0; 4 -> row 1; 3 -> row 2 (0 and 1 are too full); 2 -> row 1 after the 4
    np.testing.assert_array_equal(row, [2, 0, 1, 1, 5])        # 5 = no row: an empty sequence
    np.testing.assert_array_equal(offset[:4], [0, 0, 4, 0])
    # the output slots are a budget too: one slot per row puts each sequence in a row of its own
    row, _, out_offset = first_fit(lengths, jnp.asarray([1, 1, 1, 1, 0], jnp.int32), 6, 1, 5)
    np.testing.assert_array_equal(row, [2, 0, 3, 1, 5])
    np.testing.assert_array_equal(out_offset[:4], [0, 0, 0, 0])


def test_each_packed_sequence_is_laid_out_as_it_runs_alone():
    batch = make_batch()
    rows, seq_row = pack(batch, S, B)
    prompt, response = map(np.asarray, sequence_lengths(batch.attention_mask, batch.mask))
    np.testing.assert_array_equal(response, LENGTHS)
    tokens, seg, pos = (np.asarray(x) for x in (rows.tokens, rows.segment_ids, rows.positions))
    assert int(seq_row.max(where=LENGTHS > 0, initial=0)) < B - 2       # ragged rows share packed rows
    for i in range(B):
        if LENGTHS[i] == 0:
            assert int(seq_row[i]) == B and not (seg == i + 1).any()
            continue
        real = np.asarray(batch.tokens[i])[P - prompt[i]:P + LENGTHS[i] - 1]     # the last token is not run
        r = int(seq_row[i])
        slots = np.flatnonzero(seg[r] == i + 1)
        np.testing.assert_array_equal(slots, slots[0] + np.arange(len(real)))   # contiguous
        np.testing.assert_array_equal(tokens[r, slots], real)
        np.testing.assert_array_equal(pos[r, slots], np.arange(len(real)))
        # output slot k of this sequence predicts response token t from the token just before it
        mine = np.asarray(rows.scatter[r]) // R == i
        t = np.asarray(rows.scatter[r])[mine] % R
        np.testing.assert_array_equal(t, np.arange(LENGTHS[i]))
        np.testing.assert_array_equal(np.asarray(rows.targets[r])[mine], np.asarray(batch.response[i, :LENGTHS[i]]))
        np.testing.assert_array_equal(np.asarray(rows.outputs_at[r])[mine], slots[prompt[i] - 1 + t])
    assert (np.asarray(rows.scatter) == B * R).sum() == B * R - LENGTHS.sum()   # the rest go nowhere


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_rows_give_the_padded_log_probs_and_values(arch):
    """Block-diagonal attention and per-sequence positions: each packed sequence's log-probs,
    entropies and values are those of its left-padded row (learned positions and RoPE)."""
    batch = make_batch(1)
    policy, critic = small_model(0, arch=arch), small_model(1, arch=arch, head="scalar")
    rows, _ = pack(batch, S, B)
    n_slots = B * R

    def unpack(x):
        return jnp.zeros(n_slots + 1, x.dtype).at[rows.scatter.reshape(-1)].set(x.reshape(-1))[:n_slots].reshape(B, R)

    h = policy.packed_hidden_states(rows.tokens, rows.segment_ids, rows.positions, outputs_at=rows.outputs_at)
    lp, ent = map(unpack, head_logprobs(policy, h, rows.targets, T, entropy=True))
    h = critic.packed_hidden_states(rows.tokens, rows.segment_ids, rows.positions, outputs_at=rows.outputs_at)
    values = unpack(critic.apply_head(h))
    want_lp, want_ent = response_logprobs(policy, batch.tokens, batch.attention_mask, batch.response, T, entropy=True)
    want_values = response_values(critic, batch.tokens, batch.attention_mask, R)
    m = np.asarray(batch.mask)
    for got, want in ((lp, want_lp), (ent, want_ent), (values, want_values)):
        np.testing.assert_allclose(np.asarray(got) * m, np.asarray(want) * m, rtol=1e-5, atol=1e-5)


def run_update(s: UpdateSettings, batch, arch="llama", critic=True, lr=1e-3):
    """Both models' (or the policy's alone) updates with SGD: (params, metrics)."""
    models = [small_model(0, arch=arch)] + ([small_model(1, arch=arch, head="scalar")] if critic else [])
    objectives = [policy_objective(s, T), value_objective(s)][:len(models)]
    split = [nnx.split(m) for m in models]
    tx = optax.sgd(lr)

    @jax.jit
    def fn(params, batch):
        out = [model_update(o, g, p, tx.init(p), batch, jax.random.PRNGKey(0), tx, s)
               for o, (g, _), p in zip(objectives, split, params)]
        return [p for p, _, _ in out], update_metrics(*[st for _, _, st in out], *([None] if not critic else []))

    params, metrics = fn([p for _, p in split], batch)
    return params, metrics.as_dict()


def assert_same_update(a, b):
    (pa, ma), (pb, mb) = a, b
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-6)
    assert ma.keys() == mb.keys()
    for k in ma:
        # summation orders differ: a few float32 ulps of the token sums
        np.testing.assert_allclose(float(ma[k]), float(mb[k]), rtol=1e-4, atol=1e-6, err_msg=k)


# budgets: one row per micro-batch (many micro-batches, the loop stops early) and all rows in one
BUDGETS = [S, 4 * S, B * S]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_packed_update_equals_the_padded_one(arch):
    """Policy and critic, two epochs x two minibatches, the entropy bonus: parameters after the
    update and every metric, against the padded update."""
    batch = make_batch(2)
    s = UpdateSettings(epochs=2, num_minibatches=2, ent_coef=0.01)
    padded = run_update(s, batch, arch)
    for budget in BUDGETS[:2]:
        assert_same_update(run_update(dataclasses.replace(s, max_tokens_per_microbatch=budget), batch, arch), padded)


@pytest.mark.parametrize("mode,budget", [("token-mean", BUDGETS[0]), ("seq-mean-token-mean", BUDGETS[0]),
                                         ("seq-mean-token-sum", BUDGETS[2]), ("seq-mean-token-sum-norm", BUDGETS[2])])
def test_every_loss_aggregation_packs_exactly(mode, budget):
    """The per-sequence modes need each sequence whole in one micro-batch: packing never splits one."""
    batch = make_batch(3).replace(old_values=None, returns=None)
    s = UpdateSettings(epochs=1, num_minibatches=2, loss_agg=mode, kl_coef=0.1, kl_estimator="k3",
                       clip_eps_high=0.28, dual_clip=3.0, ent_coef=0.01)
    padded = run_update(s, batch, critic=False)
    assert_same_update(run_update(dataclasses.replace(s, max_tokens_per_microbatch=budget), batch, critic=False),
                       padded)
    assert padded[1]["policy/kl_avg"] > 0 and "clip_ratio/low_mean" in padded[1]


def test_packed_update_with_sliced_logits():
    batch = make_batch(4)
    s = UpdateSettings(epochs=1, num_minibatches=1, ent_coef=0.01, logits_chunk_bytes=2 * 97 * 4)
    padded = run_update(s, batch, critic=False)
    assert_same_update(run_update(dataclasses.replace(s, max_tokens_per_microbatch=2 * S), batch, critic=False),
                       padded)


def test_one_compile_whatever_the_lengths():
    """The packing is traced: batches of other response lengths reuse the compiled update."""
    traces = []
    s = UpdateSettings(epochs=1, num_minibatches=2, max_tokens_per_microbatch=2 * S)
    (graph, params), tx = nnx.split(small_model(0)), optax.sgd(1e-3)

    @jax.jit
    def fn(params, batch):
        traces.append(1)
        return model_update(policy_objective(s, T), graph, params, tx.init(params), batch, jax.random.PRNGKey(0),
                            tx, s)[0]

    for lengths in (LENGTHS, np.full(B, R), np.zeros(B, int), np.array([1, 0, 0, 2, 0, 0, 0, 1])):
        out = fn(params, make_batch(5, lengths))
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out))
    assert len(traces) == 1


def test_the_config_knob_reaches_the_update():
    config = load_config(None, ["train.max_tokens_per_microbatch=512"])
    assert UpdateSettings.from_config(config).max_tokens_per_microbatch == 512
    assert UpdateSettings.from_config(load_config(None, [])).max_tokens_per_microbatch is None
