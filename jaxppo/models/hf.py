"""Hugging Face folders <-> `Transformer`: config.json + safetensors (single or sharded), tokenizers.

No torch: tensors are read with `safetensors.safe_open(framework="numpy")` (bf16 through the
"flax" framework, since NumPy has no bfloat16) and written with `safetensors.numpy`.

    model, tok = load_causal_lm("path/to/policy")                 # lm head -> logits
    reward, tok = load_reward_model("path/to/reward")             # *ForSequenceClassification, 1 label
    critic, tok = load_backbone_with_fresh_head("path/to/policy", seed=0)  # critic initialised from the policy
    save_pretrained(model, tok, "out/final_model")                # transformers loads it back

Layout: our fused kernels are `[in, out]`; HF `nn.Linear` weights are `[out, in]` (transposed,
q/k/v and gate/up concatenated along `out`); GPT-2 `Conv1D` weights are already `[in, out]`.
Every problem with a folder raises `ModelLoadError` naming the file, tensor or key at fault.

The pieces live in `hf_config` (config.json <-> `TransformerConfig`, `ModelLoadError`), `hf_layout`
(the parameter table: NNX path <-> HF tensor names and shapes) and `hf_weights` (safetensors <->
`Transformer`: `load_model`, `to_hf_tensors`); this module loads tokenizers, pairs them with models,
saves folders, and re-exports the public names of the others, so `jaxppo.models.hf` stays the one import.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp

from jaxppo.models.hf_config import (
    SUPPORTED_MODEL_TYPES,
    ModelLoadError,
    config_from_hf,
    config_to_hf,
)
from jaxppo.models.hf_layout import hf_tensor_shapes, iter_hf_tensor_specs
from jaxppo.models.hf_weights import load_model, to_hf_tensors, weights_fingerprint
from jaxppo.models.transformer import Transformer, TransformerConfig

__all__ = [
    "SUPPORTED_MODEL_TYPES", "ModelLoadError", "Transformer", "TransformerConfig", "config_from_hf", "config_to_hf",
    "hf_tensor_shapes", "iter_hf_tensor_specs", "load_backbone_with_fresh_head", "load_causal_lm", "load_model",
    "load_reward_model", "load_tokenizer", "save_pretrained", "to_hf_tensors", "weights_fingerprint",
]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str):
    """`transformers.AutoTokenizer` from local files only, left padding, pad = eos when unset."""
    if not os.path.isdir(path):
        raise ModelLoadError(f"{path}: tokenizer folder does not exist")
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise ModelLoadError(f"{path}: no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)})")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, padding_side="left")
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot load tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _with_tokenizer(path: str, model: Transformer):
    tok = load_tokenizer(path)
    if len(tok) > model.config.vocab_size:
        raise ModelLoadError(
            f"{path}: tokenizer has {len(tok)} tokens but the model's vocab_size is {model.config.vocab_size}"
        )
    return model, tok


def load_causal_lm(path: str, dtype: Any = jnp.float32, param_dtype: Any = None, remat: bool = False):
    """(policy `Transformer` with an lm head, tokenizer) from an HF causal-LM folder."""
    return _with_tokenizer(path, load_model(path, head="lm", dtype=dtype, param_dtype=param_dtype, remat=remat))


def load_reward_model(path: str, dtype: Any = jnp.float32, param_dtype: Any = None, remat: bool = False):
    """(scalar-head `Transformer`, tokenizer) from an HF *ForSequenceClassification folder with 1 label.
    Score a batch with `sequence_scores(model(ids, mask), mask)`."""
    return _with_tokenizer(path, load_model(path, head="scalar", dtype=dtype, param_dtype=param_dtype, remat=remat))


def load_backbone_with_fresh_head(
    path: str, dtype: Any = jnp.float32, param_dtype: Any = None, remat: bool = False, seed: int = 0
):
    """(scalar-head `Transformer`, tokenizer): the backbone of any supported folder (causal LM or
    classifier) with a new `score` head ~ N(0, initializer_range) drawn from `seed` (critic init)."""
    model = load_model(path, head="scalar", fresh_head=True, dtype=dtype, param_dtype=param_dtype, remat=remat,
                       seed=seed)
    return _with_tokenizer(path, model)


# ----------------------------------------------------------------------------- saving


def save_pretrained(model: Transformer, tokenizer, path: str) -> None:
    """Write config.json, model.safetensors and the tokenizer files (if `tokenizer` is given) so that
    `transformers.AutoModelForCausalLM` (or `AutoModelForSequenceClassification` for a scalar head)
    and `AutoTokenizer` load `path` with identical outputs."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    tensors = to_hf_tensors(model)
    dtype = "bfloat16" if jnp.dtype(model.param_dtype) == jnp.bfloat16 else "float32"
    d = config_to_hf(model.config, model.head)
    d["dtype"] = dtype
    d.pop("torch_dtype", None)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
