"""Shared test set-up: a per-session cache folder for tiny models and compiled programs, and the
process-wide settings the CLI makes (`jaxppo.runtime.configure`: two host devices on a CPU with
two or more cores, XLA:CPU options), made here explicitly since importing jaxppo changes nothing."""

import os
import sys
import tempfile

# one cache per test session: tiny checkpoints and XLA programs are made once and reused
_CACHE = os.environ.setdefault("JAXPPO_CACHE", os.path.join(tempfile.gettempdir(), "jaxppo-test-cache"))
os.environ.setdefault("JAXPPO_COMPILATION_CACHE", os.path.join(_CACHE, "xla"))

# tests in sub-folders import the shared helpers (tests/helpers.py) by module name
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jaxppo import runtime  # noqa: E402

runtime.configure(compilation_cache=False)   # trainers turn the cache on themselves, as in a user's process
