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
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxppo.errors import JaxppoError
from jaxppo.models.transformer import Transformer, TransformerConfig

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")
_ARCH_PREFIX = {"gpt2": "GPT2", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class ModelLoadError(JaxppoError, ValueError):
    """A model folder cannot be read or written; the one-line message names the file / tensor / key."""


# ----------------------------------------------------------------------------- config


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


# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One NNX parameter and the HF tensors it is made of.

    kind "linear": HF `[out_i, in]` parts, ours = concat(part.T, axis=1) -> `[in, sum out_i]`.
    kind "copy":   HF parts concatenated along axis 0 (embeddings, Conv1D `[in, out]`, norms, biases).
    """

    path: str  # NNX state path, e.g. "layers.0.attn.qkv.kernel"
    kind: str
    parts: tuple[tuple[str, tuple[int, ...]], ...]  # (HF key, HF shape)


def _layout(c: TransformerConfig, head: str, prefix: str, *, with_lm_head: bool = True) -> list[_Entry]:
    """The full parameter table of a model with the given config, head and HF key prefix."""
    e = []

    def add(path, kind, *parts):
        e.append(_Entry(path, kind, tuple(parts)))

    h, v = c.hidden_size, c.vocab_size
    if c.arch == "gpt2":
        add("embed.embedding", "copy", (f"{prefix}wte.weight", (v, h)))
        add("pos_embed.embedding", "copy", (f"{prefix}wpe.weight", (c.max_position_embeddings, h)))
        for i in range(c.num_layers):
            hf, our = f"{prefix}h.{i}.", f"layers.{i}."
            qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
            for ln, norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                add(f"{our}{norm}.scale", "copy", (f"{hf}{ln}.weight", (h,)))
                add(f"{our}{norm}.bias", "copy", (f"{hf}{ln}.bias", (h,)))
            for mod, ours, shape in (("attn.c_attn", "attn.qkv", (h, qkv)),
                                     ("attn.c_proj", "attn.out", (c.num_heads * c.head_dim, h)),
                                     ("mlp.c_fc", "mlp.fc_in", (h, c.intermediate_size)),
                                     ("mlp.c_proj", "mlp.fc_out", (c.intermediate_size, h))):
                add(f"{our}{ours}.kernel", "copy", (f"{hf}{mod}.weight", shape))
                add(f"{our}{ours}.bias", "copy", (f"{hf}{mod}.bias", (shape[1],)))
        add("final_norm.scale", "copy", (f"{prefix}ln_f.weight", (h,)))
        add("final_norm.bias", "copy", (f"{prefix}ln_f.bias", (h,)))
    else:
        add("embed.embedding", "copy", (f"{prefix}embed_tokens.weight", (v, h)))
        q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
        for i in range(c.num_layers):
            hf, our = f"{prefix}layers.{i}.", f"layers.{i}."
            add(f"{our}attn_norm.scale", "copy", (f"{hf}input_layernorm.weight", (h,)))
            add(f"{our}mlp_norm.scale", "copy", (f"{hf}post_attention_layernorm.weight", (h,)))
            att = f"{hf}self_attn."
            add(f"{our}attn.qkv.kernel", "linear",
                (f"{att}q_proj.weight", (q, h)), (f"{att}k_proj.weight", (kv, h)), (f"{att}v_proj.weight", (kv, h)))
            if c.qkv_bias:
                add(f"{our}attn.qkv.bias", "copy",
                    (f"{att}q_proj.bias", (q,)), (f"{att}k_proj.bias", (kv,)), (f"{att}v_proj.bias", (kv,)))
            add(f"{our}attn.out.kernel", "linear", (f"{att}o_proj.weight", (h, q)))
            if c.o_bias:
                add(f"{our}attn.out.bias", "copy", (f"{att}o_proj.bias", (h,)))
            mlp = f"{hf}mlp."
            add(f"{our}mlp.fc_in.kernel", "linear", (f"{mlp}gate_proj.weight", (inter, h)),
                (f"{mlp}up_proj.weight", (inter, h)))
            add(f"{our}mlp.fc_out.kernel", "linear", (f"{mlp}down_proj.weight", (h, inter)))
            if c.mlp_bias:
                add(f"{our}mlp.fc_in.bias", "copy",
                    (f"{mlp}gate_proj.bias", (inter,)), (f"{mlp}up_proj.bias", (inter,)))
                add(f"{our}mlp.fc_out.bias", "copy", (f"{mlp}down_proj.bias", (h,)))
        add("final_norm.scale", "copy", (f"{prefix}norm.weight", (h,)))
    if head == "lm" and not c.tie_word_embeddings and with_lm_head:
        add("lm_head.kernel", "linear", ("lm_head.weight", (v, h)))
    if head == "scalar":
        add("score.kernel", "linear", ("score.weight", (1, h)))
    return e


def hf_tensor_shapes(config: TransformerConfig, head: str = "lm") -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, as transformers' *ForCausalLM / *ForSequenceClassification saves it."""
    prefix = "transformer." if config.arch == "gpt2" else "model."
    return {k: s for entry in _layout(config, head, prefix) for k, s in entry.parts}


# ----------------------------------------------------------------------------- reading tensors


class _Tensors:
    """Tensors of one folder: `model.safetensors` or the shards listed in `model.safetensors.index.json`."""

    def __init__(self, folder: str):
        single = os.path.join(folder, "model.safetensors")
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(single):
            files = {"model.safetensors": single}
            self.where = None
        elif os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map must map tensor names to file names")
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise ModelLoadError(f"{index}: malformed safetensors index ({type(e).__name__}: {e})") from None
            except OSError as e:
                raise ModelLoadError(f"{index}: cannot read ({e.strerror or e})") from None
            files = {name: os.path.join(folder, name) for name in sorted(set(weight_map.values()))}
            self.where = weight_map
        else:
            raise ModelLoadError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        from safetensors import safe_open

        self.handles, self.key_file, self.bf16_handles = {}, {}, {}
        for name, path in files.items():
            if not os.path.isfile(path):
                raise ModelLoadError(f"{path}: shard listed in model.safetensors.index.json is missing")
            try:
                handle = safe_open(path, framework="numpy")
                keys = list(handle.keys())
            except Exception as e:  # the Rust reader raises its own error types
                raise ModelLoadError(f"{path}: truncated or corrupt safetensors file ({e})") from None
            self.handles[name] = (path, handle)
            for k in keys:
                self.key_file[k] = name

    def __contains__(self, key: str) -> bool:
        return key in self.key_file

    def file(self, key: str) -> str:
        return self.handles[self.key_file[key]][0] if key in self.key_file else next(iter(self.handles.values()))[0]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handles[self.key_file[key]][1].get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        path, handle = self.handles[self.key_file[key]]
        try:
            if handle.get_slice(key).get_dtype() != "BF16":
                return handle.get_tensor(key)
            if path not in self.bf16_handles:  # NumPy has no bf16; the "flax" reader returns jax arrays
                from safetensors import safe_open

                self.bf16_handles[path] = safe_open(path, framework="flax")
            return np.asarray(self.bf16_handles[path].get_tensor(key))
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot read tensor {key!r} ({e})") from None


def _read_config(path: str) -> dict:
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


def _np_dtype(dtype: Any) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(jnp.dtype(dtype))


def _assemble(entry: _Entry, tensors: _Tensors, dtype: np.dtype) -> np.ndarray:
    arrays = []
    for key, shape in entry.parts:
        if key not in tensors:
            raise ModelLoadError(f"{tensors.file(key)}: missing tensor {key!r}")
        got = tensors.shape(key)
        if got != shape:
            raise ModelLoadError(
                f"{tensors.file(key)}: tensor {key!r} has shape {list(got)}, expected {list(shape)}"
            )
        a = tensors.get(key).astype(np.float32)
        arrays.append(a.T if entry.kind == "linear" else a)
    out = np.concatenate(arrays, axis=1 if entry.kind == "linear" else 0) if len(arrays) > 1 else arrays[0]
    return np.ascontiguousarray(out).astype(dtype)


def _build(config, head, arrays: dict[str, np.ndarray], *, dtype, param_dtype, remat) -> Transformer:
    """A `Transformer` whose every parameter comes from `arrays` (no random init is run)."""
    abstract = nnx.eval_shape(
        lambda: Transformer(config, head=head, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(abstract)
    flat = {}
    for path, var in nnx.to_flat_state(state):
        name = ".".join(map(str, path))
        if name not in arrays:
            raise ModelLoadError(f"internal: no tensor mapped to parameter {name}")
        a = arrays[name]
        if tuple(a.shape) != tuple(var.shape):
            raise ModelLoadError(f"internal: parameter {name} shape {a.shape} != {var.shape}")
        flat[path] = var.replace(jnp.asarray(a, dtype=param_dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_model(
    path: str,
    *,
    head: str = "lm",
    fresh_head: bool = False,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    remat: bool = False,
    seed: int = 0,
) -> Transformer:
    """Read an HF folder into a `Transformer` (no tokenizer).

    head "lm" needs the LM head (or tied embeddings); head "scalar" reads `score.weight` of a
    *ForSequenceClassification folder (num_labels must be 1). `fresh_head=True` (scalar only)
    ignores any stored head and draws `score` ~ N(0, initializer_range) from `seed` instead.
    `param_dtype=None` keeps parameters in `dtype`.
    """
    if fresh_head and head != "scalar":
        raise ValueError(f"load_model: fresh_head=True needs head='scalar', got head={head!r}")
    d = _read_config(path)
    cfg_path = os.path.join(path, "config.json")
    config = config_from_hf(d, source=cfg_path)
    param_dtype = dtype if param_dtype is None else param_dtype
    if head == "scalar" and not fresh_head:
        labels = d.get("num_labels", len(d["id2label"]) if isinstance(d.get("id2label"), dict) else 1)
        if labels != 1:
            raise ModelLoadError(f"{cfg_path}: a reward/value model needs num_labels=1, got {labels}")
    tensors = _Tensors(path)
    # transformers writes "transformer." / "model." prefixes; some old checkpoints have none
    prefix, embed = ("transformer.", "wte.weight") if config.arch == "gpt2" else ("model.", "embed_tokens.weight")
    if prefix + embed not in tensors and embed in tensors:
        prefix = ""
    entries = _layout(config, head, prefix)
    archs = d.get("architectures")
    if head == "scalar" and not fresh_head and "score.weight" not in tensors:
        raise ModelLoadError(f"{tensors.file('score.weight')}: missing tensor 'score.weight': {path} is not a "
                             f"reward/value model (architectures: {archs}); expected a *ForSequenceClassification "
                             "folder with num_labels=1")
    if any(e.path == "lm_head.kernel" for e in entries) and "lm_head.weight" not in tensors:
        raise ModelLoadError(f"{tensors.file('lm_head.weight')}: missing tensor 'lm_head.weight' (architectures: "
                             f"{archs}, tie_word_embeddings=false); expected a causal-LM folder")
    if head == "scalar" and fresh_head:
        entries = [e for e in entries if e.path != "score.kernel"]
    if head == "scalar" and "score.weight" in tensors and not fresh_head and tensors.shape("score.weight")[0] != 1:
        raise ModelLoadError(
            f"{tensors.file('score.weight')}: a reward/value model needs num_labels=1, "
            f"score.weight has shape {list(tensors.shape('score.weight'))}"
        )
    np_dtype = _np_dtype(param_dtype)
    arrays = {e.path: _assemble(e, tensors, np_dtype) for e in entries}
    if head == "scalar" and fresh_head:
        std = float(d.get("initializer_range", 0.02))
        w = std * jax.random.normal(jax.random.key(seed), (config.hidden_size, 1), jnp.float32)
        arrays["score.kernel"] = np.asarray(w).astype(np_dtype)
    return _build(config, head, arrays, dtype=dtype, param_dtype=param_dtype, remat=remat)


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


def to_hf_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """The model's parameters as HF tensors (torch layout); tied LM heads are not written, as HF does."""
    config = model.config
    prefix = "transformer." if config.arch == "gpt2" else "model."
    params = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out = {}
    for entry in _layout(config, model.head, prefix):
        a = np.asarray(jax.device_get(params[entry.path]))
        axis = 1 if entry.kind == "linear" else 0
        sizes = np.cumsum([shape[0] for _, shape in entry.parts])[:-1]
        for (key, shape), part in zip(entry.parts, np.split(a, sizes, axis=axis)):
            out[key] = np.ascontiguousarray(part.T if entry.kind == "linear" else part)
            assert out[key].shape == shape, (key, out[key].shape, shape)
    return out


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


def iter_hf_tensor_specs(config: TransformerConfig, head: str = "lm") -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(HF key, shape, role) for every tensor a folder of this config holds, in a fixed order;
    role is "norm" (ones), "bias" (zeros) or "weight" (random). Used by `jaxppo.models.tiny`."""
    prefix = "transformer." if config.arch == "gpt2" else "model."
    for entry in _layout(config, head, prefix):
        role = "norm" if entry.path.endswith(".scale") else ("bias" if entry.path.endswith(".bias") else "weight")
        for key, shape in entry.parts:
            yield key, shape, role

