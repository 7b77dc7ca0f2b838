"""Pytest configuration and fixtures; the plain helpers they use are in ``testing_utils.py``."""

from __future__ import annotations

import pytest
import torch
from testing_utils import TinyConv2dNet

# The tests use tiny tensors: one thread is fastest, and immune to a busy neighbour on a shared machine.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_net():
    """A seeded :class:`testing_utils.TinyConv2dNet` in eval mode."""
    torch.manual_seed(0)
    return TinyConv2dNet().eval()


@pytest.fixture
def ids():
    """Token ids ``(3, 5)`` for :class:`testing_utils.TinyConv2dNet` (vocabulary 40)."""
    return torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(1))
