"""LoRA runs (issue 25): only adapters train, the reference is the base with them off, checkpoints
hold the adapters, resume is exact and refuses a changed base, the exports load, every estimator
and FSDP over the frozen base work."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxppo import PPOConfig, PPOTrainer
from jaxppo.config import load_config
from jaxppo.errors import ConfigError
from jaxppo.models import hf
from jaxppo.models.peft import load_adapter
from jaxppo.run.logger import read_metrics

FAST = ["model.tiny_arch=llama", "train.batch_size=4", "rollout.max_new_tokens=8", "ppo.epochs=2",
        "ppo.num_minibatches=2", "logging.progress_bar=false", "logging.tensorboard=false",
        "data.max_prompt_length=24", "train.eval_batch_size=4", "optim.lr=1e-2", "data.eval_fraction=0.1",
        "model.lora.rank=4"]


def config(tmp_path, *extra) -> PPOConfig:
    return load_config(None, [f"train.output_dir={tmp_path}", *FAST, *extra])


def leaf_names(tree):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time") and k != "tokens_per_sec"} for r in rows]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step LoRA run (PPO, critic full) saved every step."""
    run = tmp_path_factory.mktemp("lora") / "run"
    trainer = PPOTrainer(load_config(None, [f"train.output_dir={run}", *FAST, "train.total_steps=3",
                                            "train.save_every=1"]))
    before = jax.tree.map(np.asarray, (trainer.state.policy, trainer.frozen.ref))
    summary = trainer.train()
    return trainer, before, summary, run


def test_only_adapters_train_and_the_base_is_the_reference(trained):
    trainer, (adapters0, base0), summary, _ = trained
    names = leaf_names(trainer.state.policy)
    assert names and all("adapters" in n and ("lora_a" in n or "lora_b" in n) for n in names)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainer.state.policy))
    # Adam state for the adapters only: as many moments as adapter leaves
    opt_sizes = sum(x.size for x in jax.tree.leaves(trainer.state.policy_opt) if x.ndim)
    adapter_size = sum(x.size for x in jax.tree.leaves(trainer.state.policy))
    assert adapter_size <= opt_sizes <= 2 * adapter_size + 64
    # the base (= the reference) never moves; the adapters do (B starts at zero and leaves it)
    for a, b in zip(jax.tree.leaves(base0), jax.tree.leaves(trainer.frozen.ref)):
        np.testing.assert_array_equal(a, np.asarray(b))
    moved = [not np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree.leaves(adapters0), jax.tree.leaves(trainer.state.policy))]
    assert all(moved)
    # no second copy of the weights: the reference graph is the base model's and there is no ref model
    assert trainer.models.graphs.lora and trainer.models.lora.rank == 4
    ref = nnx.merge(trainer.models.graphs.ref, trainer.frozen.ref)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(ref, nnx.LoRAParam))) == 0
    rows = read_metrics(trained[3] / "metrics.jsonl")
    first = [r for r in rows if r["split"] == "train"][0]
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-6)      # fresh B = 0: policy == reference


def test_checkpoints_hold_adapters_and_the_exports_load(trained):
    trainer, _, _, run = trained
    layout = json.loads(next((run / "checkpoints" / "3").glob("layout/*")).read_text()) \
        if (run / "checkpoints" / "3" / "layout").is_dir() else None
    state_bytes = sum(p.stat().st_size for p in (run / "checkpoints" / "3").rglob("*") if p.is_file())
    base_bytes = (run / "final_model" / "model.safetensors").stat().st_size
    critic_bytes = 4 * sum(x.size for x in jax.tree.leaves((trainer.state.critic, trainer.state.critic_opt)))
    assert state_bytes < critic_bytes + base_bytes / 2, (state_bytes, critic_bytes, base_bytes)
    if layout is not None:
        assert not any(e["name"].startswith("policy.") and "adapters" not in e["name"] for e in layout["leaves"])
    # final_model: the merged weights; transformers' layout, logits of the adapted policy
    ids = jnp.asarray([[5, 6, 7, 8, 9, 10]], jnp.int32)
    merged, _ = hf.load_causal_lm(str(run / "final_model"))
    policy = nnx.merge(trainer.models.graphs.policy, trainer.frozen.ref, trainer.state.policy)
    np.testing.assert_allclose(np.asarray(merged(ids)), np.asarray(policy(ids)), atol=1e-4)
    # final_adapter: PEFT's format, reading back the trained adapters exactly
    loaded = load_adapter(str(run / "final_adapter"), trainer.state.policy, trainer.models.policy_config)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(trainer.state.policy)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_from_a_checkpoint_is_exact(trained, tmp_path):
    _, _, _, run = trained
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'b'}", *FAST, "train.total_steps=3", "train.save_every=1"])
    shutil.copytree(run / "checkpoints" / "1", tmp_path / "ck1" / "checkpoints" / "1")
    resumed = PPOTrainer(cfg, resume_from_checkpoint=str(tmp_path / "ck1" / "checkpoints" / "1"))
    resumed.train()
    a = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train" and r["step"] > 1]
    b = [r for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["split"] == "train"]
    assert strip(a) == strip(b)



def test_the_base_is_named_by_a_fingerprint_of_its_weights(tmp_path):
    from jaxppo.run.rundir import fingerprint

    base = tmp_path / "base"
    shutil.copytree("tests/golden/llama", base)
    cfg = config(tmp_path, f"model.policy={base}")
    model = hf.load_model(str(base))
    want = fingerprint(cfg, model.config, None, str(base))
    assert want["lora"]["rank"] == 4 and want["base_weights"] == hf.weights_fingerprint(str(base))
    assert "base_weights" not in fingerprint(cfg, model.config, None)        # full fine-tuning: the weights are saved
    assert fingerprint(cfg, model.config, None, str(base), str(base))["critic_base_weights"] == want["base_weights"]
    data = bytearray((base / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF                                                       # one weight changes
    (base / "model.safetensors").write_bytes(bytes(data))
    assert fingerprint(cfg, model.config, None, str(base))["base_weights"] != want["base_weights"]


@pytest.mark.parametrize("extra", [
    ["algo.advantage=grpo", "rollout.num_generations=2", "train.batch_size=2", "model.lora.dropout=0.1"],
    ["algo.advantage=rloo", "rollout.num_generations=2", "train.batch_size=2", "train.mesh_fsdp=2",
     "model.ref_dtype=bfloat16"],
    ["model.lora.critic=true", "model.lora.target_modules=[q_proj,v_proj]", "model.lora.modules_to_save=[norm]"],
], ids=["grpo-dropout", "rloo-fsdp-bf16-base", "ppo-lora-critic"])
def test_lora_with_the_estimators_fsdp_and_a_lora_critic(tmp_path, extra):
    trainer = PPOTrainer(config(tmp_path, "train.total_steps=2", "data.eval_fraction=0", *extra))
    summary = trainer.train()
    assert summary["steps"] == 2
    names = leaf_names(trainer.state.policy)
    assert names and all("adapters" in n or "final_norm" in n for n in names)
    if "model.lora.critic=true" in extra:
        critic = leaf_names(trainer.state.critic)
        assert all("adapters" in n or "score" in n for n in critic) and any("score" in n for n in critic)
        assert all(("q_proj" in n or "v_proj" in n) for n in names if "adapters" in n)
        assert any("final_norm" in n for n in names)
        assert trainer.frozen.critic_base is not None
        # the critic's frozen backbone (here the policy's folder) is named by its weights too
        assert trainer.run_dir.fingerprint["critic_base_weights"] == trainer.run_dir.fingerprint["base_weights"]
    if "train.mesh_fsdp=2" in extra:
        kernel = trainer.frozen.ref["layers"][0]["mlp"]["fc_in"]["kernel"]
        assert kernel.dtype == jnp.bfloat16 and not kernel.sharding.is_fully_replicated


def test_a_target_the_model_lacks_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model.lora.target_modules.*c_attn"):
        PPOTrainer(config(tmp_path, "model.lora.target_modules=[c_attn]"))
