"""The command line on bad input: one `error: ...` line naming the culprit, exit code 2, no traceback,
nothing written to the run directory; and SIGTERM: a checkpoint, exit 143, `--resume` finishes the run.

Bad input is run in-process (`main([...])` + capsys) and fails before anything is compiled; one
subprocess shows what a terminal gets. Only the reward-function tests and the SIGTERM test
generate (they share the compiled programs of tests/test_trainer.py through the XLA cache).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxppo.config import load_config
from jaxppo.models.tiny import make_tiny
from jaxppo.data.tasks import demo_prompts, score_responses
from jaxppo.train import main
from jaxppo.errors import RewardError
from jaxppo.run.models import tiny_model_dir

# the shapes of tests/test_trainer.py, so that the compiled programs are shared
FAST = ["model.tiny_arch=gpt2", "train.batch_size=4", "rollout.max_new_tokens=8", "ppo.epochs=2",
        "ppo.num_minibatches=2", "logging.progress_bar=false", "logging.tensorboard=false",
        "data.max_prompt_length=24", "train.eval_batch_size=4", "optim.lr=1e-3"]
REWARDS = "jaxppo_cli_rewards"   # a user's reward module, written to a temporary folder

REWARD_SOURCE = textwrap.dedent("""
    import os, time

    CULPRIT = None   # the prompt the picky functions fail on

    def picky(prompts, responses):
        for p in prompts:
            if p == CULPRIT:
                raise ValueError("cannot score this one\\n(second line of the message)")
        return [0.5] * len(prompts)

    def nan_for_culprit(prompts, responses):
        return [float("nan") if p == CULPRIT else 0.5 for p in prompts]

    def slow(prompts, responses):   # paces the SIGTERM run: SLOW_REWARD seconds per step
        time.sleep(float(os.environ.get("SLOW_REWARD", "0")))
        return [float(len(r) % 5) for r in responses]
""")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Prompt files, a reward module, and model folders (good ones and broken copies)."""
    root = tmp_path_factory.mktemp("cli")
    prompts = demo_prompts(24, seed=1)
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (root / "empty.txt").write_text("\n\n")
    (root / "bad.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog"\n')
    (root / "nofield.jsonl").write_text('{"prompt": "a cat"}\n{"text": "a dog"}\n')
    long_prompts = ["a cat", "the dog", "a bird sings", " ".join(["word"] * 100), "the end"]   # line 4 is long
    (root / "long.txt").write_text("\n".join(long_prompts) + "\n")
    (root / "bad.yaml").write_text("ppo:\n  kl_coef: 0.1\n  epochs: [1\ntrain:\n  batch_size: 4\n")
    (root / "type.yaml").write_text("train:\n  total_steps: 3\nppo:\n  kl_coef: 0.1\n  vf_coef: high\n")
    (root / f"{REWARDS}.py").write_text(REWARD_SOURCE)

    policy = tiny_model_dir("gpt2")

    def broken(name, edit_config=None, edit_tensors=None):
        path = root / name
        shutil.copytree(policy, path)
        if edit_config:
            d = json.loads((path / "config.json").read_text())
            edit_config(d)
            (path / "config.json").write_text(json.dumps(d))
        if edit_tensors:
            t = load_file(path / "model.safetensors")
            edit_tensors(t)
            save_file(t, path / "model.safetensors", metadata={"format": "pt"})
        return str(path)

    paths = {
        "policy": policy,
        "no_config": broken("no_config"),
        "bad_json": broken("bad_json"),
        "str_size": broken("str_size", edit_config=lambda d: d.update(n_embd="64")),
        "bert": broken("bert", edit_config=lambda d: d.update(model_type="bert")),
        "no_tensor": broken("no_tensor", edit_tensors=lambda t: t.pop("transformer.h.1.attn.c_attn.weight")),
        "bad_shape": broken("bad_shape", edit_tensors=lambda t: t.update(
            {"transformer.h.0.mlp.c_fc.bias": t["transformer.h.0.mlp.c_fc.bias"][:10]})),
        "truncated": broken("truncated"),
        "no_tokenizer": broken("no_tokenizer"),
        "rm300": make_tiny(str(root / "rm300"), arch="gpt2", reward_model=True, vocab_size=300, seed=1),
        "llama": make_tiny(str(root / "llama"), arch="llama", seed=0),
    }
    os.remove(os.path.join(paths["no_config"], "config.json"))
    with open(os.path.join(paths["bad_json"], "config.json"), "w") as f:
        f.write('{"model_type": "gpt2",\n "n_embd": }\n')
    safetensors = os.path.join(paths["truncated"], "model.safetensors")
    os.truncate(safetensors, os.path.getsize(safetensors) // 2)
    for name in os.listdir(paths["no_tokenizer"]):
        if name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            os.remove(os.path.join(paths["no_tokenizer"], name))
    return SimpleNamespace(root=root, **paths)


@pytest.fixture
def rewards_module(files, monkeypatch):
    monkeypatch.syspath_prepend(str(files.root))
    import importlib
    module = importlib.import_module(REWARDS)
    monkeypatch.setattr(module, "CULPRIT", None)
    return module


def args(files, tmp_path, *extra):
    return [f"train.output_dir={tmp_path / 'run'}", f"data.prompts={files.root / 'prompts.txt'}", *FAST, *extra]


def cli_error(capsys, argv, *words) -> tuple[str, str]:
    """Runs the CLI in-process; asserts exit code 2, no traceback, exactly one `error:` line holding `words`.
    Returns (that line, stdout)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    for word in words:
        assert str(word) in errors[0], (word, errors[0])
    return errors[0], out


# ---------------------------------------------------------------------------------------- config

def test_unknown_key_suggests_the_closest(files, tmp_path, capsys):
    cli_error(capsys, args(files, tmp_path, "ppo.kl_coeff=0.1"), "'ppo.kl_coeff'", "did you mean 'ppo.kl_coef'")
    assert not (tmp_path / "run").exists()


def test_wrong_type_in_yaml_names_file_and_line(files, tmp_path, capsys):
    cli_error(capsys, ["--config", files.root / "type.yaml", *args(files, tmp_path)],
              "type.yaml:5", "ppo.vf_coef", "expected float", "'high'")
    assert load_config(files.root / "type.yaml", ["ppo.vf_coef=0.2"]).ppo.vf_coef == 0.2   # an override fixes it


def test_unparsable_yaml_names_file_and_line(files, tmp_path, capsys):
    cli_error(capsys, ["--config", files.root / "bad.yaml", *args(files, tmp_path)], "bad.yaml:4", "invalid YAML")


@pytest.mark.parametrize("override, words", [
    ("optim.lr=-1e-5", ["optim.lr=-1e-05", "out of range", "> 0.0"]),
    ("ppo.clip_eps=0", ["ppo.clip_eps=0.0", "out of range"]),
    ("ppo.clip_value=-0.2", ["ppo.clip_value=-0.2", "out of range"]),
    ("rollout.top_p=1.5", ["rollout.top_p=1.5", "<= 1.0"]),
    ("data.eval_fraction=1.0", ["data.eval_fraction=1.0", "< 1.0"]),
    ("ppo.gamma=1.01", ["ppo.gamma=1.01", "<= 1.0"]),
    ("data.truncation=right", ["data.truncation='right'", "left|error"]),
])
def test_out_of_range_values(files, tmp_path, capsys, override, words):
    cli_error(capsys, args(files, tmp_path, override), f"override '{override}'", *words)


def test_batch_not_divisible_by_minibatches(files, tmp_path, capsys):
    cli_error(capsys, args(files, tmp_path, "train.batch_size=6", "ppo.num_minibatches=4"),
              "train.batch_size=6", "ppo.num_minibatches=4", "not divisible")


def test_batch_not_divisible_by_devices(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 3)      # checked before any model is loaded
    cli_error(capsys, args(files, tmp_path), "train.batch_size=4", "number of devices (3)")
    cli_error(capsys, args(files, tmp_path, "train.placement=separate"), "train.placement=separate",
              "even number of devices", "found 3")
    monkeypatch.setattr(jax, "device_count", lambda: 2)
    cli_error(capsys, args(files, tmp_path, "train.eval_batch_size=3", "train.placement=colocated"),
              "train.eval_batch_size=3", "devices (2)")
    cli_error(capsys, args(files, tmp_path, "train.mesh_data=3", "train.mesh_fsdp=1", "train.placement=colocated"),
              "train.mesh_data=3 x train.mesh_fsdp=1", "2 device(s)")
    # placement auto on a CPU: each model gets one of the two devices
    cli_error(capsys, args(files, tmp_path, "train.mesh_data=2", "train.mesh_fsdp=1"),
              "train.mesh_data=2 x train.mesh_fsdp=1", "1 device(s) per model")
    assert not (tmp_path / "run").exists()


def test_output_dir_is_a_file(files, tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    cli_error(capsys, args(files, tmp_path, f"train.output_dir={tmp_path / 'taken'}"), "train.output_dir", "taken",
              "not a directory")


# ---------------------------------------------------------------------------------------- models

@pytest.mark.parametrize("folder, words", [
    ("missing", ["missing", "model folder does not exist"]),
    ("no_config", ["no_config/config.json", "missing config.json"]),
    ("bad_json", ["bad_json/config.json", "malformed JSON at line 2"]),
    ("str_size", ["str_size/config.json", "n_embd must be an integer", "'64'"]),
    ("bert", ["bert/config.json", "unsupported model_type 'bert'", "gpt2, llama"]),
    ("no_tensor", ["no_tensor/model.safetensors", "missing tensor 'transformer.h.1.attn.c_attn.weight'"]),
    ("bad_shape", ["bad_shape/model.safetensors", "'transformer.h.0.mlp.c_fc.bias' has shape [10], expected [256]"]),
    ("truncated", ["truncated/model.safetensors", "truncated or corrupt"]),
    ("no_tokenizer", ["no_tokenizer", "no tokenizer files"]),
])
def test_bad_model_folder(files, tmp_path, capsys, folder, words):
    path = getattr(files, folder, str(files.root / folder))
    cli_error(capsys, args(files, tmp_path, f"model.policy={path}"), *words)
    assert not (tmp_path / "run").exists()


def test_vocab_mismatch_between_policy_reward_model_and_critic(files, tmp_path, capsys):
    words = ["tokenizer mismatch", files.rm300, "300 tokens", files.policy, "512 tokens"]
    cli_error(capsys, args(files, tmp_path, f"model.policy={files.policy}", f"model.reward_model={files.rm300}"),
              *words)
    cli_error(capsys, args(files, tmp_path, f"model.policy={files.policy}", f"model.critic={files.rm300}"), *words)


def test_causal_lm_given_as_reward_model(files, tmp_path, capsys):
    cli_error(capsys, args(files, tmp_path, f"model.reward_model={files.policy}"),
              "missing tensor 'score.weight'", "not a reward/value model", "GPT2LMHeadModel")


# ---------------------------------------------------------------------------------------- prompts

def test_empty_prompt_file(files, tmp_path, capsys):
    cli_error(capsys, args(files, tmp_path, f"data.prompts={files.root / 'empty.txt'}"), "empty.txt", "no prompts")
    assert not (tmp_path / "run").exists()


def test_malformed_jsonl_line(files, tmp_path, capsys):
    cli_error(capsys, args(files, tmp_path, f"data.prompts={files.root / 'bad.jsonl'}"), "bad.jsonl:2", "invalid JSON")


def test_records_without_the_prompt_field(files, tmp_path, capsys):
    cli_error(capsys, args(files, tmp_path, f"data.eval_prompts={files.root / 'nofield.jsonl'}"),
              "nofield.jsonl:2", "missing field 'prompt'", "'text'")
    cli_error(capsys, args(files, tmp_path, f"data.prompts={files.root / 'nofield.jsonl'}", "data.prompt_field=text"),
              "nofield.jsonl:1", "missing field 'text'")


def test_missing_prompt_file(files, tmp_path, capsys):
    cli_error(capsys, args(files, tmp_path, f"data.prompts={tmp_path / 'nope.jsonl'}"), "prompt file not found",
              "nope.jsonl")


def test_long_prompt_with_truncation_error_names_file_and_line(files, tmp_path, capsys):
    cli_error(capsys, args(files, tmp_path, f"data.prompts={files.root / 'long.txt'}", "data.truncation=error",
                           "data.eval_fraction=0"),
              "long.txt:4", "tokens, more than data.max_prompt_length=24")
    assert not (tmp_path / "run").exists()


def test_long_prompt_is_truncated_with_a_warning_then_context_checked(files, tmp_path, capsys):
    # truncation=left warns (naming the first long prompt); the prompt + response must still fit the model
    _, out = cli_error(capsys, args(files, tmp_path, f"data.prompts={files.root / 'long.txt'}",
                                    "data.eval_fraction=0", "rollout.max_new_tokens=240"),
                       "rollout.max_new_tokens=240", "max_position_embeddings=256", "exceed the context")
    warning = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "1 of 5 prompts were longer than data.max_prompt_length=24" in warning[0]
    assert "truncated on the left (first: " in warning[0] and "long.txt:4" in warning[0]


def test_no_reward_source_and_bad_reward_functions(files, tmp_path, capsys, rewards_module):
    cli_error(capsys, args(files, tmp_path, "reward.task=null"), "no reward source", "reward.functions")
    cli_error(capsys, args(files, tmp_path, "reward.task=vowel"), "reward.task", "'vowel'", "vowels")
    cli_error(capsys, args(files, tmp_path, "reward.functions=[no_such_module:f]"),
              "reward.functions", "cannot import module 'no_such_module'", "ModuleNotFoundError")
    cli_error(capsys, args(files, tmp_path, f"reward.functions=[{REWARDS}:nope]"), f"'{REWARDS}' has no callable 'nope'")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- resume

def test_resume_without_a_checkpoint(files, tmp_path, capsys):
    cli_error(capsys, ["--resume-from", tmp_path / "nowhere", *args(files, tmp_path)], "no checkpoint found", "nowhere")
    a = args(files, tmp_path)
    cli_error(capsys, [*a[:3], "--resume", *a[3:]], "no checkpoint found", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- reward functions

def test_reward_function_that_raises_names_the_prompt(files, tmp_path, capsys, rewards_module):
    prompts = demo_prompts(24, seed=1)
    rewards_module.CULPRIT = prompts[2]                      # line 3, in the first batch (no shuffle)
    message, _ = cli_error(capsys, args(files, tmp_path, "reward.task=null", f"reward.functions=[{REWARDS}:picky]",
                                     "data.shuffle=false", "data.eval_fraction=0", "train.total_steps=1"),
                        f"reward function {REWARDS}:picky failed on prompt", repr(prompts[2])[:40],
                        "prompts.txt:3", "ValueError: cannot score this one ...")
    assert "second line" not in message


def test_reward_function_returning_nan_names_the_prompt(files, tmp_path, capsys, rewards_module):
    prompts = demo_prompts(24, seed=1)
    rewards_module.CULPRIT = prompts[1]
    cli_error(capsys, args(files, tmp_path, "reward.task=null", f"reward.functions=[{REWARDS}:nan_for_culprit]",
                           "data.shuffle=false", "data.eval_fraction=0", "train.total_steps=1"),
              "returned nan for prompt", repr(prompts[1])[:40], "prompts.txt:2", "reward.on_error=penalty")


def test_reward_errors_with_penalty_score_only_the_rows_at_fault(rewards_module):
    """`tasks.score_responses` alone (no model): per-row isolation of a raising or non-finite function."""
    prompts, texts = ["p0", "p1", "p2", "p3"], ["xxx"] * 4
    rewards_module.CULPRIT = "p2"
    logged = []
    fns = [("picky", rewards_module.picky, 1.0), ("nan", rewards_module.nan_for_culprit, 2.0)]
    sources = {"p2": "prompts.jsonl:9"}
    scores = score_responses(fns, prompts, texts, on_error="penalty", error_penalty=-3.0, log=logged.append,
                             sources=sources)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, [0.5 + 1.0, 0.5 + 1.0, -3.0, 0.5 + 1.0])   # the penalty is the row's score
    assert "failed on 1 of 4 responses" in logged[0] and "'p2' (prompts.jsonl:9)" in logged[0]
    assert "non-finite" in logged[1] and "'p2' (prompts.jsonl:9)" in logged[1]
    with pytest.raises(RewardError, match=r"failed on prompt 'p2' \(prompts.jsonl:9\) \(response 'xxx'\)"):
        score_responses(fns, prompts, texts, on_error="raise", sources=sources)


# ---------------------------------------------------------------------------------------- the terminal

def _env(files):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(files.root), env.get("PYTHONPATH", "")])
    return env


def test_terminal_gets_one_line_and_exit_code_2(files, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxppo.train", *args(files, tmp_path),
                           f"data.prompts={files.root / 'bad.jsonl'}"],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(files), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]          # exactly one line
    assert proc.stderr.startswith("error: ") and "bad.jsonl:2: invalid JSON" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def interrupted_run(files, tmp_path_factory):
    """A CLI run killed with SIGTERM after its first logged step."""
    run = tmp_path_factory.mktemp("sigterm") / "run"
    argv = [f"train.output_dir={run}", f"data.prompts={files.root / 'prompts.txt'}", *FAST, "train.total_steps=12",
            "data.eval_fraction=0", "reward.task=null", f"reward.functions=[{REWARDS}:slow]"]
    env = {**_env(files), "SLOW_REWARD": "0.5"}              # 12 steps >= 6 s: SIGTERM lands mid-run
    proc = subprocess.Popen([sys.executable, "-m", "jaxppo.train", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=run.parent, env=env)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the run ended or hung before its first step (rc {proc.returncode}):\n{out}\n{err}")
        time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return SimpleNamespace(run=run, argv=argv, rc=proc.returncode, out=out, err=err,
                           seconds=time.monotonic() - sent)


def test_sigterm_saves_a_checkpoint_and_resume_finishes(interrupted_run, capsys, rewards_module):
    r = interrupted_run
    assert r.rc == 143, (r.out, r.err)
    assert r.seconds < 20, r.seconds
    assert "Traceback" not in r.out + r.err
    assert "received signal SIGTERM: saved checkpoint at step" in r.out and "resume with --resume" in r.out
    steps = sorted(int(p.name) for p in (r.run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and 1 <= steps[-1] < 12

    assert main(["--resume", *r.argv]) == 0                   # SLOW_REWARD is unset here: fast
    out = capsys.readouterr().out
    assert f"resumed from step {steps[-1]}" in out
    rows = [json.loads(line) for line in (r.run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["split"] == "train"] == list(range(1, 13))
    assert (r.run / "final_model" / "model.safetensors").exists()


def test_resume_from_a_checkpoint_of_another_model(interrupted_run, files, tmp_path, capsys, rewards_module):
    r = interrupted_run
    config_before = (r.run / "config.yaml").read_text()
    cli_error(capsys, ["--resume-from", r.run / "checkpoints", *r.argv, f"model.policy={files.llama}"],
              "different model", "refusing to resume", files.llama)
    cli_error(capsys, ["--resume", *r.argv, f"model.policy={files.llama}"], "different model", str(r.run))
    assert (r.run / "config.yaml").read_text() == config_before     # nothing of the run was overwritten
