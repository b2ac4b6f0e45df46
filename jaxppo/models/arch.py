"""`TransformerConfig`: the frozen, hashable architecture of a decoder-only LM, and the tables it checks against.

`arch` picks the family ("gpt2" or "llama", which covers Llama 2/3, Mistral and Qwen2);
`__post_init__` fills the derived defaults (`num_kv_heads`, `head_dim`, `intermediate_size`,
`model_type`) and validates every field by name. `ACTIVATIONS` maps HF activation names to JAX
functions (used by the MLP in `jaxppo.models.blocks`). Being hashable, a config can be a static
jit argument; `jaxppo.models.hf_config` converts HF config.json to and from it.
"""

from __future__ import annotations

import dataclasses

import jax

ARCHS = ("gpt2", "llama")
MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama"}
ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}
ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Architecture of a decoder-only LM. Hashable, so it can be a static jit argument."""

    arch: str  # "gpt2" | "llama" (the llama family: llama, mistral, qwen2)
    model_type: str = ""  # HF model_type: "gpt2" | "llama" | "mistral" | "qwen2"; "" -> arch
    vocab_size: int  # rows of the embedding / logits width; may exceed the tokenizer's vocab
    hidden_size: int  # residual stream width H
    num_layers: int  # transformer blocks
    num_heads: int  # query heads Hq
    num_kv_heads: int = 0  # key/value heads Hkv (grouped-query attention); 0 -> num_heads
    head_dim: int = 0  # D; 0 -> hidden_size // num_heads
    intermediate_size: int = 0  # MLP width I; 0 -> 4 * hidden_size
    max_position_embeddings: int = 1024  # learned positions (gpt2) / nominal context (llama)
    norm_eps: float = 1e-5  # LayerNorm / RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base (llama family)
    rope_scaling: tuple | None = None  # sorted (key, value) items of HF rope_scaling; None = plain RoPE
    qkv_bias: bool = False  # bias on q, k, v (gpt2, qwen2, llama attention_bias)
    o_bias: bool = False  # bias on the attention output projection (gpt2, llama attention_bias)
    mlp_bias: bool = False  # bias on the MLP projections (gpt2, llama mlp_bias)
    tie_word_embeddings: bool = False  # lm head reuses the token embedding
    activation: str = "gelu_new"  # MLP activation (HF name); llama family gates it (SwiGLU)
    bos_token_id: int | None = None
    eos_token_id: int | tuple | None = None
    pad_token_id: int | None = None
    hf_config: str | None = dataclasses.field(default=None, compare=False, repr=False)
    # ^ the original config.json text, kept so save_pretrained writes back every HF field

    def __post_init__(self):
        def fix(name, value):
            object.__setattr__(self, name, value)

        if self.arch not in ARCHS:
            raise ValueError(f"TransformerConfig.arch: got {self.arch!r}, expected one of {ARCHS}")
        if not self.model_type:
            fix("model_type", self.arch)
        if self.model_type not in MODEL_TYPES or MODEL_TYPES[self.model_type] != self.arch:
            raise ValueError(
                f"TransformerConfig.model_type: {self.model_type!r} does not fit arch {self.arch!r} "
                f"(supported: {sorted(MODEL_TYPES)})"
            )
        if not self.num_kv_heads:
            fix("num_kv_heads", self.num_heads)
        if not self.head_dim:
            fix("head_dim", self.hidden_size // self.num_heads)
        if not self.intermediate_size:
            fix("intermediate_size", 4 * self.hidden_size)
        if isinstance(self.eos_token_id, list):
            fix("eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, dict):
            fix("rope_scaling", tuple(sorted(self.rope_scaling.items())))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TransformerConfig.{name}: must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"TransformerConfig.num_kv_heads: {self.num_kv_heads} does not divide num_heads {self.num_heads}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"TransformerConfig.activation: {self.activation!r} unsupported (supported: {sorted(ACTIVATIONS)})"
            )
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"TransformerConfig.head_dim: RoPE needs an even head_dim, got {self.head_dim}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"TransformerConfig.rope_scaling: rope_type {self.rope_type!r} unsupported "
                f"(supported: {ROPE_TYPES})"
            )

    @property
    def rope_type(self) -> str:
        params = dict(self.rope_scaling or ())
        return params.get("rope_type", params.get("type")) or "default"

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head G."""
        return self.num_heads // self.num_kv_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)
