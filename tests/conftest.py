"""Registers the one-file toy backend and method (tests/toy_*.py) for the whole session, so the
tests parametrised over every registered backend and method run on them too."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import toy_backend  # noqa: E402,F401
import toy_method  # noqa: E402,F401
