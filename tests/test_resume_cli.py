"""Issue 5's acceptance run: a config-file run on a tiny Llama policy + tiny reward model,
SIGKILLed after a checkpoint and resumed with --resume, gives the metrics of a run that was
never interrupted; the run directory is complete."""

import json
import signal
import subprocess
import sys
import time

import pytest

from jaxppo.run.logger import read_metrics

CONFIG = """
model: {policy: tiny, tiny_arch: llama, reward_model: tiny, critic_init: reward_model}
data: {prompts: PROMPTS, eval_fraction: 0.2, max_prompt_length: 24}
reward: {task: null, normalize: true}
rollout: {max_new_tokens: 8}
ppo: {epochs: 2, num_minibatches: 2}
optim: {lr: 1.0e-3, schedule: cosine, warmup_steps: 2}
train: {total_steps: 6, batch_size: 4, eval_every: 3, save_every: 2, eval_batch_size: 4}
logging: {progress_bar: false}
"""

TIME_KEYS = ("time", "time/rollout", "time/update", "time/iteration", "tokens_per_sec")


def write_config(tmp_path):
    from jaxppo.data.tasks import demo_prompts
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in demo_prompts(20, seed=5)))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG.replace("PROMPTS", str(prompts)))
    return cfg


def cli(*args):
    return [sys.executable, "-m", "jaxppo.train", *args]


def strip(rows):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(tmp_path):
    cfg = write_config(tmp_path)
    straight = subprocess.run(cli("--config", str(cfg), "--output-dir", str(tmp_path / "a")),
                              capture_output=True, text=True, timeout=900)
    assert straight.returncode == 0, straight.stderr[-2000:]

    run_b = tmp_path / "b"
    proc = subprocess.Popen(cli("--config", str(cfg), "--output-dir", str(run_b)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    # the all-digit step folder appears when orbax renames the finished save into place (its
    # commit_success.txt, which orbax 0.12.8 writes just before the rename, 0.12.0 never writes)
    while not (run_b / "checkpoints" / "2").is_dir():
        assert proc.poll() is None, "run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(cli("--config", str(cfg), "--output-dir", str(run_b), "--resume"),
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a = read_metrics(tmp_path / "a" / "metrics.jsonl")
    b = read_metrics(run_b / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in b] == [(r["step"], r["split"]) for r in a]
    assert strip(a) == strip(b)
    for name in ("config.yaml", "train.log", "samples.jsonl", "tensorboard", "plots/overview.png",
                 "final_model/model.safetensors", "final_model/tokenizer.json"):
        assert (run_b / name).exists(), name
    assert "resumed from step" in (run_b / "train.log").read_text()
