"""Loading torch.export programs: any batch size, inference mode, refused randomness."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from scanner.config import ModelOptions
from scanner.errors import UnsupportedFormatError
from scanner.loading import ExportedClassifier, load_model
from tests.scanner.loading.helpers import CPU, assert_error, assert_same_logits


def test_load_pt2_under_any_name(checkpoints: dict[str, Path], mnist_model: nn.Module, tmp_path: Path) -> None:
    renamed = tmp_path / "upload-3f2a.bin"
    shutil.copyfile(checkpoints["pt2"], renamed)
    assert_same_logits(mnist_model, load_model(renamed, ModelOptions(), CPU).module, (1, 28, 28))


def test_load_pt2_static_batch_splits_and_pads(checkpoints: dict[str, Path], mnist_model: nn.Module) -> None:
    loaded = load_model(checkpoints["pt2_static"], ModelOptions(), CPU)
    assert isinstance(loaded.module, ExportedClassifier)
    assert (loaded.module.min_batch, loaded.module.max_batch) == (2, 2)
    for count in (1, 2, 5):
        assert_same_logits(mnist_model, loaded.module, (1, 28, 28), count)


def test_load_pt2_exported_in_train_mode_runs_in_inference_mode(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 6 * 6, 3)
    )
    with torch.no_grad():
        net(torch.rand(8, 3, 8, 8))  # move the running statistics away from their defaults
    path = tmp_path / "train_mode.pt2"
    torch.export.save(torch.export.export(net.train(), (torch.rand(2, 3, 8, 8),)), path)
    loaded = load_model(path, ModelOptions(), CPU)
    assert loaded.num_classes == 3
    assert loaded.module.eval() is loaded.module  # eval() works on the wrapper
    assert_same_logits(net.eval(), loaded.module, (3, 8, 8), 4)


class _StochasticDepth(nn.Module):
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return features
        keep = torch.empty(features.shape[0], 1).bernoulli_(0.9)
        return features * keep / 0.9


def test_load_pt2_with_training_randomness_is_refused(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3), _StochasticDepth()).train()
    path = tmp_path / "stochastic.pt2"
    torch.export.save(torch.export.export(net, (torch.rand(2, 1, 6, 6),)), path)
    assert_error(
        UnsupportedFormatError,
        "unsupported_format",
        lambda: load_model(path, ModelOptions(), CPU),
        "aten.bernoulli_.float",
        "model.eval()",
    )
