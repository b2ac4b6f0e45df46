"""TrainingLogger: train.log, metrics.jsonl, samples.jsonl, TensorBoard events, wandb, resume."""

import glob
import json
import math
import os
import re
import struct
import sys
import types

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from jaxppo.errors import JaxppoError
from jaxppo.run.logger import TrainingLogger, read_metrics


def read_events(run_dir):
    """Every Event of the TensorBoard files (TFRecord framing: u64 length, u32 crc, data, u32 crc)."""
    events = []
    for path in sorted(glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))):
        with open(path, "rb") as fh:
            data = fh.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4
    return events


def scalars(run_dir):
    return [(e.step, v.tag, v.simple_value) for e in read_events(run_dir) for v in e.summary.value
            if v.HasField("simple_value")]


def test_writes_every_file(tmp_path, capsys):
    run = tmp_path / "run"
    with TrainingLogger(run) as logger:
        logger.log("hello\nsecond line")
        logger.log_metrics({"objective/scores": np.float32(0.5), "lr": 3e-6, "count": np.int64(3),
                            "bad": float("nan"), "inf": np.inf}, step=1)
        logger.log_metrics({"objective/scores": 0.75}, step=1, split="eval")
        logger.log_samples([{"prompt": "2+2=", "response": "4 | yes\nok", "score": np.float32(1.0)},
                            {"prompt": "p", "response": "r", "score": None}], step=1)
    assert "hello\nsecond line" in capsys.readouterr().out
    log_lines = (run / "train.log").read_text().splitlines()
    assert len(log_lines) == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d hello", log_lines[0])

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (1, "eval")]
    assert rows[0]["objective/scores"] == 0.5 and rows[0]["count"] == 3.0 and isinstance(rows[0]["time"], float)
    assert rows[0]["bad"] is None and rows[0]["inf"] is None  # valid JSON: non-finite -> null
    assert read_metrics(run, split="eval") == [rows[1]]

    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples[0] == {"step": 1, "prompt": "2+2=", "response": "4 | yes\nok", "score": 1.0}
    assert samples[1]["score"] is None

    events = scalars(run)
    assert (1, "train/objective/scores", 0.5) in events and (1, "eval/objective/scores", 0.75) in events
    assert not any(tag == "train/bad" for _, tag, _ in events)
    texts = [v for e in read_events(run) for v in e.summary.value if v.tag.startswith("samples")]
    assert texts and b"4 \\| yes" in texts[0].tensor.string_val[0]


def test_bad_metric_values(tmp_path):
    with TrainingLogger(tmp_path, tensorboard=False, console=False) as logger:
        with pytest.raises(TypeError, match="metric 'x' is not a scalar"):
            logger.log_metrics({"x": "text"}, step=0)
        with pytest.raises(ValueError, match="reserved"):
            logger.log_metrics({"step": 1}, step=0)
    assert not (tmp_path / "tensorboard").exists()


def test_partial_line_is_repaired_on_open(tmp_path):
    good = json.dumps({"step": 1, "split": "train", "time": 0.0, "a": 1.0})
    (tmp_path / "metrics.jsonl").write_text(good + "\n" + '{"step": 2, "spl')  # killed mid-write
    (tmp_path / "samples.jsonl").write_text('{"step": 1, "prompt"')
    assert read_metrics(tmp_path) == [json.loads(good)]  # readers skip the partial line
    with TrainingLogger(tmp_path, tensorboard=False, console=False) as logger:
        logger.log_metrics({"a": 2.0}, step=2)
        logger.log_samples([{"prompt": "p", "response": "r", "score": 0.0}], step=2)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == [2]


def test_resume_appends_and_truncate_after(tmp_path):
    with TrainingLogger(tmp_path, console=False) as logger:
        for step in range(1, 6):
            logger.log_metrics({"a": float(step)}, step=step)
            logger.log_samples([{"prompt": "p", "response": "r", "score": step}], step=step)
    # resumed from the checkpoint of step 3: steps 4 and 5 are logged again
    with TrainingLogger(tmp_path, console=False) as logger:
        logger.truncate_after(3)
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
        for step in (4, 5):
            logger.log_metrics({"a": 10.0 * step}, step=step)
    assert [(r["step"], r["a"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == [1, 2, 3]
    # the new TensorBoard file starts with a purge marker so TensorBoard drops the stale steps 4-5
    starts = [e.step for e in read_events(tmp_path) if e.HasField("session_log")]
    assert 4 in starts
    events = scalars(tmp_path)  # the first session's file was not overwritten by the later writers
    assert (1, "train/a", 1.0) in events and (5, "train/a", 50.0) in events


def test_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(JaxppoError, match=r"logging.wandb is on but wandb is not installed: pip install 'jaxppo\[wandb\]'"):
        TrainingLogger(tmp_path, wandb=True, tensorboard=False, console=False)

    calls = {}

    class Run:
        def log(self, data, step):
            calls.setdefault("log", []).append((data, step))

        def finish(self):
            calls["finish"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    fake = types.SimpleNamespace(init=init, Table=lambda columns, data: ("table", columns, data))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with TrainingLogger(tmp_path, wandb=True, wandb_project="p", tensorboard=False, console=False,
                        config={"ppo": {"kl_coef": 0.1}}) as logger:
        logger.log_metrics({"objective/kl": 0.5, "nan": math.nan}, step=3)
        logger.log_samples([{"prompt": "p", "response": "r", "score": 1.0}], step=3)
    assert calls["init"] == {"project": "p", "dir": str(tmp_path), "mode": "offline", "config": {"ppo": {"kl_coef": 0.1}}}
    assert calls["log"][0] == ({"train/objective/kl": 0.5}, 3)
    assert calls["log"][1][0]["samples"][0] == "table" and calls["finish"]
