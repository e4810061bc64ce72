"""Shared test fixtures."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def one_thread():
    """One intra-op thread for tests on tiny tensors: thread wake-ups otherwise dominate on small,
    busy CPUs (100x slower). Restored afterwards, so other modules are unaffected."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
