"""Format detection from the bytes, and measuring zip directories before zipfile reads them."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from scanner.errors import EmptyFileError, UnsafeFileError, UnsupportedFormatError
from scanner.loading import FindingKind, ModelFormat, detect_format, load_model
from scanner.loading.sniff import zip_member_count
from tests.malicious import build_many_member_zip
from tests.scanner.loading.helpers import CPU, MNIST, assert_error, refused_with_peak

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
    checkpoints: dict[str, Path], tmp_path: Path, name: str, expected: ModelFormat
) -> None:
    assert detect_format(checkpoints[name]) is expected
    misnamed = tmp_path / ("model.safetensors" if expected is not ModelFormat.safetensors else "model.pt")
    shutil.copyfile(checkpoints[name], misnamed)
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


# -- zip directories ---------------------------------------------------------------------


@pytest.mark.parametrize("declared", [None, 3], ids=["honest", "lying"])
def test_zip_directory_read_only_up_to_member_limit(tmp_path: Path, declared: int | None) -> None:
    """100,000 empty members: zipfile would build 100,000 ZipInfo objects (650,000: 8 s and 350 MB) before the limit."""
    path = build_many_member_zip(tmp_path / "many.zip", 100_000, declared=declared)

    error, peak = refused_with_peak(path)

    assert peak < 4 * 2**20, f"the check allocated {peak / 2**20:.1f} MiB"
    assert isinstance(error, UnsafeFileError)
    assert [(finding.member, finding.kind) for finding in error.report.findings] == [
        ("archive", FindingKind.limit_exceeded)
    ]
    assert "more than 65536 members" in error.detail
    assert detect_format(path) is ModelFormat.unknown


def test_zip_member_count_agrees_with_zipfile(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    commented = tmp_path / "commented.zip"
    with zipfile.ZipFile(commented, "w") as archive:
        archive.writestr("a", b"1")
        archive.writestr("b", b"PK\x05\x06 looks like an end record")
        archive.comment = b"x" * 1000
    prepended = tmp_path / "prepended.zip"
    prepended.write_bytes(b"junk" * 100 + checkpoints["torch_zip"].read_bytes())
    archives = [checkpoints[name] for name in ("pt2", "torch_zip", "torchscript")]
    for path in [*archives, commented, prepended]:
        with path.open("rb") as stream, zipfile.ZipFile(path) as archive:
            assert zip_member_count(stream, 100_000) == len(archive.infolist()), path.name
            assert zip_member_count(stream, 1) == len(archive.infolist()), path.name  # as declared

    zip64 = build_many_member_zip(tmp_path / "zip64.zip", 70_000)
    lying = build_many_member_zip(tmp_path / "lying.zip", 70_000, declared=3)
    with zip64.open("rb") as stream, lying.open("rb") as lying_stream:
        assert zip_member_count(stream, 100_000) == 70_000  # walked
        assert zip_member_count(stream, 65_536) == 70_000  # declared, the directory unread
        assert zip_member_count(lying_stream, 100_000) == 70_000
        assert zip_member_count(lying_stream, 100) == 101

    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(checkpoints["torch_zip"].read_bytes()[:-30])
    with truncated.open("rb") as stream, pytest.raises(zipfile.BadZipFile):
        zip_member_count(stream, 100)
