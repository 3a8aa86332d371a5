"""Shared fixtures of the point-cloud tests: one thread (tiny models run faster so on 2 cores), seeded clouds."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def clouds() -> torch.Tensor:
    """Four random clouds of 128 points (what ``point_mae_test`` is configured for)."""
    return torch.randn(4, 128, 3, generator=torch.Generator().manual_seed(0))
