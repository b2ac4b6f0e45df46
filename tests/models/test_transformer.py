"""The NNX transformer alone: config checks, padding, KV-cache decode == full forward, greedy decode
against transformers' `generate`, jit without retracing, bf16, remat, helpers.

Golden folders and outputs come from tests/golden/make_golden.py (transformers, torch).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxppo.models.hf import load_model
from jaxppo.models.transformer import (
    KVCache,
    Transformer,
    TransformerConfig,
    last_token_index,
    positions_from_mask,
    sequence_scores,
)

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden")
TOL = 1e-4  # float32 parity with transformers


def small_config(arch="llama", **kw):
    base = dict(arch=arch, vocab_size=61, hidden_size=32, num_layers=2, num_heads=4)
    if arch == "llama":
        base.update(num_kv_heads=2, intermediate_size=48, activation="silu", rope_theta=1000.0, qkv_bias=True)
    else:
        base.update(qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True, max_position_embeddings=40)
    return TransformerConfig(**{**base, **kw})


def batch(b=3, s=9, vocab=61, pads=(0, 3, 6), seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, size=(b, s)).astype(np.int32)
    mask = np.ones((b, s), np.int32)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
        ids[i, :p] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


def golden(name):
    return load_model(os.path.join(GOLDEN, name)), dict(np.load(os.path.join(GOLDEN, name, "outputs.npz")))


# ----------------------------------------------------------------------------- config


def test_config_defaults_and_hashable():
    c = small_config("gpt2", num_kv_heads=0)
    assert (c.num_kv_heads, c.head_dim, c.intermediate_size, c.model_type) == (4, 8, 128, "gpt2")
    assert hash(c) == hash(small_config("gpt2"))
    assert small_config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0}).rope_type == "llama3"


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(arch="bert"), "arch"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(activation="tanh"), "activation"),
        (dict(rope_scaling=(("rope_type", "yarn"), ("factor", 2.0))), "yarn"),
        (dict(model_type="gpt2"), "model_type"),
    ],
)
def test_config_rejects(kw, match):
    with pytest.raises(ValueError, match=match):
        small_config(**kw)


# ----------------------------------------------------------------------------- helpers


def test_last_token_index_and_sequence_scores():
    mask = jnp.array([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(last_token_index(mask), [3, 3, 2, 0])
    values = jnp.arange(16, dtype=jnp.float32).reshape(4, 4)
    np.testing.assert_array_equal(sequence_scores(values, mask), [3.0, 7.0, 10.0, 12.0])
    np.testing.assert_array_equal(positions_from_mask(mask[1:2]), [[0, 0, 0, 1]])
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        sequence_scores(values[0], mask[0])


def test_rank_errors():
    model = load_model(os.path.join(GOLDEN, "gpt2"))
    with pytest.raises(ValueError, match="input_ids"):
        model(jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask"):
        model(jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 4), jnp.int32))


# ----------------------------------------------------------------------------- forward

forward = nnx.jit(lambda model, ids, mask: model(ids, mask))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_left_padding_equals_unpadded(name):
    """Left padding changes nothing: right-padding the same tokens puts them at positions 0..n-1 with
    nothing to attend before them, i.e. each row's unpadded computation."""
    model, o = golden(name)
    ids, mask = jnp.asarray(o["input_ids"], jnp.int32), jnp.asarray(o["attention_mask"], jnp.int32)
    lengths = np.asarray(mask).sum(1)
    right_ids = np.ones_like(ids)
    for r, n in enumerate(lengths):
        right_ids[r, :n] = ids[r, -n:]
    right_mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int32)
    with jax.numpy_rank_promotion("raise"):
        left = forward(model, ids, mask)
    right = forward(model, jnp.asarray(right_ids), jnp.asarray(right_mask))
    assert left.shape == (3, 10, 128) and left.dtype == jnp.float32
    for r, n in enumerate(lengths):
        np.testing.assert_allclose(left[r, -n:], right[r, :n], atol=1e-5)


def test_fresh_model_init_and_scalar_head():
    model = nnx.jit(lambda: Transformer(small_config(), head="scalar", rngs=nnx.Rngs(0)))()
    assert model.score.kernel.shape == (32, 1) and model.lm_head is None
    assert model.layers[0].attn.qkv.kernel.shape == (32, (4 + 2 * 2) * 8)
    assert model.layers[0].mlp.fc_in.kernel.shape == (32, 2 * 48)  # [gate | up]
    np.testing.assert_allclose(np.std(model.embed.embedding[...]), 0.02, rtol=0.1)
    ids, mask = batch()
    values = forward(model, ids, mask)
    assert values.shape == (3, 9) and values.dtype == jnp.float32
    assert sequence_scores(values, mask).shape == (3,)


# ----------------------------------------------------------------------------- decode


def decode_stepwise(model, ids, mask, prefill):
    """Prefill `prefill` tokens, then feed the rest one token at a time (jitted step)."""
    b, s = ids.shape
    pos = positions_from_mask(mask)
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, cache, ids, mask, pos, index):
        out, cache = nnx.merge(graphdef, state).decode(ids, mask, pos, cache, index)
        return out, cache

    cache = model.init_cache(b, s + 2)  # spare slots stay masked out
    out, cache = step(state, cache, ids[:, :prefill], mask[:, :prefill], pos[:, :prefill], jnp.int32(0))
    outs = [out]
    for t in range(prefill, s):
        out, cache = step(state, cache, ids[:, t:t + 1], mask[:, t:t + 1], pos[:, t:t + 1], jnp.int32(t))
        outs.append(out)
    assert step._cache_size() == 2  # one prefill shape + one step shape, whatever the index
    return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("name", ["gpt2", "llama_reward"])  # learned positions; RoPE + GQA + scalar head
def test_decode_matches_full_forward(name):
    model = load_model(os.path.join(GOLDEN, name), head="scalar" if "reward" in name else "lm")
    o = np.load(os.path.join(GOLDEN, name, "outputs.npz"))
    ids, mask = jnp.asarray(o["input_ids"], jnp.int32), jnp.asarray(o["attention_mask"], jnp.int32)
    full = forward(model, ids, mask)
    with jax.numpy_rank_promotion("raise"):
        stepped, cache = decode_stepwise(model, ids, mask, prefill=4)
    keep = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(stepped)[keep], np.asarray(full)[keep], atol=TOL)
    c = model.config
    assert isinstance(cache, KVCache) and len(cache.keys) == c.num_layers
    assert cache.keys[0].shape == (3, c.num_kv_heads, 12, c.head_dim)
    np.testing.assert_array_equal(cache.mask, np.pad(np.asarray(mask), ((0, 0), (0, 2))))


def make_greedy(model, prompt_len, new_tokens):
    """Jitted greedy decoding: prefill + lax.fori_loop of one-token decode steps."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def greedy(state, ids, mask):
        m = nnx.merge(graphdef, state)
        b = ids.shape[0]
        cache = m.init_cache(b, prompt_len + new_tokens)
        logits, cache = m.decode(ids, mask, positions_from_mask(mask), cache, 0)
        first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        n_real = jnp.sum(mask, axis=-1).astype(jnp.int32)
        out = jnp.zeros((b, new_tokens), jnp.int32).at[:, 0].set(first)

        def body(i, carry):
            out, cache = carry
            tok = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)  # [B, 1]
            logits, cache = m.decode(tok, jnp.ones_like(tok), (n_real + i - 1)[:, None], cache, prompt_len + i - 1)
            nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
            return jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1), cache

        out, _ = jax.lax.fori_loop(1, new_tokens, body, (out, cache))
        return out

    return lambda ids, mask: greedy(state, ids, mask), greedy


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_decode_matches_transformers_generate(name):
    model, o = golden(name)
    ids, mask = jnp.asarray(o["input_ids"], jnp.int32), jnp.asarray(o["attention_mask"], jnp.int32)
    p = ids.shape[1]
    run, jitted = make_greedy(model, p, 8)
    tokens = np.asarray(run(ids, mask))
    # transformers stops a row at EOS (id 0) and pads it (id 1) afterwards
    after_eos = np.cumsum(tokens == 0, axis=1) - (tokens == 0) > 0
    np.testing.assert_array_equal(np.where(after_eos, 1, tokens), o["sequences"][:, p:])
    run(ids[::-1], mask[::-1])  # new values, same shapes: no recompilation
    assert jitted._cache_size() == 1


def test_jit_call_does_not_retrace():
    model, o = golden("llama")
    graphdef, state = nnx.split(model)
    traces = []

    @jax.jit
    def forward(state, ids, mask):
        traces.append(1)
        return nnx.merge(graphdef, state)(ids, mask)

    ids, mask = jnp.asarray(o["input_ids"], jnp.int32), jnp.asarray(o["attention_mask"], jnp.int32)
    a = forward(state, ids, mask)
    b = forward(state, ids[::-1], mask[::-1])
    assert len(traces) == 1 and forward._cache_size() == 1
    # float32 matmul blocking depends on a row's place in the batch: equal to rounding (~1e-6)
    np.testing.assert_allclose(b[::-1], a, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- dtypes, remat


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_bfloat16_compute(param_dtype):
    path = os.path.join(GOLDEN, "llama")
    ref = load_model(path)
    model = load_model(path, dtype=jnp.bfloat16, param_dtype=param_dtype)
    assert model.layers[0].attn.qkv.kernel[...].dtype == param_dtype
    ids, mask = batch(vocab=128)
    logits = forward(model, ids, mask)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    keep = np.asarray(mask, bool)
    err = np.abs(np.asarray(logits - forward(ref, ids, mask)))[keep]
    assert err.max() < 0.15, err.max()  # bf16 has ~3 significant digits; logits are O(4)
    if param_dtype == jnp.float32:
        return
    stepped, cache = decode_stepwise(model, ids, mask, prefill=5)
    assert cache.keys[0].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(stepped)[keep], np.asarray(logits)[keep], atol=0.1)


def test_remat_same_values_and_grads():
    path = os.path.join(GOLDEN, "qwen2")
    plain, remat = load_model(path), load_model(path, remat=True)
    ids, mask = batch(vocab=128)

    def loss(model):
        logits = model(ids, mask)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask)

    l1, g1 = nnx.jit(nnx.value_and_grad(loss))(plain)
    l2, g2 = nnx.jit(nnx.value_and_grad(loss))(remat)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------- outputs_at


@pytest.mark.parametrize("name, head", [("gpt2", "lm"), ("llama", "lm"), ("llama_reward", "scalar")])
@pytest.mark.parametrize("remat", [False, True])
def test_outputs_at_equals_the_full_call_sliced(name, head, remat):
    model = load_model(os.path.join(GOLDEN, name), head=head, remat=remat)
    ids, mask = batch(vocab=model.config.vocab_size, s=11, pads=(0, 2, 5))
    full = np.asarray(model(ids, mask))
    np.testing.assert_allclose(model(ids, mask, outputs_at=(4, 10)), full[:, 4:10], rtol=1e-5, atol=1e-5)
    last = last_token_index(mask)[:, None]                                # [B, 1], per row
    at = np.asarray(jnp.concatenate([last - 3, last], axis=1))            # [B, 2]
    want = np.take_along_axis(full, at.reshape(at.shape + (1,) * (full.ndim - 2)), axis=1)
    np.testing.assert_allclose(model(ids, mask, outputs_at=jnp.asarray(at)), want, rtol=1e-5, atol=1e-5)


def test_outputs_at_gradients_equal_the_full_call_sliced():
    model = load_model(os.path.join(GOLDEN, "gpt2"))
    ids, mask = batch(vocab=model.config.vocab_size, s=11, pads=(0, 2, 5))

    def loss(model, outputs_at):
        if outputs_at is None:
            logits = model(ids, mask)[:, 5:10]
        else:
            logits = model(ids, mask, outputs_at=outputs_at)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 3])

    g_full = nnx.grad(loss)(model, None)
    g_rows = nnx.grad(loss)(model, (5, 10))
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_rows)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_outputs_at_prefill_fills_the_whole_cache():
    model = load_model(os.path.join(GOLDEN, "llama"))
    ids, mask = batch(vocab=model.config.vocab_size, s=9)
    pos = positions_from_mask(mask)
    full, cache_full = model.decode(ids, mask, pos, model.init_cache(3, 12), 0)
    last, cache_last = model.decode(ids, mask, pos, model.init_cache(3, 12), 0, outputs_at=(8, 9))
    assert last.shape == (3, 1, model.config.vocab_size)
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(cache_full), jax.tree.leaves(cache_last)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, match", [((5, 5), "start < stop"), ((0, 12), "<= 11"),
                                        (np.zeros((3,), np.int32), r"\[B, Q\]")])
def test_outputs_at_rejects_bad_values(bad, match):
    model = Transformer(small_config(), rngs=nnx.Rngs(0))
    ids, mask = batch(s=11, pads=(0, 2, 5))
    with pytest.raises(ValueError, match=match):
        model(ids, mask, outputs_at=bad)


@pytest.mark.parametrize("name, head", [("gpt2", "lm"), ("llama", "lm"), ("llama_reward", "scalar")])
def test_decode_with_a_precomputed_head_kernel(name, head):
    model = load_model(os.path.join(GOLDEN, name), head=head)
    c = model.config
    kernel = model.head_kernel()
    assert kernel.shape == (c.hidden_size, c.vocab_size if head == "lm" else 1)
    ids, mask = batch(vocab=c.vocab_size, s=9)
    pos = positions_from_mask(mask)
    plain, _ = model.decode(ids, mask, pos, model.init_cache(3, 12), 0)
    hoisted, _ = model.decode(ids, mask, pos, model.init_cache(3, 12), 0, head_kernel=kernel)
    np.testing.assert_allclose(hoisted, plain, rtol=1e-5, atol=1e-5)


def test_shape_errors_name_the_argument():
    from helpers import small_model

    model = small_model()
    ids = jnp.ones((2, 5), jnp.int32)
    with pytest.raises(ValueError, match="packed_hidden_states: segment_ids shape"):
        model.packed_hidden_states(ids, jnp.ones((2, 4), jnp.int32), jnp.zeros((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="hidden_states: attention_mask shape"):
        model.hidden_states(ids, jnp.ones((2, 4), jnp.int32))
