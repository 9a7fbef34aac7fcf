"""The ``model_file`` detector: which globals would the pickles inside a checkpoint import?

Pure static analysis: nothing here ever unpickles, imports a name from a file, or calls torch to
read one. Every pickle in the file is walked opcode by opcode (``pickletools.genops``) while a
small model of the unpickler's stack and memo resolves the operands of ``STACK_GLOBAL``. Each
import is checked against torch's own weights-only allowlist (an allowlist, not a denylist:
anything not known to be harmless is reported).

Which bytes are pickles depends on the container, and the walk follows the loaders:

- zip archives (``torch.save``, ``torch.export`` ``.pt2``, TorchScript): every member. Members
  that a loader reads as a pickle (``*.pkl``, ``*.pt`` artifacts, the payloads a ``.pt2``
  configuration marks as pickled, nested zips) are walked *strictly*: a parse failure is a
  finding. All other members are walked *leniently* as a second line of defence: raw tensor
  bytes are not pickles, so only imports with importable names are reported there. Member
  names that escape the archive, native libraries (AOTInductor ``.so`` files, which
  ``torch.export.load`` would ``dlopen``) and size limits are findings too. The central directory
  is measured before ``zipfile`` reads it (:func:`zip_member_count`), so an archive of a million
  empty members costs milliseconds, not gigabytes.
- legacy ``torch.save`` files: the pickles back to back (magic number, protocol version,
  sys_info, object, storage keys) up to the raw storage bytes.
- legacy tar files: the ``pickle``, ``storages`` and ``tensors`` members, stepping over the raw
  storage and tensor records between their pickles.
- a bare pickle: the whole file.

A ``.pt2`` archive can run code without any pickle: ``torch.export.load`` parses the symbolic
shapes of its programs (every member under ``models/``, whatever its suffix) with
``sympy.sympify`` (which evaluates Python), resolves graph node targets with ``getattr`` chains
from ``torch``, and ``ExportedProgram.module()`` compiles the archive's guard strings into
Python. So the serialized program is checked too, against a grammar: ATen/prims operators and
higher-order operators only, sympy expression classes over shape symbols, shape guards over
input sizes (finding kind ``unsafe_program``). Every JSON member the check parses is capped in
bytes and in values before it is parsed (a JSON bomb of 60 MiB would cost 1.5 GB); one that is
not JSON at all is corruption (``CorruptFileError``), since torch cannot load it either.

TorchScript archives name their compiled classes ``__torch__.*`` and their list builders
``torch.jit._pickle.*``; the TorchScript loader resolves those itself without importing
Python, so they are accepted inside TorchScript archives only (loading TorchScript at all
needs the operator's trust switch).
"""

from __future__ import annotations

import _compat_pickle
import ast
import functools
import io
import json
import pickletools
import posixpath
import re
import struct
import tarfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, cast

from scanner.errors import AllowlistUnavailableError, CorruptFileError

if TYPE_CHECKING:
    from scanner.formats import ModelFormat

__all__ = [
    "LEGACY_MAGIC_NUMBER",
    "FindingKind",
    "ModelFileReport",
    "PickleFinding",
    "ScanLimits",
    "allowed_globals",
    "allowed_graph_callable",
    "scan_model_file",
    "zip_member_count",
]

#: First pickle of a legacy (non-zip) ``torch.save`` file.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C

_ZIP_MAGIC = b"PK\x03\x04"
_NATIVE_MAGICS = (b"\x7fELF", b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe", b"\xfe\xed\xfa\xcf", b"\xfe\xed\xfa\xce")
_NATIVE_SUFFIXES = (".so", ".dylib", ".dll", ".pyd")
_PT2_AOTI_DIR = "data/aotinductor/"
_PT2_PAYLOAD_DIRS = ("data/weights/", "data/constants/")
_PT2_PICKLED_PREFIXES = ("custom_obj_", "opaque_obj_")
# torch.export.load deserializes every member under models/ as a program, whatever its suffix.
_PT2_MODELS_DIR = "models/"
_PT2_PROGRAM_NAMES = ("serialized_exported_program.json",)  # the pre-2.8 layout
# Zip records, as zipfile reads them: end of central directory (and its ZIP64 locator and record),
# central directory header.
_ZIP_END = struct.Struct("<4s4H2LH")
_ZIP64_END_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_END = struct.Struct("<4sQ2H2L4Q")
_ZIP_CENTRAL_HEADER = struct.Struct("<4s4B4HL2L5H2L")
# Every JSON value but the outermost follows one of these bytes (and every object key "{" or ","): json.loads
# builds at most one object per occurrence, plus one.
_JSON_VALUE_MARKS = (b",", b":", b"[", b"{")
# Python callables an exported graph may name (torch's serializer writes f"{module}.{name}").
_PT2_PYTHON_OPERATORS = frozenset(
    [
        f"_operator.{name}"
        for name in (
            "getitem", "eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub", "floordiv",
            "mod", "pow", "truediv", "and_", "or_", "lshift", "rshift",
        )
    ]
    + ["math.trunc"]
    + [f"torch.sym_{name}" for name in ("not", "int", "float", "ite", "max", "min", "sqrt")]
)  # fmt: skip
_PT2_OPERATOR_NAMESPACES = ("aten", "prims")
# What sympy may construct from the graph's symbolic expressions (torch parses them with
# sympy.sympify, which evaluates Python): sympy's and torch.utils._sympy's expression classes.
_SYMPY_CALLS = frozenset(
    [
        "Symbol",
        "Integer",
        "Float",
        "Rational",
        "Add",
        "Mul",
        "Pow",
        "Mod",
        "Max",
        "Min",
        "Abs",
        "floor",
        "ceiling",
        "Piecewise",
        "ExprCondPair",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "Equality",
        "Unequality",
        "StrictLessThan",
        "StrictGreaterThan",
        "LessThan",
        "GreaterThan",
        "And",
        "Or",
        "Not",
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "LShift",
        "RShift",
        "PowByNatural",
        "FloatPow",
        "FloatTrueDiv",
        "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "Identity",
    ]
)
_SYMPY_CONSTANTS = frozenset({"oo", "zoo", "nan", "true", "false"})
_SYMPY_KEYWORDS = frozenset(
    {"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "precision", "evaluate"}
)
_SYMBOL_NAME = re.compile(r"[a-z]+[0-9]+")
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_LEGACY_PICKLE_NAMES = ("magic number", "protocol version", "sys_info", "object", "storage keys")
_TORCHSCRIPT_BUILTINS = frozenset(
    f"torch.jit._pickle.{name}"
    for name in (
        "build_intlist",
        "build_tensorlist",
        "build_doublelist",
        "build_boollist",
        "build_tensor_from_id",
        "restore_type_tag",
    )
)
_WHOLE_MODULE_PREFIXES = ("torch.nn.modules.", "__main__.", "torchvision.models.")


class FindingKind(StrEnum):
    """Why a member of the file was flagged."""

    unsafe_global = "unsafe_global"
    malformed_pickle = "malformed_pickle"
    unsafe_member = "unsafe_member"
    native_code = "native_code"
    unsafe_program = "unsafe_program"
    limit_exceeded = "limit_exceeded"


@dataclass(frozen=True)
class PickleFinding:
    """One flagged member of a checkpoint.

    Attributes:
        member: where in the file: the zip/tar member name (``outer!/inner`` inside nested
            zips), or the file's own name when it is not an archive.
        globals: the imports outside the allowlist, as ``module.name`` (``<...>`` when the
            target cannot be known statically); empty for findings that are not about imports.
        message: what is wrong and what to do about it.
        kind: the category, for machines.
    """

    member: str
    globals: tuple[str, ...]
    message: str
    kind: FindingKind

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"member": self.member, "kind": str(self.kind), "globals": list(self.globals), "message": self.message}


@dataclass(frozen=True)
class ModelFileReport:
    """Result of :func:`scan_model_file`.

    Attributes:
        format: the container format detected from the file's bytes.
        pickles_scanned: how many pickles that a loader would read were walked (the lenient
            walks of other members are not counted).
        findings: everything flagged; empty when the file passed.
    """

    format: ModelFormat
    pickles_scanned: int
    findings: tuple[PickleFinding, ...]

    @property
    def safe(self) -> bool:
        """True when nothing was flagged."""
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "format": str(self.format),
            "pickles_scanned": self.pickles_scanned,
            "findings": [finding.to_dict() for finding in self.findings],
        }


@dataclass(frozen=True)
class ScanLimits:
    """Caps on the work one scan may do, so hostile files (zip bombs, endless pickles) stay cheap.

    Sizes are uncompressed bytes as the archive declares them; members are streamed, never read
    whole except nested archives (up to ``max_nested_bytes``) and the JSON members the check parses
    (up to ``max_json_bytes``, enforced again while reading, and ``max_json_values``). Zip
    directories are read only when they hold at most ``max_members`` members.
    """

    max_members: int = 65_536
    max_member_bytes: int = 4 * 1024**3
    max_total_bytes: int = 16 * 1024**3
    max_compression_ratio: float = 200.0
    max_pickle_bytes: int = 64 * 1024**2
    max_pickle_stack: int = 1_000_000
    max_nested_bytes: int = 512 * 1024**2
    max_depth: int = 3
    # A pt2 program (models/*) and its payload configurations are parsed whole while the upload request
    # waits. torch.export.save writes 0.17 MB of program for resnet18, 1.3 MB for densenet121 and 4.6 MB
    # with 293,000 values for swin_v2_b (dynamic batch), the largest torchvision classifier: both caps
    # leave 3.4x. Parsed, a real program takes ~6x its bytes but a bomb of empty objects 27x (16 MiB:
    # 450 MB), hence the cap on values (json.loads builds at most one object per value). The worst
    # documents under both caps measured ~170 MB at peak; swin_v2_b's program 23 MB.
    max_json_bytes: int = 16 * 1024**2
    max_json_values: int = 1_000_000


@functools.cache
def allowed_globals() -> frozenset[str]:
    """The ``module.name`` strings that torch's weights-only unpickler accepts by default.

    Read from the installed torch so the allowlist follows torch upgrades. Deliberately NOT
    ``torch.serialization.get_safe_globals()``: that list can be extended by any code running
    in the process, and a scanner must not trust its environment.

    Raises:
        AllowlistUnavailableError: torch no longer has the private function (fail closed).
    """
    try:
        # Private torch API: the default allowlist of torch.load(weights_only=True). There is no
        # public equivalent; if it moves, every scan fails loudly rather than passing silently.
        from torch._weights_only_unpickler import _get_allowed_globals

        names = frozenset(str(name) for name in _get_allowed_globals())
    except (ImportError, AttributeError, TypeError) as exc:
        raise AllowlistUnavailableError(
            f"cannot read torch's weights-only allowlist (torch._weights_only_unpickler._get_allowed_globals): {exc}"
        ) from exc
    if not names:
        raise AllowlistUnavailableError("torch's weights-only allowlist is empty")
    return names


def scan_model_file(path: Path, limits: ScanLimits | None = None) -> ModelFileReport:
    """List the globals every pickle in ``path`` would import and flag those outside the allowlist.

    Args:
        path: the untrusted checkpoint.
        limits: work caps; the defaults suit checkpoints of image classifiers.

    Returns:
        The report; ``report.findings`` is empty when the file passed.

    Raises:
        EmptyFileError: the file has no bytes.
        CorruptFileError: the container itself (zip, tar) cannot be read; or nothing was flagged but a
            JSON member of the archive (a pt2 program or payload configuration) is not JSON.
        AllowlistUnavailableError: torch's allowlist cannot be read.
    """
    from scanner.formats import ModelFormat, detect_format

    file_format = detect_format(path)
    torchscript = file_format is ModelFormat.torchscript
    scan = _Scan(
        allowed=(allowed_globals() | _TORCHSCRIPT_BUILTINS) if torchscript else allowed_globals(),
        allow_torchscript_classes=torchscript,
        limits=limits or ScanLimits(),
    )
    with path.open("rb") as stream:
        try:
            if _is_zip(stream):  # every zip, also those of an unknown kind
                zipped = scan.open_zip(stream, "archive")
                if zipped is not None:
                    with zipped:
                        scan.zip_archive(zipped, prefix="", depth=0)
            elif file_format is ModelFormat.torch_tar:
                with tarfile.open(fileobj=stream, mode="r:") as archive:
                    scan.tar_archive(archive)
            elif file_format in (ModelFormat.torch_legacy, ModelFormat.pickle):
                scan.pickle_stream(stream, path.name, strict=True)
            else:
                # safetensors and unknown files are never unpickled; a lenient walk still reports
                # a pickle hiding behind an unrecognised header.
                scan.pickle_stream(stream, path.name, strict=False)
        except Exception as exc:  # the container itself is unreadable (BadZipFile, TarError, ...)
            raise CorruptFileError(f"{file_format} container cannot be read: {type(exc).__name__}: {exc}") from exc
    if scan.corrupt and not scan.findings:  # a flagged file is unsafe, corrupt or not
        raise CorruptFileError(f"{file_format} file is corrupt: " + "; ".join(scan.corrupt[:3]))
    return ModelFileReport(format=file_format, pickles_scanned=scan.pickles, findings=tuple(scan.findings))


def _is_zip(stream: IO[bytes]) -> bool:
    head = stream.read(len(_ZIP_MAGIC))
    stream.seek(0)
    return head == _ZIP_MAGIC


def zip_member_count(stream: IO[bytes], limit: int) -> int:
    """How many members a zip archive's central directory holds, counted no further than ``limit + 1``.

    ``zipfile.ZipFile`` reads the whole directory into ``ZipInfo`` objects first (650,000 empty
    members: 8 s and 350 MB), so archives are measured with this before it opens them. The end
    record is found as ``zipfile`` finds it (ZIP64 too), and a declared count over ``limit`` is
    returned at once. Declared counts can lie (``zipfile`` reads headers until the directory's byte
    size is used up), so the directory's headers are then stepped over the way ``zipfile`` walks
    them, building nothing, up to ``limit + 1``.

    Args:
        stream: the archive (seekable); left at an arbitrary position.
        limit: the most members the caller accepts.

    Returns:
        The number of members, or a number over ``limit`` (the declared count, or ``limit + 1``).

    Raises:
        zipfile.BadZipFile: no end record, or a central directory that is truncated or malformed.
    """
    declared, directory_size, directory_start = _zip_end_record(stream)
    if declared > limit:
        return declared
    stream.seek(directory_start)
    count = walked = 0
    while walked < directory_size and count <= limit:
        header = stream.read(_ZIP_CENTRAL_HEADER.size)
        if len(header) != _ZIP_CENTRAL_HEADER.size or walked + len(header) > directory_size:
            raise zipfile.BadZipFile("truncated central directory")
        fields = _ZIP_CENTRAL_HEADER.unpack(header)
        if fields[0] != b"PK\x01\x02":
            raise zipfile.BadZipFile("bad magic number for central directory")
        variable = fields[12] + fields[13] + fields[14]  # name, extra field and comment lengths
        stream.seek(variable, io.SEEK_CUR)
        walked += len(header) + variable
        count += 1
    return count


def _zip_end_record(stream: IO[bytes]) -> tuple[int, int, int]:
    """``(declared members, directory bytes, directory start)`` from the end records, as ``zipfile`` reads them.

    Raises:
        zipfile.BadZipFile: there is no end record, or it spans disks or points before the file.
    """
    size = stream.seek(0, io.SEEK_END)
    stream.seek(max(size - _ZIP_END.size, 0))
    record = stream.read()
    position = size - _ZIP_END.size
    if not (len(record) == _ZIP_END.size and record.startswith(b"PK\x05\x06") and record.endswith(b"\0\0")):
        # An archive comment (up to 64 KiB) follows the record: the last signature in reach is it.
        window_start = max(size - 2**16 - _ZIP_END.size, 0)
        stream.seek(window_start)
        window = stream.read()
        found = window.rfind(b"PK\x05\x06")
        record = window[found : found + _ZIP_END.size]
        if found < 0 or len(record) != _ZIP_END.size:
            raise zipfile.BadZipFile("file is not a zip file (no end of central directory record)")
        position = window_start + found
    *_, declared, directory_size, _, _ = _ZIP_END.unpack(record)
    zip64_start = position - _ZIP64_END_LOCATOR.size - _ZIP64_END.size
    if zip64_start >= 0:
        stream.seek(zip64_start)
        zip64 = stream.read(_ZIP64_END.size + _ZIP64_END_LOCATOR.size)
        signature, disk, _, disks = _ZIP64_END_LOCATOR.unpack(zip64[_ZIP64_END.size :])
        if signature == b"PK\x06\x07":
            if disk != 0 or disks > 1:
                raise zipfile.BadZipFile("zipfiles that span multiple disks are not supported")
            if zip64.startswith(b"PK\x06\x06"):
                *_, declared, directory_size, _ = _ZIP64_END.unpack(zip64[: _ZIP64_END.size])
                position = zip64_start
    directory_start = position - directory_size  # zipfile's start_dir: right before the end records
    if directory_start < 0:
        raise zipfile.BadZipFile("bad offset for central directory")
    return declared, directory_size, directory_start


# --------------------------------------------------------------------------------------------
# Walking one pickle


class _PickleTooLarge(Exception):
    """The walk went past a limit; the pickle is not walked further."""


class _CappedReader:
    """File-like view that refuses to hand out more than ``cap`` bytes (genops reads through it)."""

    def __init__(self, stream: IO[bytes], cap: int) -> None:
        self._stream = stream
        self._left = cap

    def _take(self, data: bytes) -> bytes:
        if len(data) > self._left:
            raise _PickleTooLarge
        self._left -= len(data)
        return data

    def tell(self) -> int:
        return self._stream.tell()

    def read(self, size: int = -1) -> bytes:
        wanted = self._left + 1 if size < 0 else min(size, self._left + 1)
        return self._take(self._stream.read(wanted))

    def readline(self, size: int = -1) -> bytes:
        wanted = self._left + 1 if size < 0 else min(size, self._left + 1)
        return self._take(self._stream.readline(wanted))


@dataclass(frozen=True)
class _Import:
    name: str
    importable: bool  # a dotted identifier path that CPython could import; lenient walks report only these


@dataclass
class _Walk:
    imports: list[_Import] = field(default_factory=list)
    ints: list[int] = field(default_factory=list)
    error: str | None = None
    too_large: bool = False

    @property
    def complete(self) -> bool:
        return self.error is None


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_MARK = _Sentinel("MARK")  # the MARK object on the simulated stack
_VALUE = _Sentinel("VALUE")  # any value on the simulated stack that is not a string
_STRING_OPCODES = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
)
_INT_OPCODES = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"})
_PUT_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPCODES = frozenset({"GET", "BINGET", "LONG_BINGET"})
_EXT_OPCODES = frozenset({"EXT1", "EXT2", "EXT4"})


def _global_name(module: str, name: str, protocol: int) -> _Import:
    """``module.name`` as CPython's ``find_class`` would resolve it (including Python 2 names)."""
    if protocol < 3:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
    importable = all(part.isidentifier() for part in f"{module}.{name}".split("."))
    return _Import(f"{module}.{name}", importable)


def _walk_pickle(stream: IO[bytes], limits: ScanLimits) -> _Walk:
    """Walk one pickle from the stream's position to its STOP opcode, collecting imports.

    The stack model follows CPython's unpickler (opcodes never pop across a MARK, POP with
    nothing above the MARK drops the MARK, memo entries may be overwritten) and tracks only
    which entries are strings, so ``STACK_GLOBAL`` operands resolve like they would at load.
    """
    walk = _Walk()
    stack: list[object] = []  # _MARK entries separate the frames
    memo: dict[int, object] = {}
    protocol = 0

    def pop() -> object:
        if not stack or stack[-1] is _MARK:
            raise ValueError("stack underflow")
        return stack.pop()

    def pop_mark() -> None:
        if _MARK not in stack:
            raise ValueError("no MARK on the stack")
        del stack[len(stack) - 1 - stack[::-1].index(_MARK) :]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # genops on escapes like b"\\?" in raw bytes
        try:
            reader = cast(IO[bytes], _CappedReader(stream, limits.max_pickle_bytes))
            for opcode, raw_arg, position in pickletools.genops(reader):
                arg: Any = raw_arg
                name = opcode.name
                if name == "PROTO":
                    protocol = int(arg)
                elif name in ("GLOBAL", "INST"):
                    module, _, attribute = str(arg).partition(" ")
                    walk.imports.append(_global_name(module, attribute, protocol))
                elif name in _INT_OPCODES and type(arg) is int:
                    walk.ints.append(arg)

                if name in _STRING_OPCODES and isinstance(arg, str):
                    stack.append(arg)
                elif name == "STACK_GLOBAL":
                    top, below = pop(), pop()
                    if isinstance(below, str) and isinstance(top, str):
                        walk.imports.append(_global_name(below, top, protocol))
                    else:
                        walk.imports.append(_Import(f"<unresolvable STACK_GLOBAL at byte {position}>", False))
                    stack.append(_VALUE)
                elif name in _EXT_OPCODES:
                    # copyreg's extension registry maps codes to globals; nothing registers any, but
                    # a code is an import all the same.
                    walk.imports.append(_Import(f"<copyreg extension code {arg}>", False))
                    stack.append(_VALUE)
                elif name in _PUT_OPCODES or name == "MEMOIZE":
                    if not stack or stack[-1] is _MARK:
                        raise ValueError("memo store without a value on the stack")
                    memo[len(memo) if name == "MEMOIZE" else int(arg)] = stack[-1]
                elif name in _GET_OPCODES:
                    if int(arg) not in memo:
                        raise ValueError(f"memo key {arg} read before it was stored")
                    stack.append(memo[int(arg)])
                elif name == "DUP":
                    stack.append(stack[-1] if stack else pop())
                elif name == "MARK":
                    stack.append(_MARK)
                elif name == "POP":
                    if stack and stack[-1] is _MARK:
                        stack.pop()
                    else:
                        pop()
                else:
                    before = opcode.stack_before
                    if pickletools.markobject in before:
                        pop_mark()
                        for _ in range(before.index(pickletools.markobject)):
                            pop()
                    else:
                        for _ in before:
                            pop()
                    stack.extend(_VALUE for _ in opcode.stack_after)
                if len(stack) > limits.max_pickle_stack or len(memo) > limits.max_pickle_stack:
                    raise _PickleTooLarge
        except _PickleTooLarge:
            walk.too_large = True
            walk.error = (
                f"larger than the scan limits ({limits.max_pickle_bytes} bytes, {limits.max_pickle_stack} entries)"
            )
        except Exception as exc:  # genops raises ValueError, EOFError, UnicodeDecodeError, ... on garbage
            walk.error = f"{type(exc).__name__}: {exc}"
    return walk


# --------------------------------------------------------------------------------------------
# Containers


def _unsafe_member_name(name: str) -> bool:
    normalized = name.replace("\\", "/")
    return (
        normalized.startswith("/")
        or (len(normalized) > 1 and normalized[1] == ":")
        or ".." in PurePosixPath(normalized).parts
        or "\x00" in normalized
    )


def _archive_relative(name: str) -> str:
    """Member name without the archive's root folder (torch writes every member under one)."""
    return name.split("/", 1)[1] if "/" in name else name


def _whole_module_hint(names: list[str]) -> str:
    if any(name.startswith(_WHOLE_MODULE_PREFIXES) for name in names):
        return (
            " These look like a whole pickled nn.Module (torch.save(model)), which is a program, not weights:"
            " save model.state_dict() with safetensors.torch.save_file(...), or export the model with"
            " torch.export.save(torch.export.export(model, (example_input,)), 'model.pt2')."
        )
    return ""


_UNCHECKED = _Sentinel("UNCHECKED")  # a JSON member that was flagged or is corrupt, not a document


@dataclass
class _Scan:
    allowed: frozenset[str]
    allow_torchscript_classes: bool
    limits: ScanLimits
    pickles: int = 0
    findings: list[PickleFinding] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)  # members that torch could not load either

    def flag(self, member: str, kind: FindingKind, message: str, names: tuple[str, ...] = ()) -> None:
        self.findings.append(PickleFinding(member=member, globals=names, message=message, kind=kind))

    def is_allowed(self, name: str) -> bool:
        return name in self.allowed or (self.allow_torchscript_classes and name.startswith("__torch__."))

    # -- pickles ------------------------------------------------------------------------------

    def pickle_stream(self, stream: IO[bytes], member: str, *, strict: bool) -> None:
        """Walk the pickle(s) at the stream's position as ``torch.load`` would read them.

        The first pickle always; when it is the legacy magic number, the four that follow it.
        Strict walks report parse failures; lenient walks only report importable names.
        """
        walks = [_walk_pickle(stream, self.limits)]
        if walks[0].complete and LEGACY_MAGIC_NUMBER in walks[0].ints:
            strict = True
            while len(walks) < len(_LEGACY_PICKLE_NAMES) and walks[-1].complete:
                walks.append(_walk_pickle(stream, self.limits))
        self.report_walks(member, walks, strict=strict, labels=_LEGACY_PICKLE_NAMES if len(walks) > 1 else None)

    def report_walks(
        self, member: str, walks: list[_Walk], *, strict: bool, labels: tuple[str, ...] | None = None
    ) -> None:
        """Turn walks of one member into at most a few findings (imports, parse errors, limits)."""
        unsafe: list[str] = []
        for walk in walks:
            self.pickles += strict
            for imported in walk.imports:
                if (
                    (strict or imported.importable)
                    and not self.is_allowed(imported.name)
                    and imported.name not in unsafe
                ):
                    unsafe.append(imported.name)
        if unsafe:
            self.flag(
                member,
                FindingKind.unsafe_global,
                f"pickle imports {', '.join(unsafe)}, outside torch's weights-only allowlist;"
                " unpickling it could run arbitrary code." + _whole_module_hint(unsafe),
                tuple(unsafe),
            )
        for index, walk in enumerate(walks):
            if walk.error is None or not strict:  # lenient: raw bytes fail to parse all the time
                continue
            where = f" ({labels[index]} pickle)" if labels else ""
            if walk.too_large:
                self.flag(member, FindingKind.limit_exceeded, f"pickle{where} is {walk.error}; it was not checked")
            else:
                self.flag(
                    member,
                    FindingKind.malformed_pickle,
                    f"pickle{where} cannot be parsed (truncated or corrupt): {walk.error}",
                )

    # -- zip ----------------------------------------------------------------------------------

    def open_zip(self, stream: IO[bytes], label: str) -> zipfile.ZipFile | None:
        """Open a zip archive whose directory holds at most ``max_members`` members; flag it and return None otherwise.

        Raises:
            zipfile.BadZipFile: not a readable zip archive.
        """
        if zip_member_count(stream, self.limits.max_members) > self.limits.max_members:
            self.flag(label, FindingKind.limit_exceeded, f"more than {self.limits.max_members} members")
            return None
        return zipfile.ZipFile(stream)

    def zip_archive(self, archive: zipfile.ZipFile, prefix: str, depth: int) -> None:
        """Check every member of a zip archive (recursing into nested zips)."""
        infos = archive.infolist()
        total = sum(info.file_size for info in infos)
        if total > self.limits.max_total_bytes:
            self.flag(
                prefix.removesuffix("!/") or "archive",
                FindingKind.limit_exceeded,
                f"members add up to {total} uncompressed bytes (limit {self.limits.max_total_bytes})",
            )
            return
        if not self._zip_layout_ok(archive, infos, prefix):
            return
        strict_members = self._pt2_pickled_members(archive, infos, prefix)
        for info in infos:
            if not info.is_dir():
                self._zip_member(archive, info, prefix, depth, strict=info.filename in strict_members)

    def _zip_layout_ok(self, archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], prefix: str) -> bool:
        """Refuse archives that other zip readers could see differently (prepended data, overlaps)."""
        ordered = sorted(infos, key=lambda info: info.header_offset)
        if ordered and ordered[0].header_offset != 0:
            label = prefix.removesuffix("!/") or "archive"
            self.flag(label, FindingKind.unsafe_member, "archive has data before its first member")
            return False
        ends = [info.header_offset + info.compress_size for info in ordered]
        starts = [info.header_offset for info in ordered[1:]] + [archive.start_dir]
        for info, end, start in zip(ordered, ends, starts, strict=True):
            if end > start:
                self.flag(
                    prefix + info.filename, FindingKind.unsafe_member, "member overlaps the next one (zip bomb layout)"
                )
                return False
        return True

    def _pt2_pickled_members(self, archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], prefix: str) -> set[str]:
        """Members that ``torch.export.load`` unpickles although their names do not say so.

        Weight and constant payloads marked ``use_pickle`` (loaded with ``weights_only=False``),
        and custom/opaque objects (loaded with ``pickle.loads``), as listed in the archive's
        payload configurations. Read with the same JSON parser torch uses.
        """
        by_relative: dict[str, list[zipfile.ZipInfo]] = {}
        for info in infos:
            by_relative.setdefault(_archive_relative(info.filename), []).append(info)
        pickled: set[str] = set()
        for info in infos:
            relative = _archive_relative(info.filename)
            directory = next((d for d in _PT2_PAYLOAD_DIRS if relative.startswith(d)), None)
            if directory is None or not relative.endswith("config.json"):
                continue
            document = self._read_json(archive, info, prefix + info.filename, "pt2 payload configuration")
            if document is _UNCHECKED:
                continue
            try:
                entries = document["config"].values()
                for entry in entries:
                    path_name = str(entry["path_name"])
                    if entry.get("use_pickle") or path_name.startswith(_PT2_PICKLED_PREFIXES):
                        targets = by_relative.get(posixpath.join(directory, path_name), [])
                        pickled.update(target.filename for target in targets)
            except Exception as exc:  # JSON of another shape: a finding, never a crash
                self.flag(
                    prefix + info.filename,
                    FindingKind.malformed_pickle,
                    f"pt2 payload configuration cannot be read ({type(exc).__name__}: {exc});"
                    " the pickled payloads it lists cannot be identified",
                )
        return pickled

    def _zip_member(
        self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, prefix: str, depth: int, *, strict: bool
    ) -> None:
        member = prefix + info.filename
        relative = _archive_relative(info.filename)
        if _unsafe_member_name(info.filename):
            self.flag(member, FindingKind.unsafe_member, "member name escapes the archive (absolute path or '..')")
        if relative.startswith(_PT2_AOTI_DIR) or info.filename.lower().endswith(_NATIVE_SUFFIXES):
            self.flag(
                member,
                FindingKind.native_code,
                "native code (AOTInductor/shared library): torch.export.load would load and run it",
            )
            return
        if info.file_size > self.limits.max_member_bytes:
            self.flag(
                member, FindingKind.limit_exceeded, f"{info.file_size} bytes (limit {self.limits.max_member_bytes})"
            )
            return
        ratio = info.file_size / max(info.compress_size, 1)
        if (
            info.compress_type != zipfile.ZIP_STORED
            and info.file_size > 2**20
            and ratio > self.limits.max_compression_ratio
        ):
            self.flag(member, FindingKind.limit_exceeded, f"compression ratio {ratio:.0f} (zip bomb?)")
            return
        if relative.startswith(_PT2_MODELS_DIR) or relative in _PT2_PROGRAM_NAMES:
            self._pt2_program(archive, info, member)
            return
        strict = strict or relative.endswith(("pkl", ".pt", ".pth"))
        try:
            with archive.open(info) as stream:
                head = stream.read(4)
                stream.seek(0)
                if head in _NATIVE_MAGICS:
                    self.flag(member, FindingKind.native_code, "member is a native executable or shared library")
                elif head == _ZIP_MAGIC:
                    self._nested_zip(stream, info, member, depth, strict=strict)
                else:
                    self.pickle_stream(stream, member, strict=strict)
        except Exception as exc:  # BadZipFile, zlib.error, LZMAError, ...: a finding, never a crash
            self.flag(member, FindingKind.malformed_pickle, f"member cannot be read: {exc}")

    def _nested_zip(self, stream: IO[bytes], info: zipfile.ZipInfo, member: str, depth: int, *, strict: bool) -> None:
        if depth + 1 > self.limits.max_depth:
            self.flag(member, FindingKind.limit_exceeded, f"archives nested deeper than {self.limits.max_depth}")
            return
        if info.file_size > self.limits.max_nested_bytes:
            self.flag(member, FindingKind.limit_exceeded, f"nested archive over {self.limits.max_nested_bytes} bytes")
            return
        try:
            nested = self.open_zip(io.BytesIO(stream.read()), member)
        except Exception as exc:  # not a zip after all (raw bytes can start with the magic)
            if strict:
                self.flag(member, FindingKind.malformed_pickle, f"nested archive cannot be read: {exc}")
            return
        if nested is not None:
            with nested:
                self.zip_archive(nested, prefix=member + "!/", depth=depth + 1)

    def _pt2_program(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, member: str) -> None:
        """Check the JSON graph of an exported program for what ``torch.export.load`` would run.

        Its deserializer resolves node targets by ``getattr`` from ``torch``/``math``/
        ``_operator`` (``torch.os.system`` is callable), parses symbolic shapes with
        ``sympy.sympify`` (which calls ``eval``), and ``ExportedProgram.module()`` ``exec``s the
        guard code. Only ATen/prims operator overloads, higher-order operators, torch's symbolic
        Python operators, sympy expressions and shape guards of a fixed grammar pass.
        """
        document = self._read_json(archive, info, member, "exported program")
        if document is _UNCHECKED:
            return
        problems = _program_problems(document)
        if problems:
            shown = [problem[:200] for problem in problems[:20]]
            self.flag(
                member,
                FindingKind.unsafe_program,
                "the exported program would run Python code when loaded: it names "
                + "; ".join(shown)
                + (f" (+{len(problems) - 20} more)" if len(problems) > 20 else ""),
                tuple(shown),
            )

    def _read_json(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, member: str, what: str) -> Any:
        """Parse a JSON member within the byte and value caps, as torch would read it (``json.loads``).

        The caps hold before anything is parsed: the declared size, then the bytes read (never more
        than the cap + 1, should the declaration lie), then the number of values. Over a cap, nested
        too deeply for this parser, or unreadable (like any member) is a finding; bytes that are not
        JSON are corruption, since torch cannot load them either.

        Returns:
            The document, or ``_UNCHECKED``.
        """
        cap = self.limits.max_json_bytes
        if info.file_size > cap:
            self.flag(member, FindingKind.limit_exceeded, f"{what} of {info.file_size} bytes (limit {cap})")
            return _UNCHECKED
        try:
            with archive.open(info) as stream:
                data = stream.read(cap + 1)
        except Exception as exc:  # BadZipFile, zlib.error, LZMAError, ...: a finding, never a crash
            self.flag(member, FindingKind.malformed_pickle, f"{what} cannot be read: {exc}")
            return _UNCHECKED
        if len(data) > cap:
            self.flag(member, FindingKind.limit_exceeded, f"{what} of more than {cap} bytes (limit {cap})")
            return _UNCHECKED
        values = 1 + sum(data.count(mark) for mark in _JSON_VALUE_MARKS)
        if values > self.limits.max_json_values:
            self.flag(
                member,
                FindingKind.limit_exceeded,
                f"{what} of up to {values} JSON values (limit {self.limits.max_json_values})",
            )
            return _UNCHECKED
        try:
            return json.loads(data)
        except RecursionError:
            self.flag(member, FindingKind.limit_exceeded, f"{what} is nested too deeply to be checked")
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            self.corrupt.append(f"{member}: {what} is not valid JSON: {exc}")
        return _UNCHECKED

    # -- legacy tar ---------------------------------------------------------------------------

    def tar_archive(self, archive: tarfile.TarFile) -> None:
        """Check a legacy tar checkpoint (members ``pickle``, ``storages``, ``tensors``)."""
        readers: dict[str, Callable[[IO[bytes], str], None]] = {
            "pickle": lambda stream, member: self.pickle_stream(stream, member, strict=True),
            "storages": self._tar_storages,
            "tensors": self._tar_tensors,
        }
        for count, info in enumerate(_tar_members(archive), start=1):
            if count > self.limits.max_members:
                self.flag("archive", FindingKind.limit_exceeded, f"more than {self.limits.max_members} members")
                return
            if _unsafe_member_name(info.name):
                self.flag(
                    info.name, FindingKind.unsafe_member, "member name escapes the archive (absolute path or '..')"
                )
            if not info.isfile():
                self.flag(info.name, FindingKind.unsafe_member, "member is a link or device, not a regular file")
                continue
            if info.size > self.limits.max_member_bytes:
                self.flag(
                    info.name, FindingKind.limit_exceeded, f"{info.size} bytes (limit {self.limits.max_member_bytes})"
                )
                continue
            stream = archive.extractfile(info)
            if stream is None:
                continue
            with stream:
                reader = readers.get(info.name)
                if reader is None:
                    self.pickle_stream(stream, info.name, strict=False)
                else:
                    reader(stream, info.name)

    def _tar_records(self, stream: IO[bytes], member: str, skip_record: Callable[[_Walk], None]) -> list[_Walk]:
        """``count`` pickle, then ``count`` x (pickle + raw record), as torch's legacy tar loader reads."""
        walks = [_walk_pickle(stream, self.limits)]
        counts = walks[0].ints
        if not walks[0].complete or len(counts) != 1 or counts[0] < 0:
            walks[0].error = walks[0].error or "record count is not a single non-negative integer"
            return walks
        for _ in range(counts[0]):
            walks.append(_walk_pickle(stream, self.limits))
            if not walks[-1].complete or not self._imports_allowed(walks[-1]):
                break
            try:
                skip_record(walks[-1])
            except Exception as exc:  # truncated record, or a storage type without a dtype
                walks[-1].error = f"raw record after the pickle is malformed: {exc}"
                break
        return walks

    def _imports_allowed(self, walk: _Walk) -> bool:
        return all(self.is_allowed(imported.name) for imported in walk.imports)

    def _tar_storages(self, stream: IO[bytes], member: str) -> None:
        def skip_storage(walk: _Walk) -> None:
            storage_types = [imported.name for imported in walk.imports if imported.name.endswith("Storage")]
            if len(storage_types) != 1:
                raise ValueError("storage record does not name one storage type")
            from torch._weights_only_unpickler import _get_allowed_globals

            itemsize = int(_get_allowed_globals()[storage_types[0]].dtype.itemsize)
            (numel,) = struct.unpack("<q", _read_exactly(stream, 8))
            _skip(stream, numel * itemsize)

        walks = self._tar_records(stream, member, skip_storage)
        if all(walk.complete for walk in walks) and self._imports_allowed(walks[-1]):
            walks.append(_walk_pickle(stream, self.limits))  # storage views
        self.report_walks(member, walks, strict=True)

    def _tar_tensors(self, stream: IO[bytes], member: str) -> None:
        def skip_tensor(_: _Walk) -> None:
            (ndim,) = struct.unpack("<i", _read_exactly(stream, 4))
            if ndim < 0:
                raise ValueError(f"negative tensor rank {ndim}")
            _skip(stream, 4 + 16 * ndim + 8)

        self.report_walks(member, self._tar_records(stream, member, skip_tensor), strict=True)


def _program_problems(document: object) -> list[str]:
    """The operator targets, symbolic expressions and guards of a serialized program that are not allowed."""
    problems: list[str] = []
    if isinstance(document, dict):
        guards = document.get("guards_code", [])
        for guard in guards if isinstance(guards, list) else [guards]:
            if not (isinstance(guard, str) and _guard_allowed(guard)):
                problems.append(f"guard code {guard!r}")
    pending = [document]
    while pending:
        value = pending.pop()
        if isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                if key in ("target", "as_operator") and isinstance(item, str):
                    if not _operator_allowed(item):
                        problems.append(f"operator {item!r}")
                elif key == "expr_str" and isinstance(item, str):
                    if not _sympy_expression_allowed(item):
                        problems.append(f"symbolic expression {item!r}")
                else:
                    pending.append(item)
    return problems


def _operator_allowed(target: str) -> bool:
    """An ATen/prims ``OpOverload``, a higher-order operator, or one of torch's symbolic Python operators."""
    if target in _PT2_PYTHON_OPERATORS:
        return True
    parts = target.split(".")
    if parts[:2] != ["torch", "ops"] or not all(part.isidentifier() and not part.startswith("__") for part in parts):
        return False
    import torch

    expected: type
    if len(parts) == 5 and parts[2] in _PT2_OPERATOR_NAMESPACES:
        expected = torch._ops.OpOverload
    elif len(parts) == 4 and parts[2] == "higher_order":
        expected = torch._ops.HigherOrderOperator
    else:
        return False
    resolved: object = torch.ops
    try:
        for part in parts[2:]:
            resolved = getattr(resolved, part)
    except Exception:  # unknown operators raise AttributeError or RuntimeError
        return False
    return isinstance(resolved, expected)


def allowed_graph_callable(target: object) -> bool:
    """Whether a deserialized graph node may call ``target`` (the check of :func:`_operator_allowed`, resolved).

    ATen/prims operator overloads, higher-order operators, and torch's symbolic Python operators.
    """
    import torch

    if isinstance(target, torch._ops.OpOverload):
        return target.namespace in _PT2_OPERATOR_NAMESPACES
    if isinstance(target, torch._ops.HigherOrderOperator):
        return True
    module, name = getattr(target, "__module__", None), getattr(target, "__name__", None)
    return f"{module}.{name}" in _PT2_PYTHON_OPERATORS


def _parse_expression(text: str) -> ast.Expression | None:
    if len(text) > 100_000 or "\n" in text or "\r" in text:
        return None
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


_EXPRESSION_NODES = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.Compare,
    ast.BoolOp,
    ast.operator,
    ast.unaryop,
    ast.cmpop,
    ast.boolop,
    ast.Load,
)


def _sympy_expression_allowed(text: str) -> bool:
    """Arithmetic over symbols (``s0``) and calls of sympy expression classes; strings only as names.

    ``Max('...')`` would sympify (evaluate) its string argument, so strings are allowed only as
    the first argument of ``Symbol``/``Float``.
    """
    tree = _parse_expression(text)
    if tree is None:
        return False
    name_strings: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _SYMPY_CALLS:
                return False
            if node.func.id in ("Symbol", "Float") and node.args and isinstance(node.args[0], ast.Constant):
                name_strings.add(id(node.args[0]))
            for keyword in node.keywords:
                if keyword.arg not in _SYMPY_KEYWORDS or not isinstance(keyword.value, ast.Constant):
                    return False
        elif isinstance(node, ast.Name):
            if not (node.id in _SYMPY_CALLS or node.id in _SYMPY_CONSTANTS or _SYMBOL_NAME.fullmatch(node.id)):
                return False
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str | bytes) and id(node) not in name_strings:
                return False
        elif not isinstance(node, (*_EXPRESSION_NODES, ast.keyword)):
            return False
    return True


def _guard_allowed(text: str) -> bool:
    """Shape guards like ``L['x'].size()[2] >= 3``: arithmetic and comparisons over input sizes."""
    tree = _parse_expression(text)
    if tree is None or '"' in text or "\\" in text:  # the guard is pasted into a string literal too
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Attribute) or node.keywords:
                return False
        elif isinstance(node, ast.Attribute):
            if node.attr not in _GUARD_METHODS:
                return False
        elif isinstance(node, ast.Name):
            if node.id != "L":
                return False
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str) and not node.value.isidentifier():
                return False
            if isinstance(node.value, bytes):
                return False
        elif not isinstance(node, (*_EXPRESSION_NODES, ast.Subscript)):
            return False
    return True


def _tar_members(archive: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Members one at a time (``getmembers`` would read every header first)."""
    while (info := archive.next()) is not None:
        yield info


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise ValueError(f"expected {size} bytes, found {len(data)}")
    return data


def _skip(stream: IO[bytes], size: int) -> None:
    """Step over a raw record; tar member streams clamp seeks at their end, which reveals truncation."""
    if size < 0:
        raise ValueError(f"negative record size {size}")
    target = stream.tell() + size
    if stream.seek(target) != target:
        raise ValueError("record runs past the end of the member")
