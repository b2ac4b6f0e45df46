"""Golden reference outputs from transformers (torch) for the jaxppo model parity tests.

This is the only file in the repo that imports torch. Run it with an environment that has
torch + transformers (not jaxppo's), from the repo root:

    ~/.cache/jaxppo-peers/venv-trl/bin/python tests/golden/make_golden.py \
        [--jaxppo-python /root/venv/bin/python]

It writes, under tests/golden/:
  <name>/config.json, <name>/model.safetensors   tiny random models saved by transformers itself
  <name>/outputs.npz                              input_ids, attention_mask (left padded, B=3) and
                                                  logits [B, S, V] or scores [B]; greedy `sequences`
                                                  [B, S + 8] for gpt2 and llama
                                                  (stops at EOS=0; HF then writes PAD=1)
  tiny_roundtrip.npz                              transformers' logits/scores on folders written by
                                                  `python -m jaxppo.models.tiny` (run with --jaxppo-python),
                                                  plus the tokenizer's ids for a fixed sentence
and checks (writing nothing) that transformers loads what `jaxppo.models.hf.save_pretrained` writes
from each golden model with the same outputs.

Position ids are passed explicitly as clip(cumsum(mask) - 1, 0), jaxppo's convention.
Parameters are re-drawn larger than HF's init (std 0.2, norms 1 +- 0.1, biases +- 0.1) so that
logits are spread out, every bias path matters and greedy decoding has clear winners.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 128
PAD, BOS, EOS = 1, 0, 0
IDS = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
LLAMA_SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
GPT2_SIZES = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                  attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, summary_first_dropout=0.0)

# name -> (constructor, config, stored dtype, greedy generate?)
MODELS = {
    "gpt2": (GPT2LMHeadModel, GPT2Config(**GPT2_SIZES, **IDS), torch.float32, True),
    "llama": (LlamaForCausalLM, LlamaConfig(
        **LLAMA_SIZES, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}, **IDS), torch.float32, True),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**LLAMA_SIZES, tie_word_embeddings=True, **IDS), torch.bfloat16, False),
    "mistral": (MistralForCausalLM, MistralConfig(**LLAMA_SIZES, head_dim=16, tie_word_embeddings=False,
                                                  sliding_window=None, **IDS), torch.bfloat16, False),
    "gpt2_reward": (GPT2ForSequenceClassification, GPT2Config(**GPT2_SIZES, num_labels=1, **IDS), torch.bfloat16,
                    False),
    "llama_reward": (LlamaForSequenceClassification, LlamaConfig(**LLAMA_SIZES, num_labels=1, **IDS),
                     torch.bfloat16, False),
}

TINY_CASES = {  # name -> `python -m jaxppo.models.tiny` arguments (the test rebuilds with the same)
    "tiny_gpt2": ["--arch", "gpt2", "--seed", "0"],
    "tiny_llama": ["--arch", "llama", "--seed", "1"],
    "tiny_qwen2": ["--arch", "qwen2", "--seed", "2"],
    "tiny_gpt2_reward": ["--arch", "gpt2", "--reward-model", "--seed", "3"],
    "tiny_llama_reward": ["--arch", "llama", "--reward-model", "--seed", "4"],
}
TINY_SENTENCE = "Once the quiet robot finds the golden river by the sea. Digits 0 1 2!"


def left_padded_batch(vocab: int, seed: int, lengths: list[int], seq: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, size=(len(lengths), seq)).astype(np.int64)
    mask = np.zeros((len(lengths), seq), np.int64)
    for i, n in enumerate(lengths):
        mask[i, seq - n:] = 1
    ids[mask == 0] = PAD
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def randomize(model: torch.nn.Module, seed: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.ndim == 1:  # norm weights
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.2 * noise)
            p.copy_(p.to(dtype).float())  # values representable in the stored dtype


def make_models() -> None:
    ids_np, mask_np = left_padded_batch(VOCAB, seed=0, lengths=[10, 7, 4], seq=10)
    ids, mask = torch.from_numpy(ids_np), torch.from_numpy(mask_np)
    for k, (name, (cls, config, dtype, greedy)) in enumerate(MODELS.items()):
        torch.manual_seed(k)
        model = cls(config).eval()
        randomize(model, seed=100 + k, dtype=dtype)
        out = {"input_ids": ids_np, "attention_mask": mask_np}
        with torch.no_grad():
            res = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
            if cls in (GPT2ForSequenceClassification, LlamaForSequenceClassification):
                out["scores"] = res.logits[:, 0].float().numpy()
            else:
                out["logits"] = res.logits.float().numpy()
            if greedy:
                gen = GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=PAD, eos_token_id=EOS,
                                       bos_token_id=BOS)
                g = model.generate(ids, attention_mask=mask, generation_config=gen, output_scores=True,
                                   return_dict_in_generate=True)
                out["sequences"] = g.sequences.numpy()
                top2 = torch.stack(g.scores, 1).topk(2, dim=-1).values  # [B, 8, 2]
                out["greedy_min_gap"] = np.float32((top2[..., 0] - top2[..., 1]).min())
        folder = os.path.join(HERE, name)
        os.makedirs(folder, exist_ok=True)
        model.to(dtype).save_pretrained(folder, safe_serialization=True)
        np.savez_compressed(os.path.join(folder, "outputs.npz"), **out)
        print(f"{name}: {sorted(out)} " + (f"greedy gap {out['greedy_min_gap']:.3f}" if greedy else ""))


def make_tiny_roundtrip(jaxppo_python: str) -> None:
    ids_np, mask_np = left_padded_batch(512, seed=1, lengths=[8, 5], seq=8)
    ids, mask = torch.from_numpy(ids_np), torch.from_numpy(mask_np)
    out = {"input_ids": ids_np, "attention_mask": mask_np, "cases": json.dumps(TINY_CASES)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in TINY_CASES.items():
            folder = os.path.join(tmp, name)
            subprocess.run([jaxppo_python, "-m", "jaxppo.models.tiny", folder, *args], check=True,
                           cwd=os.path.dirname(os.path.dirname(HERE)))
            reward = "--reward-model" in args
            cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
            model = cls.from_pretrained(folder).eval()
            with torch.no_grad():
                res = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
            out[name] = (res.logits[:, 0] if reward else res.logits).float().numpy()
            tok = AutoTokenizer.from_pretrained(folder)
            out[f"{name}_tokens"] = np.asarray(tok(TINY_SENTENCE)["input_ids"], np.int64)
            print(f"{name}: {type(model).__name__} {out[name].shape} tokenizer {type(tok).__name__} {len(tok)}")
    out["sentence"] = TINY_SENTENCE
    np.savez_compressed(os.path.join(HERE, "tiny_roundtrip.npz"), **out)


SAVE_SNIPPET = """
import sys
from jaxppo.models.hf import load_model, save_pretrained
src, dst, head = sys.argv[1:]
save_pretrained(load_model(src, head=head), None, dst)
"""


def check_save_pretrained(jaxppo_python: str) -> None:
    """jaxppo load -> save_pretrained -> transformers from_pretrained reproduces the golden outputs."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, (cls, _, _, _) in MODELS.items():
            reward = cls in (GPT2ForSequenceClassification, LlamaForSequenceClassification)
            dst = os.path.join(tmp, name)
            subprocess.run([jaxppo_python, "-c", SAVE_SNIPPET, os.path.join(HERE, name), dst,
                            "scalar" if reward else "lm"], check=True, cwd=os.path.dirname(os.path.dirname(HERE)))
            auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
            model = auto.from_pretrained(dst, dtype=torch.float32).eval()
            assert type(model) is cls, (name, type(model))
            o = np.load(os.path.join(HERE, name, "outputs.npz"))
            ids, mask = torch.from_numpy(o["input_ids"]), torch.from_numpy(o["attention_mask"])
            with torch.no_grad():
                res = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
            if reward:
                err = np.abs(res.logits[:, 0].numpy() - o["scores"]).max()
            else:
                err = np.abs((res.logits.numpy() - o["logits"])[o["attention_mask"] > 0]).max()
            assert err < 1e-4, (name, err)
            print(f"save_pretrained {name}: transformers loads it as {type(model).__name__}, max |diff| {err:.1e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jaxppo-python", default="/root/venv/bin/python",
                    help="python of the jaxppo environment, used to run `python -m jaxppo.models.tiny`")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--skip-save-check", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__} transformers {transformers.__version__}")
    make_models()
    if not a.skip_tiny:
        make_tiny_roundtrip(a.jaxppo_python)
    if not a.skip_save_check:
        check_save_pretrained(a.jaxppo_python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
