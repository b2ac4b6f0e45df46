"""The KV-cache sampler: log-probs equal a teacher-forced forward, greedy equals transformers,
EOS handling, determinism, truncation and no recompilation."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxppo.models.hf import load_model
from flax import nnx

from jaxppo.engine.sampling import SamplingParams, filter_logits, generate, generate_program, gumbel_argmax, sample

from helpers import left_padded_batch, small_model

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden")


def teacher_forced_logprobs(model, out, prompt_mask, temperature):
    R = out.response.shape[1]
    attn = jnp.concatenate([jnp.asarray(prompt_mask), jnp.ones_like(out.response)], axis=1)
    logits = model(out.tokens, attn)[:, -R - 1:-1] / temperature
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, out.response[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logprobs_equal_teacher_forced_forward(arch):
    model = small_model(arch=arch)
    ids, mask = left_padded_batch()
    params = SamplingParams(max_new_tokens=7, temperature=0.8, pad_token_id=1, stop_at_eos=False)
    out = generate(model, ids, mask, jax.random.PRNGKey(0), params)
    assert out.tokens.shape == (3, 13) and out.response.shape == (3, 7)
    np.testing.assert_array_equal(np.asarray(out.tokens[:, :6]), ids)
    ref = teacher_forced_logprobs(model, out, mask, 0.8)
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref), atol=2e-5)
    assert float(out.mask.sum()) == 21.0


def test_same_key_same_tokens_and_keys_matter():
    model = small_model()
    ids, mask = left_padded_batch()
    params = SamplingParams(max_new_tokens=8, temperature=1.0, pad_token_id=1, stop_at_eos=False)
    a = generate(model, ids, mask, jax.random.PRNGKey(1), params)
    b = generate(model, ids, mask, jax.random.PRNGKey(1), params)
    c = generate(model, ids, mask, jax.random.PRNGKey(2), params)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_eos_stops_rows_and_mask_includes_eos():
    model = small_model()
    ids, mask = left_padded_batch()
    # EOS = the token the first row samples at step 2, so at least that row stops early
    free = generate(model, ids, mask, jax.random.PRNGKey(3),
                    SamplingParams(max_new_tokens=10, temperature=1.0, pad_token_id=1, stop_at_eos=False))
    eos = int(free.response[0, 2])
    params = SamplingParams(max_new_tokens=10, temperature=1.0, pad_token_id=1, eos_token_ids=(eos,))
    out = generate(model, ids, mask, jax.random.PRNGKey(3), params)
    resp, m, lp = map(np.asarray, (out.response, out.mask, out.logprobs))
    for b in range(3):
        hits = np.flatnonzero(resp[b] == eos)
        first = hits[0] if hits.size else 10
        # same keys -> same tokens up to the stop; mask is 1 through the EOS, 0 after
        np.testing.assert_array_equal(resp[b, :first + 1], np.asarray(free.response)[b, :first + 1])
        np.testing.assert_array_equal(m[b], (np.arange(10) <= first).astype(np.float32))
        assert (resp[b, first + 1:] == 1).all()
        assert (lp[b, first + 1:] == 0).all()
    assert int(out.num_steps) <= 10


def test_loop_ends_early_when_all_rows_done():
    model = small_model()
    ids, mask = left_padded_batch()
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, pad_token_id=1)
    first = generate(model, ids, mask, jax.random.PRNGKey(0), greedy)
    # make every row's first greedy token an EOS: all rows finish after one step
    eos = tuple(sorted(set(np.asarray(first.response[:, 0]).tolist())))
    out = generate(model, ids, mask, jax.random.PRNGKey(0),
                   SamplingParams(max_new_tokens=12, temperature=0.0, pad_token_id=1, eos_token_ids=eos))
    assert int(out.num_steps) == 1
    np.testing.assert_array_equal(np.asarray(out.mask)[:, 0], 1.0)
    assert float(np.asarray(out.mask)[:, 1:].sum()) == 0.0


def test_top_k_one_is_greedy_and_filters():
    model = small_model()
    ids, mask = left_padded_batch()
    g = generate(model, ids, mask, jax.random.PRNGKey(0),
                 SamplingParams(max_new_tokens=6, temperature=0.0, pad_token_id=1, stop_at_eos=False))
    k1 = generate(model, ids, mask, jax.random.PRNGKey(5),
                  SamplingParams(max_new_tokens=6, temperature=0.9, top_k=1, pad_token_id=1, stop_at_eos=False))
    np.testing.assert_array_equal(np.asarray(g.response), np.asarray(k1.response))

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.asarray(filter_logits(logits, top_k=0, top_p=0.7)) > -1e29
    np.testing.assert_array_equal(kept, [[True, True, False, False]])   # 0.5 < 0.7, 0.8 >= 0.7 -> stop
    kept = np.asarray(filter_logits(logits, top_k=3, top_p=1.0)) > -1e29
    np.testing.assert_array_equal(kept, [[True, True, True, False]])
    kept = np.asarray(filter_logits(logits, top_k=0, top_p=0.1)) > -1e29
    np.testing.assert_array_equal(kept, [[True, False, False, False]])   # the top token always stays


def test_no_recompile_on_second_call():
    model = small_model()
    ids, mask = left_padded_batch()
    params = SamplingParams(max_new_tokens=5, temperature=0.7, pad_token_id=1, stop_at_eos=False)
    generate(model, ids, mask, jax.random.PRNGKey(0), params)
    n = generate_program._cache_size()
    generate(model, ids + 0, mask, jax.random.PRNGKey(1), params)
    assert generate_program._cache_size() == n


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_equals_transformers_generate(name):
    """tests/golden/<name>/outputs.npz holds transformers' greedy `generate` on a left-padded batch."""
    folder = os.path.join(GOLDEN, name)
    gold = np.load(os.path.join(folder, "outputs.npz"))
    model = load_model(folder, head="lm")
    ids, mask = gold["input_ids"], gold["attention_mask"]
    want = gold["sequences"][:, ids.shape[1]:]
    params = SamplingParams(max_new_tokens=want.shape[1], temperature=0.0,
                            pad_token_id=int(model.config.pad_token_id), eos_token_ids=model.config.eos_token_ids)
    out = generate(model, ids, mask, jax.random.PRNGKey(0), params)
    np.testing.assert_array_equal(np.asarray(out.response), want)


def test_the_cache_has_no_slot_for_the_last_token(monkeypatch):
    """The last sampled token is never fed back: the KV cache holds P + R - 1 positions."""
    from jaxppo.models.transformer import Transformer
    from jaxppo.engine.sampling import sample

    model = small_model()
    ids, mask = left_padded_batch()                                       # P = 6
    sizes = []
    real = Transformer.init_cache
    monkeypatch.setattr(Transformer, "init_cache",
                        lambda self, b, n: sizes.append(n) or real(self, b, n))
    for R in (1, 4):
        params = SamplingParams(max_new_tokens=R, temperature=0.8, pad_token_id=1, stop_at_eos=False)
        out = jax.jit(lambda ids, mask, key: sample(model, ids, mask, key, params))(ids, mask, jax.random.PRNGKey(0))
        assert out.response.shape == (3, R)
        np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(teacher_forced_logprobs(model, out, mask, 0.8)),
                                   atol=2e-5)
    assert sizes == [6, 9]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_group_sampling_prefills_each_prompt_once_and_shares_its_cache(monkeypatch, arch):
    """num_generations = G: B prompts -> B*G rows, prompt-major (rows b*G..b*G+G-1 continue prompt
    b), the prompt's K/V computed once (the prefill runs on B rows, not B*G) and every row's
    log-probs equal a teacher-forced forward of its own sequence; G samples differ."""
    from jaxppo.models.transformer import Transformer

    model = small_model(arch=arch)
    ids, mask = left_padded_batch()                      # B = 3, P = 6, left padding
    G, R = 4, 5
    params = SamplingParams(max_new_tokens=R, temperature=1.0, pad_token_id=1, stop_at_eos=False,
                            num_generations=G)
    calls = []
    real = Transformer.decode

    def spy(self, input_ids, *a, **k):
        calls.append(input_ids.shape)
        return real(self, input_ids, *a, **k)

    monkeypatch.setattr(Transformer, "decode", spy)
    graph, state = nnx.split(model)
    out = jax.jit(lambda st, i, m, k: sample(nnx.merge(graph, st), i, m, k, params))(state, ids, mask,
                                                                                      jax.random.PRNGKey(3))
    assert calls[0] == (3, 6)                                          # the prefill: B prompts, once
    assert all(shape == (3 * G, 1) for shape in calls[1:])             # decode steps: B*G rows
    assert out.tokens.shape == (3 * G, 6 + R) and out.response.shape == (3 * G, R)
    np.testing.assert_array_equal(np.asarray(out.tokens[:, :6]), np.repeat(ids, G, axis=0))
    rep_mask = np.repeat(mask, G, axis=0)
    ref = teacher_forced_logprobs(model, out, rep_mask, 1.0)
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref), atol=2e-5)
    assert len({tuple(r) for r in np.asarray(out.response)[:G]}) > 1   # a prompt's G samples differ


def test_one_generation_is_the_plain_sampler():
    model = small_model()
    ids, mask = left_padded_batch()
    base = SamplingParams(max_new_tokens=6, temperature=0.9, pad_token_id=1, stop_at_eos=False)
    a = generate(model, ids, mask, jax.random.PRNGKey(1), base)
    b = generate(model, ids, mask, jax.random.PRNGKey(1), SamplingParams(**{**base.__dict__, "num_generations": 1}))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))


def test_gumbel_argmax_draws_what_categorical_draws():
    """The sampler's draw is jax.random.categorical's, token for token: the same noise and the
    first index of the maximum, also over filtered (-inf-ish) logits and exact ties."""
    logits = jax.random.normal(jax.random.PRNGKey(0), (64, 97)) * 3.0
    logits = logits.at[:, :40].set(-1e30).at[:8, 50:52].set(0.25)       # masked entries; ties in rows 0-7
    for seed in range(20):
        key = jax.random.PRNGKey(seed)
        got = jax.jit(gumbel_argmax)(key, logits)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.random.categorical(key, logits, axis=-1)))
        assert got.dtype == jnp.int32 and int(got.min()) >= 40
