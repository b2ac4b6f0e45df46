"""TrainingLogger: console + train.log, metrics.jsonl, samples.jsonl, TensorBoard, wandb.

    with TrainingLogger("runs/demo", config=config_to_dict(config)) as logger:
        logger.log("step 1 done")
        logger.log_metrics({"objective/scores": 0.5, "lr": 3e-6}, step=1)            # split="train"
        logger.log_samples([{"prompt": "...", "response": "...", "score": 1.0}], step=1)

Every JSONL row is written with one `write()` of the whole line followed by a flush, and a
partial last line left by a crash is cut off when the file is opened again, so readers never
see a broken row. A resumed run appends to the same files; `truncate_after(step)` first drops
the rows logged after the checkpoint it resumed from, so no step appears twice.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from jaxppo.errors import JaxppoError

__all__ = ["TrainingLogger", "read_metrics", "read_jsonl"]

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
LOG_FILE = "train.log"
TENSORBOARD_DIR = "tensorboard"


def _to_float(key: str, value: Any) -> float | None:
    """float for any scalar (Python, NumPy, JAX); None (JSON null) for NaN/inf."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r} is not a scalar: {type(value).__name__}") from None
    return x if math.isfinite(x) else None


def _json_line(row: Mapping[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"


def _repair_partial_line(path: str) -> None:
    """Cuts a last line without its newline (a write interrupted by a crash)."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as fh:
        end = fh.seek(0, os.SEEK_END)
        fh.seek(end - 1)
        if fh.read(1) == b"\n":
            return
        pos = end
        while pos > 0:  # scan back in chunks for the previous newline
            start = max(0, pos - 65536)
            fh.seek(start)
            chunk = fh.read(pos - start)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                fh.truncate(start + idx + 1)
                return
            pos = start
        fh.truncate(0)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file; a trailing partial line is ignored, other bad lines skipped with a warning."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i != len(lines) - 1:  # the last piece has no newline: an interrupted write, not corruption
                warnings.warn(f"{path}:{i + 1}: skipping a line that is not valid JSON", stacklevel=2)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_metrics(path: str | os.PathLike, split: str | None = None) -> list[dict]:
    """Rows of metrics.jsonl (a run directory or the file itself), optionally of one split."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    rows = read_jsonl(path)
    return [r for r in rows if split is None or r.get("split") == split]


def _markdown_table(samples: Sequence[Mapping[str, Any]]) -> str:
    def cell(x: Any) -> str:
        text = "" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))
        return text.replace("|", "\\|").replace("\r", "").replace("\n", " ↵ ")

    lines = ["| prompt | response | score |", "|---|---|---|"]
    lines += [f"| {cell(s.get('prompt'))} | {cell(s.get('response'))} | {cell(s.get('score'))} |" for s in samples]
    return "\n".join(lines)


class TrainingLogger:
    """Writes a run's logs into `run_dir`: train.log, metrics.jsonl, samples.jsonl, tensorboard/."""

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "jaxppo", wandb_mode: str = "offline", config: dict | None = None,
                 console: bool = True):
        self.run_dir = os.fspath(run_dir)
        self.console = console
        self._closed = False
        os.makedirs(self.run_dir, exist_ok=True)
        self._tensorboard = tensorboard
        self._tb: Any = None
        self._wandb_run: Any = None
        self._log_fh = open(os.path.join(self.run_dir, LOG_FILE), "a", encoding="utf-8")
        self._metrics_fh = self._open_jsonl(METRICS_FILE)
        self._samples_fh = self._open_jsonl(SAMPLES_FILE)
        if tensorboard:
            self._tb = self._tb_writer()
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                self.close()
                raise JaxppoError("logging.wandb is on but wandb is not installed: pip install 'jaxppo[wandb]'") from None
            self._wandb = wandb_lib
            self._wandb_run = wandb_lib.init(project=wandb_project, dir=self.run_dir, mode=wandb_mode, config=config)

    def _open_jsonl(self, name: str):
        path = os.path.join(self.run_dir, name)
        _repair_partial_line(path)
        return open(path, "a", encoding="utf-8")

    def _tb_writer(self, purge_step: int | None = None) -> Any:
        from tensorboardX import SummaryWriter  # imported here: costs a second, only when enabled

        # tensorboardX names files by the second and opens them with "wb": without a unique suffix a
        # writer started in the same second (resume, truncate_after) would overwrite the previous file
        return SummaryWriter(logdir=os.path.join(self.run_dir, TENSORBOARD_DIR), purge_step=purge_step,
                             filename_suffix=f".{uuid.uuid4().hex[:8]}")

    # ------------------------------------------------------------------ text

    def log(self, message: str) -> None:
        """Prints `message` (above a tqdm bar if one is running) and appends it, timestamped, to train.log."""
        message = str(message)
        if self.console:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stdout)
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        self._log_fh.write("".join(f"{stamp} {line}\n" for line in message.splitlines() or [""]))
        self._log_fh.flush()

    # ------------------------------------------------------------------ metrics

    def log_metrics(self, metrics: Mapping[str, Any], step: int, split: str = "train") -> None:
        """One row {"step", "split", "time", **metrics} in metrics.jsonl (NaN/inf -> null), plus TB/wandb."""
        values = {str(k): _to_float(str(k), v) for k, v in metrics.items()}
        clash = {"step", "split", "time"} & set(values)
        if clash:
            raise ValueError(f"metric names {sorted(clash)} are reserved in metrics.jsonl")
        step = int(step)
        row = {"step": step, "split": split, "time": time.time(), **values}
        self._metrics_fh.write(_json_line(row))  # one write per row: a crash cannot split it
        self._metrics_fh.flush()
        if self._tb is not None:
            for key, value in values.items():
                if value is not None:
                    self._tb.add_scalar(f"{split}/{key}", value, step)
            self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({f"{split}/{k}": v for k, v in values.items() if v is not None}, step=step)

    def log_samples(self, samples: Sequence[Mapping[str, Any]], step: int) -> None:
        """Rows {"step", "prompt", "response", "score"} in samples.jsonl, plus a TB text table."""
        step = int(step)
        rows = []
        for s in samples:
            score = s.get("score")
            rows.append({"step": step, "prompt": str(s.get("prompt", "")), "response": str(s.get("response", "")),
                         "score": None if score is None else _to_float("score", score)})
        if not rows:
            return
        self._samples_fh.write("".join(_json_line(r) for r in rows))
        self._samples_fh.flush()
        if self._tb is not None:
            self._tb.add_text("samples", _markdown_table(rows), step)
            self._tb.flush()
        if self._wandb_run is not None:
            table = self._wandb.Table(columns=["prompt", "response", "score"],
                                      data=[[r["prompt"], r["response"], r["score"]] for r in rows])
            self._wandb_run.log({"samples": table}, step=step)

    # ------------------------------------------------------------------ resume

    def truncate_after(self, step: int) -> None:
        """Drops the metrics and samples rows with step > `step` (resuming from an older checkpoint).

        TensorBoard gets a new writer with `purge_step=step + 1`, which hides the old events after it.
        """
        for name, attr in ((METRICS_FILE, "_metrics_fh"), (SAMPLES_FILE, "_samples_fh")):
            getattr(self, attr).close()
            path = os.path.join(self.run_dir, name)
            kept = [r for r in read_jsonl(path) if isinstance(r.get("step"), int) and r["step"] <= step]
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write("".join(_json_line(r) for r in kept))
            os.replace(tmp, path)  # atomic: a crash leaves either the old or the new file
            setattr(self, attr, open(path, "a", encoding="utf-8"))
        if self._tb is not None:
            self._tb.close()
            self._tb = self._tb_writer(purge_step=step + 1)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for attr in ("_log_fh", "_metrics_fh", "_samples_fh"):
            fh = getattr(self, attr, None)
            if fh is not None:
                fh.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> TrainingLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SilentLogger:
    """What processes other than 0 of a multi-process run log through: nothing (process 0 writes
    train.log, metrics.jsonl, samples.jsonl, TensorBoard and wandb for the run)."""

    def log(self, message: str) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, Any], step: int, split: str = "train") -> None:
        pass

    def log_samples(self, samples: Sequence[Mapping[str, Any]], step: int) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(cfg, start: int):
    """The console's tqdm bar over train.total_steps from `start` (None when logging.progress_bar is off)."""
    if not cfg.logging.progress_bar:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=cfg.train.total_steps, initial=start, desc="ppo", unit="it", dynamic_ncols=True)
