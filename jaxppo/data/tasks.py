"""Built-in tasks: prompts plus a programmatic reward, for the demo, tests and benchmarks.

A reward function takes the prompts, the decoded responses and the rows' other columns, and
returns one float per row (`jaxppo.data.scoring` calls it):

    def my_reward(prompts: list, responses: list[str], **columns) -> list[float]

Point `reward.functions: ["my_module:my_reward"]` at your own; `reward.task` picks one of these.

- `vowels`:   share of the response's letters that are vowels (0..1), scaled down for
              responses under 24 letters (so stopping early is no shortcut). A random policy sits
              around 0.35; with the default config (the demo: tiny GPT-2, 120 iterations, rewards
              normalized by their running std, kl_coef 0.05) PPO lifts it to about 0.7 in about
              a minute on a 2-core CPU, with the KL to the reference levelling off around
              30-40 nats per response.
- `length`:   1 - |len(words) - 12| / 12, clipped to [-1, 1]: learn to stop at a length.
- `keyword`:  +1 per occurrence of "the" (case-insensitive), at most 4.
- `letters`:  prompts ask for one letter over and over ("Repeat the letter s: s"), rows
              {"prompt", "answer": "s"} over six letters; the reward is the share of the response's
              letters equal to the row's `answer` column, so it depends on the prompt: the demo of
              rewards that read the data and of critic-free advantages. A random tiny GPT-2 scores
              about 0.07 (a policy that ignores the prompt at most 1/6); GRPO (G=4, kl_coef 0,
              the other settings the demo's) lifts it to 0.2-0.35 in 100 iterations, about 30 s
              on a 2-core CPU. A KL penalty in the reward (kl_in=reward) drives the responses
              short instead.

`score_responses` and `RewardScorer` (jaxppo.data.scoring) call a set of weighted reward
functions on one batch, as the trainer does at every step and evaluation.
"""

from __future__ import annotations

import importlib
import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from jaxppo.data.scoring import RewardFn, RewardScorer, score_responses
from jaxppo.errors import ConfigError

__all__ = ["Task", "TASKS", "get_task", "import_function", "reward_functions", "demo_prompts", "letter_prompts",
           "vowels", "length", "keyword", "letters", "RewardFn", "RewardScorer", "score_responses"]

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


_LETTER_ASKS = ["Write the letter {c} again and again:", "Repeat the letter {c}:", "Type {c} many times:",
                "Say {c} over and over:", "Fill the line with the letter {c}:", "Only the letter {c}, please:",
                "Keep writing {c}:", "Letter {c}, as many times as you can:", "{c} {c} {c}, and more:",
                "Give me a long row of {c}:"]


def letter_prompts(n: int = 520, seed: int = 0, letters: str = "aeiost") -> list[dict[str, str]]:
    """Rows {"prompt", "answer"}: a letter and a phrasing asking to repeat it, the prompt ending
    with the letter as the start of the answer ("Repeat the letter s: s"); every letter equally
    often, deterministic from `seed`. Six letters by default: with all 26, a tiny random model
    meets each too rarely to learn the mapping within ~100 iterations. Any policy that ignores the
    prompt scores at most 1 / len(letters) on average, so a mean reward above it shows conditioning."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        c = letters[i % len(letters)]
        rows.append({"prompt": f"{rng.choice(_LETTER_ASKS).format(c=c)} {c}", "answer": c})
    rng.shuffle(rows)
    return rows


def letters(prompts: list, responses: list[str], answer: list[str]) -> list[float]:
    """Share of each response's letters equal to its row's `answer` letter (case-insensitive);
    0 for a response without letters."""
    out = []
    for r, a in zip(responses, answer):
        chars = [c for c in r.lower() if c.isalpha()]
        out.append(sum(c == a.lower() for c in chars) / len(chars) if chars else 0.0)
    return out


@dataclass(frozen=True)
class Task:
    reward: RewardFn                 # fn(prompts, responses, **columns) -> scores
    prompts: Callable[[], list]      # prompts, or dict rows {"prompt", <columns>} for the reward


TASKS: dict[str, Task] = {
    "vowels": Task(vowels, demo_prompts),
    "length": Task(length, demo_prompts),
    "keyword": Task(keyword, demo_prompts),
    "letters": Task(letters, letter_prompts),
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
