"""LoRA adapters on the transformer (jaxppo.models.lora): a fresh adapter changes nothing, each HF
projection's adapter writes only its columns of a fused kernel, merging equals the adapted model,
dropout acts only with a key, unknown targets are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import left_padded_batch, small_model
from jaxppo.models import lora
from jaxppo.models.layers import Adapters


def randomized(adapters, seed=1, scale=0.1):
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fresh_adapters_change_nothing_and_merging_equals_the_adapted_model(arch):
    ids, mask = left_padded_batch()
    model = small_model(arch=arch)
    base_graph, _ = nnx.split(model)
    before = model(ids, mask)
    lora.add_lora(model, lora.LoraSpec(rank=4, alpha=8), rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(np.asarray(model(ids, mask)), np.asarray(before))   # B = 0
    graph, adapters, base = lora.split_lora(model)
    assert all(isinstance(v, nnx.LoRAParam) for v in jax.tree.leaves(adapters, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    adapters = randomized(adapters)
    adapted = nnx.merge(graph, base, adapters)(ids, mask)
    assert float(jnp.abs(adapted - before).max()) > 1e-2
    merged = lora.merged_params(graph, base, adapters)
    np.testing.assert_allclose(np.asarray(nnx.merge(base_graph, merged)(ids, mask)), np.asarray(adapted), atol=2e-5)
    # the base itself is untouched: the reference (base graph + base params) is the original model
    np.testing.assert_array_equal(np.asarray(nnx.merge(base_graph, base)(ids, mask)), np.asarray(before))


def test_each_projection_writes_only_its_columns_of_the_fused_kernel():
    model = small_model(arch="llama")
    c = model.config
    lora.add_lora(model, lora.LoraSpec(rank=2, alpha=2, target_modules=("k_proj", "up_proj")), rngs=nnx.Rngs(0))
    graph, adapters, base = lora.split_lora(model)
    merged = lora.merged_params(graph, base, randomized(adapters))
    q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    for i in range(c.num_layers):
        qkv = np.asarray(merged["layers"][i]["attn"]["qkv"]["kernel"][...]) - np.asarray(base["layers"][i]["attn"]["qkv"]["kernel"][...])
        assert np.all(qkv[:, :q] == 0) and np.all(qkv[:, q + kv:] == 0) and np.any(qkv[:, q:q + kv] != 0)
        fc_in = np.asarray(merged["layers"][i]["mlp"]["fc_in"]["kernel"][...]) - np.asarray(base["layers"][i]["mlp"]["fc_in"]["kernel"][...])
        assert np.all(fc_in[:, :inter] == 0) and np.any(fc_in[:, inter:] != 0)
        out = np.asarray(merged["layers"][i]["attn"]["out"]["kernel"][...]) - np.asarray(base["layers"][i]["attn"]["out"]["kernel"][...])
        assert np.all(out == 0)                                            # o_proj not targeted


def test_all_linear_targets_every_projection_and_unknown_names_are_refused():
    c = small_model(arch="gpt2").config
    targets = lora.resolve_targets(c, ("all-linear",))
    assert targets == {"attn.qkv": {"c_attn": None}, "attn.out": {"c_proj": None}, "mlp.fc_out": {"c_proj": None},
                       "mlp.fc_in": {"c_fc": None}}
    with pytest.raises(ValueError, match="'q_proj'.*c_attn, c_proj, c_fc"):
        lora.resolve_targets(c, ("q_proj",))


def test_dropout_acts_only_with_a_key_and_differs_per_key():
    ids, mask = left_padded_batch()
    model = small_model(arch="llama")
    lora.add_lora(model, lora.LoraSpec(rank=4, alpha=8, dropout=0.5), rngs=nnx.Rngs(1))
    graph, adapters, base = lora.split_lora(model)
    adapters = randomized(adapters)

    @jax.jit
    def forward(adapters, key):
        m = nnx.merge(graph, base, adapters)
        if key is not None:
            lora.set_dropout_key(m, key)
        return m(ids, mask)

    plain = forward(adapters, None)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(nnx.merge(graph, base, adapters)(ids, mask)), atol=1e-6)
    a, b = forward(adapters, jax.random.key(0)), forward(adapters, jax.random.key(1))
    assert float(jnp.abs(a - plain).max()) > 1e-3 and float(jnp.abs(a - b).max()) > 1e-3
    # the keys are per adapter: no two modules draw the same mask
    m = nnx.merge(graph, base, adapters)
    lora.set_dropout_key(m, jax.random.key(0))
    keys = [jax.random.key_data(mod.key).tolist() for _, mod in nnx.iter_graph(m) if isinstance(mod, Adapters)]
    assert len(keys) == 4 * m.config.num_layers and len({str(k) for k in keys}) == len(keys)


def test_modules_to_save_train_a_copy_and_the_reference_keeps_the_original():
    ids, mask = left_padded_batch()
    model = small_model(arch="llama")
    base_graph, _ = nnx.split(model)
    before = model(ids, mask)
    lora.add_lora(model, lora.LoraSpec(rank=2, alpha=2, modules_to_save=("norm",)), rngs=nnx.Rngs(0))
    extra = nnx.PathContains(lora.saved_modules(model.config, ("norm",))["norm"])
    graph, trained, base = lora.split_lora(model, trained_extra=extra)
    assert "final_norm" in trained and "final_norm" in base
    trained["final_norm"]["scale"].set_value(trained["final_norm"]["scale"][...] * 3.0)
    adapted = lora.merge(graph, trained, base)(ids, mask)
    assert float(jnp.abs(adapted - before).max()) > 1e-2                      # the trained copy is used
    np.testing.assert_array_equal(np.asarray(nnx.merge(base_graph, base)(ids, mask)), np.asarray(before))
    merged = nnx.merge(base_graph, lora.merged_params(graph, base, trained))(ids, mask)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(adapted), atol=2e-5)
    grads = jax.grad(lambda t: lora.merge(graph, t, base)(ids, mask).sum())(trained)
    assert float(jnp.abs(grads["final_norm"]["scale"][...]).sum()) > 0
    with pytest.raises(ValueError, match="'ln_f'.*embed_tokens, norm"):
        lora.saved_modules(model.config, ("ln_f",))
