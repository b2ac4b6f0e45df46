"""Decode in length buckets: the bucketed sampler gives the unbucketed one's tokens, masks and
log-probs (three buckets, left padding, G = 2, data parallel, EOS inside a bucket), stops before a
later bucket once every row is done, and is the unbucketed program when one bucket covers the
response. A width of 4 slots makes the short test responses cross buckets: with 6 prompt tokens
and 10 new ones the buckets are (8, 12, 15), response tokens 0-2 | 3-6 | 7-9."""

import jax
import numpy as np
import pytest

from jaxppo.engine.mesh import make_mesh
from jaxppo.engine.sampling import SamplingParams, decode_buckets, generate, generate_program, sample
from jaxppo.models.transformer import KVCache

from helpers import left_padded_batch, small_model

WIDTH = 4
KW = dict(max_new_tokens=10, temperature=1.0, top_k=40, pad_token_id=1, num_generations=2)


@pytest.fixture(scope="module")
def free():
    """(model, ids, mask, key, the unbucketed sampler's output without EOS stops)."""
    model = small_model(seed=2)
    ids, mask = left_padded_batch(B=4)                         # rows left-padded by 0, 1, 2, 3
    key = jax.random.PRNGKey(3)
    out = generate(model, ids, mask, key, SamplingParams(stop_at_eos=False, decode_bucket=0, **KW))
    return model, ids, mask, key, out


def assert_stopped_copy(free, out, eos):
    """`out` (EOS `eos`) is `free` (no stops, same key) up to each row's first EOS, masked after
    (pad), as the unbucketed sampler gives it."""
    resp, lp, m = (np.asarray(x) for x in (out.response, out.logprobs, out.mask))
    R = resp.shape[1]
    for b, row in enumerate(np.asarray(free.response)):
        hits = np.flatnonzero(np.isin(row, eos))
        n = hits[0] + 1 if hits.size else R
        np.testing.assert_array_equal(resp[b, :n], row[:n])
        assert (resp[b, n:] == KW["pad_token_id"]).all()
        np.testing.assert_array_equal(m[b], (np.arange(R) < n).astype(np.float32))
        np.testing.assert_allclose(lp[b], np.where(np.arange(R) < n, np.asarray(free.logprobs)[b], 0.0),
                                   rtol=0, atol=1e-6)


def test_bucket_lengths():
    assert decode_buckets(16, 32, 128) == (47,)                # the benchmarks' 16 + 32: one bucket
    assert decode_buckets(16, 224, 128) == (128, 239)
    assert decode_buckets(6, 10, 4) == (8, 12, 15)             # steps fill 7..15: {7, 8} {9..12} {13..15}
    assert decode_buckets(8, 10, 4) == (12, 16, 17)            # step 0 fills slot 8: 9 slots
    assert decode_buckets(6, 1, 4) == (6,)                     # no decode step: the prefill's cache
    assert decode_buckets(16, 224, 0) == (239,)
    with pytest.raises(ValueError, match="decode_bucket"):
        SamplingParams(decode_bucket=-1)


def test_extend_keeps_the_cache_and_appends_empty_slots():
    rng = np.random.default_rng(0)
    kv = lambda: tuple(rng.normal(size=(3, 2, 6, 8)).astype(np.float32) for _ in range(2))   # 2 layers
    cache = KVCache(keys=kv(), values=kv(), mask=rng.integers(0, 2, size=(3, 6)).astype(np.int32))
    longer = cache.extend(9)
    assert longer.max_length == 9
    for old, new in zip(cache.keys + cache.values, longer.keys + longer.values):
        assert new.shape == (3, 2, 9, 8)
        np.testing.assert_array_equal(np.asarray(new), np.pad(old, ((0, 0), (0, 0), (0, 3), (0, 0))))
    np.testing.assert_array_equal(np.asarray(longer.mask), np.pad(cache.mask, ((0, 0), (0, 3))))
    assert cache.extend(6) is cache
    with pytest.raises(ValueError, match="extend"):
        cache.extend(5)


def test_buckets_give_the_unbucketed_samples(free):
    """Three buckets, G = 2 rows per prompt sharing a prefill cache that then grows."""
    model, ids, mask, key, ref = free
    params = SamplingParams(stop_at_eos=False, decode_bucket=WIDTH, **KW)
    out = generate(model, ids, mask, key, params)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(ref.mask))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), rtol=0, atol=1e-6)
    assert int(out.num_steps) == int(ref.num_steps) == 10
    n = generate_program._cache_size()                         # a second call compiles nothing
    generate(model, ids + 0, mask, jax.random.PRNGKey(5), params)
    assert generate_program._cache_size() == n


def test_eos_inside_a_bucket_data_parallel(free):
    """A row stops inside the second bucket while the others go on into the third; the rows split
    over two devices, each growing its own part of the cache."""
    model, ids, mask, key, ref = free
    eos = (int(ref.response[0, 4]),)                            # row 0's token 4
    assert 3 <= np.flatnonzero(np.asarray(ref.response)[0] == eos[0])[0] <= 5
    out = generate(model, ids, mask, key, SamplingParams(eos_token_ids=eos, decode_bucket=WIDTH, **KW),
                   mesh=make_mesh(data=2, fsdp=1, devices=jax.devices()[:2]))
    assert_stopped_copy(ref, out, eos)
    assert int(out.num_steps) == 10


def test_no_later_bucket_runs_once_every_row_is_done(free):
    model, ids, mask, key, ref = free
    eos = tuple(sorted(set(np.asarray(ref.response)[:, 3].tolist())))   # every row's token 3 is an EOS
    out = generate(model, ids, mask, key, SamplingParams(eos_token_ids=eos, decode_bucket=WIDTH, **KW))
    assert_stopped_copy(ref, out, eos)
    assert int(out.num_steps) <= 4                             # the step counter stopped in bucket 2


def test_one_bucket_is_the_unbucketed_program():
    model = small_model()
    ids, mask = left_padded_batch()
    trace = lambda width: str(jax.make_jaxpr(lambda i, m, k: sample(model, i, m, k, SamplingParams(
        max_new_tokens=7, pad_token_id=1, eos_token_ids=(3,), decode_bucket=width)))(ids, mask, jax.random.PRNGKey(0)))
    assert trace(0) == trace(128)
    assert trace(4).count("while[") == 2                       # (8, 12): two loops


def test_the_config_sets_the_bucket_width():
    from jaxppo.config import load_config
    from jaxppo.errors import ConfigError

    rollout = load_config(None, ["rollout.decode_bucket=0"]).rollout
    assert SamplingParams.from_config(rollout, (2,), 1).decode_bucket == 0
    assert SamplingParams.from_config(load_config(None, []).rollout, (2,), 1).decode_bucket == 128
    with pytest.raises(ConfigError, match="rollout.decode_bucket"):
        load_config(None, ["rollout.decode_bucket=-1"])
