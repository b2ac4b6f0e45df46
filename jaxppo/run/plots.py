"""Training curves from a run's metrics.jsonl as PNG files in RUN_DIR/plots/.

    python -m jaxppo.plot runs/demo        # -> runs/demo/plots/overview.png, reward.png, kl.png, ...

Figures are drawn on `matplotlib.figure.Figure` objects, which render with the Agg canvas and
never touch pyplot or the global backend: safe on headless machines and inside notebooks.
Train series are drawn raw (faint) with an EMA-smoothed line; eval points as markers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jaxppo.errors import JaxppoError
from jaxppo.run.logger import METRICS_FILE, read_metrics

__all__ = ["Panel", "PANELS", "plot_run", "ema"]


@dataclass(frozen=True)
class Panel:
    name: str  # file stem of the panel's own PNG
    title: str
    key: str  # metric name in metrics.jsonl
    ylabel: str
    smooth: bool = True  # draw an EMA over the (noisy) train series


PANELS: tuple[Panel, ...] = (
    Panel("reward", "Reward (objective/scores)", "objective/scores", "mean score"),
    Panel("kl", "KL to reference (objective/kl)", "objective/kl", "KL"),
    Panel("entropy", "Policy entropy (objective/entropy)", "objective/entropy", "entropy"),
    Panel("policy_loss", "Policy loss (loss/policy_avg)", "loss/policy_avg", "loss"),
    Panel("value_loss", "Value loss (loss/value_avg)", "loss/value_avg", "loss"),
    Panel("clipfrac", "Policy clip fraction (policy/clipfrac_avg)", "policy/clipfrac_avg", "fraction"),
    Panel("lr", "Learning rate", "lr", "lr", smooth=False),
    Panel("tokens_per_sec", "Throughput (tokens_per_sec)", "tokens_per_sec", "tokens / s"),
)


def ema(values: Sequence[float], weight: float) -> np.ndarray:
    """Debiased exponential moving average (as TensorBoard's smoothing slider)."""
    out = np.empty(len(values))
    acc, norm = 0.0, 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[i] = acc / norm
    return out


def _series(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows
           if isinstance(r.get("step"), (int, float)) and isinstance(r.get(key), (int, float))
           and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    pts.sort(key=lambda p: p[0])
    return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)


def _eval_key(panel: Panel, eval_rows: Sequence[dict]) -> str | None:
    """The eval metric drawn with the panel: the same key, or for the reward any '*score*' key."""
    keys = {k for r in eval_rows for k in r if k not in ("step", "split", "time")}
    if panel.key in keys:
        return panel.key
    if panel.name == "reward":
        scores = sorted(k for k in keys if "score" in k)
        return scores[0] if scores else None
    return None


@dataclass(frozen=True)
class _PanelData:
    x: np.ndarray  # train steps
    y: np.ndarray
    ex: np.ndarray  # eval steps
    ey: np.ndarray
    eval_key: str | None


def _panel_data(panel: Panel, train_rows: Sequence[dict], eval_rows: Sequence[dict]) -> _PanelData | None:
    """The panel's train and eval series, or None when the run has none of its metrics."""
    x, y = _series(train_rows, panel.key)
    ekey = _eval_key(panel, eval_rows)
    ex, ey = _series(eval_rows, ekey) if ekey else (np.empty(0), np.empty(0))
    return _PanelData(x, y, ex, ey, ekey) if len(x) or len(ex) else None


def _draw(ax, panel: Panel, d: _PanelData) -> None:
    smoothed = panel.smooth and len(d.x) >= 5
    if smoothed:
        weight = min(0.9, 1.0 - 5.0 / len(d.x))  # stronger smoothing for longer runs
        ax.plot(d.x, d.y, color="C0", alpha=0.25, linewidth=1.0, label="train (raw)")
        ax.plot(d.x, ema(d.y, weight), color="C0", linewidth=2.0, label="train (EMA)")
    elif len(d.x):
        ax.plot(d.x, d.y, color="C0", linewidth=1.5, marker="." if len(d.x) < 30 else None, label="train")
    if len(d.ex):
        ax.plot(d.ex, d.ey, color="C3", marker="o", linestyle="--", linewidth=1.0, markersize=5,
                label="eval" if d.eval_key == panel.key else f"eval ({d.eval_key})")
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    if smoothed or (len(d.x) and len(d.ex)):
        ax.legend(fontsize=8, loc="best")


def plot_run(run_dir: str | os.PathLike) -> list[str]:
    """Writes plots/overview.png and one PNG per panel that has data; returns the paths written.

    Raises JaxppoError if `run_dir` or its metrics.jsonl is missing; a run with no rows yet
    writes nothing and returns [].
    """
    from matplotlib.figure import Figure  # the Agg canvas, no pyplot: see the module docstring

    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise JaxppoError(f"run directory not found: {run_dir}")
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(metrics_path):
        raise JaxppoError(f"{metrics_path} not found: is {run_dir} a jaxppo run directory?")
    rows = read_metrics(metrics_path)
    train_rows = [r for r in rows if r.get("split", "train") == "train"]
    eval_rows = [r for r in rows if r.get("split") == "eval"]

    data = {p: _panel_data(p, train_rows, eval_rows) for p in PANELS}
    present = [p for p in PANELS if data[p] is not None]
    if not present:
        return []
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)

    ncols = min(4, len(present))
    nrows = math.ceil(len(present) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, present):
        _draw(ax, panel, data[panel])
    for ax in axes[len(present):]:
        ax.set_visible(False)
    fig.suptitle(f"jaxppo run: {os.path.basename(os.path.abspath(run_dir))}", fontsize=12)
    paths = [os.path.join(out_dir, "overview.png")]
    fig.savefig(paths[0], dpi=100)

    for panel in present:
        fig = Figure(figsize=(6, 4), layout="constrained")
        _draw(fig.subplots(), panel, data[panel])
        paths.append(os.path.join(out_dir, f"{panel.name}.png"))
        fig.savefig(paths[-1], dpi=100)
    return paths
