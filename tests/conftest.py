"""Shared fixtures."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (the machine's cores go to Ray actors and other tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
