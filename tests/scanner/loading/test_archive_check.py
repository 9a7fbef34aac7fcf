"""The model_file check end to end: real attacks, clean checkpoints of every format, and the walk of archives."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from scanner.config import ModelOptions
from scanner.errors import CorruptFileError, UnsafeFileError
from scanner.loading import FindingKind, ModelFormat, ScanLimits, check_model_file, load_model, scan_model_file
from tests.malicious import (
    EXPECTED_FINDINGS,
    MALICIOUS_BUILDERS,
    build_clean_legacy_tar,
    build_json_bomb_pt2,
    build_small_pt2,
    rewrite_zip,
)
from tests.scanner.loading.helpers import CPU, kinds, refused_with_peak

# -- malicious checkpoints ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MALICIOUS_BUILDERS))
def test_scan_flags_malicious_file(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "MARKER"
    path = MALICIOUS_BUILDERS[name](tmp_path, marker)
    member, fragment = EXPECTED_FINDINGS[name]

    report = scan_model_file(path)

    dangerous = (FindingKind.unsafe_global, FindingKind.unsafe_program)
    flagged = {finding.member: finding for finding in report.findings if finding.kind in dangerous}
    assert member in flagged, report.to_dict()
    assert any(fragment in name for name in flagged[member].globals), flagged[member]
    assert fragment in flagged[member].message
    json.dumps(report.to_dict())
    assert not marker.exists()


@pytest.mark.parametrize("name", sorted(MALICIOUS_BUILDERS))
def test_load_model_refuses_malicious_file(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "MARKER"
    path = MALICIOUS_BUILDERS[name](tmp_path, marker)

    with pytest.raises(UnsafeFileError) as caught:
        load_model(path, ModelOptions(arch="mnist_cnn", trust_code=True), CPU)

    assert caught.value.code == "unsafe_file"
    fragment = EXPECTED_FINDINGS[name][1]
    assert any(fragment in flagged for finding in caught.value.report.findings for flagged in finding.globals)
    assert not marker.exists()


def test_malicious_payloads_run_when_loaded_unsafely(tmp_path: Path) -> None:
    """The builders are real attacks: the unsafe loaders (in a child process) do run them.

    Guards the tests above against stale payloads; in particular torch.export.load in torch
    2.14.1 runs the pickled-weight, sample-input, opaque-object and sympy payloads, and the
    module it returns runs the guard-code payload. (A graph node calling ``torch.os.system`` is
    stopped by torch's own verifier in 2.14.1; the scanner flags it regardless.)
    """
    script = textwrap.dedent(
        """
        import logging, pickle, sys, time, warnings
        from pathlib import Path
        import torch
        logging.disable(logging.CRITICAL)
        warnings.simplefilter("ignore")
        for line in sys.stdin.read().splitlines():
            how, path = line.split(" ", 1)
            try:
                if how == "pickle":
                    pickle.loads(Path(path).read_bytes())
                elif how == "torch":
                    torch.load(path, weights_only=False)
                else:
                    torch.export.load(path).module()(torch.zeros(2, 4))
            except Exception:
                pass
        time.sleep(0.5)  # subprocess.Popen payloads finish asynchronously
        """
    )
    lines, markers = [], []
    for name, build in MALICIOUS_BUILDERS.items():
        directory = tmp_path / name
        directory.mkdir()
        marker = directory / "MARKER"
        path = build(directory, marker)
        how = "pt2" if path.suffix == ".pt2" else "torch" if name.startswith(("torch_", "legacy_")) else "pickle"
        if name in ("nested_zip", "zip_slip_member", "pt2_graph_target"):
            continue  # not reached by these loaders (see the docstring); flagged regardless
        lines.append(f"{how} {path}")
        markers.append(marker)
    subprocess.run([sys.executable, "-c", script], input="\n".join(lines), text=True, check=True, timeout=120)
    assert [marker.parent.name for marker in markers if not marker.exists()] == []


# -- clean checkpoints -------------------------------------------------------------------------


@pytest.mark.parametrize("file_format", list(ModelFormat)[:-1])
def test_scan_clean_file_has_no_findings(checkpoints: dict[str, Path], file_format: ModelFormat) -> None:
    report = scan_model_file(checkpoints[file_format.value])
    assert report.format is file_format
    assert report.findings == ()
    expected_pickles = {ModelFormat.safetensors: 0, ModelFormat.torch_legacy: 5, ModelFormat.pickle: 1}
    if file_format in expected_pickles:
        assert report.pickles_scanned == expected_pickles[file_format]
    else:
        assert report.pickles_scanned >= 1


def test_scan_clean_checkpoint_with_random_raw_bytes(tmp_path: Path) -> None:
    """Raw tensor bytes are walked leniently: noise never looks like an import."""
    generator = torch.Generator().manual_seed(0)
    tensors = {
        f"t{index}": torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=generator) for index in range(200)
    }
    tensors["starts_like_a_pickle"] = torch.tensor(list(b"\x80\x02\xff\x00garbage"), dtype=torch.uint8)
    tensors["starts_like_global"] = torch.tensor(list(b"c\x01\x02\n\xff\n"), dtype=torch.uint8)
    path = tmp_path / "noise.pt"
    torch.save(tensors, path)
    assert scan_model_file(path).findings == ()


# -- archives ----------------------------------------------------------------------------


def test_scan_pt2_native_code_member(tmp_path: Path) -> None:
    clean = build_small_pt2(tmp_path / "aoti.pt2")
    path = rewrite_zip(
        clean, tmp_path / "aoti_evil.pt2", {"aoti/data/aotinductor/model/model.so": b"\x7fELF" + b"\0" * 60}
    )
    (finding,) = scan_model_file(path).findings
    assert (finding.member, finding.kind) == ("aoti/data/aotinductor/model/model.so", FindingKind.native_code)


def test_scan_elf_member_anywhere(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    path = rewrite_zip(checkpoints["torch_zip"], tmp_path / "elf.pt", {"model/data/9": b"\x7fELF\x02\x01"})
    assert kinds(scan_model_file(path)) == [FindingKind.native_code]


def test_scan_limits(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    source = checkpoints["torch_zip"]
    assert kinds(scan_model_file(source, ScanLimits(max_members=3))) == [FindingKind.limit_exceeded]
    assert kinds(scan_model_file(source, ScanLimits(max_total_bytes=1000))) == [FindingKind.limit_exceeded]
    limited = scan_model_file(source, ScanLimits(max_member_bytes=1000))
    assert set(kinds(limited)) == {FindingKind.limit_exceeded}
    assert kinds(scan_model_file(source, ScanLimits(max_pickle_bytes=100))) == [FindingKind.limit_exceeded]

    bomb = rewrite_zip(source, tmp_path / "bomb.pt", {"model/data/9": b"\0" * (8 * 2**20)}, stored=False)
    report = scan_model_file(bomb)
    assert [(finding.member, finding.kind) for finding in report.findings] == [
        ("model/data/9", FindingKind.limit_exceeded)
    ]
    assert "compression ratio" in report.findings[0].message


@pytest.mark.parametrize("member", ["models/model.json", "data/weights/model_weights_config.json"])
@pytest.mark.parametrize(
    ("size", "declared_size", "kind", "fragment"),
    [
        (20 * 2**20, None, FindingKind.limit_exceeded, "of 20971520 bytes (limit 16777216)"),
        (8 * 2**20, None, FindingKind.limit_exceeded, "JSON values (limit 1000000)"),
        (20 * 2**20, 1000, FindingKind.malformed_pickle, "cannot be read: Bad CRC-32"),  # zipfile stops at 1000
    ],
    ids=["over_byte_cap", "over_value_cap", "lying_size"],
)
def test_json_bomb_refused_before_parsing(
    tmp_path: Path, member: str, size: int, declared_size: int | None, kind: FindingKind, fragment: str
) -> None:
    """``[{},{},...`` + a random tail: json.loads would build ~27 bytes of objects per byte (60 MiB: 1.5 GB)."""
    path = build_json_bomb_pt2(tmp_path / "bomb.pt2", size, member=member, declared_size=declared_size)

    error, peak = refused_with_peak(path)

    assert peak < 64 * 2**20, f"the check allocated {peak / 2**20:.0f} MiB"
    assert isinstance(error, UnsafeFileError)
    assert {(finding.member, finding.kind) for finding in error.report.findings} == {(f"bomb_clean/{member}", kind)}
    assert fragment in error.detail


def test_scan_program_json_that_does_not_parse_is_corrupt(tmp_path: Path) -> None:
    """Not JSON (cut short, or not UTF-8): torch cannot load it either; still flagged when something else is."""
    clean = build_small_pt2(tmp_path / "cut.pt2")
    with zipfile.ZipFile(clean) as archive:
        program = archive.read("cut/models/model.json")
        config = archive.read("cut/data/weights/model_weights_config.json")
    cases = {
        "cut/models/model.json": program[: len(program) // 2],
        "cut/data/weights/model_weights_config.json": config[:-1],
        "cut/models/latin1.json": '{"name": "é"}'.encode("latin-1"),
    }
    for name, data in cases.items():
        path = rewrite_zip(clean, tmp_path / "corrupt.pt2", {name: data})
        with pytest.raises(CorruptFileError) as caught:
            load_model(path, ModelOptions(), CPU)
        assert caught.value.code == "corrupt_file"
        assert f"{name}: " in caught.value.detail
        assert "is not valid JSON" in caught.value.detail

    evil = rewrite_zip(
        clean,
        tmp_path / "corrupt_and_evil.pt2",
        {"cut/models/model.json": program[:100], "cut/extra.pkl": b"\x80\x02cposix\nsystem\n)R."},
    )
    with pytest.raises(UnsafeFileError) as unsafe:
        check_model_file(evil, ModelOptions())
    assert [finding.member for finding in unsafe.value.report.findings] == ["cut/extra.pkl"]

    deep = rewrite_zip(clean, tmp_path / "deep.pt2", {"cut/models/model.json": b"[" * 100_000})
    (finding,) = scan_model_file(deep).findings  # a parser with a deeper stack could read it: not checked
    assert (finding.kind, finding.message) == (
        FindingKind.limit_exceeded,
        "exported program is nested too deeply to be checked",
    )


def test_scan_nesting_depth(tmp_path: Path) -> None:
    payload = b"\x80\x02cos\nsystem\n)R."
    for level in range(5):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr(f"level{level}/data.pkl" if level == 0 else f"level{level}/inner.zip", payload)
        payload = buffer.getvalue()
    path = tmp_path / "deep.zip"
    path.write_bytes(payload)
    report = scan_model_file(path)
    assert kinds(report) == [FindingKind.limit_exceeded]
    assert "nested deeper than 3" in report.findings[0].message


def test_scan_zip_with_prepended_archive(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    """Another zip reader could see the first archive; Python's sees the second: refuse."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as decoy:
        decoy.writestr("decoy/data.pkl", b"\x80\x02cos\nsystem\n)R.")
    path = tmp_path / "polyglot.pt"
    path.write_bytes(buffer.getvalue() + checkpoints["torch_zip"].read_bytes())
    assert FindingKind.unsafe_member in kinds(scan_model_file(path))


def test_scan_tar_link_member(tmp_path: Path) -> None:

    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as archive:
        link = tarfile.TarInfo("storages")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
    report = scan_model_file(path)
    assert report.format is ModelFormat.torch_tar
    assert [(finding.member, finding.kind) for finding in report.findings] == [("storages", FindingKind.unsafe_member)]


def test_scan_tar_truncated_storage_record(tmp_path: Path) -> None:

    clean = build_clean_legacy_tar(tmp_path / "clean.tar")
    with tarfile.open(clean) as archive:
        storages = archive.extractfile("storages")
        assert storages is not None
        data = storages.read()
    path = tmp_path / "cut.tar"
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("storages")
        info.size = 40
        archive.addfile(info, io.BytesIO(data[:40]))
    assert kinds(scan_model_file(path)) == [FindingKind.malformed_pickle]
