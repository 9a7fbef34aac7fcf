"""The ``model_file`` check: what a checkpoint would import or run if it were loaded, found without loading it.

Pure static analysis over the file's containers; the pickles inside are walked by
:mod:`scanner.loading.pickle_walk` and ``.pt2`` programs checked by :mod:`scanner.loading.pt2_program`.
Which bytes are pickles depends on the container, and the walk follows the loaders:

- zip archives (``torch.save``, ``torch.export`` ``.pt2``, TorchScript): every member. Members
  that a loader reads as a pickle (``*.pkl``, ``*.pt`` artifacts, the payloads a ``.pt2``
  configuration marks as pickled, nested zips) are walked *strictly*: a parse failure is a
  finding. All other members are walked *leniently* as a second line of defence: raw tensor
  bytes are not pickles, so only imports with importable names are reported there. Member
  names that escape the archive, native libraries (AOTInductor ``.so`` files, which
  ``torch.export.load`` would ``dlopen``) and size limits are findings too. The central directory
  is measured before ``zipfile`` reads it (:func:`~scanner.loading.sniff.zip_member_count`).
- legacy ``torch.save`` files: the pickles back to back (magic number, protocol version,
  sys_info, object, storage keys) up to the raw storage bytes.
- legacy tar files: the ``pickle``, ``storages`` and ``tensors`` members, stepping over the raw
  storage and tensor records between their pickles.
- a bare pickle: the whole file.

Every JSON member the check parses (``.pt2`` programs and payload configurations) is capped in bytes
and in values before it is parsed (a JSON bomb of 60 MiB would cost 1.5 GB); one that is not JSON at
all is corruption (``CorruptFileError``), since torch cannot load it either.
"""

from __future__ import annotations

import io
import json
import posixpath
import struct
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from scanner.errors import CorruptFileError
from scanner.loading.pickle_walk import TORCHSCRIPT_BUILTINS, PickleScan, PickleWalk, allowed_globals, walk_pickle
from scanner.loading.pt2_program import program_problems
from scanner.loading.sniff import detect_format, is_zip, zip_member_count
from scanner.loading.types import ZIP_MAGIC, FindingKind, ModelFileReport, ModelFormat, ScanLimits

__all__ = ["scan_model_file"]

_NATIVE_MAGICS = (b"\x7fELF", b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe", b"\xfe\xed\xfa\xcf", b"\xfe\xed\xfa\xce")
_NATIVE_SUFFIXES = (".so", ".dylib", ".dll", ".pyd")
_PT2_AOTI_DIR = "data/aotinductor/"
_PT2_PAYLOAD_DIRS = ("data/weights/", "data/constants/")
_PT2_PICKLED_PREFIXES = ("custom_obj_", "opaque_obj_")
# torch.export.load deserializes every member under models/ as a program, whatever its suffix.
_PT2_MODELS_DIR = "models/"
_PT2_PROGRAM_NAMES = ("serialized_exported_program.json",)  # the pre-2.8 layout
# Every JSON value but the outermost follows one of these bytes (and every object key "{" or ","): json.loads
# builds at most one object per occurrence, plus one.
_JSON_VALUE_MARKS = (b",", b":", b"[", b"{")


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
    file_format = detect_format(path)
    torchscript = file_format is ModelFormat.torchscript
    scan = _Scan(
        allowed=(allowed_globals() | TORCHSCRIPT_BUILTINS) if torchscript else allowed_globals(),
        allow_torchscript_classes=torchscript,
        limits=limits or ScanLimits(),
    )
    with path.open("rb") as stream:
        try:
            if is_zip(stream):  # every zip, also those of an unknown kind
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


_UNCHECKED = object()  # a JSON member that was flagged or is corrupt, not a document


@dataclass
class _Scan(PickleScan):
    """The walk of one file's containers, down to the pickles and ``.pt2`` programs inside."""

    corrupt: list[str] = field(default_factory=list)  # members that torch could not load either

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
                elif head == ZIP_MAGIC:
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
        problems = program_problems(document)
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

    def _tar_records(
        self, stream: IO[bytes], member: str, skip_record: Callable[[PickleWalk], None]
    ) -> list[PickleWalk]:
        """``count`` pickle, then ``count`` x (pickle + raw record), as torch's legacy tar loader reads."""
        walks = [walk_pickle(stream, self.limits)]
        counts = walks[0].ints
        if not walks[0].complete or len(counts) != 1 or counts[0] < 0:
            walks[0].error = walks[0].error or "record count is not a single non-negative integer"
            return walks
        for _ in range(counts[0]):
            walks.append(walk_pickle(stream, self.limits))
            if not walks[-1].complete or not self._imports_allowed(walks[-1]):
                break
            try:
                skip_record(walks[-1])
            except Exception as exc:  # truncated record, or a storage type without a dtype
                walks[-1].error = f"raw record after the pickle is malformed: {exc}"
                break
        return walks

    def _imports_allowed(self, walk: PickleWalk) -> bool:
        return all(self.is_allowed(imported.name) for imported in walk.imports)

    def _tar_storages(self, stream: IO[bytes], member: str) -> None:
        def skip_storage(walk: PickleWalk) -> None:
            storage_types = [imported.name for imported in walk.imports if imported.name.endswith("Storage")]
            if len(storage_types) != 1:
                raise ValueError("storage record does not name one storage type")
            from torch._weights_only_unpickler import _get_allowed_globals

            itemsize = int(_get_allowed_globals()[storage_types[0]].dtype.itemsize)
            (numel,) = struct.unpack("<q", _read_exactly(stream, 8))
            _skip(stream, numel * itemsize)

        walks = self._tar_records(stream, member, skip_storage)
        if all(walk.complete for walk in walks) and self._imports_allowed(walks[-1]):
            walks.append(walk_pickle(stream, self.limits))  # storage views
        self.report_walks(member, walks, strict=True)

    def _tar_tensors(self, stream: IO[bytes], member: str) -> None:
        def skip_tensor(_: PickleWalk) -> None:
            (ndim,) = struct.unpack("<i", _read_exactly(stream, 4))
            if ndim < 0:
                raise ValueError(f"negative tensor rank {ndim}")
            _skip(stream, 4 + 16 * ndim + 8)

        self.report_walks(member, self._tar_records(stream, member, skip_tensor), strict=True)


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
