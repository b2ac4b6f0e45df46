"""Curves from a synthetic metrics.jsonl, and the `python -m jaxppo.plot` command line."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxppo.errors import JaxppoError
from jaxppo.run.plots import ema, plot_run

PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, steps=40, keys=("objective/scores", "objective/kl", "lr"), eval_key="objective/scores"):
    rng = np.random.default_rng(0)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as fh:
        for step in range(1, steps + 1):
            row = {"step": step, "split": "train", "time": float(step)}
            row.update({k: float(1 - math.exp(-step / 10) + 0.1 * rng.normal()) for k in keys})
            row["lr"] = 1e-5 if "lr" in keys else None
            fh.write(json.dumps(row) + "\n")
            if step % 10 == 0:
                fh.write(json.dumps({"step": step, "split": "eval", "time": 0.0, eval_key: 0.5}) + "\n")
        fh.write('{"step": 41, "split": "tr')  # a partial line from a crash


def test_plot_run_writes_pngs(tmp_path):
    run = str(tmp_path / "run")
    write_metrics(run, keys=("objective/scores", "objective/kl", "lr"), eval_key="eval/score")
    paths = plot_run(run)
    names = [os.path.basename(p) for p in paths]
    assert names == ["overview.png", "reward.png", "kl.png", "lr.png"]  # panels without data are skipped
    for path in paths:
        assert os.path.dirname(path) == os.path.join(run, "plots")
        with open(path, "rb") as fh:
            assert fh.read(8) == PNG


def test_empty_and_missing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    assert plot_run(tmp_path) == []
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(JaxppoError, match="metrics.jsonl not found"):
        plot_run(tmp_path / "not_a_run")
    with pytest.raises(JaxppoError, match="run directory not found"):
        plot_run(tmp_path / "nope")


def test_ema_is_debiased():
    np.testing.assert_allclose(ema([2.0, 2.0, 2.0], 0.9), [2.0, 2.0, 2.0])
    np.testing.assert_allclose(ema([0.0, 1.0], 0.5), [0.0, 0.5 * 1.0 / 0.75])


def test_plot_cli(tmp_path):
    run = str(tmp_path / "run")
    write_metrics(run, keys=("objective/scores",))
    env = dict(os.environ, MPLBACKEND="TkAgg", DISPLAY="")  # a GUI backend without a display: never used
    ok = subprocess.run([sys.executable, "-m", "jaxppo.plot", run], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split() == [os.path.join(run, "plots", "overview.png"), os.path.join(run, "plots", "reward.png")]
    bad = subprocess.run([sys.executable, "-m", "jaxppo.plot", str(tmp_path / "missing")], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: run directory not found: {tmp_path / 'missing'}"
