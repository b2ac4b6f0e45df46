"""Built-in tasks: prompts plus a programmatic reward, for the demo, tests and benchmarks.

A reward function takes the decoded prompts and responses and returns one float per row:

    def my_reward(prompts: list[str], responses: list[str]) -> list[float]

Point `reward.functions: ["my_module:my_reward"]` at your own; `reward.task` picks one of these.

- `vowels`:   share of the response's letters that are vowels (0..1), scaled down for
              responses under 24 letters (so stopping early is no shortcut). A random policy sits
              around 0.35; with the default config (the demo: tiny GPT-2, 120 iterations, rewards
              normalized by their running std, kl_coef 0.05) PPO lifts it to about 0.65 in about
              two minutes on a 2-core CPU, with the KL to the reference levelling off around
              30-40 nats per response.
- `length`:   1 - |len(words) - 12| / 12, clipped to [-1, 1]: learn to stop at a length.
- `keyword`:  +1 per occurrence of "the" (case-insensitive), at most 4.
"""

from __future__ import annotations

import importlib
import random
import re
from dataclasses import dataclass
from typing import Callable

from jaxppo.errors import ConfigError

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
