r"""Verifiable rewards: the final answer of a response checked against the row's `answer` column.

    reward:
      functions: ["jaxppo.data.rewards:math_answer_reward"]     # rows need an `answer` column

`extract_answer` takes the content of the last `\boxed{...}` (braces balanced), else the last
number of the text. `math_answer_reward` scores 1.0 when it equals the answer: as numbers
("0.5" == "1/2" == "\frac{1}{2}", "1,000" == "1000"), else as normalised strings, else, when the
optional `math-verify` package is installed (`pip install 'jaxppo[math]'`), as the expressions
it parses (`\sqrt{2}/2` == `\frac{1}{\sqrt{2}}`). A GSM8K-style answer ("... #### 72") or a
MATH-style solution (with a `\boxed{}`) is reduced to its final answer first.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

__all__ = ["extract_answer", "answers_match", "math_answer_reward"]

_NUMBER = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\$?\.\d+")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) whose braces balance."""
    for start in sorted((m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)), reverse=True):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def extract_answer(text: str) -> str | None:
    r"""The final answer of a response: the content of the last `\boxed{...}` (nested braces
    kept), else the last number in the text with '$' and thousands commas stripped
    ("$1,234.5" -> "1234.5", "-3", "3/4"); None when there is neither."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace("$", "").replace(",", "") if numbers else None


def _strip(s: str) -> str:
    s = _TEXT.sub(r"\1", s.strip())
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\%", ""),
                     ("%", ""), ("^\\circ", ""), ("^{\\circ}", ""), ("$", ""), (" ", "")):
        s = s.replace(old, new)
    return s.rstrip(".")


def _as_number(s: str) -> Fraction | None:
    s = _FRAC.sub(r"(\1)/(\2)", _strip(s)).replace(",", "")
    m = re.fullmatch(r"\(?(-?[\d.]+)\)?/\(?(-?[\d.]+)\)?", s)
    try:
        if m:
            return Fraction(m.group(1)) / Fraction(m.group(2))
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _gold(answer: object) -> str:
    text = str(answer)
    if "####" in text:          # GSM8K: the worked solution, then "#### 72"
        return text.rsplit("####", 1)[1].strip()
    boxed = _last_boxed(text)   # MATH: the solution holds the answer in \boxed{}
    return boxed if boxed is not None else text.strip()


def _math_verify(gold: str, predicted: str) -> bool | None:
    """math-verify's verdict, or None when the package is not installed."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    # math-verify times out with signal.alarm, which only works on the main thread
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        return bool(verify(parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout),
                           parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout), timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - a parse failure or a timeout: not a match
        return False


def answers_match(predicted: str, answer: object) -> bool:
    """Whether an extracted answer equals a reference answer: as numbers, as normalised strings,
    or (with math-verify installed) as parsed expressions."""
    gold = _gold(answer)
    a, b = _as_number(predicted), _as_number(gold)
    if a is not None and b is not None:
        return a == b
    if _strip(predicted).lower() == _strip(gold).lower():
        return True
    return bool(_math_verify(gold, predicted))


def math_answer_reward(prompts: list, responses: list[str], answer: list, **columns) -> list[float]:
    r"""1.0 for each response whose final answer (`extract_answer`) matches its row's `answer`
    (`answers_match`), 0.0 otherwise (also when the response has no answer)."""
    out = []
    for response, gold in zip(responses, answer):
        predicted = extract_answer(response)
        out.append(1.0 if predicted is not None and answers_match(predicted, gold) else 0.0)
    return out
