"""The README runs as written: its Python examples and its command lines, on tiny models, so that
the documentation and the code cannot drift apart.

Commands and code are read from README.md itself. What differs from a user's run is substituted
explicitly and checked to be there (model folders -> tiny ones, `train.total_steps` -> 2, a tiny
batch and response length appended); the commands run in a temporary folder holding a copy of
`experiments/configs` and `experiments/data` and a `prompts.jsonl`, in-process through each
module's `main` as `python -m ...` would run it. The command-line runs are slow-marked (~45 s
for train -> resume -> plot, a minute for the demo and the example configs; CI runs them); every
command line is parsed and its config loaded in the quick part, with the Python example (~30 s).
"""

import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jax
import numpy as np
import pytest
from packaging.requirements import Requirement

from jaxppo.config import load_config
from jaxppo.data.tasks import demo_prompts
from jaxppo.run.logger import read_metrics
from jaxppo.run.models import tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# small enough for a 2-core CPU; the shapes of tests/run/test_trainer.py
TINY = ["train.batch_size=4", "rollout.max_new_tokens=8", "ppo.epochs=2", "ppo.num_minibatches=2",
        "data.max_prompt_length=24", "train.eval_batch_size=4", "logging.progress_bar=false",
        "logging.tensorboard=false"]


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, re.DOTALL | re.MULTILINE)


def commands() -> list[str]:
    """Every `python -m jaxppo...` command of the README: fenced bash lines (continuations joined,
    comments dropped, `&&` chains split) and inline code spans."""
    found = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line)
            found += [part.strip() for part in line.split("&&") if part.strip().startswith("python -m jaxppo.")]
    found += re.findall(r"`(python -m jaxppo\.[^`]+)`", README)
    return list(dict.fromkeys(" ".join(c.split()) for c in found))


def run(command: str, *extra: str) -> int:
    """`python -m MODULE args...` in this process (the module's `main`), with `extra` args appended."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"], command
    module = __import__(argv[2], fromlist=["main"])
    return module.main([*argv[3:], *extra])


def with_command(predicate) -> list[str]:
    found = [c for c in commands() if predicate(c)]
    assert found, "the README no longer has this command: update tests/test_readme.py"
    return found


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A user's folder: the example configs and data, and a prompts.jsonl of their own."""
    for sub in ("configs", "data"):
        shutil.copytree(ROOT / "experiments" / sub, tmp_path / "experiments" / sub)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in demo_prompts(40, seed=3)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_shows_what_this_test_runs():
    cmds = commands()
    assert "python -m jaxppo.train" in cmds                                  # the demo
    assert any("--resume" in c for c in cmds) and any(c.startswith("python -m jaxppo.plot") for c in cmds)
    assert any(c.startswith("python -m jaxppo.models.tiny") for c in cmds)
    assert any("PPOTrainer(config)" in b for b in blocks("python"))


def test_every_command_line_parses_and_its_config_loads(workdir):
    """Field names, flags and config files of every command still exist (a resume reads its run: below)."""
    from jaxppo.train import build_parser

    for command in with_command(lambda c: c.startswith("python -m jaxppo.train") and "--help" not in c):
        args = build_parser().parse_intermixed_args(shlex.split(command)[3:])
        if not (args.resume or args.resume_from):
            load_config(args.config, args.overrides)


def test_help_lists_the_fields(capsys):
    (command,) = with_command(lambda c: c.endswith("--help"))
    with pytest.raises(SystemExit) as e:
        run(command)
    assert e.value.code == 0 and "model.policy" in capsys.readouterr().out


@pytest.mark.slow
def test_own_models_train_resume_and_plot_as_written(workdir, capsys):
    (train,) = with_command(lambda c: "/ckpt/my-llama" in c)
    subs = {"/ckpt/my-llama": tiny_model_dir("llama"), "/ckpt/my-rm": tiny_model_dir("llama", seed=1, reward_model=True),
            "train.total_steps=500": "train.total_steps=2"}
    for old, new in subs.items():
        assert old in train, f"{old!r} is no longer in the README's command: update the substitutions"
        train = train.replace(old, new)
    assert run(train, *TINY) == 0, capsys.readouterr().err
    (resume,) = with_command(lambda c: "--resume" in c and "runs/llama" in c)
    assert run(resume, "train.total_steps=3") == 0, capsys.readouterr().err     # one step more
    rows = read_metrics(workdir / "runs" / "llama", split="train")
    assert [r["step"] for r in rows] == [1, 2, 3]
    (plot,) = with_command(lambda c: c.startswith("python -m jaxppo.plot"))
    assert run(plot) == 0
    assert (workdir / "runs" / "llama" / "plots" / "overview.png").exists()


def test_tiny_checkpoint_maker(workdir):
    (command,) = with_command(lambda c: c.startswith("python -m jaxppo.models.tiny"))
    out = shlex.split(command)[3]
    command = command.replace(out, str(workdir / "tiny-llama"))     # the README's /tmp path, in this test's folder
    assert run(command) == 0
    assert json.loads((workdir / "tiny-llama" / "config.json").read_text())["model_type"] == "llama"


def test_python_example_trains_evaluates_and_a_resumed_trainer_evaluates_its_checkpoint(workdir):
    from jaxppo import PPODataset, PPOTrainer

    (code,) = [b for b in blocks("python") if "PPOTrainer(config)" in b]
    assert '["train.total_steps=100"]' in code, "update the substitution below"
    code = code.replace('["train.total_steps=100"]', repr(["train.total_steps=2", *TINY]))
    *body, last = code.strip().splitlines()
    ns: dict = {}
    exec(compile("\n".join(body), "README.md", "exec"), ns)  # noqa: S102 - the README's own code
    summary = ns["summary"]
    assert summary["steps"] == 2 and summary["stopped"] is None
    metrics_file = Path(summary["run_dir"]) / "metrics.jsonl"
    logged = metrics_file.read_text()
    metrics = eval(last, ns)                                           # trainer.evaluate(...) after train
    assert {"objective/scores", "objective/kl", "eos_rate"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics_file.read_text() == logged                          # the run is closed: returned, not logged

    # evaluate() alone on a trainer that resumes: the checkpoint's weights, not the initial ones
    resumed = PPOTrainer(ns["config"], resume_from_checkpoint="latest")
    again = resumed.evaluate(PPODataset(ns["prompts"][ns["n"]:]))
    assert int(resumed.state.step) == 2 and set(again) == set(metrics)
    for a, b in zip(jax.tree.leaves(resumed.state.policy), jax.tree.leaves(ns["trainer"].state.policy), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert metrics_file.read_text() == logged


def test_notebook_cell_configures_a_fresh_process():
    (cell,) = [b for b in blocks("python") if "runtime.configure()" in b]
    out = subprocess.run([sys.executable, "-c", cell + "import jax; print(jax.device_count())"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-2000:]


def test_install_lines_name_what_exists():
    """`pip install -e ".[extra]"` and `-r FILE` lines name extras and files of this repository, and
    requirements-cuda.txt pins versions that pyproject.toml's ranges allow (on Python 3.12)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [c for b in blocks("bash") for c in b.splitlines()]
    extras = {e for line in lines for e in re.findall(r'pip install[^#]*-e "\.\[([\w,]+)\]"', line)}
    assert "cuda12" in ",".join(extras)
    for extra in ",".join(extras).split(","):
        assert extra in project["optional-dependencies"], extra
    for line in lines:
        for path in re.findall(r"-r (\S+)|bash (experiments/\S+)", line):
            assert (ROOT / "".join(path)).is_file(), path
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "extra": "cuda12"}
    ranges = {}
    for spec in project["dependencies"] + project["optional-dependencies"]["cuda12"]:
        req = Requirement(spec)
        if req.marker is None or req.marker.evaluate(env):
            ranges.setdefault(req.name.lower().replace("_", "-"), []).append(req.specifier)
    pins = [Requirement(line) for line in (ROOT / "requirements-cuda.txt").read_text().splitlines()
            if line.strip() and not line.startswith(("#", "-"))]
    assert {p.name for p in pins} == {"jax", "flax", "optax", "orbax-checkpoint"}
    for pin in pins:
        (version,) = [s.version for s in pin.specifier]
        for allowed in ranges[pin.name]:
            assert allowed.contains(version), f"requirements-cuda.txt {pin} is outside pyproject's {allowed}"


@pytest.mark.slow
def test_config_file_commands_run(workdir, capsys):
    """The demo and the example configs, two iterations each on tiny shapes."""
    for i, command in enumerate(with_command(lambda c: c.startswith("python -m jaxppo.train")
                                             and "--resume" not in c and "--help" not in c and "/ckpt/" not in c)):
        out = workdir / f"run{i}"
        assert run(command, "train.total_steps=2", *TINY, f"train.output_dir={out}") == 0, \
            (command, capsys.readouterr().err)
        assert [r["step"] for r in read_metrics(out, split="train")] == [1, 2], command
