"""Built-in tasks: prompts plus a programmatic reward, for the demo, tests and benchmarks.

A reward function takes the decoded prompts and responses and returns one float per row:

    def my_reward(prompts: list[str], responses: list[str]) -> list[float]

Point `reward.functions: ["my_module:my_reward"]` at your own; `reward.task` picks one of these.

- `vowels`:   share of the response's letters that are vowels (0..1), scaled down for
              responses under 24 letters (so stopping early is no shortcut). A random policy sits
              around 0.35; with the default config (the demo: tiny GPT-2, 120 iterations, rewards
              normalized by their running std, kl_coef 0.05) PPO lifts it to about 0.7 in about
              a minute on a 2-core CPU, with the KL to the reference levelling off around
              30-40 nats per response.
- `length`:   1 - |len(words) - 12| / 12, clipped to [-1, 1]: learn to stop at a length.
- `keyword`:  +1 per occurrence of "the" (case-insensitive), at most 4.

`score_responses` calls a set of weighted reward functions on one batch, as the trainer does at
every step and evaluation, and finds, names and raises or penalises the rows a function fails on.
"""

from __future__ import annotations

import importlib
import random
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from jaxppo.errors import ConfigError, RewardError, one_line

RewardFn = Callable[[list[str], list[str]], list[float]]

_SUBJECTS = ["the cat", "a small dog", "the old farmer", "my neighbour", "the young engineer",
             "a tired student", "the red fox", "our teacher", "a clever robot", "the baker",
             "a wise owl", "the river", "a lonely traveler", "the scientist"]
_VERBS = ["walks to", "looks at", "thinks about", "builds", "paints", "finds", "carries",
          "writes about", "dreams of", "talks with", "follows", "watches", "repairs", "opens"]
_OBJECTS = ["the green garden", "a wooden bridge", "the bright morning sky", "an ancient map",
            "the blue door", "a cup of tea", "the mountain trail", "a heavy box", "a golden key",
            "the long letter", "a broken clock", "the evening train", "a basket of apples"]
_STARTS = ["Tell me a story about", "Write a short poem about", "Describe how", "Imagine that",
           "Once upon a time,", "In a faraway village,", "Every morning", "What happens when"]


def demo_prompts(n: int = 512, seed: int = 0) -> list[str]:
    """Short synthetic English prompts (deterministic)."""
    rng = random.Random(seed)
    return [f"{rng.choice(_STARTS)} {rng.choice(_SUBJECTS)} who {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
            for _ in range(n)]


def vowels(prompts: list[str], responses: list[str], min_letters: int = 24) -> list[float]:
    out = []
    for r in responses:
        letters = [c for c in r.lower() if c.isalpha()]
        share = sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0
        # short answers earn proportionally less, so stopping early is not a shortcut
        out.append(share * min(1.0, len(letters) / min_letters))
    return out


def length(prompts: list[str], responses: list[str], target: int = 12) -> list[float]:
    return [max(-1.0, 1.0 - abs(len(r.split()) - target) / target) for r in responses]


def keyword(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(min(4, len(re.findall(r"\bthe\b", r.lower())))) for r in responses]


@dataclass(frozen=True)
class Task:
    reward: RewardFn
    prompts: Callable[[], list[str]]


TASKS: dict[str, Task] = {
    "vowels": Task(vowels, demo_prompts),
    "length": Task(length, demo_prompts),
    "keyword": Task(keyword, demo_prompts),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"reward.task: unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def import_function(spec: str, key: str = "reward.functions") -> RewardFn:
    """'package.module:function' -> the callable, with a one-line error naming what is missing."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key}: {spec!r} is not of the form 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        raise ConfigError(f"{key}: cannot import module {module_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{key}: module {module_name!r} has no callable {attr!r}")
    return fn


def score_responses(reward_fns: list[tuple[str, RewardFn, float]], prompts: list[str], texts: list[str], *,
                    on_error: str = "raise", error_penalty: float = 0.0, log: Callable[[str], None] = print,
                    sources: Mapping[str, str] | None = None) -> np.ndarray:
    """Weighted sum of reward functions' scores, float32 [B]: `reward_fns` are (name, fn, weight),
    `texts` the decoded responses to `prompts`.

    A function that raises (or returns the wrong number of scores) on the batch is called again
    on each row to find the prompt at fault; a non-finite score names its prompt too. With
    on_error="raise" that is a RewardError; with "penalty" the rows at fault score error_penalty
    (with a warning through `log`) and the others keep their scores. `sources` maps a prompt to
    where it comes from ('prompts.jsonl:7'), shown next to it.
    """
    B = len(prompts)
    total = np.zeros(B, np.float64)
    sources = sources or {}

    def show(text: str, limit: int = 80) -> str:
        return repr(text if len(text) <= limit else text[:limit - 3] + "...")

    def prompt_at(i: int) -> str:
        where = sources.get(prompts[i])
        return show(prompts[i]) + (f" ({where})" if where else "")

    def call(fn, p, t):
        """(scores float64 [len(p)], None) or (None, what went wrong)."""
        try:
            values = np.asarray(fn(p, t), dtype=np.float64).reshape(-1)
        except Exception as e:  # noqa: BLE001 - user code
            return None, f"{type(e).__name__}: {one_line(e)}"
        if values.shape[0] != len(p):
            return None, f"returned {values.shape[0]} scores for {len(p)} responses"
        return values, None

    for name, fn, weight in reward_fns:
        values, error = call(fn, prompts, texts)
        if error is not None:
            values, failed = np.full(B, error_penalty, np.float64), []
            for i in range(B):             # the batch call does not say which row is at fault
                row, row_error = call(fn, prompts[i:i + 1], texts[i:i + 1])
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
            log(f"warning: reward function {name} failed on {len(failed)} of {B} responses ({error}); "
                f"they score reward.error_penalty={error_penalty}")
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.argmax(bad))
            if on_error == "raise":
                raise RewardError(f"reward function {name} returned {values[i]} for prompt {prompt_at(i)} "
                                  f"(response {show(texts[i])}); reward.on_error=penalty scores such "
                                  "responses reward.error_penalty instead")
            log(f"warning: reward function {name} returned {int(bad.sum())} non-finite scores "
                f"(first {values[i]} for prompt {prompt_at(i)}); using reward.error_penalty={error_penalty}")
            values = np.where(bad, error_penalty, values)
        total += weight * values
    return total.astype(np.float32)


def reward_functions(reward_cfg, extra: Sequence[Callable] | None = None) -> list[tuple[str, RewardFn, float]]:
    """(name, fn, weight) of every reward function a run uses: the built-in `reward.task`, the
    `reward.functions` specs ('module:function', weighted by `reward.weights`), and the Python
    callables passed to the trainer (weight 1)."""
    fns: list[tuple[str, RewardFn, float]] = []
    if reward_cfg.task:
        fns.append((f"task:{reward_cfg.task}", get_task(reward_cfg.task).reward, 1.0))
    weights = list(reward_cfg.weights) or [1.0] * len(reward_cfg.functions)
    for spec, w in zip(reward_cfg.functions, weights):
        fns.append((spec, import_function(spec), float(w)))
    for fn in extra or ():
        fns.append((getattr(fn, "__name__", repr(fn)), fn, 1.0))
    return fns


class RewardScorer:
    """The reward functions of a run applied to sampled token ids: decode the valid response
    tokens, call `score_responses`, return float32 [B] (zeros without functions).

    `sources` maps a prompt to where it came from ('prompts.jsonl:7'), so that a reward error
    names the line; the trainer sets it for each training run."""

    def __init__(self, fns: list[tuple[str, RewardFn, float]], tokenizer, reward_cfg, log: Callable[[str], None]):
        self.fns = fns
        self.tokenizer = tokenizer
        self.on_error = reward_cfg.on_error
        self.error_penalty = reward_cfg.error_penalty
        self.log = log
        self.sources: Mapping[str, str] = {}

    def __call__(self, prompts: list[str], response, mask) -> np.ndarray:
        """response, mask: [B, R] token ids and response mask (NumPy, or device arrays to copy)."""
        if not self.fns:
            return np.zeros(len(prompts), np.float32)
        response, mask = np.asarray(response), np.asarray(mask)
        texts = [self.tokenizer.decode(r[m > 0], skip_special_tokens=True) for r, m in zip(response, mask)]
        return score_responses(self.fns, prompts, texts, on_error=self.on_error, error_penalty=self.error_penalty,
                               log=self.log, sources=self.sources)
