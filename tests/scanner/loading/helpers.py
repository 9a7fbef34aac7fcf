"""Helpers shared by the loading tests."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from scanner.config import ModelOptions
from scanner.errors import ScannerError
from scanner.loading import ModelFileReport, check_model_file
from scanner.loading.architectures import build_architecture
from scanner.loading.types import FindingKind

CPU = torch.device("cpu")
MNIST = ModelOptions(arch="mnist_cnn")


def seeded(arch: str, num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_architecture(arch, num_classes).eval()


def images(shape: tuple[int, int, int], count: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.rand((count, *shape), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(original: nn.Module, loaded: nn.Module, shape: tuple[int, int, int], count: int = 5) -> None:
    batch = images(shape, count)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), original(batch))


def assert_error(error: type[ScannerError], code: str, call: Callable[[], object], *fragments: str) -> ScannerError:
    with pytest.raises(error) as caught:
        call()
    assert caught.value.code == code
    for fragment in fragments:
        assert fragment in caught.value.detail
    return caught.value


def kinds(report: ModelFileReport) -> list[FindingKind]:
    return [finding.kind for finding in report.findings]


def refused_with_peak(path: Path) -> tuple[ScannerError, int]:
    """How ``check_model_file`` (the upload request's check) refuses ``path``, and the peak bytes Python allocated."""
    tracemalloc.start()
    try:
        with pytest.raises(ScannerError) as caught:
            check_model_file(path, ModelOptions())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return caught.value, peak
