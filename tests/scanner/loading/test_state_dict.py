"""Loading state_dicts into allowlisted architectures: wrappers, class counts, corrupt safetensors, mismatches."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from scanner.config import ModelOptions
from scanner.errors import (
    CorruptFileError,
    InvalidOptionError,
    StateDictMismatchError,
    UnknownArchitectureError,
    UnsupportedFormatError,
)
from scanner.loading import ModelFormat, detect_format, load_model
from tests.scanner.loading.helpers import CPU, MNIST, assert_error, assert_same_logits, seeded

# -- loading -----------------------------------------------------------------------------


def test_load_model_cifar_and_torchvision(tmp_path: Path) -> None:
    cifar = seeded("cifar_cnn", 10)
    path = tmp_path / "cifar.pt"
    torch.save(cifar.state_dict(), path)
    loaded = load_model(path, ModelOptions(arch="cifar_cnn"), CPU)
    assert (loaded.input_shape, loaded.num_classes) == ((3, 32, 32), 10)
    assert_same_logits(cifar, loaded.module, (3, 32, 32))

    resnet = seeded("resnet18", 4)
    path = tmp_path / "resnet.safetensors"
    state_dict = {key: value for key, value in resnet.state_dict().items() if "num_batches_tracked" not in key}
    safetensors.torch.save_file(state_dict, path)  # as saved before BatchNorm counted batches
    loaded = load_model(path, ModelOptions(arch="resnet18", input_shape=(3, 32, 32)), CPU)
    assert (loaded.input_shape, loaded.num_classes) == ((3, 32, 32), 4)
    assert_same_logits(resnet, loaded.module, (3, 32, 32), 3)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "epoch": torch.tensor(3)},
        lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {}},
        lambda sd: {"model": sd},
        lambda sd: {f"module.{key}": value for key, value in sd.items()},
        lambda sd: {"state_dict": {f"module._orig_mod.{key}": value for key, value in sd.items()}},
    ],
    ids=["state_dict", "model_state_dict", "model", "module_prefix", "ddp_and_compile_prefix"],
)
def test_load_model_unwraps_checkpoints(
    tmp_path: Path, mnist_model: nn.Module, wrap: Callable[[dict[str, torch.Tensor]], object]
) -> None:
    path = tmp_path / "wrapped.pt"
    torch.save(wrap(mnist_model.state_dict()), path)
    assert_same_logits(mnist_model, load_model(path, MNIST, CPU).module, (1, 28, 28))


def test_load_model_infers_num_classes(tmp_path: Path) -> None:
    seven = seeded("mnist_cnn", 7)
    path = tmp_path / "seven.safetensors"
    safetensors.torch.save_file(seven.state_dict(), path)
    loaded = load_model(path, MNIST, CPU)
    assert loaded.num_classes == 7
    assert_same_logits(seven, loaded.module, (1, 28, 28))
    assert_error(  # the option disagrees with the weights: the same code on every path (issue 13)
        InvalidOptionError,
        "invalid_option",
        lambda: load_model(path, ModelOptions(arch="mnist_cnn", num_classes=10), CPU),
        "classifier.3.weight",
        "7",
    )


# -- refusals ----------------------------------------------------------------------------


def test_load_model_unknown_arch(checkpoints: dict[str, Path]) -> None:
    assert_error(
        UnknownArchitectureError,
        "unknown_architecture",
        lambda: load_model(checkpoints["torch_zip"], ModelOptions(), CPU),
        "needs an architecture",
    )
    assert_error(
        UnknownArchitectureError,
        "unknown_architecture",
        lambda: load_model(checkpoints["safetensors"], ModelOptions(arch="alexnet"), CPU),
        "alexnet",
        "mnist_cnn",
        "resnet18",
    )


def _safetensors_bytes(header: dict[str, object], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (lambda good: good[: len(good) - 100], ("data_offsets",)),
        (
            lambda good: _safetensors_bytes(
                {"huge": {"dtype": "F32", "shape": [2**38], "data_offsets": [0, 2**40]}}, b"\0" * 16
            ),
            ("huge", "data_offsets"),
        ),
        (lambda good: struct.pack("<Q", 2**60) + b"{" + b"\0" * 64, ("header length",)),
        (
            lambda good: _safetensors_bytes({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
            ("F99",),
        ),
        (
            lambda good: _safetensors_bytes({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}, b"\0" * 4),
            ("'w'", "12 bytes"),
        ),
        (
            lambda good: _safetensors_bytes({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
            ("shape",),
        ),
        (lambda good: struct.pack("<Q", 6) + b"{nope}", ("JSON",)),
    ],
    ids=[
        "truncated",
        "terabyte_tensor",
        "huge_header_length",
        "unknown_dtype",
        "size_mismatch",
        "negative_shape",
        "bad_json",
    ],
)
def test_load_safetensors_corrupt(
    tmp_path: Path, checkpoints: dict[str, Path], content: Callable[[bytes], bytes], fragments: tuple[str, ...]
) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content(checkpoints["safetensors"].read_bytes()))
    assert detect_format(path) is ModelFormat.safetensors
    assert_error(CorruptFileError, "corrupt_file", lambda: load_model(path, MNIST, CPU), *fragments)


def test_load_state_dict_mismatch_names_keys(tmp_path: Path, mnist_model: nn.Module) -> None:
    state_dict = dict(mnist_model.state_dict())
    del state_dict["features.3.bias"]
    state_dict["features.9.weight"] = torch.zeros(1)
    state_dict["features.0.weight"] = torch.zeros(8, 1, 3, 3)
    path = tmp_path / "mismatch.safetensors"
    safetensors.torch.save_file(state_dict, path)
    assert_error(
        StateDictMismatchError,
        "state_dict_mismatch",
        lambda: load_model(path, MNIST, CPU),
        "missing keys (1): features.3.bias",
        "unexpected keys (1): features.9.weight",
        "features.0.weight: expected (16, 1, 3, 3), got (8, 1, 3, 3)",
    )


def test_load_state_dict_with_non_tensors_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "config.pt"
    torch.save({"lr": 0.1, "name": "run"}, path)
    assert_error(UnsupportedFormatError, "unsupported_format", lambda: load_model(path, MNIST, CPU), "'lr'")
