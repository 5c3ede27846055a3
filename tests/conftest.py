"""Registers the one-file toy backend and method (tests/toy_*.py) for the whole session, so the
tests parametrised over every registered backend and method run on them too."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import toy_backend  # noqa: E402,F401
import toy_method  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Give every test the thread count the session started with: a test (or a run it starts
    with ``train.threads``) that sets it would otherwise leave it for all later ones, and the
    suite would run the multi-threaded paths (the refresh's threads) only where a test forces
    them."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
