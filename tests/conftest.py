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


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change; a real run is one process,
    a test session runs many runs (fp32 toy, bf16 diffusers presets), so each test starts from a fresh one
    (as accelerate's own test cases do)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
