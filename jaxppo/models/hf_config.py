"""HF `config.json` <-> `TransformerConfig`, and `ModelLoadError`, which every `jaxppo.models.hf*` module raises.

`config_from_hf` checks a config dict field by field (each message names the file and key);
`config_to_hf` writes one back (the kept original when the model was loaded from a folder) with
`architectures` set for the head; `read_config` reads a folder's config.json. The public names
are re-exported by `jaxppo.models.hf`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxppo.errors import JaxppoError
from jaxppo.models.transformer import TransformerConfig

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")
_ARCH_PREFIX = {"gpt2": "GPT2", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


class ModelLoadError(JaxppoError, ValueError):
    """A model folder cannot be read or written; the one-line message names the file / tensor / key."""


def _get(d: dict, key: str, source: str, default: Any = ...) -> Any:
    if key in d and d[key] is not None:
        return d[key]
    if default is ...:
        raise ModelLoadError(f"{source}: missing key {key!r}")
    return default


def _int(d: dict, key: str, source: str, default: Any = ..., minimum: int = 1) -> int:
    """An integer field of config.json (sizes, counts), with a message naming the key when it is not one."""
    value = _get(d, key, source, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelLoadError(f"{source}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(d: dict, key: str, source: str, default: Any = ...) -> float:
    value = _get(d, key, source, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelLoadError(f"{source}: {key} must be a number, got {value!r}")
    return float(value)


def _rope_params(d: dict, source: str) -> tuple[float, tuple | None]:
    """(rope_theta, rope_scaling) from transformers 5 `rope_parameters` or legacy rope_theta/rope_scaling."""
    params = dict(d.get("rope_parameters") or {})
    if not params:
        params = dict(d.get("rope_scaling") or {})
        params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    raw_theta = params.pop("rope_theta", d.get("rope_theta") or 10000.0)
    if isinstance(raw_theta, bool) or not isinstance(raw_theta, (int, float)):
        raise ModelLoadError(f"{source}: rope_theta must be a number, got {raw_theta!r}")
    theta = float(raw_theta)
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ModelLoadError(f"{source}: rope_type {rope_type!r} unsupported (supported: 'default', 'llama3')")
    params["rope_type"] = "llama3"
    params.pop("type", None)
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        _get(params, key, f"{source} rope_parameters")
    return theta, tuple(sorted(params.items()))


def config_from_hf(d: dict, source: str = "config.json") -> TransformerConfig:
    """HF config dict -> `TransformerConfig` (the original dict is kept as `hf_config`)."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{source}: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    ids = dict(bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
               pad_token_id=d.get("pad_token_id"))
    try:
        if model_type == "gpt2":
            if d.get("scale_attn_by_inverse_layer_idx") or d.get("scale_attn_weights") is False:
                raise ModelLoadError(
                    f"{source}: scale_attn_by_inverse_layer_idx=true / scale_attn_weights=false unsupported"
                )
            if d.get("add_cross_attention"):
                raise ModelLoadError(f"{source}: add_cross_attention unsupported")
            hidden, heads = _int(d, "n_embd", source), _int(d, "n_head", source)
            if hidden % heads:
                raise ModelLoadError(f"{source}: n_embd={hidden} is not divisible by n_head={heads}")
            cfg = TransformerConfig(
                arch="gpt2", model_type="gpt2", vocab_size=_int(d, "vocab_size", source), hidden_size=hidden,
                num_layers=_int(d, "n_layer", source), num_heads=heads,
                intermediate_size=_int(d, "n_inner", source, 4 * hidden),
                max_position_embeddings=_int(d, "n_positions", source, 1024),
                norm_eps=_number(d, "layer_norm_epsilon", source, 1e-5),
                qkv_bias=True, o_bias=True, mlp_bias=True,
                tie_word_embeddings=d.get("tie_word_embeddings", True),
                activation=_get(d, "activation_function", source, "gelu_new"),
                hf_config=json.dumps(d), **ids,
            )
        else:
            theta, scaling = _rope_params(d, source)
            hidden, heads = _int(d, "hidden_size", source), _int(d, "num_attention_heads", source)
            kv_heads, head_dim = _int(d, "num_key_value_heads", source, heads), _int(d, "head_dim", source, 0, minimum=0)
            if heads % kv_heads:
                raise ModelLoadError(f"{source}: num_attention_heads={heads} is not divisible by "
                                     f"num_key_value_heads={kv_heads}")
            if not head_dim and hidden % heads:
                raise ModelLoadError(f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads} "
                                     "(and head_dim is not set)")
            bias = bool(d.get("attention_bias", False))
            cfg = TransformerConfig(
                arch="llama", model_type=model_type, vocab_size=_int(d, "vocab_size", source),
                hidden_size=hidden, num_layers=_int(d, "num_hidden_layers", source),
                num_heads=heads, num_kv_heads=kv_heads,
                head_dim=head_dim, intermediate_size=_int(d, "intermediate_size", source),
                max_position_embeddings=_int(d, "max_position_embeddings", source, 2048),
                norm_eps=_number(d, "rms_norm_eps", source, 1e-6), rope_theta=theta, rope_scaling=scaling,
                qkv_bias=bias or model_type == "qwen2", o_bias=bias, mlp_bias=bool(d.get("mlp_bias", False)),
                tie_word_embeddings=d.get("tie_word_embeddings", False),
                activation=_get(d, "hidden_act", source, "silu"), hf_config=json.dumps(d), **ids,
            )
    except ModelLoadError:
        raise
    except (ValueError, TypeError, ArithmeticError) as e:
        raise ModelLoadError(f"{source}: {e}") from None
    return cfg


def config_to_hf(config: TransformerConfig, head: str = "lm") -> dict:
    """`TransformerConfig` -> HF config dict (the kept original, or a fresh one) with `architectures` set."""
    c = config
    if c.hf_config:
        d = json.loads(c.hf_config)
    elif c.arch == "gpt2":
        d = dict(model_type="gpt2", vocab_size=c.vocab_size, n_embd=c.hidden_size, n_layer=c.num_layers,
                 n_head=c.num_heads, n_inner=c.intermediate_size, n_positions=c.max_position_embeddings,
                 layer_norm_epsilon=c.norm_eps, activation_function=c.activation, attn_pdrop=0.0, embd_pdrop=0.0,
                 resid_pdrop=0.0, summary_first_dropout=0.0, scale_attn_weights=True, initializer_range=0.02,
                 use_cache=True)
    else:
        rope = {"rope_type": c.rope_type, "rope_theta": c.rope_theta, **dict(c.rope_scaling or ())}
        d = dict(model_type=c.model_type, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                 num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                 head_dim=c.head_dim, intermediate_size=c.intermediate_size,
                 max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.norm_eps, hidden_act=c.activation,
                 rope_parameters=rope, attention_dropout=0.0, initializer_range=0.02, use_cache=True)
        if c.model_type == "llama":
            d.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
        elif c.model_type == "mistral":
            d.update(sliding_window=None)
        elif c.model_type == "qwen2":
            d.update(use_sliding_window=False, sliding_window=None)
    d.update(tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
             pad_token_id=c.pad_token_id,
             eos_token_id=list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id)
    prefix = _ARCH_PREFIX[c.model_type]
    if head == "scalar":
        d["architectures"] = [f"{prefix}ForSequenceClassification"]
        d["id2label"], d["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    else:
        d["architectures"] = [f"{prefix}LMHeadModel" if c.arch == "gpt2" else f"{prefix}ForCausalLM"]
    return d


def read_config(path: str) -> dict:
    """The config.json of the model folder `path` as a dict; `ModelLoadError` names what is wrong."""
    if not os.path.isdir(path):
        raise ModelLoadError(f"{path}: model folder does not exist")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"{cfg_path}: missing config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{cfg_path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ModelLoadError(f"{cfg_path}: cannot read ({e.strerror or e})") from None
    if not isinstance(d, dict):
        raise ModelLoadError(f"{cfg_path}: expected a JSON object, got {type(d).__name__}")
    return d
