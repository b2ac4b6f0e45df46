"""Verifiable rewards (final answers) and the `letters` task, whose reward reads the `answer` column."""

import sys

import numpy as np
import pytest

from jaxppo.data.dataset import PPODataset
from jaxppo.data.rewards import answers_match, extract_answer, math_answer_reward
from jaxppo.data.tasks import get_task, import_function, letter_prompts, letters


@pytest.mark.parametrize("text, expected", [
    (r"so the answer is \boxed{42}.", "42"),
    (r"\boxed{1} first, then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),                    # the last one
    (r"nested \boxed{\frac{a^{2}}{b_{1}}} braces", r"\frac{a^{2}}{b_{1}}"),
    (r"unbalanced \boxed{\frac{1}{2} and 7", "7"),                                     # falls back to numbers
    ("It costs $1,234.50 in total.", "1234.50"),
    ("The temperature fell to -3.", "-3"),
    ("first 12, then 7 and finally 0.25", "0.25"),
    ("half: 1/2", "1/2"),
    ("items 1,2,3", "3"),
    ("no number here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("predicted, answer, match", [
    ("0.5", "1/2", True), (r"\frac{1}{2}", "0.5", True), (r"\dfrac{3}{4}", "0.75", True),
    ("1000", "1,000", True), ("72.0", 72, True), ("-3", "-3", True), ("-3", "3", False),
    ("1/3", "0.33", False), ("7", "8", False),
    (r"\text{Paris}", "paris", True), ("x+1", "x+1", True), ("50\\%", "50", True),
    ("72", "Natalia sold 48 clips ... 48+24 = 72\n#### 72", True),                     # GSM8K answers
    (r"\frac{1}{2}", r"so it is $\boxed{\frac12}$ ... no, \boxed{0.5}", True),       # MATH solutions
])
def test_answers_match_without_math_verify(predicted, answer, match, monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)         # the plain comparison alone
    assert answers_match(predicted, answer) is match


def test_math_answer_reward():
    responses = [r"Thus \boxed{\frac{1}{2}}.", "So 2 + 2 = 4", "The total is $1,000.", "I do not know",
                 "It is -5", r"\boxed{3}"]
    answers = ["0.5", "4", "1000", "3", "5", "4"]
    assert math_answer_reward(["q"] * 6, responses, answers) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert math_answer_reward(["q"], ["4"], ["4"], level=[1]) == [1.0]            # other columns are ignored
    assert import_function("jaxppo.data.rewards:math_answer_reward") is math_answer_reward


def test_math_verify_widens_the_match_when_installed():
    pytest.importorskip("math_verify")
    assert answers_match(r"\frac{1}{\sqrt{2}}", r"\sqrt{2}/2") and answers_match("1+x", "x+1")
    assert not answers_match(r"\sqrt{3}", r"\sqrt{2}")


def test_letters_task():
    rows = letter_prompts()
    assert rows == letter_prompts() and rows != letter_prompts(seed=1)          # deterministic from the seed
    assert len(rows) >= 500 and len({r["prompt"] for r in rows}) == 60           # 6 letters x 10 phrasings
    assert sorted({r["answer"] for r in rows}) == list("aeiost")
    assert all(r["prompt"].endswith(f": {r['answer']}") for r in rows)          # the prompt ends with the letter
    assert {r["answer"] for r in letter_prompts(26, letters="xyz")} == set("xyz")
    task = get_task("letters")
    ds = PPODataset(task.prompts())
    assert list(ds.columns) == ["answer"]
    scores = task.reward(["p"] * 5, ["kkkk", "k k a b", "K-k!", "123 ...", ""], answer=["k", "k", "k", "k", "k"])
    np.testing.assert_allclose(scores, [1.0, 0.5, 1.0, 0.0, 0.0])
    assert letters(["p"], ["zzz"], ["a"]) == [0.0]
