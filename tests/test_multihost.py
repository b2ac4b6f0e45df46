"""Two JAX processes on 127.0.0.1 (CPU, one device each, `jax.distributed` with a local
coordinator) train like one process with two devices and the same global batch: the same metrics
and evaluations, with a reward function on decoded text, for PPO and for GRPO with dynamic
sampling. Only process 0 writes the logs, the config and final_model; both take part in the
checkpoints, which restore."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

REWARDS = "jaxppo_multihost_rewards"   # a user's reward module, written to a temporary folder

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from jaxppo.config import load_config
    from jaxppo.run.trainer import PPOTrainer
    out_dir, prompts = sys.argv[1], sys.argv[2]
    cfg = load_config(None, [
        "train.total_steps=2", "train.batch_size=8", "rollout.max_new_tokens=8", "ppo.epochs=2",
        "ppo.num_minibatches=1", "logging.progress_bar=false", "logging.tensorboard=false",
        "data.max_prompt_length=24", "data.eval_fraction=0.25", "train.eval_every=1", f"data.prompts={prompts}",
        "optim.lr=1e-3", f"train.output_dir={out_dir}", "train.placement=colocated",
        "reward.functions=[REWARDS:letters]"])
    t = PPOTrainer(cfg)
    t.train()
    from jaxppo.run.checkpoint import Checkpointer
    with Checkpointer(f"{out_dir}/checkpoints", read_only=True) as ck:    # every process restores
        restored, host = ck.restore(None, t.state)
    same = all(bool((a == b).all()) and a.sharding == b.sharding
               for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(t.state)))
    evals = [json.loads(l) for l in open(f"{out_dir}/metrics.jsonl") if '"eval"' in l]
    print("RESULT " + json.dumps({"processes": jax.process_count(), "process": jax.process_index(),
                                  "devices": jax.device_count(), "history": t.history, "restored_same": same,
                                  "restored_step": int(restored.step), "evals": evals}), flush=True)
""").replace("REWARDS", REWARDS)

# GRPO with DAPO's dynamic sampling: 4 prompts x G = 4, a reward that is flat for the groups of odd-length
# prompts, so that groups are dropped and the batch is filled over several sampling rounds
GRPO_SCRIPT = SCRIPT.replace('"train.batch_size=8", ', "").replace(
    '"reward.functions=[', '"algo.advantage=grpo", "rollout.num_generations=4", "train.batch_size=4", '
    '"algo.filter_groups=true", "reward.task=null", "reward.functions=[').replace(":letters]", ":letters_if_even]")

REWARD_SOURCE = textwrap.dedent("""
    def letters(prompts, responses):
        return [sum(c.isalpha() for c in r) / 8.0 for r in responses]

    def letters_if_even(prompts, responses):
        return [0.0 if len(p) % 2 else sum(c.isalpha() for c in r) / 8.0 for p, r in zip(prompts, responses)]
""")

KEYS = ["objective/scores", "objective/kl", "objective/entropy", "loss/policy_avg", "loss/value_avg",
        "policy/approxkl_avg", "val/ratio", "objective/rlhf_reward", "val/grad_norm", "policy/grad_norm"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def result(text: str) -> dict:
    line = [l for l in text.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def start(tmp_path, out_dir, name, script=SCRIPT, **env):
    from jaxppo.data.tasks import demo_prompts
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(demo_prompts(16, seed=3)) + "\n")
    (tmp_path / f"{REWARDS}.py").write_text(REWARD_SOURCE)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]), **env)
    with open(tmp_path / f"{name}.out", "w") as log:       # a file, not a pipe: no process waits on a full one
        proc = subprocess.Popen([sys.executable, "-c", script, str(out_dir), str(prompts)],
                                stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    return proc, tmp_path / f"{name}.out"


def finish(procs):
    """Wait for every process (at most 600 s; the others are stopped as soon as one fails, as it
    would leave them waiting on a collective); the outputs, or a failure with their tails."""
    deadline = time.monotonic() + 600
    try:
        # a process that raised may wait for the others at JAX's shutdown barrier: its traceback ends the wait
        while time.monotonic() < deadline and any(p.poll() is None for p, _ in procs) \
                and not any(p.poll() or "Traceback (most recent" in path.read_text() for p, path in procs):
            time.sleep(0.5)
        time.sleep(1)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [f"{path.name} exited with {proc.returncode} (-9: stopped here):\n{path.read_text()[-3000:]}"
              for proc, path in procs if proc.returncode != 0]
    assert not failed, "\n".join(failed)
    return [result(path.read_text()) for _, path in procs]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    multi_dir = tmp_path / "two-processes"
    procs = [start(tmp_path, multi_dir, f"process{i}", JAXPPO_DISTRIBUTED="1", JAXPPO_COORDINATOR_ADDRESS=address,
                   JAXPPO_NUM_PROCESSES="2", JAXPPO_PROCESS_ID=str(i), JAXPPO_COMPILATION_CACHE="0",
                   XLA_FLAGS="--xla_force_host_platform_device_count=1") for i in range(2)]
    p0, p1 = finish(procs)
    one, = finish([start(tmp_path, tmp_path / "one-process", "single",
                         XLA_FLAGS="--xla_force_host_platform_device_count=2")])
    assert (p0["processes"], p0["process"], p0["devices"]) == (2, 0, 2)
    assert (p1["processes"], p1["process"], p1["devices"]) == (2, 1, 2)
    assert (one["processes"], one["devices"]) == (1, 2)
    # the same global batch over the same 2-device mesh: the same metrics, on both processes
    assert len(p0["history"]) == len(p1["history"]) == len(one["history"]) == 2
    for a, b, c in zip(one["history"], p0["history"], p1["history"]):
        assert b["objective/scores"] == c["objective/scores"]
        for k in KEYS:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-3, atol=1e-5, err_msg=f"step {a['step']} {k}")
            np.testing.assert_allclose(c[k], a[k], rtol=1e-3, atol=1e-5, err_msg=f"step {a['step']} {k}")
    # evaluation on: logged once (by process 0) per step, equal to the single process's
    assert [r["step"] for r in p0["evals"]] == [r["step"] for r in one["evals"]] == [1, 2]
    for a, b in zip(one["evals"], p0["evals"]):
        for k in ("objective/scores", "objective/kl", "response_length"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-3, atol=1e-5, err_msg=f"eval step {a['step']} {k}")
    # only process 0 wrote: the same files as the single run, each row once; the lock released
    assert sorted(os.listdir(multi_dir)) == sorted(os.listdir(tmp_path / "one-process"))
    rows = lambda d: (d / "metrics.jsonl").read_text().splitlines()
    assert len(rows(multi_dir)) == len(rows(tmp_path / "one-process"))
    assert len([l for l in rows(multi_dir) if '"train"' in l]) == 2
    assert not (multi_dir / ".lock").exists()
    assert (multi_dir / "final_model" / "model.safetensors").is_file()
    assert (multi_dir / "config.yaml").is_file() and (multi_dir / "train.log").is_file()
    # the exported policy (FSDP shards gathered from both processes) is the single run's
    from safetensors.numpy import load_file
    a, b = load_file(tmp_path / "one-process" / "final_model" / "model.safetensors"), \
        load_file(multi_dir / "final_model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-3, atol=5e-3, err_msg=k)
    # the checkpoint (written by both processes through orbax) restores on both, onto the live shardings
    assert p0["restored_same"] and p1["restored_same"] and p0["restored_step"] == p1["restored_step"] == 2


@pytest.mark.slow
def test_grpo_with_dynamic_sampling_on_two_processes_trains_like_one(tmp_path):
    """Group sampling, dropped groups and a batch filled over several rounds (rows gathered from
    both processes' devices) give the single process's metrics and evaluations."""
    address = f"127.0.0.1:{free_port()}"
    procs = [start(tmp_path, tmp_path / "two-processes", f"process{i}", GRPO_SCRIPT, JAXPPO_DISTRIBUTED="1",
                   JAXPPO_COORDINATOR_ADDRESS=address, JAXPPO_NUM_PROCESSES="2", JAXPPO_PROCESS_ID=str(i),
                   JAXPPO_COMPILATION_CACHE="0", XLA_FLAGS="--xla_force_host_platform_device_count=1")
             for i in range(2)]
    p0, p1 = finish(procs)
    one, = finish([start(tmp_path, tmp_path / "one-process", "single", GRPO_SCRIPT,
                         XLA_FLAGS="--xla_force_host_platform_device_count=2")])
    assert len(one["history"]) == len(p0["history"]) == len(p1["history"]) == 2
    assert any(h["sampling/rounds"] > 1 for h in one["history"])          # groups were dropped and resampled
    keys = ["sampling/rounds", "sampling/groups_with_signal_frac", "objective/scores", "objective/kl",
            "loss/policy_avg", "val/ratio", "policy/grad_norm", "reward_std"]
    for a, b, c in zip(one["history"], p0["history"], p1["history"]):
        assert "loss/value_avg" not in a            # no critic
        for k in keys:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-3, atol=1e-5, err_msg=f"step {a['step']} {k}")
            np.testing.assert_allclose(c[k], a[k], rtol=1e-3, atol=1e-5, err_msg=f"step {a['step']} {k}")
    for a, b in zip(one["evals"], p0["evals"]):
        np.testing.assert_allclose(b["objective/scores"], a["objective/scores"], rtol=1e-3, atol=1e-5)
    assert p0["restored_same"] and p1["restored_same"]
