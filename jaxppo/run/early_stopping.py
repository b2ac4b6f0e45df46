"""Early stopping on a monitored metric (`early_stopping.metric`, mode max/min, patience, min_delta)."""

from __future__ import annotations

import difflib
import math

from jaxppo.errors import ConfigError
from jaxppo.run.evaluation import EVAL_METRICS


class EarlyStopping:
    """Counts the checks without an improvement of the monitored metric; its state is checkpointed."""

    def __init__(self, cfg):
        self.cfg = cfg
        if cfg.metric is not None and cfg.metric.startswith("eval/"):   # known before the run: refuse a typo now
            check_metric_name(cfg.metric, [f"eval/{name}" for name in EVAL_METRICS])
        self.best: float | None = None
        self.bad_count = 0
        self.stopped = False
        self.reason: str | None = None

    def value(self, metrics: dict, eval_metrics: dict, step: int, eval_every: int):
        """The monitored metric at `step`: a train metric, or an `eval/` one on an evaluation step
        (None when the metric is off or not measured at this step)."""
        name = self.cfg.metric
        if name is None:
            return None
        if name.startswith("eval/"):
            fresh = eval_every and step % eval_every == 0
            return eval_metrics.get(name[len("eval/"):]) if fresh else None
        check_metric_name(name, metrics)     # the train metrics depend on the run: checked against them
        return metrics[name]

    def check(self, value: float | None) -> bool:
        """Feed the monitored metric; True when it has not improved for `patience` checks."""
        es = self.cfg
        if es.metric is None or value is None or not math.isfinite(value):
            return False
        improved = self.best is None or (value > self.best + es.min_delta if es.mode == "max"
                                         else value < self.best - es.min_delta)
        if improved:
            self.best, self.bad_count = float(value), 0
        else:
            self.bad_count += 1
        if self.bad_count >= es.patience:
            self.stopped = True
            self.reason = (f"early stopping: {es.metric} has not improved on {self.best:.6g} "
                           f"(mode {es.mode}, min_delta {es.min_delta}) for {self.bad_count} checks")
            return True
        return False

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_count": self.bad_count, "stopped": self.stopped, "reason": self.reason,
                "metric": self.cfg.metric, "mode": self.cfg.mode}

    def load_state_dict(self, state: dict):
        """The saved counters; none when they watched another metric or mode (changed on resume)."""
        if (state.get("metric", self.cfg.metric), state.get("mode", self.cfg.mode)) != (self.cfg.metric, self.cfg.mode):
            return
        self.best = state.get("best", self.best)
        self.bad_count = int(state.get("bad_count", self.bad_count))
        self.stopped = bool(state.get("stopped", self.stopped))
        self.reason = state.get("reason", self.reason)


def check_metric_name(name: str, known) -> None:
    """A one-line ConfigError when `name` is not among `known`, naming the closest ones."""
    if name in known:
        return
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(map(repr, close))}?" if close else f"expected one of {', '.join(sorted(known))}"
    raise ConfigError(f"early_stopping.metric={name!r} is not a metric this run logs: {hint}",
                      keys=("early_stopping.metric",))
