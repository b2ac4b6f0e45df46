"""Reward functions through `RewardScorer`: columns as keyword arguments, async functions, timings."""

import asyncio
import time
from types import SimpleNamespace

import numpy as np
import pytest

from jaxppo.data.dataset import PPODataset
from jaxppo.data.scoring import RewardScorer, column_spec, score_responses
from jaxppo.errors import RewardError

VOCAB = ["<pad>", "k", "a", "x", "4", "6"]


class WordTokenizer:
    """decode(ids) -> the words joined by spaces (id 0 is padding)."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(VOCAB[i] for i in ids if i)


def scorer(*fns, on_error="raise"):
    return RewardScorer([(getattr(f, "__name__", "fn"), f, 1.0) for f in fns], WordTokenizer(),
                        SimpleNamespace(on_error=on_error, error_penalty=-1.0), log=print)


# responses "k k", "4", "a x" (the mask stops at the first two tokens)
RESPONSE = np.array([[1, 1, 3], [4, 0, 0], [2, 3, 3]], np.int32)
MASK = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0]], np.int32)
DATA = PPODataset([{"prompt": "repeat k", "answer": "k", "weight": 1.0},
                   {"prompt": "2+2=", "answer": "4", "weight": 2.0},
                   {"prompt": "say a", "answer": "a", "weight": 3.0}])


def test_columns_reach_the_reward_functions():
    seen = {}

    def with_kwargs(prompts, responses, **columns):
        seen["kwargs"] = (list(prompts), list(responses), columns)
        return [float(r.split()[0] == a) for r, a in zip(responses, columns["answer"])]

    def named(prompts, completions, weight):          # no **kwargs: gets the column it names only
        seen["named"] = weight
        return [0.0] * len(prompts)

    def plain(prompts, responses):                    # the old signature keeps working
        return [len(r) for r in responses]

    score = scorer(with_kwargs, named, plain)
    idx = np.array([0, 1, 2])
    scores = score(DATA.prompts, RESPONSE, MASK, columns=DATA.columns_at(idx))
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, [1 + 3, 1 + 1, 1 + 3])
    assert seen["kwargs"] == (["repeat k", "2+2=", "say a"], ["k k", "4", "a x"],
                              {"answer": ["k", "4", "a"], "weight": [1.0, 2.0, 3.0]})
    assert seen["named"] == [1.0, 2.0, 3.0]
    np.testing.assert_allclose(scorer(plain)(DATA.prompts, RESPONSE, MASK), [3, 1, 3])   # no columns at all
    assert column_spec(named).names == frozenset({"weight"}) and column_spec(with_kwargs).names is None


def test_a_required_column_the_data_lacks_is_named():
    def needs_answer(prompts, responses, answer):
        return [0.0] * len(prompts)

    with pytest.raises(RewardError, match=r"reward function needs_answer needs the column\(s\) 'answer', which the "
                                          r"data does not have \(columns: 'weight'\)"):
        scorer(needs_answer, on_error="penalty")(DATA.prompts, RESPONSE, MASK, columns={"weight": [1, 2, 3]})


def test_async_functions_run_concurrently_and_timings_are_recorded():
    async def slow_a(prompts, responses, answer):
        await asyncio.sleep(0.2)
        return [float(a == "a") for a in answer]

    async def slow_b(prompts, responses, **columns):
        await asyncio.sleep(0.2)
        return [2.0] * len(prompts)

    def fast(prompts, responses):
        return [0.5] * len(prompts)

    score = scorer(slow_a, slow_b, fast)
    t0 = time.perf_counter()
    scores = score(DATA.prompts, RESPONSE, MASK, columns=DATA.columns)
    elapsed = time.perf_counter() - t0
    np.testing.assert_allclose(scores, [2.5, 2.5, 3.5])
    assert elapsed < 0.38, elapsed                               # the two sleeps overlap
    assert set(score.last_timings) == {"slow_a", "slow_b", "fast"}
    assert 0.19 < score.last_timings["slow_a"] < 0.38 and score.last_timings["fast"] < 0.1
    assert scorer()(DATA.prompts, RESPONSE, MASK).tolist() == [0, 0, 0] and scorer().last_timings == {}


def test_async_functions_inside_a_running_event_loop():
    async def reward(prompts, responses):
        return [1.0] * len(prompts)

    async def main():                                  # e.g. a notebook
        return scorer(reward)(DATA.prompts, RESPONSE, MASK)

    assert asyncio.run(main()).tolist() == [1, 1, 1]


def test_failing_rows_are_found_with_columns_and_chat_prompts():
    messages = [{"role": "user", "content": "2+2="}]
    prompts = ["p0", messages, "p2"]

    async def picky(prompts, responses, answer):
        if "4" in answer:
            raise ValueError("cannot score this one")
        return [1.0] * len(prompts)

    logged = []
    sources = PPODataset(prompts, sources=["f.jsonl:1", "f.jsonl:2", "f.jsonl:3"]).source_map()
    timings = {}
    scores = score_responses([("picky", picky, 1.0)], prompts, ["a", "b", "c"], columns={"answer": ["k", "4", "a"]},
                             on_error="penalty", error_penalty=-2.0, log=logged.append, sources=sources, timings=timings)
    np.testing.assert_allclose(scores, [1.0, -2.0, 1.0])
    assert "failed on 1 of 3 responses (ValueError: cannot score this one; first on prompt" in logged[0]
    assert "(f.jsonl:2)" in logged[0] and "2+2=" in logged[0] and set(timings) == {"picky"}
    with pytest.raises(RewardError, match=r"failed on prompt .*2\+2=.* \(f.jsonl:2\) \(response 'b'\)"):
        score_responses([("picky", picky, 1.0)], prompts, ["a", "b", "c"], columns={"answer": ["k", "4", "a"]},
                        sources=sources)
    with pytest.raises(ValueError, match="column 'answer' has 2 values for 3 prompts"):
        score_responses([("picky", picky, 1.0)], prompts, ["a", "b", "c"], columns={"answer": ["k", "4"]})


def test_error_penalty_is_the_score_of_the_row_whatever_the_weights():
    """reward.error_penalty is the row's score from the reward functions as a whole: not multiplied
    by the failing function's weight, nor added to the other functions' scores."""
    def fails_on_b(prompts, responses):
        if "b" in responses:
            raise ValueError("no")
        return [1.0] * len(responses)

    def nan_on_c(prompts, responses):
        return [float("nan") if r == "c" else 0.5 for r in responses]

    fns = [("fails_on_b", fails_on_b, 3.0), ("nan_on_c", nan_on_c, 2.0)]
    scores = score_responses(fns, ["p0", "p1", "p2"], ["a", "b", "c"], on_error="penalty", error_penalty=-1.0,
                             log=lambda _: None)
    np.testing.assert_allclose(scores, [3.0 * 1.0 + 2.0 * 0.5, -1.0, -1.0])
    whole = score_responses(fns[:1], ["p0", "p1"], ["a", "b"], on_error="penalty", error_penalty=-1.0,
                            log=lambda _: None)
    np.testing.assert_allclose(whole, [3.0, -1.0])      # weight 3, still -1
