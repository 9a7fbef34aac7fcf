"""Fixtures shared by the loading tests: one clean checkpoint of the same model in every format."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from tests.malicious import build_clean_legacy_tar
from tests.scanner.loading.helpers import seeded


@pytest.fixture(scope="package")
def mnist_model() -> nn.Module:
    """An untrained ``mnist_cnn`` with fixed weights, in eval mode; read-only."""
    return seeded("mnist_cnn")


@pytest.fixture(scope="package")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, mnist_model: nn.Module) -> dict[str, Path]:
    """One clean checkpoint of ``mnist_model`` per format, keyed by format name (``pt2`` has a dynamic batch).

    Zip archives are named so their members sit under ``model/`` (``torch_zip``) and ``scripted/``
    (``torchscript``); ``pt2_static`` is exported for batches of exactly 2.
    """
    directory = tmp_path_factory.mktemp("checkpoints")
    example = torch.zeros(2, 1, 28, 28)
    paths = {
        name: directory / file
        for name, file in {
            "pt2": "dynamic.pt2",
            "pt2_static": "static.pt2",
            "safetensors": "model.safetensors",
            "torch_zip": "model.pt",
            "torch_legacy": "legacy.pth",
            "torchscript": "scripted.pt",
            "torch_tar": "legacy_tar.pt",
            "pickle": "plain.pkl",
        }.items()
    }
    torch.export.save(
        torch.export.export(mnist_model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},)), paths["pt2"]
    )
    torch.export.save(torch.export.export(mnist_model, (example,)), paths["pt2_static"])
    safetensors.torch.save_file(mnist_model.state_dict(), paths["safetensors"])
    torch.save(mnist_model.state_dict(), paths["torch_zip"])
    torch.save(mnist_model.state_dict(), paths["torch_legacy"], _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.trace(mnist_model, example), paths["torchscript"])  # type: ignore[no-untyped-call]
    build_clean_legacy_tar(paths["torch_tar"])
    paths["pickle"].write_bytes(pickle.dumps({"epochs": 3}, protocol=4))
    return paths
