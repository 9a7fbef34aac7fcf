from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch._weights_only_unpickler
from torch import nn

from scanner.architectures import build_architecture
from scanner.config import ModelOptions
from scanner.errors import AllowlistUnavailableError, CorruptFileError, ScannerError, UnsafeFileError
from scanner.formats import ModelFormat, check_model_file, detect_format, load_model
from scanner.model_file import (
    FindingKind,
    ModelFileReport,
    ScanLimits,
    _program_problems,
    allowed_globals,
    scan_model_file,
    zip_member_count,
)
from tests.malicious import (
    EXPECTED_FINDINGS,
    MALICIOUS_BUILDERS,
    build_clean_legacy_tar,
    build_json_bomb_pt2,
    build_many_member_zip,
    build_small_pt2,
    rewrite_zip,
)

CPU = torch.device("cpu")


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


# -- malicious files -------------------------------------------------------------------------


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


# -- clean files -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_files(tmp_path_factory: pytest.TempPathFactory) -> dict[ModelFormat, Path]:
    directory = tmp_path_factory.mktemp("clean")
    torch.manual_seed(0)
    model = build_architecture("mnist_cnn", 10).eval()
    example = torch.zeros(1, 1, 28, 28)
    files = {
        ModelFormat.pt2: directory / "model.pt2",
        ModelFormat.safetensors: directory / "model.safetensors",
        ModelFormat.torch_zip: directory / "model.pt",
        ModelFormat.torch_legacy: directory / "legacy.pt",
        ModelFormat.torchscript: directory / "scripted.pt",
        ModelFormat.torch_tar: directory / "legacy_tar.pt",
        ModelFormat.pickle: directory / "plain.pkl",
    }
    torch.export.save(torch.export.export(model, (example,)), files[ModelFormat.pt2])
    safetensors.torch.save_file(model.state_dict(), files[ModelFormat.safetensors])
    torch.save(model.state_dict(), files[ModelFormat.torch_zip])
    torch.save(model.state_dict(), files[ModelFormat.torch_legacy], _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.script(model), files[ModelFormat.torchscript])
    build_clean_legacy_tar(files[ModelFormat.torch_tar])
    files[ModelFormat.pickle].write_bytes(pickle.dumps({"epochs": 3, "names": ["a", "b"]}, protocol=5))
    return files


@pytest.mark.parametrize("file_format", list(ModelFormat)[:-1])
def test_scan_clean_file_has_no_findings(clean_files: dict[ModelFormat, Path], file_format: ModelFormat) -> None:
    report = scan_model_file(clean_files[file_format])
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


def test_scan_pt2_with_batchnorm_and_dropout_is_clean(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Dropout(), nn.Linear(2 * 4 * 4, 2))
    path = tmp_path / "bn.pt2"
    torch.export.save(torch.export.export(net.train(), (torch.rand(2, 1, 6, 6),)), path)
    assert scan_model_file(path).findings == ()


def test_scan_pt2_with_symbolic_shapes_and_guards_is_clean(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    auto = torch.export.Dim.AUTO
    program = torch.export.export(net, (torch.zeros(4, 3, 16, 16),), dynamic_shapes=({0: auto, 2: auto, 3: auto},))
    assert program._guards_code  # this export has guards and sympy expressions to check
    path = tmp_path / "auto.pt2"
    torch.export.save(program, path)
    assert scan_model_file(path).findings == ()
    loaded = load_model(path, ModelOptions(input_shape=(3, 20, 24)), CPU)
    assert loaded.num_classes == 5


@torch.library.custom_op("bdstest::double", mutates_args=())
def _double(features: torch.Tensor) -> torch.Tensor:
    return features * 2


@_double.register_fake
def _double_fake(features: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(features)


class _CustomOpNet(nn.Module):
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        doubled: torch.Tensor = torch.ops.bdstest.double(features)
        return doubled


def test_scan_and_load_refuse_operators_outside_aten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "custom_op.pt2"
    torch.export.save(torch.export.export(_CustomOpNet(), (torch.zeros(2, 3),)), path)
    (finding,) = scan_model_file(path).findings
    assert finding.kind is FindingKind.unsafe_program
    assert finding.globals == ("operator 'torch.ops.bdstest.double.default'",)

    # Defence in depth: with the static check blinded, the loader still refuses before running anything.
    monkeypatch.setattr("scanner.model_file._operator_allowed", lambda target: True)
    with pytest.raises(UnsafeFileError) as caught:
        load_model(path, ModelOptions(), CPU)
    assert caught.value.report.findings[0].kind is FindingKind.unsafe_program
    assert "double" in caught.value.detail


@pytest.mark.parametrize(
    ("expression", "allowed"),
    [
        ("Symbol('s0', positive=True, integer=True)", True),
        ("Mul(Integer(4), Max(Integer(1), Add(Symbol('s0', positive=True, integer=True), Integer(-2))))", True),
        ("s0 + 2*s1 - FloorDiv(s0, 3)", True),
        ("Max('__import__(\"os\")')", False),  # sympy functions sympify string arguments
        ("Symbol('s0').__class__", False),
        ("__import__('os').system('true')", False),
        ("S('1 + 1')", False),
        ("(lambda: 0)()", False),
        ("Symbol('s0', positive=exec)", False),
    ],
)
def test_symbolic_expression_grammar(expression: str, allowed: bool) -> None:
    program = {"graph_module": {"graph": {"tensor_values": {"x": {"sizes": [{"as_expr": {"expr_str": expression}}]}}}}}
    assert (_program_problems(program) == []) is allowed


@pytest.mark.parametrize(
    ("guard", "allowed"),
    [
        ("L['x'].size()[2] >= 3", True),
        ("((-2) + L['x'].size()[3]) != 1", True),
        ("L['x'].size()[0] == 2 and L['x'].stride()[1] == 1", True),
        ("L['x'].__class__", False),
        ("print(1)", False),
        ("L['x\") or 1 or (\"'].size()[0] == 1", False),
        ("1)\n  import os\n  (1", False),
    ],
)
def test_guard_grammar(guard: str, allowed: bool) -> None:
    assert (_program_problems({"guards_code": [guard]}) == []) is allowed


# -- malformed pickles -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps({"a": [1, 2, 3]}, protocol=2)[:-5],
        b"\x80\x04\x95\xff\xff\xff\xff\xff\xff\xff\x7f",
        b"\x80\x02" + bytes(range(200, 256)),
        b"\x80\x02]q\x00h\x05.",  # memo read before write
        b"\x80\x02t.",  # TUPLE without MARK
    ],
    ids=["truncated", "huge_frame", "garbage_opcodes", "bad_memo", "no_mark"],
)
def test_scan_malformed_bare_pickle(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "broken.pkl"
    path.write_bytes(payload)
    report = scan_model_file(path)
    assert kinds(report) == [FindingKind.malformed_pickle]
    assert report.findings[0].member == "broken.pkl"
    with pytest.raises(UnsafeFileError) as caught:
        load_model(path, ModelOptions(), CPU)
    assert caught.value.code == "unsafe_file"


def test_scan_malformed_pickles_inside_containers(tmp_path: Path, clean_files: dict[ModelFormat, Path]) -> None:
    zipped = rewrite_zip(
        clean_files[ModelFormat.torch_zip], tmp_path / "zip.pt", {"model/data.pkl": b"\x80\x02(garbage"}
    )
    report = scan_model_file(zipped)
    assert [(finding.member, finding.kind) for finding in report.findings] == [
        ("model/data.pkl", FindingKind.malformed_pickle)
    ]

    legacy_bytes = clean_files[ModelFormat.torch_legacy].read_bytes()
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(legacy_bytes[:120])  # cut inside the object pickle
    report = scan_model_file(legacy)
    assert kinds(report) == [FindingKind.malformed_pickle]
    assert "pickle (" in report.findings[0].message


# -- opcode tricks -----------------------------------------------------------------------------


def test_scan_unresolvable_stack_global(tmp_path: Path) -> None:
    """STACK_GLOBAL operands that are not string literals (here: persistent ids) are flagged."""
    payload = b"\x80\x04" + b"\x8c\x01a\x94Q" + b"\x8c\x01b\x94Q" + b"\x93)R."
    path = tmp_path / "persid.pkl"
    path.write_bytes(payload)
    (finding,) = scan_model_file(path).findings
    assert finding.kind is FindingKind.unsafe_global
    assert finding.globals[0].startswith("<unresolvable STACK_GLOBAL")


def test_scan_extension_opcode(tmp_path: Path) -> None:
    path = tmp_path / "ext.pkl"
    path.write_bytes(b"\x80\x02\x82\x07)R.")
    (finding,) = scan_model_file(path).findings
    assert finding.globals == ("<copyreg extension code 7>",)


def test_scan_python2_names_follow_protocol(tmp_path: Path) -> None:
    """``__builtin__.set`` is ``builtins.set`` only for protocols < 3, as in CPython's find_class."""
    path = tmp_path / "py2.pkl"
    path.write_bytes(b"\x80\x02c__builtin__\nset\n]\x85R.")
    assert scan_model_file(path).findings == ()
    path.write_bytes(b"\x80\x04c__builtin__\nset\n]\x85R.")
    assert scan_model_file(path).findings[0].globals == ("__builtin__.set",)


def test_scan_whole_module_message_says_how_to_fix(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(nn.Sequential(nn.Linear(2, 2)), path)
    (finding,) = scan_model_file(path).findings
    assert "torch.nn.modules.container.Sequential" in finding.globals
    assert "whole pickled nn.Module" in finding.message
    assert "state_dict" in finding.message
    assert "torch.export.save" in finding.message


def test_scan_torchscript_names_allowed_only_in_torchscript(
    tmp_path: Path, clean_files: dict[ModelFormat, Path]
) -> None:
    torchscript_class = b"\x80\x02c__torch__.Net\nNet\n)\x81."
    zipped = rewrite_zip(clean_files[ModelFormat.torch_zip], tmp_path / "zip.pt", {"model/data.pkl": torchscript_class})
    assert scan_model_file(zipped).findings[0].globals == ("__torch__.Net.Net",)

    scripted = rewrite_zip(
        clean_files[ModelFormat.torchscript],
        tmp_path / "scripted.pt",
        {"scripted/extra.pkl": b"\x80\x02cposix\nsystem\n)R."},
    )
    (finding,) = scan_model_file(scripted).findings
    assert (finding.member, finding.globals) == ("scripted/extra.pkl", ("posix.system",))


# -- archives ----------------------------------------------------------------------------------


def test_scan_pt2_native_code_member(tmp_path: Path) -> None:
    clean = build_small_pt2(tmp_path / "aoti.pt2")
    path = rewrite_zip(
        clean, tmp_path / "aoti_evil.pt2", {"aoti/data/aotinductor/model/model.so": b"\x7fELF" + b"\0" * 60}
    )
    (finding,) = scan_model_file(path).findings
    assert (finding.member, finding.kind) == ("aoti/data/aotinductor/model/model.so", FindingKind.native_code)


def test_scan_elf_member_anywhere(tmp_path: Path, clean_files: dict[ModelFormat, Path]) -> None:
    path = rewrite_zip(clean_files[ModelFormat.torch_zip], tmp_path / "elf.pt", {"model/data/9": b"\x7fELF\x02\x01"})
    assert kinds(scan_model_file(path)) == [FindingKind.native_code]


def test_scan_limits(tmp_path: Path, clean_files: dict[ModelFormat, Path]) -> None:
    source = clean_files[ModelFormat.torch_zip]
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


def test_zip_member_count_agrees_with_zipfile(tmp_path: Path, clean_files: dict[ModelFormat, Path]) -> None:
    commented = tmp_path / "commented.zip"
    with zipfile.ZipFile(commented, "w") as archive:
        archive.writestr("a", b"1")
        archive.writestr("b", b"PK\x05\x06 looks like an end record")
        archive.comment = b"x" * 1000
    prepended = tmp_path / "prepended.zip"
    prepended.write_bytes(b"junk" * 100 + clean_files[ModelFormat.torch_zip].read_bytes())
    archives = [clean_files[kind] for kind in (ModelFormat.pt2, ModelFormat.torch_zip, ModelFormat.torchscript)]
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
    truncated.write_bytes(clean_files[ModelFormat.torch_zip].read_bytes()[:-30])
    with truncated.open("rb") as stream, pytest.raises(zipfile.BadZipFile):
        zip_member_count(stream, 100)


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


def test_scan_zip_with_prepended_archive(tmp_path: Path, clean_files: dict[ModelFormat, Path]) -> None:
    """Another zip reader could see the first archive; Python's sees the second: refuse."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as decoy:
        decoy.writestr("decoy/data.pkl", b"\x80\x02cos\nsystem\n)R.")
    path = tmp_path / "polyglot.pt"
    path.write_bytes(buffer.getvalue() + clean_files[ModelFormat.torch_zip].read_bytes())
    assert FindingKind.unsafe_member in kinds(scan_model_file(path))


def test_scan_tar_link_member(tmp_path: Path) -> None:
    import tarfile

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
    import tarfile

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


# -- the allowlist ------------------------------------------------------------------------------


def test_allowed_globals_is_torchs_default_allowlist() -> None:
    names = allowed_globals()
    assert {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage"} <= names
    assert "builtins.eval" not in names


def test_allowed_globals_ignores_user_registered_safe_globals(tmp_path: Path) -> None:
    torch.serialization.add_safe_globals([struct.pack])
    try:
        path = tmp_path / "pack.pkl"
        path.write_bytes(b"\x80\x02c_struct\npack\n)R.")
        assert scan_model_file(path).findings[0].globals == ("_struct.pack",)
    finally:
        torch.serialization.clear_safe_globals()


def test_allowed_globals_fails_closed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps([1], protocol=2))
    monkeypatch.delattr(torch._weights_only_unpickler, "_get_allowed_globals")
    allowed_globals.cache_clear()
    try:
        with pytest.raises(AllowlistUnavailableError) as caught:
            scan_model_file(path)
        assert caught.value.code == "allowlist_unavailable"
    finally:
        monkeypatch.undo()
        allowed_globals.cache_clear()
