"""One run per folder without a model: the lock (live refuses, stale is replaced), a fresh run into
a folder that holds one, --overwrite, folders replaced whole, the run's config after resumes,
periodic saves by time, and a second signal that aborts at once."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from jaxppo.config import PPOConfig, load_config, save_config
from jaxppo.errors import ConfigError
from jaxppo.run.checkpoint import CheckpointError
from jaxppo.run.rundir import RunDir, StopSignals
from jaxppo.run.runfolder import (
    RunLock,
    check_fresh,
    move_aside,
    record_changes,
    replaced_atomically,
    resume_config,
    saved_config,
)


def write_lock(folder, pid, host=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "time": 0}))


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_lock_refuses_naming_the_pid(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path / "run", sleeper.pid)
        with pytest.raises(ConfigError, match=f"in use by process {sleeper.pid} on "):
            RunLock(tmp_path / "run").acquire(print)
        with pytest.raises(ConfigError, match=f"process {sleeper.pid}"):
            RunLock(tmp_path / "run").check()
    finally:
        sleeper.kill()
        sleeper.wait()
    write_lock(tmp_path / "far", 1, host="another-host")      # cannot be checked: counts as live
    with pytest.raises(ConfigError, match="on another-host"):
        RunLock(tmp_path / "far").check()


def test_a_stale_lock_is_replaced_with_a_log_line(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, pid)
    lines = []
    lock = RunLock(tmp_path)
    lock.acquire(lines.append)
    assert len(lines) == 1 and "stale lock" in lines[0] and str(pid) in lines[0]
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    with pytest.raises(ConfigError, match=f"process {os.getpid()}"):    # held: a second one in this process
        RunLock(tmp_path).acquire(lines.append)
    lock.release()
    assert not (tmp_path / ".lock").exists()
    write_lock(tmp_path, os.getpid())          # our pid, but not held by us: left by an earlier crash
    RunLock(tmp_path).acquire(lines.append)
    assert len(lines) == 2


def test_a_folder_that_holds_a_run_is_refused_then_moved_aside(tmp_path):
    run = tmp_path / "run"
    check_fresh(run, overwrite=False)                      # missing: fine
    run.mkdir()
    (run / "notes.txt").write_text("x")
    check_fresh(run, overwrite=False)                      # no run in it: fine
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="already holds a run: continue it with --resume, replace it with "
                                          "--overwrite .* or choose another --output-dir"):
        check_fresh(run, overwrite=False)
    check_fresh(run, overwrite=True)
    (run / ".lock").write_text("{}")
    aside = move_aside(run)
    assert aside.name.startswith("run.old-") and sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "notes.txt"]
    assert [p.name for p in run.iterdir()] == [".lock"]


def test_a_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "final_model"
    with replaced_atomically(target) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("1")
        assert not target.exists()
    with pytest.raises(RuntimeError), replaced_atomically(target) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("half")
        raise RuntimeError("export failed")
    assert (target / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["final_model"]
    with replaced_atomically(target) as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("2")
    assert [p.name for p in target.iterdir()] == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["final_model"]


def fake_run(folder, config, step=4):
    """A run folder with config.yaml and a (content-free) checkpoint step folder."""
    (folder / "checkpoints" / str(step) / "state").mkdir(parents=True)
    save_config(config, folder / "config.yaml")


def test_resume_config_is_the_runs_own_with_overrides_on_top(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    saved = load_config(None, ["train.output_dir=run", "ppo.kl_coef=0.2", "train.total_steps=6"])
    fake_run(run, saved)
    assert resume_config(None, ["train.output_dir=run"], "latest") == saved
    more = resume_config(None, ["train.output_dir=run", "train.total_steps=9"], "latest")
    assert more.train.total_steps == 9 and more.ppo.kl_coef == 0.2
    record_changes(run, 6, {"train.total_steps": (6, 9), "early_stopping.metric": (None, "objective/kl")}, "latest")
    assert saved_config(run).train.total_steps == 9 and saved_config(run).early_stopping.metric == "objective/kl"
    with pytest.raises(ConfigError, match=r"ppo.kl_coef: run has 0.2, given 0.05"):
        resume_config(None, ["train.output_dir=run", "ppo.kl_coef=0.05"], "latest")
    other = tmp_path / "cfg.yaml"
    save_config(saved.replace(ppo=dataclasses.replace(saved.ppo, kl_coef=0.3)), other)
    with pytest.raises(ConfigError, match=r"ppo.kl_coef: run has 0.2, given 0.3"):
        resume_config(str(other), [], "latest")
    # --resume-from a checkpoint continues in the checkpoint's run folder, or in a new one
    assert resume_config(None, [], str(run / "checkpoints" / "4")).train.output_dir == "run"
    assert resume_config(None, ["train.output_dir=fork"], str(run / "checkpoints")).train.output_dir == "fork"
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        resume_config(None, ["train.output_dir=elsewhere"], "latest")


def test_periodic_saves_by_steps_or_minutes():
    c = PPOConfig()
    rd = RunDir(c.replace(train=dataclasses.replace(c.train, total_steps=10, save_every=4, save_every_minutes=0)), {})
    assert [s for s in range(1, 11) if rd.save_due(s)] == [4, 8]       # the last step saves in finish
    rd = RunDir(c.replace(train=dataclasses.replace(c.train, total_steps=10, save_every_minutes=1 / 600)), {})
    assert not rd.save_due(1)
    rd.last_save_time -= 0.2
    assert rd.save_due(2)


def test_a_second_signal_aborts_at_once():
    signals = StopSignals()
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert signals.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
        assert not signals.previous              # the default handlers are back
    finally:
        signals.restore()
