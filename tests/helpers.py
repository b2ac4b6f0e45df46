"""Small models and batches shared by the tests (random init, no files)."""

import numpy as np
from flax import nnx

from jaxppo.models.transformer import Transformer, TransformerConfig


def small_config(arch="llama", vocab=97):
    return TransformerConfig(
        arch=arch, model_type="llama" if arch == "llama" else "gpt2", vocab_size=vocab, hidden_size=32,
        num_layers=2, num_heads=4, num_kv_heads=2 if arch == "llama" else 4, head_dim=8,
        intermediate_size=64, max_position_embeddings=64, norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling=None, qkv_bias=False, tie_word_embeddings=False,
        activation="silu" if arch == "llama" else "gelu_new", bos_token_id=0, eos_token_id=3, pad_token_id=1)


def small_model(seed=0, arch="llama", head="lm"):
    return Transformer(small_config(arch), head=head, rngs=nnx.Rngs(seed))


def left_padded_batch(B=3, P=6, vocab=97, seed=0):
    """ids [B, P] with row b left-padded by b % P pad tokens (id 1)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab, size=(B, P)).astype(np.int32)
    mask = np.ones((B, P), np.int32)
    for b in range(B):
        pad = b % P
        ids[b, :pad] = 1
        mask[b, :pad] = 0
    return ids, mask
