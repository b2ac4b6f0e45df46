"""`jaxppo.models.tiny`: the CLI writes a folder transformers can load; jaxppo's logits on a tiny
folder equal the ones transformers computed on the same folder (tests/golden/tiny_roundtrip.npz,
recorded by make_golden.py with torch from `python -m jaxppo.models.tiny` output)."""

import filecmp
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from jaxppo.models.hf import hf_tensor_shapes, load_causal_lm, load_model, load_tokenizer
from jaxppo.models.tiny import main, make_tiny
from jaxppo.models.transformer import sequence_scores

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden")
ROUNDTRIP = np.load(os.path.join(GOLDEN, "tiny_roundtrip.npz"))
CASES = json.loads(str(ROUNDTRIP["cases"]))
forward = nnx.jit(lambda model, ids, mask: model(ids, mask))


def test_cli_writes_a_loadable_folder(tmp_path):
    out = tmp_path / "m"
    res = subprocess.run([sys.executable, "-m", "jaxppo.models.tiny", str(out), "--arch", "llama", "--seed", "3"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id, tok.padding_side) == (0, 0, 1, "left")
    assert len(tok) <= 512
    batch = tok(["The quiet robot finds the river.", "Once"], padding=True)
    assert batch["attention_mask"][1][0] == 0  # left padded
    with open(out / "config.json") as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 2


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_equal_transformers_on_tiny_folder(tmp_path, name):
    args = CASES[name]
    reward = "--reward-model" in args
    path = make_tiny(str(tmp_path / name), arch=args[args.index("--arch") + 1], reward_model=reward,
                     seed=int(args[args.index("--seed") + 1]))
    ids, mask = jnp.asarray(ROUNDTRIP["input_ids"], jnp.int32), jnp.asarray(ROUNDTRIP["attention_mask"], jnp.int32)
    model = load_model(path, head="scalar" if reward else "lm")
    out = np.asarray(forward(model, ids, mask))
    if reward:
        np.testing.assert_allclose(sequence_scores(out, mask), ROUNDTRIP[name], atol=1e-4, rtol=0)
    else:
        keep = np.asarray(mask, bool)
        np.testing.assert_allclose(out[keep], ROUNDTRIP[name][keep], atol=1e-4, rtol=0)
    tok = load_tokenizer(path)
    assert tok(str(ROUNDTRIP["sentence"]))["input_ids"] == ROUNDTRIP[f"{name}_tokens"].tolist()


def test_deterministic_given_seed(tmp_path):
    a = make_tiny(str(tmp_path / "a"), arch="qwen2", seed=7)
    b = make_tiny(str(tmp_path / "b"), arch="qwen2", seed=7)
    c = make_tiny(str(tmp_path / "c"), arch="qwen2", seed=8)
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f
    assert not filecmp.cmp(os.path.join(a, "model.safetensors"), os.path.join(c, "model.safetensors"), shallow=False)


def test_size_flags_and_hf_names(tmp_path):
    out = tmp_path / "g"
    assert main([str(out), "--arch", "gpt2", "--hidden-size", "32", "--num-layers", "3", "--num-heads", "2",
                 "--intermediate-size", "80", "--vocab-size", "300", "--no-tie"]) == 0
    model, tok = load_causal_lm(str(out))
    c = model.config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size, c.vocab_size) == (32, 3, 2, 80, 300)
    assert not c.tie_word_embeddings and len(tok) <= 300
    with safe_open(str(out / "model.safetensors"), "numpy") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert stored == hf_tensor_shapes(c) and stored["lm_head.weight"] == (300, 32)


def test_too_small_vocab_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "x"), "--vocab-size", "100"]) == 2
    assert "vocab_size: must be >= 258" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown size"):
        make_tiny(str(tmp_path / "y"), hidden=3)
