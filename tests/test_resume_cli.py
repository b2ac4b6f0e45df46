"""Issue 5's acceptance run: a config-file run on a tiny Llama policy + tiny reward model,
SIGKILLed after a checkpoint and resumed with --resume, gives the metrics of a run that was
never interrupted; the run directory is complete.

Then the run folder (issue 22): `--resume` reads the run's own config.yaml and records allowed
changes beside it, refuses the others; one run per folder (`--overwrite`, the lock); a reward
error and SIGTERM during the final evaluation leave a checkpoint that `--resume` continues."""

import importlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from jaxppo.run.logger import read_metrics
from jaxppo.train import main

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


# ------------------------------------------------------------------------------ one run per folder
# In-process runs (`main([...])`) with the shapes of tests/test_cli.py, so the compiled programs are shared.

FAST = ["model.tiny_arch=gpt2", "train.batch_size=4", "rollout.max_new_tokens=8", "ppo.epochs=2",
        "ppo.num_minibatches=2", "logging.progress_bar=false", "logging.tensorboard=false",
        "data.max_prompt_length=24", "train.eval_batch_size=4", "optim.lr=1e-3"]
MOD = "jaxppo_resume_rewards"
REWARD_SOURCE = """
import os, signal

CALLS = {"n": 0}
RAISE_AT = None        # the call that raises
SIGNAL_AT = None       # the call that sends SIGTERM to this process

def counted(prompts, responses):
    CALLS["n"] += 1
    if CALLS["n"] == RAISE_AT:
        raise RuntimeError("the scoring service is down")
    if CALLS["n"] == SIGNAL_AT:
        os.kill(os.getpid(), signal.SIGTERM)
    return [float(len(r) % 5) for r in responses]
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from jaxppo.data.tasks import demo_prompts
    root = tmp_path_factory.mktemp("folders")
    (root / "prompts.txt").write_text("\n".join(demo_prompts(24, seed=1)) + "\n")
    (root / f"{MOD}.py").write_text(REWARD_SOURCE)
    return root


@pytest.fixture
def rewards(root, monkeypatch):
    monkeypatch.syspath_prepend(str(root))
    module = importlib.import_module(MOD)
    monkeypatch.setattr(module, "RAISE_AT", None)
    monkeypatch.setattr(module, "SIGNAL_AT", None)
    module.CALLS["n"] = 0
    return module


def run_args(root, run, *extra):
    return [f"train.output_dir={run}", f"data.prompts={root / 'prompts.txt'}", *FAST, *extra]


@pytest.fixture(scope="module")
def finished(root):
    """A finished 2-step run with evaluation (the built-in task's reward)."""
    run = root / "finished"
    assert main(run_args(root, run, "train.total_steps=2")) == 0
    return run


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(capsys, argv, *words):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in out + err, (rc, out, err)
    for word in words:
        assert str(word) in errors[0], (word, errors[0])
    return errors[0]


def train_steps(run):
    return [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]


def test_resume_reads_the_runs_config_and_records_an_allowed_change(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    config_yaml = (run / "config.yaml").read_bytes()
    (run / ".lock").write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname()}))   # stale
    # no --config and none of the run's settings: they come from its config.yaml
    assert main(["--output-dir", str(run), "--resume", "train.total_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "removing the stale lock" in out and "resumed from step 2" in out
    assert "changed on resume: " in out and "train.total_steps 2 -> 3" in out
    assert train_steps(run) == [1, 2, 3]
    assert (run / "config.yaml").read_bytes() == config_yaml          # the original is kept
    changes = [json.loads(line) for line in (run / "overrides.jsonl").read_text().splitlines()]
    assert len(changes) == 1 and changes[0]["step"] == 2
    assert changes[0]["changes"]["train.total_steps"] == {"from": 2, "to": 3}
    assert not (run / ".lock").exists()
    from jaxppo.run.runfolder import saved_config
    assert saved_config(run).train.total_steps == 3 and saved_config(run).train.batch_size == 4


def test_resume_refuses_a_change_that_breaks_the_run(finished, capsys):
    before = snapshot(finished)
    one_error(capsys, ["--output-dir", finished, "--resume", "ppo.kl_coef=0.1", "optim.lr=1e-4", "train.total_steps=5"],
              "refusing to resume", "ppo.kl_coef: run has 0.05, given 0.1", "optim.lr: run has 0.001, given 0.0001")
    assert snapshot(finished) == before


def test_a_live_lock_refuses_a_second_process(finished, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (finished / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        one_error(capsys, ["--output-dir", finished, "--resume"], f"in use by process {sleeper.pid}")
        one_error(capsys, run_args(finished.parent, finished), f"in use by process {sleeper.pid}")
    finally:
        sleeper.kill()
        sleeper.wait()
        (finished / ".lock").unlink()


def test_a_second_fresh_run_is_refused_and_overwrite_moves_the_first_aside(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = snapshot(run)
    one_error(capsys, run_args(finished.parent, run, "train.total_steps=1"), "already holds a run", "--resume",
              "--overwrite", "another --output-dir")
    assert snapshot(run) == before                                    # byte for byte
    assert main([*run_args(finished.parent, run, "train.total_steps=1"), "--overwrite"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before
    assert train_steps(run) == [1]
    assert "--overwrite: moved the previous run" in (run / "train.log").read_text()


def test_a_reward_error_leaves_a_checkpoint_of_the_last_step_then_resume_continues(root, tmp_path, capsys, rewards):
    run = tmp_path / "run"
    rewards.RAISE_AT = 3                                               # the third step's scoring
    argv = run_args(root, run, "train.total_steps=4", "data.eval_fraction=0", "reward.task=null",
                    f"reward.functions=[{MOD}:counted]")
    one_error(capsys, argv, "the scoring service is down")
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2]
    assert "stopping on RewardError: saved checkpoint at step 2" in (run / "train.log").read_text()
    rewards.RAISE_AT = None
    assert main(["--output-dir", str(run), "--resume"]) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    assert train_steps(run) == [1, 2, 3, 4]


def test_sigterm_during_the_final_evaluation_saves_and_resume_finishes(root, tmp_path, capsys, rewards):
    run = tmp_path / "run"
    rewards.SIGNAL_AT = 3                                              # steps 1, 2, then the final evaluation
    argv = run_args(root, run, "train.total_steps=2", "reward.task=null", f"reward.functions=[{MOD}:counted]")
    assert main(argv) == 143
    out = capsys.readouterr().out
    assert "received signal SIGTERM: saved checkpoint at step 2" in out
    assert (run / "checkpoints" / "2").is_dir() and not (run / "final_model").exists()
    rewards.SIGNAL_AT = None
    assert main(["--output-dir", str(run), "--resume"]) == 0
    assert (run / "final_model" / "model.safetensors").exists()
    evals = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "eval"]
    assert evals == [2] and rewards.CALLS["n"] == 3                   # the evaluation was not repeated
