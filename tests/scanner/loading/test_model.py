"""load_model and check_model_file across formats: the same logits from every format, and the refusals."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from scanner.config import ModelOptions
from scanner.errors import (
    CorruptFileError,
    DataModelMismatchError,
    EmptyFileError,
    TrustRequiredError,
    UnsafeFileError,
    UnsupportedFormatError,
)
from scanner.loading import ModelFormat, detect_format, load_model
from tests.malicious import rewrite_zip
from tests.scanner.loading.helpers import CPU, MNIST, assert_error, assert_same_logits, images

# -- every format loads to the same logits -----------------------------------------------


@pytest.mark.parametrize("name", ["pt2", "safetensors", "torch_zip", "torch_legacy"])
def test_load_model_matches_original(checkpoints: dict[str, Path], mnist_model: nn.Module, name: str) -> None:
    loaded = load_model(checkpoints[name], MNIST, CPU)
    assert loaded.format is detect_format(checkpoints[name])
    assert loaded.input_shape == (1, 28, 28)
    assert loaded.num_classes == 10
    assert loaded.report.findings == ()
    assert not any(parameter.requires_grad for parameter in loaded.module.parameters())
    assert all(parameter.device.type == "cpu" for parameter in loaded.module.parameters())
    assert_same_logits(mnist_model, loaded.module, (1, 28, 28))


def test_load_torchscript_needs_trust(checkpoints: dict[str, Path], mnist_model: nn.Module) -> None:
    assert_error(
        TrustRequiredError, "trust_required", lambda: load_model(checkpoints["torchscript"], ModelOptions(), CPU)
    )
    loaded = load_model(checkpoints["torchscript"], ModelOptions(trust_code=True, input_shape=(1, 28, 28)), CPU)
    assert (loaded.format, loaded.num_classes) == (ModelFormat.torchscript, 10)
    assert_same_logits(mnist_model, loaded.module, (1, 28, 28))


# -- refusals and bad input --------------------------------------------------------------


def test_load_whole_pickled_module_refused_without_unpickling(
    tmp_path: Path, mnist_model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "whole.pt"
    torch.save(mnist_model, path)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file was unpickled")

    monkeypatch.setattr(torch, "load", never)
    monkeypatch.setattr(pickle, "load", never)
    monkeypatch.setattr(pickle, "loads", never)
    error = assert_error(UnsafeFileError, "unsafe_file", lambda: load_model(path, MNIST, CPU), "state_dict", ".pt2")
    assert isinstance(error, UnsafeFileError)
    assert "scanner.loading.architectures.MnistCnn" in error.report.findings[0].globals


@pytest.mark.parametrize(("name", "fragment"), [("pickle", "never unpickled"), ("torch_tar", "legacy tar")])
def test_load_model_unsupported(checkpoints: dict[str, Path], name: str, fragment: str) -> None:
    assert_error(
        UnsupportedFormatError, "unsupported_format", lambda: load_model(checkpoints[name], MNIST, CPU), fragment
    )


def test_load_model_bad_bytes(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert_error(EmptyFileError, "empty_file", lambda: load_model(empty, MNIST, CPU))

    noise = tmp_path / "noise.bin"
    noise.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes()
    )
    assert_error(UnsupportedFormatError, "unsupported_format", lambda: load_model(noise, MNIST, CPU), "pt2")

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoints["torch_zip"].read_bytes()[:2000])
    assert_error(CorruptFileError, "corrupt_file", lambda: load_model(truncated, MNIST, CPU), "zip")

    deflated = tmp_path / "deflated.pt2"
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model/archive_format", b"pt2")
    broken = bytearray(deflated.read_bytes())
    broken[30 + len("model/archive_format")] = 0xFF  # the deflate stream's first byte: an invalid block type
    deflated.write_bytes(bytes(broken))
    assert_error(CorruptFileError, "corrupt_file", lambda: load_model(deflated, MNIST, CPU), "decompressing")


def test_load_model_torch_failure_is_corrupt_file(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    path = tmp_path / "missing_record.pt"
    rewrite_zip(checkpoints["torch_zip"], path, {})
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            if not name.endswith("data/0"):
                archive.writestr(name, data)
    assert_error(CorruptFileError, "corrupt_file", lambda: load_model(path, MNIST, CPU), "torch_zip")


def test_load_model_input_shape_mismatch(checkpoints: dict[str, Path]) -> None:
    assert_error(
        DataModelMismatchError,
        "data_model_mismatch",
        lambda: load_model(checkpoints["torch_zip"], ModelOptions(arch="mnist_cnn", input_shape=(3, 32, 32)), CPU),
        "(3, 32, 32)",
    )
    assert_error(
        DataModelMismatchError,
        "data_model_mismatch",
        lambda: load_model(checkpoints["pt2"], ModelOptions(input_shape=(1, 32, 32)), CPU),
        "(1, 28, 28)",
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["pt2", "pt2_static", "safetensors", "torch_zip"])
def test_load_model_on_cuda(checkpoints: dict[str, Path], mnist_model: nn.Module, name: str) -> None:
    cuda = torch.device("cuda")
    loaded = load_model(checkpoints[name], MNIST, cuda)
    batch = images((1, 28, 28), 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(batch.to(cuda)).cpu(), mnist_model(batch), rtol=1e-3, atol=1e-3)
