"""Write a small random HF-format checkpoint + byte-level BPE tokenizer (demo, tests, benchmarks).

    python -m jaxppo.models.tiny OUT_DIR [--arch gpt2|llama|qwen2] [--reward-model] [--vocab-size N]
                                 [--seed S] [--hidden-size 64] [--num-layers 2] [--num-heads 4]
                                 [--num-kv-heads K] [--intermediate-size I] [--max-position-embeddings 256]
                                 [--tie | --no-tie]

OUT_DIR then loads with `transformers.AutoModelForCausalLM` (`AutoModelForSequenceClassification`
with --reward-model, one label) and `AutoTokenizer`, and with `jaxppo.models.hf.load_*`.
The tokenizer is trained here with `tokenizers` on a built-in synthetic corpus: `<|endoftext|>`
(id 0) is bos/eos/unk, `<|pad|>` (id 1) is pad, padding side left. Weights are NumPy N(0, 0.02)
(norms 1, biases 0) from `seed`, so the same arguments give the same files.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys

import numpy as np

EOS, PAD = "<|endoftext|>", "<|pad|>"
MIN_VOCAB = 258  # 256 byte symbols + the two special tokens

_DEFAULTS = {
    "gpt2": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=256,
                 max_position_embeddings=256, tie_word_embeddings=True),
    "llama": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                  max_position_embeddings=256, tie_word_embeddings=False),
    "qwen2": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                  max_position_embeddings=256, tie_word_embeddings=True),
}

# A small generative grammar: enough variety for BPE merges and for reward functions on text.
_NOUNS = ["robot", "garden", "river", "teacher", "lantern", "market", "kitten", "pilot", "forest", "violin",
          "planet", "bakery", "castle", "engine", "harbor", "meadow", "poet", "storm", "window", "puzzle"]
_ADJS = ["quiet", "bright", "ancient", "curious", "gentle", "rusty", "golden", "hungry", "tiny", "brave",
         "silver", "sleepy", "happy", "strange", "warm", "cold"]
_VERBS = ["finds", "paints", "follows", "repairs", "visits", "remembers", "builds", "answers", "carries",
          "watches", "sings to", "writes about", "dreams of", "laughs at"]
_PLACES = ["by the sea", "in the morning", "after the rain", "near the old bridge", "at midnight",
           "under a blue sky", "on a long journey", "in a small town", "before dinner", "with a smile"]
_OPENERS = ["Once", "Today", "Every day", "Later", "Suddenly", "Long ago", "Tomorrow", "Meanwhile"]
_EXTRA = ("Digits 0 1 2 3 4 5 6 7 8 9 and numbers 12 100 365 2025. Questions? Yes! No. Maybe; "
          "quotes \"like so\", parentheses (a) [b] {c}: colons, commas, dashes - and 'apostrophes'.")


def synthetic_corpus(seed: int = 0, n_lines: int = 3000) -> list[str]:
    """Deterministic English-like lines."""
    rng = random.Random(seed)

    def phrase():
        return f"the {rng.choice(_ADJS)} {rng.choice(_NOUNS)}"

    lines = [_EXTRA]
    for _ in range(n_lines):
        sents = []
        for _ in range(rng.randint(1, 3)):
            s = f"{rng.choice(_OPENERS)} {phrase()} {rng.choice(_VERBS)} {phrase()} {rng.choice(_PLACES)}"
            sents.append(s + rng.choice([".", ".", "!", "?"]))
        lines.append(" ".join(sents))
    return lines


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int) -> str:
    """Train the byte-level BPE once per vocab size per process (about 0.3 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD],  # ids 0, 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(0), trainer=trainer)
    return tok.to_str()


def make_tokenizer(vocab_size: int = 512, model_max_length: int = 256):
    """A `PreTrainedTokenizerFast` (left padding) with at most `vocab_size` tokens."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size: must be >= {MIN_VOCAB} (256 bytes + 2 special tokens), got {vocab_size}")
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD,
        padding_side="left", model_max_length=model_max_length,
    )


def hf_config_dict(arch: str = "gpt2", reward_model: bool = False, vocab_size: int = 512, **sizes) -> dict:
    """The config.json of a tiny model."""
    if arch not in _DEFAULTS:
        raise ValueError(f"arch: expected one of {sorted(_DEFAULTS)}, got {arch!r}")
    unknown = set(sizes) - set(_DEFAULTS[arch]) - {"head_dim"}
    if unknown:
        raise ValueError(f"make_tiny: unknown size argument(s) {sorted(unknown)} (known: {sorted(_DEFAULTS[arch])})")
    s = {**_DEFAULTS[arch], **{k: v for k, v in sizes.items() if v is not None}}
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=1)
    if arch == "gpt2":
        d = dict(model_type="gpt2", vocab_size=vocab_size, n_embd=s["hidden_size"], n_layer=s["num_layers"],
                 n_head=s["num_heads"], n_inner=s["intermediate_size"], n_positions=s["max_position_embeddings"],
                 layer_norm_epsilon=1e-5, activation_function="gelu_new", attn_pdrop=0.0, embd_pdrop=0.0,
                 resid_pdrop=0.0, summary_first_dropout=0.0, scale_attn_weights=True)
        prefix = "GPT2"
    else:
        head_dim = s.get("head_dim") or s["hidden_size"] // s["num_heads"]
        d = dict(model_type=arch, vocab_size=vocab_size, hidden_size=s["hidden_size"],
                 num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
                 num_key_value_heads=s["num_kv_heads"], head_dim=head_dim, intermediate_size=s["intermediate_size"],
                 max_position_embeddings=s["max_position_embeddings"], rms_norm_eps=1e-6, hidden_act="silu",
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attention_dropout=0.0)
        if arch == "llama":
            d.update(attention_bias=False, mlp_bias=False)
        else:
            d.update(use_sliding_window=False, sliding_window=None)
        prefix = {"llama": "Llama", "qwen2": "Qwen2"}[arch]
    d.update(tie_word_embeddings=s["tie_word_embeddings"], initializer_range=0.02, use_cache=True, dtype="float32",
             **ids)
    if reward_model:
        d.update(architectures=[f"{prefix}ForSequenceClassification"], id2label={"0": "LABEL_0"},
                 label2id={"LABEL_0": 0})
    else:
        d["architectures"] = [f"{prefix}LMHeadModel" if arch == "gpt2" else f"{prefix}ForCausalLM"]
    return d


def make_tiny(out_dir: str, arch: str = "gpt2", reward_model: bool = False, vocab_size: int = 512, seed: int = 0,
              **sizes) -> str:
    """Write a random tiny model + tokenizer to `out_dir`; returns its absolute path.

    sizes: hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, max_position_embeddings,
    tie_word_embeddings, head_dim (llama/qwen2). Defaults: 2 layers, hidden 64, 4 heads
    (llama/qwen2: 2 kv heads; qwen2 has q/k/v biases, random like the weights).
    """
    from safetensors.numpy import save_file

    from jaxppo.models.hf import config_from_hf, iter_hf_tensor_specs

    d = hf_config_dict(arch, reward_model, vocab_size, **sizes)
    config = config_from_hf(d, source=f"tiny {arch} config")
    tokenizer = make_tokenizer(vocab_size, config.max_position_embeddings)
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, shape, role in iter_hf_tensor_specs(config, "scalar" if reward_model else "lm"):
        if role == "norm":
            tensors[key] = np.ones(shape, np.float32)
        elif role == "bias" and arch != "qwen2":
            tensors[key] = np.zeros(shape, np.float32)
        else:  # weights, and qwen2's q/k/v biases (random so the bias path is exercised)
            tensors[key] = rng.normal(0.0, 0.02, size=shape).astype(np.float32)
    out = os.path.abspath(out_dir)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}, f, indent=2)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxppo.models.tiny", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--arch", choices=sorted(_DEFAULTS), default="gpt2")
    ap.add_argument("--reward-model", action="store_true", help="*ForSequenceClassification with one label")
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden-size", type=int)
    ap.add_argument("--num-layers", type=int)
    ap.add_argument("--num-heads", type=int)
    ap.add_argument("--num-kv-heads", type=int)
    ap.add_argument("--intermediate-size", type=int)
    ap.add_argument("--max-position-embeddings", type=int)
    ap.add_argument("--tie", dest="tie_word_embeddings", action="store_true", default=None)
    ap.add_argument("--no-tie", dest="tie_word_embeddings", action="store_false")
    a = ap.parse_args(argv)
    sizes = dict(hidden_size=a.hidden_size, num_layers=a.num_layers, num_heads=a.num_heads,
                 num_kv_heads=a.num_kv_heads, intermediate_size=a.intermediate_size,
                 max_position_embeddings=a.max_position_embeddings, tie_word_embeddings=a.tie_word_embeddings)
    try:
        out = make_tiny(a.out_dir, a.arch, a.reward_model, a.vocab_size, a.seed, **sizes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
