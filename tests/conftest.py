"""Shared test set-up: a per-session cache folder for tiny models and compiled programs."""

import os
import tempfile

# one cache per test session: tiny checkpoints and XLA programs are made once and reused
_CACHE = os.environ.setdefault("JAXPPO_CACHE", os.path.join(tempfile.gettempdir(), "jaxppo-test-cache"))
os.environ.setdefault("JAXPPO_COMPILATION_CACHE", os.path.join(_CACHE, "xla"))

# tests in sub-folders import the shared helpers (tests/helpers.py) by module name
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
