"""LoRA adapters <-> PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`).

    save_adapter(adapters, spec, model.config, "out/final_adapter", base_model_name_or_path="org/base")
    # -> peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "out/final_adapter")

    spec = spec_from_adapter_config(folder)           # a PEFT adapter, trained anywhere
    add_lora(model, spec, rngs=nnx.Rngs(0))
    nnx.update(model, load_adapter(folder, nnx.state(model, nnx.LoRAParam), model.config, spec=spec))

`adapters` is an `nnx.State` holding the LoRA parameters of a model (`split_lora`'s second part, or
`nnx.state(model, nnx.LoRAParam)`); other leaves in it (a critic's trained head) are left alone.
Our adapter `parts[name]` of a Dense in block `i` is PEFT's module `hf_module(config, i, ...)`, one
to one (`jaxppo.models.lora`); the tensors are the same matrices transposed:

    ours  lora_a [in, r],   lora_b [r, out]      y += scale * x @ lora_a @ lora_b
    PEFT  lora_A.weight [r, in],  lora_B.weight [out, r]   named base_model.model.<module>.lora_A.weight

GPT-2's `Conv1D` changes nothing here (PEFT's `fan_in_fan_out` transposes only the base weight; its
A and B have the Linear shapes), but the config says `fan_in_fan_out: true` there, as PEFT writes it.
Scale = lora_alpha / r; PEFT's variants that change the maths (DoRA, rsLoRA, per-module ranks or
alphas, trained biases) are refused by name rather than loaded wrongly.

`modules_to_save` (modules trained in full, `lora.saved_modules`): their float32 trained copies in
`adapters` (`final_norm.scale`, `embed.embedding`, ...) are PEFT's tensors of the module in the HF
layout (`hf_layout.param_table`; `lm_head.kernel [H, V]` is `base_model.model.lm_head.weight [V, H]`).
PEFT matches these names as suffixes of module paths, so the Llama family's final norm is written
"model.norm" ("norm" also takes every layer's norms, which jaxppo cannot train: such adapters are
refused). jaxppo's tied LM head (GPT-2) is the trained embedding; PEFT's is that with [..., "wte",
"lm_head"] and ensure_weight_tying=True, the one copy saved under both names: so it is written (and
read: the two must be equal).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxppo.models.arch import TransformerConfig
from jaxppo.models.hf_layout import hf_key_prefix, hf_tensor_shapes, param_table
from jaxppo.models.lora import (PROJECTIONS, SAVED_MODULES, LoraSpec, hf_module, projections, resolve_targets,
                                saved_modules)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."      # PEFT's PeftModelForCausalLM -> LoraModel -> the HF model
SUFFIX = {"lora_a": ".lora_A.weight", "lora_b": ".lora_B.weight"}
# target names in the order adapters are listed (the Llama family's, then GPT-2's)
KNOWN_TARGETS = PROJECTIONS["llama"] + PROJECTIONS["gpt2"]
# PEFT config fields whose non-default values change the adapter's maths: field -> its default
UNSUPPORTED = {"use_dora": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none",
               "lora_bias": False, "layers_to_transform": None, "target_parameters": None,
               "trainable_token_indices": None, "layer_replication": None}
# modules_to_save jaxppo trains in full (`saved_modules`' HF names, either arch; this order), our modules
SAVED_NAMES = ("norm", "embed_tokens", "lm_head", "ln_f", "wte", "wpe")
SAVED_TOP = frozenset(ours for table in SAVED_MODULES.values() for ours in table.values())
EMBEDDINGS = ("embed_tokens", "wte")
LM_HEAD = KEY_PREFIX + "lm_head.weight"


# ----------------------------------------------------------------------------- names


def peft_keys(adapters: nnx.State, config: TransformerConfig) -> dict[tuple, str]:
    """Flat NNX path of every `lora_a` / `lora_b` in `adapters` -> its PEFT tensor name
    (`('layers', 0, 'attn', 'qkv', 'adapters', 'parts', 'q_proj', 'lora_a')` ->
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    table = projections(config)
    keys = {}
    for path, _ in nnx.to_flat_state(adapters):
        if len(path) < 6 or path[-1] not in SUFFIX or path[-4:-2] != ("adapters", "parts"):
            continue                                     # not a LoRA matrix (a trained head, ...)
        at = next((i for i in range(len(path) - 1) if path[i] == "layers" and isinstance(path[i + 1], int)), -2)
        dense_path, name = ".".join(map(str, path[at + 2:-4])), path[-2]    # "attn.qkv", "q_proj"
        if at < 0 or name not in table or dense_path not in [p for p, _ in table[name]]:
            raise ValueError(f"adapter {'.'.join(map(str, path))}: not a {config.arch} projection "
                             f"({', '.join(table)})")
        keys[path] = KEY_PREFIX + hf_module(config, path[at + 1], dense_path, name) + SUFFIX[path[-1]]
    return keys


def target_names(keys) -> tuple[str, ...]:
    """The projection names (PEFT `target_modules`) that PEFT tensor names `keys` adapt, in a fixed order."""
    names = {k[:-len(s)].rsplit(".", 1)[-1] for k in keys for s in SUFFIX.values() if k.endswith(s)}
    order = {n: i for i, n in enumerate(KNOWN_TARGETS)}
    return tuple(sorted(names, key=lambda n: (order.get(n, len(order)), n)))


def peft_tensors(adapters: nnx.State, config: TransformerConfig) -> dict[str, np.ndarray]:
    """PEFT tensor name -> float32 array (`lora_A.weight [r, in]`, `lora_B.weight [out, r]`)."""
    leaves = dict(nnx.to_flat_state(adapters))
    return {key: np.ascontiguousarray(np.asarray(jax.device_get(leaves[path][...]), np.float32).T)
            for path, key in peft_keys(adapters, config).items()}


def _short(name: str) -> str:
    """A `modules_to_save` name without the backbone's prefix ("model.norm" -> "norm")."""
    return next((name[len(p):] for p in ("model.", "transformer.") if name.startswith(p)), name)


def saved_table(config: TransformerConfig) -> dict[tuple, tuple[str, bool]]:
    """Flat NNX path of every parameter of a module that can be trained in full -> (its PEFT tensor
    name, whether ours is the transpose): `('final_norm', 'scale')` -> (`base_model.model.model.norm.weight`, False)."""
    return {tuple(e.path.split(".")): (KEY_PREFIX + e.parts[0][0], e.kind == "linear")
            for e in param_table(config, "lm", hf_key_prefix(config)) if e.path.split(".")[0] in SAVED_TOP}


def saved_leaves(adapters: nnx.State) -> list[tuple[tuple, Any]]:
    return [(path, v) for path, v in nnx.to_flat_state(adapters) if path and path[0] in SAVED_TOP]


def saved_tensors(adapters: nnx.State, config: TransformerConfig) -> dict[str, np.ndarray]:
    """PEFT tensor name -> float32 array in the HF layout of every trained copy of a saved module
    in `adapters` (with a tied LM head, the trained embedding a second time as `lm_head.weight`)."""
    table, out = saved_table(config), {}
    for path, v in saved_leaves(adapters):
        if path not in table:
            raise ValueError(f"{'.'.join(map(str, path))}: not a parameter of a {config.arch} model")
        key, transposed = table[path]
        x = np.asarray(jax.device_get(v[...]), np.float32)
        out[key] = np.ascontiguousarray(x.T if transposed else x)
    embed = table[("embed", "embedding")][0]
    if config.tie_word_embeddings and embed in out:
        out[LM_HEAD] = out[embed]
    return out


def peft_module_names(config: TransformerConfig, names) -> list[str]:
    """`modules_to_save` as PEFT matches it (name suffixes): the full module path where the bare
    name would also match another module ("norm" -> "model.norm"), and "lm_head" beside a tied embedding."""
    modules = {k.rsplit(".", 1)[0] for k in hf_tensor_shapes(config)} | {"lm_head"}
    out = []
    for name in names:
        path = name if name == "lm_head" else hf_key_prefix(config) + name
        out.append(path if any(m != path and m.endswith(name) for m in modules) else name)
    if config.tie_word_embeddings and any(n in EMBEDDINGS for n in names):
        out.append("lm_head")
    return out


# ----------------------------------------------------------------------------- saving


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def adapter_config(spec: LoraSpec, config: TransformerConfig, targets, base_model_name_or_path: str | None) -> dict:
    """The `adapter_config.json` PEFT writes for `spec` (the fields that `LoraConfig` has had since
    peft 0.9, so older versions load it too; the others take their defaults; `ensure_weight_tying`,
    peft 0.18, only where a tied embedding is trained in full: without it, two equal copies)."""
    saved = peft_module_names(config, spec.modules_to_save)
    tie = {"ensure_weight_tying": True} if "lm_head" in saved and config.tie_word_embeddings else {}
    return {**tie,
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path,
        "bias": "none", "fan_in_fan_out": config.arch == "gpt2", "inference_mode": True,
        "init_lora_weights": True, "layers_pattern": None, "layers_to_transform": None,
        "lora_alpha": _number(spec.alpha), "lora_dropout": float(spec.dropout), "modules_to_save": saved or None,
        "peft_type": "LORA", "r": int(spec.rank), "rank_pattern": {}, "revision": None,
        "target_modules": list(targets), "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False,
    }


def _write(path: str, write) -> None:
    tmp = f"{path}.tmp"
    write(tmp)
    os.replace(tmp, path)


def save_adapter(adapters: nnx.State, spec: LoraSpec, config: TransformerConfig, folder: str,
                 base_model_name_or_path: str | None = None) -> None:
    """Write `adapters` as a PEFT LoRA adapter folder that `peft.PeftModel.from_pretrained` loads on
    the HF base model (weights first, then the config, each through a temporary file and a rename).
    ValueError when `adapters` does not hold exactly `spec`'s targets at rank `spec.rank` and the
    trained copies of `spec.modules_to_save`."""
    tensors = peft_tensors(adapters, config)
    if not tensors:
        raise ValueError(f"{folder}: no LoRA adapters to save (the state holds no lora_a / lora_b)")
    targets = target_names(tensors)
    wanted = tuple(n for n in KNOWN_TARGETS if n in {m for d in resolve_targets(config, spec.target_modules).values()
                                                     for m in d})
    if set(targets) != set(wanted):
        raise ValueError(f"{folder}: the adapters adapt {', '.join(targets)} but model.lora.target_modules "
                         f"asks for {', '.join(wanted)}")
    for key, x in tensors.items():
        rank = x.shape[0] if key.endswith(SUFFIX["lora_a"]) else x.shape[1]
        if rank != spec.rank:
            raise ValueError(f"{folder}: {key} has rank {rank}, model.lora.rank is {spec.rank}")
    want = set(saved_modules(config, spec.modules_to_save).values())
    have = {path[0] for path, _ in saved_leaves(adapters)}
    if have != want:
        raise ValueError(f"{folder}: the state trains {', '.join(sorted(have)) or 'no module'} in full but "
                         f"model.lora.modules_to_save asks for {', '.join(sorted(want)) or 'none'}")
    tensors.update(saved_tensors(adapters, config))
    os.makedirs(folder, exist_ok=True)
    _write(os.path.join(folder, WEIGHTS_FILE), lambda p: save_file(dict(sorted(tensors.items())), p,
                                                                   metadata={"format": "pt"}))
    text = json.dumps(adapter_config(spec, config, targets, base_model_name_or_path), indent=2, sort_keys=True)

    def write_json(p):
        with open(p, "w") as f:
            f.write(text + "\n")

    _write(os.path.join(folder, CONFIG_FILE), write_json)


# ----------------------------------------------------------------------------- loading


def read_adapter_config(folder: str) -> dict:
    """`adapter_config.json` of a PEFT LoRA folder (ValueError naming the file when missing or malformed)."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{folder}: not a PEFT adapter folder (no {CONFIG_FILE})")
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict) or d.get("peft_type") != "LORA":
        got = d.get("peft_type") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path}: peft_type is {got!r}, jaxppo loads 'LORA' adapters only")
    for field, default in UNSUPPORTED.items():
        if d.get(field) not in (None, False, {}, [], "none"):
            raise ValueError(f"{path}: {field}={d[field]!r} is not supported (jaxppo's LoRA needs {default!r})")
    saved = d.get("modules_to_save") or []
    for name in saved if isinstance(saved, list) else [saved]:
        if not isinstance(name, str) or _short(name) not in SAVED_NAMES:
            raise ValueError(f"{path}: modules_to_save {name!r} is not supported (jaxppo trains in full only "
                             f"{', '.join(SAVED_NAMES)})")
    for field in ("r", "lora_alpha"):
        if not isinstance(d.get(field), (int, float)) or isinstance(d.get(field), bool) or d[field] <= 0:
            raise ValueError(f"{path}: {field} must be a positive number, got {d.get(field)!r}")
    return d


def _weights_path(folder: str) -> str:
    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{folder}: no {WEIGHTS_FILE} (a .bin adapter must be converted to safetensors first)")
    return path


def saved_names(f, where: str) -> tuple[str, ...]:
    """`modules_to_save` (`SAVED_NAMES`, that order) of the tensors of open safetensors `f` that are
    not LoRA matrices; "lm_head" left out where it equals a trained embedding (a tied head, PEFT's
    ensure_weight_tying). ValueError naming a tensor of a module jaxppo cannot train in full."""
    names = set()
    for key in f.keys():
        if key.endswith(tuple(SUFFIX.values())):
            continue
        module = key[len(KEY_PREFIX):].rsplit(".", 1)[0] if key.startswith(KEY_PREFIX) else key
        if _short(module) not in SAVED_NAMES:
            hint = " (PEFT matches modules_to_save as suffixes: 'norm' takes every layer's norms)" * \
                module.endswith("norm")
            raise ValueError(f"{where}: {key} is trained in full; jaxppo trains only "
                             f"{', '.join(SAVED_NAMES)} in full{hint}")
        names.add(_short(module))
    embed = [KEY_PREFIX + p + n + ".weight" for p in ("model.", "transformer.") for n in EMBEDDINGS]
    if LM_HEAD in f.keys() and any(k in f.keys() and np.array_equal(f.get_tensor(k), f.get_tensor(LM_HEAD))
                                   for k in embed):
        names.discard("lm_head")
    return tuple(n for n in SAVED_NAMES if n in names)


def spec_from_adapter_config(folder: str) -> LoraSpec:
    """The `LoraSpec` of a PEFT LoRA folder. The targets and modules_to_save are read from the
    tensor names, which also covers `target_modules` written as "all-linear", full module paths or
    a regular expression."""
    d = read_adapter_config(folder)
    with safe_open(_weights_path(folder), framework="numpy") as f:
        targets, saved = target_names(f.keys()), saved_names(f, os.path.join(folder, WEIGHTS_FILE))
    if not targets:
        raise ValueError(f"{os.path.join(folder, WEIGHTS_FILE)}: no lora_A / lora_B tensors")
    return LoraSpec(rank=int(d["r"]), alpha=float(d["lora_alpha"]), dropout=float(d.get("lora_dropout") or 0.0),
                    target_modules=targets, modules_to_save=saved)


def _placed(value: jax.Array, like: Any) -> jax.Array:
    value = jnp.asarray(value, like.dtype)
    sharding = getattr(like, "sharding", None)
    return jax.device_put(value, sharding) if sharding is not None else value


def load_adapter(folder: str, adapters: nnx.State, config: TransformerConfig, *,
                 spec: LoraSpec | None = None) -> nnx.State:
    """`adapters` (the model's LoRA state: the template of shapes, dtypes and shardings) with every
    `lora_a` / `lora_b` and every trained copy of a saved module read from the PEFT folder. ValueError
    naming the folder and the tensor when one is missing, has another shape, or adapts / trains a
    module the state has no place for (or a tied LM head differs from its embedding); with `spec`,
    also when the folder's r / lora_alpha differ from it (the scale lives in the model's graph)."""
    d = read_adapter_config(folder)
    if spec is not None:
        for field, ours in (("r", spec.rank), ("lora_alpha", spec.alpha)):
            if float(d[field]) != float(ours):
                raise ValueError(f"{os.path.join(folder, CONFIG_FILE)}: {field} is {d[field]}, the model's "
                                 f"adapters have {_number(ours)}")
    keys = {path: (key, True) for path, key in peft_keys(adapters, config).items()}
    table = saved_table(config)
    keys.update({path: table[path] for path, _ in saved_leaves(adapters) if path in table})
    flat = []
    # "flax" reads bfloat16 too (NumPy has none); arrays come back as jax arrays
    with safe_open(_weights_path(folder), framework="flax") as f:
        stored = set(f.keys())
        for path, variable in nnx.to_flat_state(adapters):
            key, transposed = keys.get(path, (None, False))
            if key is None:
                flat.append((path, variable))
                continue
            name = ".".join(map(str, path))
            what = name if path[0] in SAVED_TOP else "adapter"
            if key not in stored:
                raise ValueError(f"{folder}: {WEIGHTS_FILE} has no {key} (the model's "
                                 f"{name if what == name else 'adapter ' + name})")
            value, want = f.get_tensor(key), tuple(variable[...].shape)
            value = value.T if transposed else value     # PEFT [r, in] / [out, r] -> ours [in, r] / [r, out]
            if tuple(value.shape) != want:
                hf = (lambda shape: tuple(shape)[::-1]) if transposed else tuple
                raise ValueError(f"{folder}: {key} has shape {hf(value.shape)}, the model's {what} needs {hf(want)}")
            flat.append((path, variable.replace(_placed(value, variable[...]))))
        used = {key for key, _ in keys.values()}
        embed = table[("embed", "embedding")][0]
        if config.tie_word_embeddings and embed in used:
            if LM_HEAD not in stored or not np.array_equal(np.asarray(f.get_tensor(LM_HEAD)),
                                                           np.asarray(f.get_tensor(embed))):
                raise ValueError(f"{folder}: {embed} is trained in full but {LM_HEAD} is "
                                 f"{'not saved' if LM_HEAD not in stored else 'another matrix'}: this "
                                 f"{config.arch} model ties its LM head to it (PEFT: modules_to_save with "
                                 f"'lm_head' and ensure_weight_tying=True)")
            used.add(LM_HEAD)
    lora = tuple(SUFFIX.values())
    extra = sorted(k for k in stored - used if k.endswith(lora))
    if extra:
        adapted = target_names(k for k in used if k.endswith(lora))
        raise ValueError(f"{folder}: {extra[0]} adapts a module the model has no adapter on "
                         f"({len(extra)} such tensors; the model adapts {', '.join(adapted)})")
    extra = sorted(stored - used)
    if extra:
        raise ValueError(f"{folder}: {extra[0]} is trained in full (modules_to_save) but the model's trained "
                         f"state has no place for it (model.lora.modules_to_save)")
    return nnx.from_flat_state(flat)
