"""User-facing errors.

A `JaxppoError` means bad input (a config value, a file, a missing extra), not a bug: its
message is one line that names the culprit (file and line, config key, expected vs got).
The command-line entry points catch it and print `error: <message>` with exit code 2 and
no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["JaxppoError", "ConfigError", "DataError", "RewardError", "one_line"]


class JaxppoError(Exception):
    """Base class of the errors caused by user input; the message is one line."""


class ConfigError(JaxppoError, ValueError):
    """An invalid configuration: unknown key, wrong type, value out of range, impossible combination.

    `keys` holds the dotted config keys at fault (first = main culprit), so that a caller
    that knows where a value came from (YAML file and line, command-line override) can say so.
    """

    def __init__(self, message: str, *, keys: tuple[str, ...] = ()):
        super().__init__(message)
        self.keys = tuple(keys)


class DataError(JaxppoError, ValueError):
    """Invalid data: missing or malformed prompt file, prompts that do not fit, bad tokenizer."""


class RewardError(JaxppoError):
    """A reward function raised or returned something unusable (with reward.on_error=raise)."""


def one_line(text: object, limit: int = 300) -> str:
    """The first non-empty line of `text` (an exception's message, say), cut to `limit` characters,
    so that a message built from it stays one line."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if len(lines) > 1:
        first += " ..."
    return first if len(first) <= limit else first[: limit - 3] + "..."
