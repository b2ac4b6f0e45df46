"""One run per folder: the saved config of a run, the changes a resume made to it, the lock that
refuses a second process, `--overwrite`, and folders replaced whole (final_model/).

    config = resume_config(None, ["train.total_steps=200"], "latest")   # the run's config + overrides
    check_fresh(path, overwrite=False)      # ConfigError when `path` already holds a run
    lock = RunLock(path); lock.acquire(log); ...; lock.release()

A run folder holds config.yaml (as the run started, never rewritten by a resume) and, when resumes
changed something, `overrides.jsonl`: one {"step", "time", "resumed_from", "changes": {key: {"from",
"to"}}} per resume. The run's config is config.yaml with those changes applied in order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import socket
import time
from pathlib import Path

from jaxppo.config import PPOConfig, load_config
from jaxppo.config.resume import resume_changes
from jaxppo.errors import ConfigError
from jaxppo.run.checkpoint import find_checkpoint_dir

CONFIG_FILE, CHANGES_FILE, LOCK_FILE = "config.yaml", "overrides.jsonl", ".lock"
RUN_MARKERS = ("config.yaml", "checkpoints", "metrics.jsonl")   # what makes a folder hold a run


# ---------------------------------------------------------------------- the run's config
def recorded_overrides(folder) -> list[str]:
    """The changes of earlier resumes of the run in `folder`, as `key=value` overrides, in order."""
    path = Path(folder) / CHANGES_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            changes = json.loads(line).get("changes", {})
        except (ValueError, AttributeError):
            continue                        # a line cut by a crash: that resume never started
        out += [f"{key}={json.dumps(change['to'])}" for key, change in changes.items()]
    return out


def saved_config(folder) -> PPOConfig | None:
    """The config of the run in `folder` (config.yaml + the recorded changes), or None without one."""
    path = Path(folder) / CONFIG_FILE
    return load_config(path, recorded_overrides(folder)) if path.exists() else None


def record_changes(folder, step: int, changes: dict, source) -> None:
    """Appends a resume's changes ({key: (from, to)}) to `folder`/overrides.jsonl."""
    row = {"step": int(step), "time": time.time(), "resumed_from": str(source),
           "changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()}}
    with open(Path(folder) / CHANGES_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def source_folder(resume: str, output_dir) -> Path:
    """The folder of the run that `resume` ("latest" in `output_dir`, or a checkpoint path)
    continues; CheckpointError when there is no checkpoint."""
    directory, _ = find_checkpoint_dir(Path(output_dir) / "checkpoints" if resume == "latest" else resume)
    return directory.parent


def same_folder(a, b) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def resume_config(config_file: str | None, overrides: list[str], resume: str) -> PPOConfig:
    """The config of `--resume` / `--resume-from`: the run's own config (or `config_file`, which
    may not differ from it in a field that cannot change) with `overrides` on top. The output
    directory is the run's (`--resume`) or the checkpoint's run (`--resume-from`) unless an
    override names one. Raises ConfigError on a change that would break the run."""
    given_dir = [o for o in overrides if o.split("=", 1)[0].strip() == "train.output_dir"]
    out = load_config(config_file, given_dir).train.output_dir
    source = source_folder(resume, out)
    saved = saved_config(source)
    if config_file is None and saved is None:
        raise ConfigError(f"{source} has no {CONFIG_FILE}: pass the run's config with --config", keys=("config",))
    config = load_config(config_file, overrides) if config_file is not None else \
        load_config(source / CONFIG_FILE, recorded_overrides(source) + list(overrides))
    target = out if resume == "latest" or given_dir else str(source)
    if not same_folder(config.train.output_dir, target):
        config = config.replace(train=dataclasses.replace(config.train, output_dir=target))
    if saved is not None:
        if same_folder(saved.train.output_dir, source):
            saved = saved.replace(train=dataclasses.replace(saved.train, output_dir=config.train.output_dir))
        resume_changes(saved, config, str(source))
    return config


# ---------------------------------------------------------------------- one run per folder
def holds_run(folder) -> bool:
    return any((Path(folder) / name).exists() for name in RUN_MARKERS)


def check_fresh(folder, overwrite: bool) -> None:
    """A fresh run into `folder` is refused when it holds a run, unless `overwrite`."""
    if holds_run(folder) and not overwrite:
        raise ConfigError(f"{folder} already holds a run: continue it with --resume, replace it with --overwrite "
                          f"(the old run is moved to {Path(folder).name}.old-<time>), or choose another "
                          f"--output-dir", keys=("train.output_dir",))


def move_aside(folder) -> Path:
    """Moves everything in `folder` but its lock to a new sibling `<folder>.old-<time>`."""
    folder = Path(folder)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = folder.with_name(f"{folder.name}.old-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = folder.with_name(f"{folder.name}.old-{stamp}-{n}")
    aside.mkdir()
    for entry in folder.iterdir():
        if entry.name != LOCK_FILE:
            entry.rename(aside / entry.name)
    return aside


@contextlib.contextmanager
def replaced_atomically(path):
    """Yields a temporary folder beside `path`; when the block succeeds it becomes `path` (an
    older `path` is removed), so `path` is never seen half-written. On an error it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------- the lock
_HELD: set[str] = set()          # lock files this process holds (a lock with our pid but not here is stale)


class RunLock:
    """`<folder>/.lock` ({"pid", "host", "time"}) while a process runs in `folder`. A lock whose
    process is gone (same host, pid not running) is stale and replaced; one of a live process, or
    of another host (which cannot be checked), refuses the run."""

    def __init__(self, folder):
        self.path = Path(folder) / LOCK_FILE
        self.held = False

    def holder(self) -> dict | None:
        """The live holder's {"pid", "host"}, or None when the lock is free or stale."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            pid, host = int(info["pid"]), str(info["host"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None                      # unreadable: not written by a live RunLock (they write whole files)
        if host != socket.gethostname():
            return info
        if pid == os.getpid():
            return info if str(self.path.resolve()) in _HELD else None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:              # alive, another user's
            pass
        return info

    def check(self) -> None:
        """ConfigError naming the pid when a live process holds the lock."""
        info = self.holder()
        if info is not None:
            raise ConfigError(f"{self.path.parent} is in use by process {info['pid']} on {info['host']} "
                              f"(lock file {self.path}); wait for it to finish, or delete the lock file if "
                              f"that process is gone", keys=("train.output_dir",))

    def acquire(self, log) -> None:
        """Takes the lock (replacing a stale one, with a line to `log`); ConfigError when it is held."""
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()})
        tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}")
        tmp.write_text(body, encoding="utf-8")
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)      # atomic, and the lock file is whole when it appears
                    self.held = True
                    _HELD.add(str(self.path.resolve()))
                    return
                except FileExistsError:
                    self.check()
                    try:
                        stale = json.loads(self.path.read_text(encoding="utf-8"))
                    except (OSError, ValueError):
                        stale = {}
                    log(f"removing the stale lock {self.path} (process {stale.get('pid', '?')} on "
                        f"{stale.get('host', '?')} is not running)")
                    self.path.unlink(missing_ok=True)
            self.check()
            raise ConfigError(f"cannot take the lock {self.path}", keys=("train.output_dir",))
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            _HELD.discard(str(self.path.resolve()))
            self.path.unlink(missing_ok=True)
            self.held = False
