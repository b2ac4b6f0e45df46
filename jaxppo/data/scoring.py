"""Reward functions applied to a batch: the rows' columns as keyword arguments, `async def`
functions awaited concurrently, the wall time of each, and the rows a function fails on found.

A reward function is called as TRL calls one:

    def my_reward(prompts, responses, **columns) -> list[float]     # or `async def`

`prompts` are the batch's prompts as the dataset holds them (strings, or lists of chat messages),
`responses` the decoded responses, and `columns` every other field of the rows (`answer=[...]`).
A function without `**kwargs` gets the columns its signature names only, so `f(prompts,
responses)` and `f(prompts, responses, answer)` both work; a column it requires (no default) and
the data lacks is a RewardError naming it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from jaxppo.data.dataset import prompt_key
from jaxppo.errors import RewardError, one_line

__all__ = ["RewardFn", "ColumnSpec", "column_spec", "call_concurrently", "score_responses", "RewardScorer"]

RewardFn = Callable[..., Any]   # (prompts, responses, **columns) -> scores [B], or an awaitable of them


class ColumnSpec(NamedTuple):
    """What a reward function's signature says about the columns it takes."""
    names: frozenset[str] | None   # keyword parameters that can take a column; None = any (**kwargs)
    positional: frozenset[str]     # the (up to two) parameters that take the prompts and responses
    required: tuple[str, ...]      # keyword parameters without a default: columns the data must have


def _column_spec(fn: RewardFn) -> ColumnSpec:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):     # no signature (some builtins): columns are not passed
        return ColumnSpec(frozenset(), frozenset(), ())
    P = inspect.Parameter
    positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)][:2]
    rest = [p for p in params if p not in positional and p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)]
    any_name = any(p.kind is P.VAR_KEYWORD for p in params)
    return ColumnSpec(None if any_name else frozenset(p.name for p in rest), frozenset(p.name for p in positional),
                      tuple(p.name for p in rest if p.default is P.empty))


_cached_spec = functools.lru_cache(maxsize=256)(_column_spec)


def column_spec(fn: RewardFn) -> ColumnSpec:
    """The signature of `fn` read once (cached per function; unhashable callables are read each call)."""
    try:
        return _cached_spec(fn)
    except TypeError:   # an unhashable callable object
        return _column_spec(fn)


def _run(coro) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # called from inside a running event loop (a notebook): run a fresh loop in a worker thread
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def call_concurrently(calls: Sequence[Callable[[], Any]]) -> list[tuple[Any, Exception | None, float]]:
    """Call each thunk in order; the awaitables they return (from `async def` functions) are then
    awaited together on one event loop. -> (value, exception or None, wall seconds) per call."""
    results: list[Any] = [None] * len(calls)
    pending: dict[int, Any] = {}
    for i, call in enumerate(calls):
        t0 = time.perf_counter()
        try:
            value = call()
        except Exception as e:  # noqa: BLE001 - user code
            results[i] = (None, e, time.perf_counter() - t0)
            continue
        if inspect.isawaitable(value):
            pending[i] = value
        else:
            results[i] = (value, None, time.perf_counter() - t0)
    if pending:
        async def timed(awaitable):
            t0 = time.perf_counter()
            try:
                return await awaitable, None, time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - user code
                return None, e, time.perf_counter() - t0

        async def gather():
            return await asyncio.gather(*(timed(a) for a in pending.values()))

        for i, result in zip(pending, _run(gather())):
            results[i] = result
    return results


def _scores(value: Any, error: Exception | None, n: int) -> tuple[np.ndarray | None, str | None]:
    """(scores float64 [n], None) or (None, what went wrong)."""
    if error is not None:
        return None, f"{type(error).__name__}: {one_line(error)}"
    try:
        values = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        return None, f"returned {type(value).__name__} that is not a list of numbers ({one_line(e)})"
    if values.shape[0] != n:
        return None, f"returned {values.shape[0]} scores for {n} responses"
    return values, None


def score_responses(reward_fns: list[tuple[str, RewardFn, float]], prompts: list, texts: list[str], *,
                    columns: Mapping[str, Sequence] | None = None, on_error: str = "raise",
                    error_penalty: float = 0.0, log: Callable[[str], None] = print,
                    sources: Mapping[str, str] | None = None,
                    timings: dict[str, float] | None = None) -> np.ndarray:
    """Weighted sum of reward functions' scores, float32 [B]: `reward_fns` are (name, fn, weight),
    `texts` the decoded responses to `prompts`, `columns` the rows' other fields ({name: [B values]}),
    each function called as `fn(prompts, texts, **columns it takes)` (see the module docstring).

    A function that raises (or returns the wrong number of scores) on the batch is called again
    on each row to find the prompt at fault; a non-finite score names its prompt too. With
    on_error="raise" that is a RewardError; with "penalty" a row at fault scores error_penalty as a
    whole (not times the function's weight, nor plus the other functions' scores; a reward model's
    score is still added to it), with a warning through `log`, and the other rows keep their scores. `sources` maps
    `prompt_key(prompt)` to where it comes from ('prompts.jsonl:7'), shown next to it.
    `timings`, when given, receives each function's wall seconds in this call by name.
    """
    B = len(prompts)
    columns = dict(columns or {})
    for k, v in columns.items():
        if len(v) != B:
            raise ValueError(f"column {k!r} has {len(v)} values for {B} prompts")
    sources = sources or {}

    def show(text: str, limit: int = 80) -> str:
        return repr(text if len(text) <= limit else text[:limit - 3] + "...")

    def prompt_at(i: int) -> str:
        key = prompt_key(prompts[i])
        where = sources.get(key)
        return show(key) + (f" ({where})" if where else "")

    kwargs = []
    for name, fn, _ in reward_fns:
        spec = column_spec(fn)
        missing = [k for k in spec.required if k not in columns]
        if missing:
            raise RewardError(f"reward function {name} needs the column(s) {', '.join(map(repr, missing))}, which "
                              f"the data does not have (columns: {', '.join(map(repr, columns)) or 'none'})")
        kwargs.append({k: v for k, v in columns.items()
                       if k not in spec.positional and (spec.names is None or k in spec.names)})

    batch = call_concurrently([functools.partial(fn, prompts, texts, **kw) for (_, fn, _), kw in zip(reward_fns, kwargs)])
    total, at_fault = np.zeros(B, np.float64), np.zeros(B, bool)
    for (name, fn, weight), kw, (value, exc, seconds) in zip(reward_fns, kwargs, batch):
        values, error = _scores(value, exc, B)
        if error is not None:
            # the batch call does not say which row is at fault: call each row alone
            rows = call_concurrently([functools.partial(fn, prompts[i:i + 1], texts[i:i + 1],
                                                        **{k: v[i:i + 1] for k, v in kw.items()}) for i in range(B)])
            seconds += sum(r[2] for r in rows)
            values, failed = np.full(B, error_penalty, np.float64), []
            for i, (row_value, row_exc, _) in enumerate(rows):
                row, row_error = _scores(row_value, row_exc, 1)
                if row_error is None:
                    values[i] = row[0]
                    continue
                failed.append(i)
                if on_error == "raise":
                    raise RewardError(f"reward function {name} failed on prompt {prompt_at(i)} "
                                      f"(response {show(texts[i])}): {row_error}")
                if len(failed) == 1:
                    error = f"{row_error}; first on prompt {prompt_at(i)}"
            if not failed:                 # every row passes alone: the batch as a whole is at fault
                if on_error == "raise":
                    raise RewardError(f"reward function {name} failed on a batch of {B} prompts "
                                      f"(first {prompt_at(0)}): {error}")
                values[:], failed = error_penalty, list(range(B))
            at_fault[failed] = True
            log(f"warning: reward function {name} failed on {len(failed)} of {B} responses ({error}); "
                f"they score reward.error_penalty={error_penalty}")
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + seconds
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.argmax(bad))
            if on_error == "raise":
                raise RewardError(f"reward function {name} returned {values[i]} for prompt {prompt_at(i)} "
                                  f"(response {show(texts[i])}); reward.on_error=penalty scores such "
                                  "responses reward.error_penalty instead")
            log(f"warning: reward function {name} returned {int(bad.sum())} non-finite scores "
                f"(first {values[i]} for prompt {prompt_at(i)}); using reward.error_penalty={error_penalty}")
            values, at_fault = np.where(bad, error_penalty, values), at_fault | bad
        total += weight * values
    return np.where(at_fault, error_penalty, total).astype(np.float32)


class RewardScorer:
    """The reward functions of a run applied to sampled token ids: decode the valid response
    tokens, call `score_responses`, return float32 [B] (zeros without functions).

    `sources` maps `prompt_key(prompt)` to where the prompt came from ('prompts.jsonl:7'), so that
    a reward error names the line (`PPODataset.source_map()`); `last_timings` holds each
    function's wall seconds in the last call ({name: seconds}, logged as `time/reward/<name>`)."""

    def __init__(self, fns: list[tuple[str, RewardFn, float]], tokenizer, reward_cfg, log: Callable[[str], None]):
        self.fns = fns
        self.tokenizer = tokenizer
        self.on_error = reward_cfg.on_error
        self.error_penalty = reward_cfg.error_penalty
        self.log = log
        self.sources: Mapping[str, str] = {}
        self.last_timings: dict[str, float] = {}
        for _, fn, _ in fns:             # read each signature once, up front
            column_spec(fn)

    def __call__(self, prompts: list, response, mask, columns: dict[str, list] | None = None) -> np.ndarray:
        """prompts: B prompts (strings or message lists); response, mask: [B, R] token ids and
        response mask (NumPy, or device arrays to copy); columns: {name: [B values]} of the rows."""
        self.last_timings = {}
        if not self.fns:
            return np.zeros(len(prompts), np.float32)
        response, mask = np.asarray(response), np.asarray(mask)
        texts = [self.tokenizer.decode(r[m > 0], skip_special_tokens=True) for r, m in zip(response, mask)]
        return score_responses(self.fns, prompts, texts, columns=columns, on_error=self.on_error,
                               error_penalty=self.error_penalty, log=self.log, sources=self.sources,
                               timings=self.last_timings)
