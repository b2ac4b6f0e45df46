"""LoRA on the transformer: which Hugging Face projections get adapters, putting them on a model,
and folding them back into its kernels.

    spec = LoraSpec(rank=8, alpha=16, target_modules=("q_proj", "v_proj"))
    add_lora(model, spec, rngs=nnx.Rngs(0))         # in place: Dense layers gain `Adapters`
    graph, adapters, base = split_lora(model)       # trained (float32 LoRAParams) / frozen
    merged = merged_params(graph, base, adapters)   # the plain model's params, W + scale * A B

Target names are PEFT's (the module names of the HF checkpoint): `q_proj k_proj v_proj o_proj
gate_proj up_proj down_proj` for the Llama family, `c_attn c_proj c_fc` for GPT-2 (`c_proj`
names both the attention output and the MLP's down projection there, as in PEFT), or
`all-linear` (every projection of every block; never the LM head). Our fused kernels hold several
HF projections side by side (`qkv` = q | k | v, `fc_in` = gate | up); each projection gets its own
adapter over its column range, so the adapters are PEFT's, one to one (`jaxppo.models.peft`).

Scale = alpha / rank (PEFT's default, not rsLoRA). A is initialised as PEFT does (uniform in
+-1/sqrt(in)), B at zero, so a fresh adapter leaves the model unchanged. The base model is the
model without adapters: the reference policy of a LoRA run is the same base parameters merged
into the graph the adapters were added to (`base_graph` of `split_lora`'s model before it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxppo.models.arch import TransformerConfig
from jaxppo.models.layers import Adapters, Dense

ALL_LINEAR = "all-linear"
# the HF names this module knows, per architecture family ("llama" covers Mistral and Qwen2):
# the projections that take adapters (PEFT's target_modules), in a fixed order, and the modules
# that can be trained in full (PEFT's modules_to_save) -> our top-level module
PROJECTIONS = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
               "gpt2": ("c_attn", "c_proj", "c_fc")}
SAVED_MODULES = {"llama": {"embed_tokens": "embed", "norm": "final_norm", "lm_head": "lm_head"},
                 "gpt2": {"wte": "embed", "wpe": "pos_embed", "ln_f": "final_norm", "lm_head": "lm_head"}}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What `model.lora` asks for (hashable)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    modules_to_save: tuple[str, ...] = ()     # HF modules trained in full besides the adapters (PEFT's name)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def projections(c: TransformerConfig) -> dict[str, list[tuple[str, tuple[int, int] | None]]]:
    """HF projection name -> [(our Dense's path inside a block, its output columns or None = all)]."""
    if c.arch == "gpt2":     # c_attn, c_proj (attention output and MLP down), c_fc
        places = [[("attn.qkv", None)], [("attn.out", None), ("mlp.fc_out", None)], [("mlp.fc_in", None)]]
    else:                    # q, k, v, o, gate, up, down
        q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
        places = [[("attn.qkv", (0, q))], [("attn.qkv", (q, q + kv))], [("attn.qkv", (q + kv, q + 2 * kv))],
                  [("attn.out", None)], [("mlp.fc_in", (0, inter))], [("mlp.fc_in", (inter, 2 * inter))],
                  [("mlp.fc_out", None)]]
    return dict(zip(PROJECTIONS[family(c)], places, strict=True))


def family(c: TransformerConfig) -> str:
    """The key of `PROJECTIONS` / `SAVED_MODULES` for a config."""
    return "gpt2" if c.arch == "gpt2" else "llama"


def hf_module(c: TransformerConfig, layer: int, dense_path: str, name: str) -> str:
    """The HF module path of projection `name` on our `dense_path` in block `layer`
    ("model.layers.0.self_attn.q_proj", "transformer.h.0.mlp.c_proj")."""
    part = dense_path.split(".")[0]
    if c.arch == "gpt2":
        return f"transformer.h.{layer}.{part}.{name}"
    return f"model.layers.{layer}.{'self_attn' if part == 'attn' else 'mlp'}.{name}"


def resolve_targets(c: TransformerConfig, target_modules) -> dict[str, dict[str, tuple[int, int] | None]]:
    """Our Dense path inside a block -> {HF projection name: columns} for `target_modules`
    (ValueError naming an unknown target and the valid ones)."""
    table = projections(c)
    names = list(table) if ALL_LINEAR in target_modules else list(target_modules)
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        raise ValueError(f"model.lora.target_modules: {', '.join(map(repr, unknown)) or 'empty'}: not a "
                         f"projection of a {c.arch} model; expected some of {', '.join(table)} or {ALL_LINEAR!r}")
    out: dict[str, dict] = {}
    for name in dict.fromkeys(names):
        for path, cols in table[name]:
            out.setdefault(path, {})[name] = cols
    return out


def _dense(block, path: str) -> Dense:
    for attr in path.split("."):
        block = getattr(block, attr)
    return block


def add_lora(model, spec: LoraSpec, *, rngs: nnx.Rngs):
    """Put adapters on `model`'s targeted Dense layers (in place; returns the model). Adapter
    weights are float32 whatever the model's dtypes; they compute in its compute dtype."""
    c = model.config
    targets = resolve_targets(c, spec.target_modules)
    for block in model.layers:
        for path, names in targets.items():
            dense = _dense(block, path)
            width = dense.out_features
            slices = {n: (0, width) if cols is None else cols for n, cols in names.items()}
            dense.adapters = Adapters(dense.in_features, width, slices, rank=spec.rank, scale=spec.scale,
                                      rate=spec.dropout, dtype=model.dtype, rngs=rngs)
    return model


def saved_modules(c: TransformerConfig, names) -> dict[str, str]:
    """HF module name -> our top-level module for `modules_to_save` (PEFT's option: modules trained
    in full beside the adapters: the final norm, the embeddings, an untied LM head). ValueError
    naming an unknown one."""
    table = {name: ours for name, ours in SAVED_MODULES[family(c)].items()
             if name != "lm_head" or not c.tie_word_embeddings}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"model.lora.modules_to_save: {', '.join(map(repr, unknown))}: not a module of this "
                         f"{c.arch} model that can be trained in full; expected some of {', '.join(table)}")
    return {n: table[n] for n in names}


def split_lora(model, trained_extra=None):
    """(graph, trained, base): the LoRA parameters (and the parameters `trained_extra`, an NNX filter,
    selects: a critic's fresh `score` head, the `modules_to_save`) as float32 trained copies, and the
    whole base (frozen, its own copy of those modules included: the reference keeps them as they were).
    `merge(graph, trained, base)` puts them back together."""
    trained_filter = nnx.LoRAParam if trained_extra is None else nnx.Any(nnx.LoRAParam, trained_extra)
    graph, _, base = nnx.split(model, nnx.LoRAParam, ...)
    # copies, never the base's buffers: the update donates the trained ones
    trained = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), nnx.state(model, trained_filter))
    return graph, trained, base


def merge(graph, trained, base=None):
    """The model of `trained` params (with LoRA: merged with their frozen `base`, whose own copies of
    trained modules give way to the trained ones). Trace-time only: no arrays are copied."""
    if base is None:
        return nnx.merge(graph, trained)
    taken = {path for path, _ in nnx.to_flat_state(trained)}
    rest = nnx.from_flat_state([(path, v) for path, v in nnx.to_flat_state(base) if path not in taken])
    return nnx.merge(graph, rest, trained)


def set_dropout_key(model, key) -> None:
    """Turn LoRA dropout on for this (merged, traced) model: every `Adapters` gets its own key
    folded from `key`. Call it on the training forward's model only."""
    i = 0
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Adapters) and module.rate > 0:
            module.key = jax.random.fold_in(key, i)
            i += 1


def merged_params(lora_graph, base, adapters, dtype=jnp.float32):
    """The base model's parameters with every adapter folded in (`W[:, cols] += scale * A B`,
    computed in float32 and stored in `dtype`): an `nnx.State` for the graph without adapters."""
    copy = lambda tree: jax.tree.map(lambda x: x, tree)    # new Variables: `base` itself stays as it is
    model = merge(lora_graph, copy(adapters), copy(base))
    out = {}
    for path, dense in nnx.iter_graph(model):
        if isinstance(dense, Dense) and dense.adapters is not None:
            a = dense.adapters
            kernel = dense.kernel[...].astype(jnp.float32)
            for name, (start, stop) in a.slices:
                lora = a.parts[name]
                delta = a.scale * (lora.lora_a[...].astype(jnp.float32) @ lora.lora_b[...].astype(jnp.float32))
                kernel = kernel.at[:, start:stop].add(delta)
            out[path] = kernel.astype(dtype)
    for path, dense in nnx.iter_graph(model):
        if isinstance(dense, Dense) and dense.adapters is not None:
            dense.kernel.set_value(out[path])
            dense.adapters = None
    _, params = nnx.split(model)
    return params


def strip_lora(model) -> None:
    """Remove every adapter from `model` in place (the base model)."""
    for _, dense in nnx.iter_graph(model):
        if isinstance(dense, Dense):
            dense.adapters = None
