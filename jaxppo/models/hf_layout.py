"""The parameter table: each NNX parameter of a `Transformer` and the HF tensors (names, shapes) it is made of.

Reading and writing weights (`jaxppo.models.hf_weights`) and the tiny random checkpoints
(`jaxppo.models.tiny`, through `iter_hf_tensor_specs`) all walk this one table, `param_table`.
Layout: our fused kernels are `[in, out]`; HF `nn.Linear` weights are `[out, in]` (transposed,
q/k/v and gate/up concatenated along `out`); GPT-2 `Conv1D` weights are already `[in, out]`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from jaxppo.models.transformer import TransformerConfig


@dataclasses.dataclass(frozen=True)
class ParamEntry:
    """One NNX parameter and the HF tensors it is made of.

    kind "linear": HF `[out_i, in]` parts, ours = concat(part.T, axis=1) -> `[in, sum out_i]`.
    kind "copy":   HF parts concatenated along axis 0 (embeddings, Conv1D `[in, out]`, norms, biases).
    """

    path: str  # NNX state path, e.g. "layers.0.attn.qkv.kernel"
    kind: str
    parts: tuple[tuple[str, tuple[int, ...]], ...]  # (HF key, HF shape)


def hf_key_prefix(config: TransformerConfig) -> str:
    """The prefix transformers writes before the backbone's tensor names."""
    return "transformer." if config.arch == "gpt2" else "model."


def param_table(c: TransformerConfig, head: str, prefix: str) -> list[ParamEntry]:
    """Every parameter of a model with the given config and head, with its HF tensors under the
    key prefix `prefix` (`hf_key_prefix`, or "" for checkpoints written without one)."""
    e = []

    def add(path, kind, *parts):
        e.append(ParamEntry(path, kind, tuple(parts)))

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
    if head == "lm" and not c.tie_word_embeddings:
        add("lm_head.kernel", "linear", ("lm_head.weight", (v, h)))
    if head == "scalar":
        add("score.kernel", "linear", ("score.weight", (1, h)))
    return e


def hf_tensor_shapes(config: TransformerConfig, head: str = "lm") -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, as transformers' *ForCausalLM / *ForSequenceClassification saves it."""
    return {k: s for entry in param_table(config, head, hf_key_prefix(config)) for k, s in entry.parts}


def iter_hf_tensor_specs(config: TransformerConfig, head: str = "lm") -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(HF key, shape, role) for every tensor a folder of this config holds, in a fixed order;
    role is "norm" (ones), "bias" (zeros) or "weight" (random). Used by `jaxppo.models.tiny`."""
    for entry in param_table(config, head, hf_key_prefix(config)):
        role = "norm" if entry.path.endswith(".scale") else ("bias" if entry.path.endswith(".bias") else "weight")
        for key, shape in entry.parts:
            yield key, shape, role
