"""HF weights <-> `Transformer`: safetensors (single or sharded) read tensor by tensor into NNX
parameters (`load_model`), and the parameters written back as HF tensors (`to_hf_tensors`).

No torch: tensors are read with `safetensors.safe_open(framework="numpy")` (bf16 through the
"flax" framework, since NumPy has no bfloat16). Both directions walk `hf_layout.param_table`.
`load_model` (no tokenizer) is re-exported by `jaxppo.models.hf`, whose `load_causal_lm` /
`load_reward_model` / `load_backbone_with_fresh_head` wrap it and whose `save_pretrained` writes
`to_hf_tensors`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxppo.models.hf_config import ModelLoadError, config_from_hf, read_config
from jaxppo.models.hf_layout import ParamEntry, hf_key_prefix, param_table
from jaxppo.models.transformer import Transformer


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


def _np_dtype(dtype: Any) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(jnp.dtype(dtype))


def _assemble(entry: ParamEntry, tensors: _Tensors, dtype: np.dtype) -> np.ndarray:
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
    d = read_config(path)
    cfg_path = os.path.join(path, "config.json")
    config = config_from_hf(d, source=cfg_path)
    param_dtype = dtype if param_dtype is None else param_dtype
    if head == "scalar" and not fresh_head:
        labels = d.get("num_labels", len(d["id2label"]) if isinstance(d.get("id2label"), dict) else 1)
        if labels != 1:
            raise ModelLoadError(f"{cfg_path}: a reward/value model needs num_labels=1, got {labels}")
    tensors = _Tensors(path)
    # transformers writes "transformer." / "model." prefixes; some old checkpoints have none
    prefix, embed = hf_key_prefix(config), ("wte.weight" if config.arch == "gpt2" else "embed_tokens.weight")
    if prefix + embed not in tensors and embed in tensors:
        prefix = ""
    entries = param_table(config, head, prefix)
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


def to_hf_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """The model's parameters as HF tensors (torch layout); tied LM heads are not written, as HF does."""
    config = model.config
    params = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out = {}
    for entry in param_table(config, model.head, hf_key_prefix(config)):
        a = np.asarray(jax.device_get(params[entry.path]))
        axis = 1 if entry.kind == "linear" else 0
        sizes = np.cumsum([shape[0] for _, shape in entry.parts])[:-1]
        for (key, shape), part in zip(entry.parts, np.split(a, sizes, axis=axis)):
            out[key] = np.ascontiguousarray(part.T if entry.kind == "linear" else part)
            assert out[key].shape == shape, (key, out[key].shape, shape)
    return out


def weights_fingerprint(folder: str, samples: int = 16, chunk: int = 1 << 16) -> str:
    """A hash of a folder's safetensors files that changes when the weights do: every file's name,
    size and header (tensor names, dtypes, shapes) and `samples` chunks of its bytes spread over
    it. Reads ~1 MB per file whatever its size (a LoRA checkpoint names its base by this)."""
    import hashlib

    digest = hashlib.sha256()
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    for name in files:
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        digest.update(f"{name}:{size}".encode())
        with open(path, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header, size)))
            for i in range(samples):
                f.seek((size - chunk) * i // max(samples - 1, 1) if size > chunk else 0)
                digest.update(f.read(chunk))
    return digest.hexdigest()[:16]
