"""Stop tokens: the tokenizer's EOS, generation_config.json's `eos_token_id` (an int or a list)
and `rollout.stop_token_ids` together end responses, mask them, and decide the missing-EOS
penalty, whatever `rollout.stop_at_eos` says about stopping."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxppo.config import load_config
from jaxppo.core import rewards as rw
from jaxppo.engine.sampling import SamplingParams, generate
from jaxppo.engine.shaping import StepSettings, prepare
from jaxppo.engine.state import Experience
from jaxppo.run.models import load_models, stop_token_ids, tiny_model_dir

from helpers import left_padded_batch, small_model


def tiny_copy(tmp_path, eos_token_id):
    """The cached tiny gpt2 (tokenizer EOS 0) with generation_config.json's eos_token_id set
    (None: no generation_config.json at all)."""
    path = tmp_path / "policy"
    shutil.copytree(tiny_model_dir("gpt2"), path)
    gen = path / "generation_config.json"
    if eos_token_id is None:
        gen.unlink()
    else:
        gen.write_text(json.dumps({"bos_token_id": 0, "eos_token_id": eos_token_id, "pad_token_id": 1}))
    return path


def test_stop_ids_join_the_tokenizer_generation_config_and_the_config(tmp_path):
    path = tiny_copy(tmp_path, [0, 7])                      # a chat model's list: <|endoftext|>, <|im_end|>
    config = load_config(None, [f"model.policy={path}", "rollout.stop_token_ids=[9,7]"])
    assert config.rollout.stop_token_ids == [9, 7]
    models, _ = load_models(config)
    assert models.eos_ids == (0, 7, 9)
    settings = StepSettings.from_config(config, models.eos_ids, models.pad_id)
    assert settings.sampling.eos_token_ids == (0, 7, 9)     # the sampler, the masks and the penalty alike


@pytest.mark.parametrize("generation_eos, extra, expect", [
    (5, (), (0, 5)),                 # an int
    ([0, 7, 8], (), (0, 7, 8)),      # a list
    (None, (3,), (0, 3)),            # no generation_config.json
    ("absent", (), (0,)),            # a generation_config.json without eos_token_id
])
def test_stop_token_ids(tmp_path, generation_eos, extra, expect):
    path = tiny_copy(tmp_path, None if generation_eos is None else 0)
    if generation_eos not in (None, "absent"):
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    elif generation_eos == "absent":
        (path / "generation_config.json").write_text(json.dumps({"pad_token_id": 1}))
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert stop_token_ids(tokenizer, str(path), extra) == expect


def test_stop_token_ids_must_be_token_ids():
    from jaxppo.errors import ConfigError
    with pytest.raises(ConfigError, match=r"rollout.stop_token_ids"):
        load_config(None, ["rollout.stop_token_ids=[3,-1]"])


def test_without_stop_at_eos_the_ids_are_kept_but_eos_is_an_ordinary_token():
    """stop_at_eos=false: the same tokens and an all-ones mask as sampling with no stop ids at all."""
    rollout = load_config(None, ["rollout.stop_at_eos=false", "rollout.max_new_tokens=9"]).rollout
    model = small_model()
    ids, mask = left_padded_batch()
    plain = generate(model, ids, mask, jax.random.PRNGKey(3),
                     SamplingParams(max_new_tokens=9, temperature=0.7, pad_token_id=1, stop_at_eos=False))
    eos = tuple(int(t) for t in np.asarray(plain.response)[:, 1])     # every row samples one at step 1
    params = SamplingParams.from_config(rollout, eos, 1)
    assert params.eos_token_ids == tuple(eos) and not params.stop_at_eos
    out = generate(model, ids, mask, jax.random.PRNGKey(3), params)
    np.testing.assert_array_equal(np.asarray(out.response), np.asarray(plain.response))
    np.testing.assert_array_equal(np.asarray(out.mask), np.ones((3, 9), np.float32))
    np.testing.assert_array_equal(np.asarray(out.logprobs), np.asarray(plain.logprobs))


def test_missing_eos_penalty_without_stop_at_eos_spares_responses_with_eos():
    """rollout.missing_eos_penalty with stop_at_eos=false: only the responses with no EOS among
    their tokens lose the penalty (`val/num_eos_tokens` counts the others)."""
    config = load_config(None, ["rollout.stop_at_eos=false", "rollout.missing_eos_penalty=1.0",
                                "reward.normalize=false", "ppo.kl_coef=0.0", "ppo.whiten_advantages=false"])
    s = StepSettings.from_config(config, (5,), 1)
    response = jnp.asarray([[4, 5, 6, 7], [4, 6, 6, 7], [4, 6, 7, 5]], jnp.int32)   # EOS mid, none, last
    B, R = response.shape
    zeros = jnp.zeros((B, R), jnp.float32)
    tokens = jnp.concatenate([jnp.full((B, 2), 8, jnp.int32), response], axis=1)
    exp = Experience(tokens=tokens, attention_mask=jnp.ones_like(tokens), response=response,
                     mask=jnp.ones((B, R), jnp.float32), logprobs=zeros, ref_logprobs=zeros, values=zeros,
                     rm_scores=jnp.zeros(B, jnp.float32), num_steps=jnp.int32(R))
    small = (rw.KLControllerState(value=jnp.float32(0.0)), rw.init_running_moments(), jax.random.PRNGKey(0),
             jnp.int32(0))
    batch, _, _, aux = prepare(s, small, exp, jnp.zeros(B, jnp.float32))
    stats = aux.stats.as_dict()
    assert float(stats["val/num_eos_tokens"]) == 2.0
    np.testing.assert_allclose(float(stats["objective/rlhf_reward"]), -1.0 / 3, rtol=1e-6)   # row 1 only
    np.testing.assert_allclose(np.asarray(batch.returns)[:, -1], [0.0, -1.0, 0.0], atol=1e-6)
