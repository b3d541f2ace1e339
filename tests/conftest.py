"""Shared test set-up: one thread, deterministic algorithms, a `seed` fixture."""
import pytest
import torch

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


@pytest.fixture
def seed():
    """Seed torch's global generator so each test sees the same numbers."""
    torch.manual_seed(0)
    return 0
