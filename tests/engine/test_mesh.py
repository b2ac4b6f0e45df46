"""Mesh and partition rules; the same run on 1 and 8 (virtual CPU) devices gives the same metrics."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxppo.engine.mesh import FSDP, make_mesh, spec_for

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from jaxppo.config import load_config
    from jaxppo.run.trainer import PPOTrainer
    from jaxppo.engine.mesh import path_str
    out_dir, prompts, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg = load_config(None, [
        "train.total_steps=2", "train.batch_size=8", "rollout.max_new_tokens=8", "ppo.epochs=2",
        "ppo.num_minibatches=1", "logging.progress_bar=false", "logging.tensorboard=false",
        "data.max_prompt_length=24", "data.eval_fraction=0.25", "train.eval_every=1", f"data.prompts={prompts}",
        "optim.lr=1e-3", f"train.output_dir={out_dir}", *overrides])
    t = PPOTrainer(cfg)
    t.train()
    specs = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(t.state.policy)[0]:
        specs[path_str(path)] = str(leaf.sharding.spec)
    # the final checkpoint restores onto the same shardings, equal to the live state
    from jaxppo.run.checkpoint import Checkpointer
    with Checkpointer(f"{out_dir}/checkpoints", read_only=True) as ck:
        restored, _ = ck.restore(None, t.state)
        step = ck.latest_step()
    same = all(bool((a == b).all()) and a.sharding == b.sharding
               for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(t.state)))
    layout = json.load(open(f"{out_dir}/checkpoints/{step}/layout/metadata"))["leaves"]
    alone = sorted(e["name"] for e in layout if "group" not in e)
    evals = [json.loads(l) for l in open(f"{out_dir}/metrics.jsonl") if '"eval"' in l]
    devices = lambda tree: sorted({d.id for x in jax.tree.leaves(tree) for d in x.sharding.device_set})
    print("RESULT " + json.dumps({"devices": jax.device_count(), "history": t.history, "specs": specs,
                                  "policy_devices": devices((t.state.policy, t.state.policy_opt)),
                                  "critic_devices": devices((t.state.critic, t.state.critic_opt)),
                                  "restored_same": same, "stored_alone": alone, "evals": evals,
                                  "eval_compiles": t.programs.evaluate._cache_size()}))
""")


def run_on(n_devices, tmp_path, *overrides):
    from jaxppo.data.tasks import demo_prompts
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(demo_prompts(16, seed=3)) + "\n")
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}")
    name = "-".join([f"run{n_devices}", *overrides]).replace("=", "_")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / name), str(prompts), *overrides],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_spec_rules():
    assert spec_for("layers.0.attn.qkv.kernel.value", (64, 192), 8) == P(None, FSDP)
    assert spec_for("layers.0.mlp.fc_out.kernel.value", (256, 64), 8) == P(FSDP, None)
    assert spec_for("embed.embedding.value", (512, 64), 8) == P(FSDP, None)
    assert spec_for("embed.embedding.value", (97, 64), 8) == P()          # not divisible: replicated
    assert spec_for("layers.0.attn_norm.scale.value", (64,), 8) == P()
    assert spec_for("0.mu.lm_head.kernel.value", (64, 512), 8) == P(None, FSDP)   # Adam moments follow params
    assert spec_for("step", (), 8) == P()


def test_make_mesh_sizes():
    mesh = make_mesh()
    assert mesh.devices.size == jax.device_count()
    with pytest.raises(ValueError, match="does not use"):
        make_mesh(data=3, fsdp=5)


def test_placement_rules():
    from jaxppo.config import check_devices, load_config
    from jaxppo.errors import ConfigError
    from jaxppo.engine.mesh import resolve_placement

    assert resolve_placement("auto", 2, "cpu") == resolve_placement("auto", 8, "cpu") == "separate"
    for n, platform, procs in [(1, "cpu", 1), (3, "cpu", 1), (8, "gpu", 1), (2, "cpu", 2)]:
        assert resolve_placement("auto", n, platform, procs) == "colocated", (n, platform, procs)
    assert resolve_placement("colocated", 2, "cpu") == "colocated"
    assert resolve_placement("separate", 4, "gpu") == "separate"
    separate = load_config(None, ["train.placement=separate"])
    with pytest.raises(ConfigError, match="even number of devices >= 2, found 1"):
        check_devices(separate, 1, "cpu")
    with pytest.raises(ConfigError, match="not supported across 2 processes"):
        check_devices(separate, 4, "gpu", 2)
    check_devices(separate, 4, "gpu")                     # 2 + 2: batch 16 splits over each half
    with pytest.raises(ConfigError, match="1 device\\(s\\) per model"):
        check_devices(load_config(None, ["train.mesh_data=2", "train.mesh_fsdp=1"]), 2, "cpu")


@pytest.mark.slow
def test_one_vs_eight_devices_same_metrics(tmp_path):
    one = run_on(1, tmp_path)
    eight = run_on(8, tmp_path)        # placement auto on a CPU: policy on devices 0-3, critic on 4-7
    assert one["devices"] == 1 and eight["devices"] == 8
    assert one["policy_devices"] == one["critic_devices"] == [0]
    assert eight["policy_devices"] == [0, 1, 2, 3] and eight["critic_devices"] == [4, 5, 6, 7]
    # the parameters really are sharded on 8 devices
    assert "fsdp" in eight["specs"]["layers.0.attn.qkv.kernel.value"]
    assert "fsdp" in eight["specs"]["embed.embedding.value"]
    assert all("fsdp" not in s for s in one["specs"].values())
    # checkpoints: sharded leaves are stored one by one, replicated small ones packed; both restore
    assert one["restored_same"] and eight["restored_same"]
    assert one["stored_alone"] == []
    assert "policy.layers.0.attn.qkv.kernel.value" in eight["stored_alone"]
    # evaluation (in the background, on a copy of the sharded policy): one compile, same values
    assert one["eval_compiles"] == 1 and eight["eval_compiles"] == 1
    assert [r["step"] for r in one["evals"]] == [r["step"] for r in eight["evals"]] == [1, 2]
    for a, b in zip(one["evals"], eight["evals"]):
        for k in ("objective/scores", "objective/kl", "response_length"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-3, atol=1e-5, err_msg=f"eval step {a['step']} {k}")
    keys = ["objective/scores", "objective/kl", "objective/entropy", "loss/policy_avg", "loss/value_avg",
            "policy/approxkl_avg", "val/ratio", "objective/rlhf_reward"]
    for a, b in zip(one["history"], eight["history"]):
        for k in keys:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-3, atol=1e-5, err_msg=f"step {a['step']} {k}")


@pytest.mark.slow
def test_separate_placement_equals_colocated(tmp_path):
    """Two devices: the critic and its optimiser state on device 1 (separate) or every leaf split
    over both (colocated, FSDP): same metrics and evaluations, and each run's checkpoint restores
    onto its own shardings."""
    sep = run_on(2, tmp_path, "train.placement=separate")
    col = run_on(2, tmp_path, "train.placement=colocated")
    assert sep["policy_devices"] == [0] and sep["critic_devices"] == [1]
    assert col["policy_devices"] == col["critic_devices"] == [0, 1]
    assert sep["restored_same"] and col["restored_same"]
    assert sep["eval_compiles"] == col["eval_compiles"] == 1
    keys = ["objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "val/grad_norm",
            "policy/grad_norm", "val/mean_values", "objective/rlhf_reward", "nonfinite_steps"]
    assert len(sep["history"]) == len(col["history"]) == 2
    for a, b in zip(col["history"], sep["history"]):
        for k in keys:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=f"step {a['step']} {k}")
    for a, b in zip(col["evals"], sep["evals"]):
        np.testing.assert_allclose(b["objective/scores"], a["objective/scores"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_grpo_on_one_and_eight_devices_gives_the_same_metrics(tmp_path):
    """A critic-free run (GRPO, 2 samples per prompt, the KL in the loss): no critic anywhere, the
    policy FSDP-sharded over all 8 devices, and the same metrics as on one device."""
    grpo = ["algo.advantage=grpo", "rollout.num_generations=2", "ppo.kl_in=loss", "ppo.kl_coef=0.04"]
    one = run_on(1, tmp_path, *grpo)
    eight = run_on(8, tmp_path, *grpo)
    assert one["critic_devices"] == eight["critic_devices"] == []            # no critic, no value memory
    assert eight["policy_devices"] == list(range(8))                          # colocated: every device
    assert "fsdp" in eight["specs"]["layers.0.attn.qkv.kernel.value"]
    assert one["restored_same"] and eight["restored_same"]
    keys = ["objective/scores", "reward", "reward_std", "frac_reward_zero_std", "kl", "loss/policy_avg",
            "policy/kl_avg", "policy/approxkl_avg", "entropy", "completions/mean_length"]
    for a, b in zip(one["history"], eight["history"]):
        assert "loss/value_avg" not in a and "val/mean_values" not in a
        for k in keys:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-3, atol=1e-5, err_msg=f"step {a['step']} {k}")
    for a, b in zip(one["evals"], eight["evals"]):
        np.testing.assert_allclose(b["objective/scores"], a["objective/scores"], rtol=1e-3, atol=1e-5)
