"""HF folders <-> jaxppo: parity with transformers' own outputs (tests/golden, made with torch by
make_golden.py), checkpoint variants (sharded, bf16, bare prefixes, stored tied heads), save/load
round trips and one-line errors that name the file / tensor / key."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jaxppo.models import hf
from jaxppo.models.hf import ModelLoadError, config_from_hf, load_model, save_pretrained
from jaxppo.models.tiny import make_tiny
from jaxppo.models.transformer import sequence_scores

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden")
TOL = 1e-4  # float32 parity with transformers
forward = nnx.jit(lambda model, ids, mask: model(ids, mask))


def outputs(name):
    o = np.load(os.path.join(GOLDEN, name, "outputs.npz"))
    return jnp.asarray(o["input_ids"], jnp.int32), jnp.asarray(o["attention_mask"], jnp.int32), o


def assert_logits_match(model, name, atol=TOL):
    ids, mask, o = outputs(name)
    logits = np.asarray(forward(model, ids, mask))
    keep = np.asarray(mask, bool)
    np.testing.assert_allclose(logits[keep], o["logits"][keep], atol=atol, rtol=0)


def copy_golden(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(os.path.join(GOLDEN, name), dst)
    return str(dst)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "mistral"])
def test_causal_lm_logits_match_transformers(name):
    model = load_model(os.path.join(GOLDEN, name))
    c = model.config
    expected = {"gpt2": ("gpt2", True), "llama": ("llama", False), "qwen2": ("llama", True),
                "mistral": ("llama", False)}[name]
    assert (c.arch, c.tie_word_embeddings) == expected
    assert_logits_match(model, name)


def test_golden_configs_cover_the_switches():
    llama = load_model(os.path.join(GOLDEN, "llama")).config
    assert llama.rope_type == "llama3" and llama.num_kv_heads < llama.num_heads and llama.rope_theta == 500000.0
    qwen2 = load_model(os.path.join(GOLDEN, "qwen2")).config
    assert qwen2.qkv_bias and not qwen2.o_bias
    mistral = load_model(os.path.join(GOLDEN, "mistral")).config
    assert mistral.head_dim * mistral.num_heads != mistral.hidden_size  # explicit head_dim
    with safe_open(os.path.join(GOLDEN, "mistral", "model.safetensors"), "numpy") as f:
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"  # bf16 tensors load


@pytest.mark.parametrize("name", ["gpt2_reward", "llama_reward"])
def test_reward_scores_match_transformers(name):
    model = load_model(os.path.join(GOLDEN, name), head="scalar")
    ids, mask, o = outputs(name)
    scores = sequence_scores(forward(model, ids, mask), mask)
    np.testing.assert_allclose(scores, o["scores"], atol=TOL, rtol=0)


# ----------------------------------------------------------------------------- checkpoint variants


def test_sharded_index(tmp_path):
    path = copy_golden("llama", tmp_path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in ks})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    assert_logits_match(load_model(path), "llama")


@pytest.mark.parametrize("name, prefix", [("gpt2", "transformer."), ("qwen2", "model.")])
def test_bare_prefix_and_stored_tied_head(tmp_path, name, prefix):
    """Old GPT-2 checkpoints have no `transformer.` prefix; some tied checkpoints also store lm_head."""
    path = copy_golden(name, tmp_path)
    file = os.path.join(path, "model.safetensors")
    with safe_open(file, "flax") as f:  # handles bf16
        tensors = {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    bare = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}
    bare["lm_head.weight"] = bare["wte.weight" if name == "gpt2" else "embed_tokens.weight"]
    save_file(bare, file, metadata={"format": "pt"})
    assert_logits_match(load_model(path), name)


# ----------------------------------------------------------------------------- save / load round trips


@pytest.mark.parametrize("name, head", [("gpt2", "lm"), ("llama", "lm"), ("qwen2", "lm"), ("llama_reward", "scalar")])
def test_save_pretrained_round_trip(tmp_path, name, head):
    src = os.path.join(GOLDEN, name)
    model = load_model(src, head=head)
    out = str(tmp_path / "saved")
    save_pretrained(model, None, out)
    # same tensor names, shapes and values as transformers wrote (tied heads omitted, as HF does)
    with safe_open(os.path.join(src, "model.safetensors"), "flax") as f:
        original = {k: np.asarray(f.get_tensor(k)).astype(np.float32) for k in f.keys()}
    saved = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(saved) == sorted(original)
    for k, v in original.items():
        np.testing.assert_array_equal(saved[k], v, err_msg=k)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(src, "config.json")) as f:
        src_cfg = json.load(f)
    assert cfg["architectures"] == src_cfg["architectures"]
    assert {k: cfg[k] for k in src_cfg if k not in ("dtype", "transformers_version")} == {
        k: v for k, v in src_cfg.items() if k not in ("dtype", "transformers_version")}
    reloaded = load_model(out, head=head)
    ids, mask, _ = outputs(name)
    np.testing.assert_array_equal(forward(reloaded, ids, mask), forward(model, ids, mask))


def test_save_bf16_params_and_tokenizer(tmp_path):
    src = make_tiny(str(tmp_path / "tiny"), arch="llama")
    model, tok = hf.load_causal_lm(src, dtype=jnp.bfloat16)
    out = str(tmp_path / "saved")
    save_pretrained(model, tok, out)
    with safe_open(os.path.join(out, "model.safetensors"), "numpy") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    again, tok2 = hf.load_causal_lm(out, dtype=jnp.bfloat16)
    assert tok2("a quiet robot")["input_ids"] == tok("a quiet robot")["input_ids"]
    ids = jnp.asarray([[5, 6, 7, 8]], jnp.int32)
    np.testing.assert_array_equal(forward(again, ids, None), forward(model, ids, None))


def test_reward_model_and_fresh_head(tmp_path):
    policy = make_tiny(str(tmp_path / "policy"), arch="gpt2", seed=5)
    reward = make_tiny(str(tmp_path / "reward"), arch="gpt2", reward_model=True, seed=6)
    rm, tok = hf.load_reward_model(reward)
    assert rm.head == "scalar" and tok.padding_side == "left" and tok.pad_token_id == 1
    critic, _ = hf.load_backbone_with_fresh_head(policy, seed=1)
    lm, _ = hf.load_causal_lm(policy)
    np.testing.assert_array_equal(critic.layers[1].mlp.fc_in.kernel[...], lm.layers[1].mlp.fc_in.kernel[...])
    assert critic.score.kernel.shape == (64, 1) and 0.01 < float(jnp.std(critic.score.kernel[...])) < 0.03
    again, _ = hf.load_backbone_with_fresh_head(policy, seed=1)
    other, _ = hf.load_backbone_with_fresh_head(policy, seed=2)
    np.testing.assert_array_equal(again.score.kernel[...], critic.score.kernel[...])
    assert not np.array_equal(other.score.kernel[...], critic.score.kernel[...])
    from_rm, _ = hf.load_backbone_with_fresh_head(reward, seed=1)  # a classifier folder works too
    assert from_rm.score.kernel.shape == (64, 1)


def test_load_tokenizer_pad_falls_back_to_eos(tmp_path):
    path = make_tiny(str(tmp_path / "t"), arch="gpt2")
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        tc = json.load(f)
    tc.pop("pad_token")
    tc["padding_side"] = "right"
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f)
    tok = hf.load_tokenizer(path)
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.padding_side == "left"


# ----------------------------------------------------------------------------- config


def test_config_from_hf_legacy_rope_fields():
    with open(os.path.join(GOLDEN, "llama", "config.json")) as f:
        d = json.load(f)
    new = config_from_hf(d)
    rope = dict(d.pop("rope_parameters"))
    d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = rope  # transformers 4.x layout
    assert config_from_hf(d) == new
    d["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ModelLoadError, match="yarn"):
        config_from_hf(d)


# ----------------------------------------------------------------------------- errors


def _write_json(path, d):
    with open(path, "w") as f:
        json.dump(d, f)


def _edit_config(path, **changes):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        d = json.load(f)
    d.update(changes)
    _write_json(file, d)


def test_error_missing_folder_and_config(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    path = copy_golden("gpt2", tmp_path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(ModelLoadError, match=r"config\.json: missing config\.json"):
        load_model(path)


def test_error_malformed_config(tmp_path):
    path = copy_golden("gpt2", tmp_path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write('{\n  "model_type": "gpt2",\n  "n_embd": 32,,\n}\n')
    with pytest.raises(ModelLoadError, match=r"config\.json: malformed JSON at line 3"):
        load_model(path)


def test_error_unsupported_model_type(tmp_path):
    path = copy_golden("gpt2", tmp_path)
    _edit_config(path, model_type="bert")
    msg = r"unsupported model_type 'bert' \(supported: gpt2, llama, mistral, qwen2\)"
    with pytest.raises(ModelLoadError, match=msg):
        load_model(path)


def test_error_missing_config_key(tmp_path):
    path = copy_golden("llama", tmp_path)
    file = os.path.join(path, "config.json")
    with open(file) as f:
        d = json.load(f)
    del d["hidden_size"]
    _write_json(file, d)
    with pytest.raises(ModelLoadError, match="missing key 'hidden_size'"):
        load_model(path)


def test_error_missing_tensor(tmp_path):
    path = copy_golden("llama", tmp_path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    msg = r"model\.safetensors: missing tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'"
    with pytest.raises(ModelLoadError, match=msg):
        load_model(path)
    os.remove(file)
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_model(path)


def test_error_untied_head_missing(tmp_path):
    path = copy_golden("llama", tmp_path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["lm_head.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing tensor 'lm_head.weight'"):
        load_model(path)


def test_error_wrong_shape(tmp_path):
    path = copy_golden("gpt2", tmp_path)
    _edit_config(path, n_inner=96)  # checkpoint has 128
    msg = r"'transformer\.h\.0\.mlp\.c_fc\.weight' has shape \[32, 128\], expected \[32, 96\]"
    with pytest.raises(ModelLoadError, match=msg):
        load_model(path)


def test_error_truncated_safetensors(tmp_path):
    path = copy_golden("gpt2", tmp_path)
    file = os.path.join(path, "model.safetensors")
    with open(file, "rb") as f:
        data = f.read()
    with open(file, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: truncated or corrupt"):
        load_model(path)
    with open(file, "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: truncated or corrupt"):
        load_model(path)


def test_error_missing_tokenizer():
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        hf.load_causal_lm(os.path.join(GOLDEN, "gpt2"))


def test_error_tokenizer_larger_than_model_vocab(tmp_path):
    path = make_tiny(str(tmp_path / "t"), arch="gpt2", vocab_size=300)
    _edit_config(path, vocab_size=280)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:280]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="tokenizer has 300 tokens but the model's vocab_size is 280"):
        hf.load_causal_lm(path)


def test_error_reward_needs_one_label(tmp_path):
    path = copy_golden("gpt2_reward", tmp_path)
    _edit_config(path, id2label={"0": "A", "1": "B"})
    with pytest.raises(ModelLoadError, match="num_labels=1, got 2"):
        load_model(path, head="scalar")
    with pytest.raises(ModelLoadError, match="missing tensor 'score.weight'"):
        load_model(os.path.join(GOLDEN, "gpt2"), head="scalar")
