from __future__ import annotations

import json
import pickle
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from scanner.architectures import build_architecture
from scanner.config import ModelOptions
from scanner.errors import (
    CorruptFileError,
    DataModelMismatchError,
    EmptyFileError,
    InvalidOptionError,
    ScannerError,
    StateDictMismatchError,
    TrustRequiredError,
    UnknownArchitectureError,
    UnsafeFileError,
    UnsupportedFormatError,
)
from scanner.formats import ExportedClassifier, ModelFormat, detect_format, load_model
from tests.malicious import build_clean_legacy_tar, rewrite_zip

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


@pytest.fixture(scope="module")
def mnist_model() -> nn.Module:
    return seeded("mnist_cnn")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, mnist_model: nn.Module) -> dict[str, Path]:
    """One clean checkpoint of the same mnist_cnn per format."""
    directory = tmp_path_factory.mktemp("formats")
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


# -- detection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("pt2", ModelFormat.pt2),
        ("pt2_static", ModelFormat.pt2),
        ("safetensors", ModelFormat.safetensors),
        ("torch_zip", ModelFormat.torch_zip),
        ("torch_legacy", ModelFormat.torch_legacy),
        ("torchscript", ModelFormat.torchscript),
        ("torch_tar", ModelFormat.torch_tar),
        ("pickle", ModelFormat.pickle),
    ],
)
def test_detect_format_from_bytes_not_name(
    files: dict[str, Path], tmp_path: Path, name: str, expected: ModelFormat
) -> None:
    assert detect_format(files[name]) is expected
    misnamed = tmp_path / ("model.safetensors" if expected is not ModelFormat.safetensors else "model.pt")
    shutil.copyfile(files[name], misnamed)
    assert detect_format(misnamed) is expected


def test_detect_format_unknown_and_empty(tmp_path: Path) -> None:
    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(range(256)) * 4)
    assert detect_format(noise) is ModelFormat.unknown
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert_error(EmptyFileError, "empty_file", lambda: detect_format(empty))


def test_zeros_are_not_a_tar_checkpoint(tmp_path: Path) -> None:
    """Python's tarfile opens blocks of zeros as an empty archive: zeros are unknown bytes, not the tar format."""
    zeros = tmp_path / "zeros.pt"
    zeros.write_bytes(bytes(2**20))
    assert detect_format(zeros) is ModelFormat.unknown
    error = assert_error(UnsupportedFormatError, "unsupported_format", lambda: load_model(zeros, MNIST, CPU), "pt2")
    assert "tar" not in error.detail


# -- every format loads to the same logits ---------------------------------------------------


@pytest.mark.parametrize("name", ["pt2", "safetensors", "torch_zip", "torch_legacy"])
def test_load_model_matches_original(files: dict[str, Path], mnist_model: nn.Module, name: str) -> None:
    loaded = load_model(files[name], MNIST, CPU)
    assert loaded.format is detect_format(files[name])
    assert loaded.input_shape == (1, 28, 28)
    assert loaded.num_classes == 10
    assert loaded.report.findings == ()
    assert not any(parameter.requires_grad for parameter in loaded.module.parameters())
    assert all(parameter.device.type == "cpu" for parameter in loaded.module.parameters())
    assert_same_logits(mnist_model, loaded.module, (1, 28, 28))


def test_load_pt2_under_any_name(files: dict[str, Path], mnist_model: nn.Module, tmp_path: Path) -> None:
    renamed = tmp_path / "upload-3f2a.bin"
    shutil.copyfile(files["pt2"], renamed)
    assert_same_logits(mnist_model, load_model(renamed, ModelOptions(), CPU).module, (1, 28, 28))


def test_load_pt2_static_batch_splits_and_pads(files: dict[str, Path], mnist_model: nn.Module) -> None:
    loaded = load_model(files["pt2_static"], ModelOptions(), CPU)
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


def test_load_torchscript_needs_trust(files: dict[str, Path], mnist_model: nn.Module) -> None:
    assert_error(TrustRequiredError, "trust_required", lambda: load_model(files["torchscript"], ModelOptions(), CPU))
    loaded = load_model(files["torchscript"], ModelOptions(trust_code=True, input_shape=(1, 28, 28)), CPU)
    assert (loaded.format, loaded.num_classes) == (ModelFormat.torchscript, 10)
    assert_same_logits(mnist_model, loaded.module, (1, 28, 28))


# -- refusals and bad input ------------------------------------------------------------------


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
    assert "scanner.architectures.MnistCnn" in error.report.findings[0].globals


@pytest.mark.parametrize(("name", "fragment"), [("pickle", "never unpickled"), ("torch_tar", "legacy tar")])
def test_load_model_unsupported(files: dict[str, Path], name: str, fragment: str) -> None:
    assert_error(UnsupportedFormatError, "unsupported_format", lambda: load_model(files[name], MNIST, CPU), fragment)


def test_load_model_unknown_arch(files: dict[str, Path]) -> None:
    assert_error(
        UnknownArchitectureError,
        "unknown_architecture",
        lambda: load_model(files["torch_zip"], ModelOptions(), CPU),
        "needs an architecture",
    )
    assert_error(
        UnknownArchitectureError,
        "unknown_architecture",
        lambda: load_model(files["safetensors"], ModelOptions(arch="alexnet"), CPU),
        "alexnet",
        "mnist_cnn",
        "resnet18",
    )


def test_load_model_bad_bytes(tmp_path: Path, files: dict[str, Path]) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert_error(EmptyFileError, "empty_file", lambda: load_model(empty, MNIST, CPU))

    noise = tmp_path / "noise.bin"
    noise.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes()
    )
    assert_error(UnsupportedFormatError, "unsupported_format", lambda: load_model(noise, MNIST, CPU), "pt2")

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(files["torch_zip"].read_bytes()[:2000])
    assert_error(CorruptFileError, "corrupt_file", lambda: load_model(truncated, MNIST, CPU), "zip")

    deflated = tmp_path / "deflated.pt2"
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model/archive_format", b"pt2")
    broken = bytearray(deflated.read_bytes())
    broken[30 + len("model/archive_format")] = 0xFF  # the deflate stream's first byte: an invalid block type
    deflated.write_bytes(bytes(broken))
    assert_error(CorruptFileError, "corrupt_file", lambda: load_model(deflated, MNIST, CPU), "decompressing")


def test_load_model_torch_failure_is_corrupt_file(tmp_path: Path, files: dict[str, Path]) -> None:
    path = tmp_path / "missing_record.pt"
    rewrite_zip(files["torch_zip"], path, {})
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            if not name.endswith("data/0"):
                archive.writestr(name, data)
    assert_error(CorruptFileError, "corrupt_file", lambda: load_model(path, MNIST, CPU), "torch_zip")


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
    tmp_path: Path, files: dict[str, Path], content: Callable[[bytes], bytes], fragments: tuple[str, ...]
) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content(files["safetensors"].read_bytes()))
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


def test_load_model_input_shape_mismatch(files: dict[str, Path]) -> None:
    assert_error(
        DataModelMismatchError,
        "data_model_mismatch",
        lambda: load_model(files["torch_zip"], ModelOptions(arch="mnist_cnn", input_shape=(3, 32, 32)), CPU),
        "(3, 32, 32)",
    )
    assert_error(
        DataModelMismatchError,
        "data_model_mismatch",
        lambda: load_model(files["pt2"], ModelOptions(input_shape=(1, 32, 32)), CPU),
        "(1, 28, 28)",
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["pt2", "pt2_static", "safetensors", "torch_zip"])
def test_load_model_on_cuda(files: dict[str, Path], mnist_model: nn.Module, name: str) -> None:
    cuda = torch.device("cuda")
    loaded = load_model(files[name], MNIST, cuda)
    batch = images((1, 28, 28), 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(batch.to(cuda)).cpu(), mnist_model(batch), rtol=1e-3, atol=1e-3)
