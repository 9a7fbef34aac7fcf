"""The pickle walk: imports found without unpickling, malformed pickles, and the allowlist they are held to."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import pytest
import torch
import torch._weights_only_unpickler
from torch import nn

from scanner.config import ModelOptions
from scanner.errors import AllowlistUnavailableError, UnsafeFileError
from scanner.loading import FindingKind, load_model, scan_model_file
from scanner.loading.pickle_walk import allowed_globals
from tests.malicious import rewrite_zip
from tests.scanner.loading.helpers import CPU, kinds

# -- malformed pickles -------------------------------------------------------------------


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


def test_scan_malformed_pickles_inside_containers(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    zipped = rewrite_zip(checkpoints["torch_zip"], tmp_path / "zip.pt", {"model/data.pkl": b"\x80\x02(garbage"})
    report = scan_model_file(zipped)
    assert [(finding.member, finding.kind) for finding in report.findings] == [
        ("model/data.pkl", FindingKind.malformed_pickle)
    ]

    legacy_bytes = checkpoints["torch_legacy"].read_bytes()
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(legacy_bytes[:120])  # cut inside the object pickle
    report = scan_model_file(legacy)
    assert kinds(report) == [FindingKind.malformed_pickle]
    assert "pickle (" in report.findings[0].message


# -- opcode tricks -----------------------------------------------------------------------


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


def test_scan_torchscript_names_allowed_only_in_torchscript(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    torchscript_class = b"\x80\x02c__torch__.Net\nNet\n)\x81."
    zipped = rewrite_zip(checkpoints["torch_zip"], tmp_path / "zip.pt", {"model/data.pkl": torchscript_class})
    assert scan_model_file(zipped).findings[0].globals == ("__torch__.Net.Net",)

    scripted = rewrite_zip(
        checkpoints["torchscript"],
        tmp_path / "scripted.pt",
        {"scripted/extra.pkl": b"\x80\x02cposix\nsystem\n)R."},
    )
    (finding,) = scan_model_file(scripted).findings
    assert (finding.member, finding.globals) == ("scripted/extra.pkl", ("posix.system",))


# -- the allowlist -----------------------------------------------------------------------


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
