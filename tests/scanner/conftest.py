"""Fixtures shared by the scanner tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scanner.loading.architectures import build_architecture


@pytest.fixture(scope="module")
def mnist_cnn() -> nn.Module:
    """An untrained ``mnist_cnn`` with fixed weights, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_architecture("mnist_cnn", 10).eval()
