"""PEFT adapter folders <-> jaxppo LoRA: parity with PEFT's own outputs (tests/golden/lora_<arch>
and lora_<arch>_saved, with modules_to_save; made with torch + peft by make_lora_golden.py),
save/load round trips, one-line errors, and (when torch and peft are installed) PEFT and
transformers loading what jaxppo writes."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxppo.models.hf import load_model, save_pretrained
from jaxppo.models.lora import LoraSpec, add_lora, merge, merged_params, saved_modules, split_lora
from jaxppo.models.peft import load_adapter, read_adapter_config, save_adapter, spec_from_adapter_config

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden")
TOL = 1e-4  # float32 parity with PEFT / transformers
ARCHS = ["llama", "gpt2"]
forward = nnx.jit(lambda model, ids, mask: model(ids, mask))


def golden(arch, name=None):
    o = np.load(os.path.join(GOLDEN, name or f"lora_{arch}", "outputs.npz"))
    return jnp.asarray(o["input_ids"], jnp.int32), jnp.asarray(o["attention_mask"], jnp.int32), o


def assert_logits(model, arch, expected, atol=TOL):
    ids, mask, _ = golden(arch)
    keep = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(forward(model, ids, mask))[keep], expected[keep], atol=atol, rtol=0)


def lora_model(arch, spec, seed=0):
    return add_lora(load_model(os.path.join(GOLDEN, arch)), spec, rngs=nnx.Rngs(seed))


def with_golden_adapter(arch):
    folder = os.path.join(GOLDEN, f"lora_{arch}")
    spec = spec_from_adapter_config(folder)
    model = lora_model(arch, spec)
    nnx.update(model, load_adapter(folder, nnx.state(model, nnx.LoRAParam), model.config, spec=spec))
    return model, spec


def randomize(model, seed):
    """Every lora_a / lora_b ~ N(0, 0.1^2) (a fresh adapter has B = 0 and would test nothing)."""
    flat = [(p, v.replace(0.1 * jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), v[...].shape)))
            for i, (p, v) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))]
    nnx.update(model, nnx.from_flat_state(flat))


def tensor_shapes(folder):
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), framework="numpy") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}


def merged_model(arch, model):
    """The plain model (no adapters) with `model`'s adapters folded into its kernels."""
    graph, adapters, base = split_lora(model)
    return merged_from(arch, graph, base, adapters)


def merged_from(arch, graph, base, trained):
    plain_graph, _ = nnx.split(load_model(os.path.join(GOLDEN, arch)))
    return nnx.merge(plain_graph, merged_params(graph, base, trained))


def split_saved(arch, spec, seed=0):
    """(config, graph, trained, base) of a LoRA model that also trains `spec.modules_to_save` in full."""
    model = lora_model(arch, spec, seed)
    modules = saved_modules(model.config, spec.modules_to_save).values()
    return (model.config, *split_lora(model, nnx.Any(*(nnx.PathContains(m) for m in modules))))


def golden_saved(arch):
    """PEFT's adapter with modules_to_save loaded: (config, graph, trained, base, spec)."""
    folder = os.path.join(GOLDEN, f"lora_{arch}_saved")
    spec = spec_from_adapter_config(folder)
    config, graph, trained, base = split_saved(arch, spec, seed=1)
    return config, graph, load_adapter(folder, trained, config, spec=spec), base, spec


def noisy(trained, seed):
    """LoRA matrices ~ N(0, 0.1^2), trained copies of saved modules + N(0, 0.1^2)."""
    flat = []
    for i, (p, v) in enumerate(nnx.to_flat_state(trained)):
        noise = 0.1 * jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), v[...].shape)
        flat.append((p, v.replace(noise if type(v) is nnx.LoRAParam else v[...] + noise)))
    return nnx.from_flat_state(flat)


# ----------------------------------------------------------------------------- parity with PEFT


@pytest.mark.parametrize("arch", ARCHS)
def test_golden_adapter_logits_match_peft(arch):
    model, spec = with_golden_adapter(arch)
    targets = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
               "gpt2": ("c_attn", "c_proj", "c_fc")}[arch]
    assert spec == LoraSpec(rank=4, alpha=8.0, dropout=0.0, target_modules=targets)
    assert_logits(model, arch, golden(arch)[2]["logits"])


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_params_match_merge_and_unload_and_export(arch, tmp_path):
    model, _ = with_golden_adapter(arch)
    merged = merged_model(arch, model)
    expected = golden(arch)[2]["merged_logits"]
    assert_logits(merged, arch, expected)
    save_pretrained(merged, None, str(tmp_path))
    assert_logits(load_model(str(tmp_path)), arch, expected)


SAVED = {"llama": (("q_proj", "v_proj"), ("norm", "embed_tokens", "lm_head")),
         "gpt2": (("c_attn",), ("ln_f", "wte", "wpe"))}


@pytest.mark.parametrize("arch", ARCHS)
def test_golden_modules_to_save_match_peft_and_merge_and_unload(arch, tmp_path):
    _, graph, trained, base, spec = golden_saved(arch)
    assert spec == LoraSpec(rank=4, alpha=8.0, target_modules=SAVED[arch][0], modules_to_save=SAVED[arch][1])
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trained)}
    assert {n for n in names if "adapters" not in n} == {
        "llama": {"final_norm.scale", "embed.embedding", "lm_head.kernel"},
        "gpt2": {"final_norm.scale", "final_norm.bias", "embed.embedding", "pos_embed.embedding"}}[arch]
    _, _, out = golden(arch, f"lora_{arch}_saved")
    assert_logits(merge(graph, trained, base), arch, out["logits"])
    merged = merged_from(arch, graph, base, trained)
    assert_logits(merged, arch, out["merged_logits"])
    save_pretrained(merged, None, str(tmp_path))
    assert_logits(load_model(str(tmp_path)), arch, out["merged_logits"])


@pytest.mark.parametrize("arch", ARCHS)
def test_modules_to_save_round_trip_in_peft_names(arch, tmp_path):
    config, _, trained, _, spec = golden_saved(arch)
    save_adapter(trained, spec, config, str(tmp_path), base_model_name_or_path=f"tests/golden/{arch}")
    src = os.path.join(GOLDEN, f"lora_{arch}_saved")
    assert tensor_shapes(str(tmp_path)) == tensor_shapes(src)   # gpt2: the tied lm_head.weight too
    with safe_open(os.path.join(src, "adapter_model.safetensors"), "numpy") as a, \
            safe_open(os.path.join(str(tmp_path), "adapter_model.safetensors"), "numpy") as b:
        for k in a.keys():
            np.testing.assert_array_equal(b.get_tensor(k), a.get_tensor(k))
    cfg = read_adapter_config(str(tmp_path))
    assert cfg["modules_to_save"] == {"llama": ["model.norm", "embed_tokens", "lm_head"],
                                      "gpt2": ["ln_f", "wte", "wpe", "lm_head"]}[arch]
    assert cfg.get("ensure_weight_tying", False) is (arch == "gpt2")
    assert set(cfg) <= set(read_adapter_config(src))
    assert spec_from_adapter_config(str(tmp_path)) == spec
    _, _, fresh, _ = split_saved(arch, spec, seed=2)
    loaded = dict(nnx.to_flat_state(load_adapter(str(tmp_path), fresh, config)))
    for path, v in nnx.to_flat_state(trained):
        assert loaded[path][...].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(loaded[path][...]), np.asarray(v[...]))
    spec = LoraSpec(rank=4, alpha=8.0, target_modules=SAVED[arch][0], modules_to_save=SAVED[arch][1][:1])
    with pytest.raises(ValueError, match=r"the state trains .* in full but model.lora.modules_to_save asks for "
                                         r"final_norm"):
        save_adapter(trained, spec, config, str(tmp_path / "x"))


def copy_with(tmp_path, name, change=None, config=None):
    """A copy of golden folder `name` with tensors changed (`change(tensors)`) or config fields set."""
    folder = tmp_path / name
    shutil.copytree(os.path.join(GOLDEN, name), folder)
    if change is not None:
        path = str(folder / "adapter_model.safetensors")
        with safe_open(path, "numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        change(tensors)
        save_file(tensors, path)
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps({**read_adapter_config(str(folder)), **config}))
    return str(folder)


def test_modules_to_save_that_do_not_fit_are_refused(tmp_path):
    # PEFT's modules_to_save ["norm"] also trains every layer's norms: jaxppo trains the final norm only
    layer_norm = "base_model.model.model.layers.0.input_layernorm.weight"
    folder = copy_with(tmp_path, "lora_llama_saved", lambda t: t.update({layer_norm: np.ones(32, np.float32)}))
    with pytest.raises(ValueError, match=rf"{layer_norm} is trained in full; jaxppo trains only norm, embed_tokens, "
                                         r"lm_head, ln_f, wte, wpe in full \(PEFT matches modules_to_save as"):
        spec_from_adapter_config(folder)
    spec = spec_from_adapter_config(os.path.join(GOLDEN, "lora_llama_saved"))
    config, _, trained, _ = split_saved("llama", spec)
    with pytest.raises(ValueError, match=r"is trained in full \(modules_to_save\) but the model's trained state"):
        load_adapter(folder, trained, config)
    # a model that trains no module in full, or other ones
    config, _, plain, _ = split_saved("llama", LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
    with pytest.raises(ValueError, match=r"lora_llama_saved: base_model.model.lm_head.weight is trained in full"):
        load_adapter(os.path.join(GOLDEN, "lora_llama_saved"), plain, config)
    with pytest.raises(ValueError, match=r"lora_llama: adapter_model.safetensors has no base_model.model.model."
                                         r"norm.weight \(the model's final_norm.scale\)"):
        load_adapter(os.path.join(GOLDEN, "lora_llama"), split_saved("llama", LoraSpec(
            rank=4, alpha=8.0, modules_to_save=("norm",)))[2], config)
    # GPT-2 ties its LM head to wte: the head PEFT saved must be the trained wte
    spec = spec_from_adapter_config(os.path.join(GOLDEN, "lora_gpt2_saved"))
    config, _, trained, _ = split_saved("gpt2", spec)
    untied = copy_with(tmp_path, "lora_gpt2_saved",
                       lambda t: t.update({"base_model.model.lm_head.weight": t["base_model.model.lm_head.weight"] + 1}))
    assert spec_from_adapter_config(untied).modules_to_save == ("lm_head", "ln_f", "wte", "wpe")
    with pytest.raises(ValueError, match=r"transformer.wte.weight is trained in full but base_model.model.lm_head."
                                         r"weight is another matrix: this gpt2 model ties its LM head to it"):
        load_adapter(untied, trained, config)
    with pytest.raises(ValueError, match=r"'lm_head': not a module of this gpt2 model"):
        split_saved("gpt2", spec_from_adapter_config(untied))
    with pytest.raises(ValueError, match=r"modules_to_save 'score' is not supported \(jaxppo trains in full only"):
        read_adapter_config(copy_with(tmp_path / "b", "lora_gpt2_saved", config={"modules_to_save": ["ln_f", "score"]}))


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("arch", ARCHS)
def test_save_then_load_gives_the_same_arrays_and_peft_names(arch, tmp_path):
    model, spec = with_golden_adapter(arch)
    adapters = nnx.state(model, nnx.LoRAParam)
    save_adapter(adapters, spec, model.config, str(tmp_path), base_model_name_or_path=f"tests/golden/{arch}")
    src = os.path.join(GOLDEN, f"lora_{arch}")
    assert tensor_shapes(str(tmp_path)) == tensor_shapes(src)
    with safe_open(os.path.join(src, "adapter_model.safetensors"), "numpy") as a, \
            safe_open(os.path.join(str(tmp_path), "adapter_model.safetensors"), "numpy") as b:
        for k in a.keys():
            assert b.get_tensor(k).dtype == np.float32
            np.testing.assert_array_equal(b.get_tensor(k), a.get_tensor(k))
    ours, theirs = read_adapter_config(str(tmp_path)), read_adapter_config(src)
    assert set(ours) <= set(theirs)                    # only fields PEFT itself writes
    for field in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "fan_in_fan_out",
                  "base_model_name_or_path", "inference_mode", "use_dora", "use_rslora"):
        assert ours[field] == theirs[field], field
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    fresh = lora_model(arch, spec, seed=1)             # other values: the load must replace every one
    loaded = load_adapter(str(tmp_path), nnx.state(fresh, nnx.LoRAParam), fresh.config)
    want = dict(nnx.to_flat_state(adapters))
    got = list(nnx.to_flat_state(loaded))
    assert len(got) == len(want)
    for path, v in got:
        assert type(v) is nnx.LoRAParam and v[...].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(want[path][...]))


def test_all_linear_is_written_as_the_projections_and_a_subset_round_trips(tmp_path):
    spec = LoraSpec(rank=3, alpha=6.0, target_modules=("all-linear",))
    model = lora_model("gpt2", spec)
    save_adapter(nnx.state(model, nnx.LoRAParam), spec, model.config, str(tmp_path / "all"))
    cfg = json.loads((tmp_path / "all" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["c_attn", "c_proj", "c_fc"] and cfg["fan_in_fan_out"] is True
    assert cfg["lora_alpha"] == 6 and cfg["r"] == 3

    spec = LoraSpec(rank=2, alpha=5.0, dropout=0.1, target_modules=("v_proj", "k_proj", "up_proj"))
    model = lora_model("llama", spec)
    randomize(model, 3)
    save_adapter(nnx.state(model, nnx.LoRAParam), spec, model.config, str(tmp_path / "some"))
    back = spec_from_adapter_config(str(tmp_path / "some"))
    assert back == LoraSpec(rank=2, alpha=5.0, dropout=0.1, target_modules=("k_proj", "v_proj", "up_proj"))
    assert sorted({k.split(".")[-3] for k in tensor_shapes(str(tmp_path / "some"))}) == ["k_proj", "up_proj",
                                                                                         "v_proj"]
    assert not [f for f in os.listdir(tmp_path / "some") if f.endswith(".tmp")]
    other = lora_model("llama", back, seed=5)
    nnx.update(other, load_adapter(str(tmp_path / "some"), nnx.state(other, nnx.LoRAParam), other.config))
    ids, mask, _ = golden("llama")
    np.testing.assert_array_equal(np.asarray(forward(other, ids, mask)), np.asarray(forward(model, ids, mask)))


# ----------------------------------------------------------------------------- errors


def test_an_adapter_that_does_not_fit_is_refused_naming_the_tensor(tmp_path):
    folder = os.path.join(GOLDEN, "lora_llama")
    model = lora_model("llama", LoraSpec(rank=8, alpha=8.0))
    state = nnx.state(model, nnx.LoRAParam)
    with pytest.raises(ValueError, match=r"lora_llama: base_model\.model\.model\.layers\.0\.self_attn\.o_proj"
                                         r"\.lora_A\.weight has shape \(4, 32\), the model's adapter needs \(8, 32\)"):
        load_adapter(folder, state, model.config)
    model = lora_model("llama", LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
    with pytest.raises(ValueError, match=r"lora_llama: base_model.model.model.layers.0.mlp.down_proj.lora_A.weight "
                                         r"adapts a module the model has no adapter on \(20 such tensors; the model "
                                         r"adapts q_proj, v_proj\)"):
        load_adapter(folder, nnx.state(model, nnx.LoRAParam), model.config)
    with pytest.raises(ValueError, match=r"adapter_config.json: lora_alpha is 8, the model's adapters have 16"):
        load_adapter(folder, nnx.state(model, nnx.LoRAParam), model.config, spec=LoraSpec(rank=4, alpha=16.0))

    model = lora_model("llama", LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "o_proj")))
    short = tmp_path / "short"
    save_adapter(nnx.state(model, nnx.LoRAParam), LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj",
                                                                                              "o_proj")),
                 model.config, str(short))
    wide = lora_model("llama", LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "o_proj", "up_proj")))
    with pytest.raises(ValueError, match=r"short: adapter_model.safetensors has no base_model.model.model.layers.0"
                                         r".mlp.up_proj.lora_A.weight"):
        load_adapter(str(short), nnx.state(wide, nnx.LoRAParam), wide.config)
    with pytest.raises(ValueError, match=r"the adapters adapt q_proj, o_proj but model.lora.target_modules asks "
                                         r"for q_proj, o_proj, up_proj"):
        save_adapter(nnx.state(model, nnx.LoRAParam), LoraSpec(rank=4, target_modules=("q_proj", "o_proj",
                                                                                       "up_proj")),
                     model.config, str(tmp_path / "x"))


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, r"use_dora=True is not supported"),
    ({"rank_pattern": {"q_proj": 8}}, r"rank_pattern=\{'q_proj': 8\} is not supported"),
    ({"peft_type": "IA3"}, r"peft_type is 'IA3', jaxppo loads 'LORA' adapters only"),
    ({"r": 0}, r"r must be a positive number, got 0"),
])
def test_unsupported_peft_configs_are_refused_by_field(tmp_path, change, message):
    d = read_adapter_config(os.path.join(GOLDEN, "lora_gpt2"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({**d, **change}))
    with pytest.raises(ValueError, match=message):
        spec_from_adapter_config(str(tmp_path))
    with pytest.raises(ValueError, match=r"not a PEFT adapter folder \(no adapter_config.json\)"):
        spec_from_adapter_config(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- PEFT and transformers load ours


def peft_logits(arch, folder, ids, mask, merged=None):
    """Logits of PEFT's model of the adapter `folder` on the golden base, and of the HF folder `merged`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t_ids, t_mask = torch.from_numpy(np.asarray(ids, np.int64)), torch.from_numpy(np.asarray(mask, np.int64))
    positions = (t_mask.cumsum(-1) - 1).clamp(min=0)
    base = AutoModelForCausalLM.from_pretrained(os.path.join(GOLDEN, arch), dtype=torch.float32)
    models = [PeftModel.from_pretrained(base, folder).eval()]
    if merged is not None:
        models.append(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval())
    with torch.no_grad():
        return [m(input_ids=t_ids, attention_mask=t_mask, position_ids=positions).logits.numpy() for m in models]


@pytest.mark.parametrize("arch, targets, saved", [("llama", ("o_proj",), ("norm", "lm_head")),
                                                  ("gpt2", ("c_fc",), ("wte", "ln_f"))])
def test_peft_loads_modules_to_save_that_jaxppo_writes(arch, targets, saved, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    spec = LoraSpec(rank=2, alpha=4.0, target_modules=targets, modules_to_save=saved)
    config, graph, trained, base = split_saved(arch, spec)
    trained = noisy(trained, 11)
    save_adapter(trained, spec, config, str(tmp_path / "adapter"), base_model_name_or_path=os.path.join(GOLDEN, arch))
    save_pretrained(merged_from(arch, graph, base, trained), None, str(tmp_path / "merged"))
    ids, mask, _ = golden(arch)
    ours = np.asarray(forward(merge(graph, trained, base), ids, mask))
    keep = np.asarray(mask, bool)
    for theirs in peft_logits(arch, str(tmp_path / "adapter"), ids, mask, str(tmp_path / "merged")):
        np.testing.assert_allclose(theirs[keep], ours[keep], atol=TOL, rtol=0)


@pytest.mark.parametrize("arch, targets", [("llama", ("k_proj", "v_proj", "o_proj", "up_proj")),
                                           ("gpt2", ("all-linear",))])
def test_peft_and_transformers_load_what_jaxppo_writes(arch, targets, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    spec = LoraSpec(rank=4, alpha=12.0, target_modules=targets)
    model = lora_model(arch, spec)
    randomize(model, 7)
    save_adapter(nnx.state(model, nnx.LoRAParam), spec, model.config, str(tmp_path / "adapter"),
                 base_model_name_or_path=os.path.join(GOLDEN, arch))
    save_pretrained(merged_model(arch, model), None, str(tmp_path / "merged"))
    ids, mask, _ = golden(arch)
    ours = np.asarray(forward(model, ids, mask))
    t_ids, t_mask = torch.from_numpy(np.asarray(ids, np.int64)), torch.from_numpy(np.asarray(mask, np.int64))
    positions = (t_mask.cumsum(-1) - 1).clamp(min=0)
    base = AutoModelForCausalLM.from_pretrained(os.path.join(GOLDEN, arch), dtype=torch.float32)
    for hf in (peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval(),
               AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()):
        with torch.no_grad():
            theirs = hf(input_ids=t_ids, attention_mask=t_mask, position_ids=positions).logits.numpy()
        keep = np.asarray(mask, bool)
        np.testing.assert_allclose(theirs[keep], ours[keep], atol=TOL, rtol=0)
