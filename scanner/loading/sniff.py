"""Which container a checkpoint is, told from its bytes (never its name), and how many members a zip holds.

Zip archives are measured before anything opens them: ``zipfile`` builds an object per member of the
central directory before it can be asked anything, so a directory of a million empty members would
cost seconds and hundreds of megabytes. :func:`zip_member_count` walks the directory the way
``zipfile`` does, building nothing, so the caller can refuse first.
"""

from __future__ import annotations

import io
import pickletools
import struct
import tarfile
import zipfile
from pathlib import Path
from typing import IO

from scanner.errors import CorruptFileError, EmptyFileError
from scanner.loading.types import LEGACY_MAGIC_NUMBER, ZIP_MAGIC, ModelFormat, ScanLimits

__all__ = ["detect_format", "is_zip", "zip_member_count"]

# Zip records, as zipfile reads them: end of central directory (and its ZIP64 locator and record),
# central directory header.
_ZIP_END = struct.Struct("<4s4H2LH")
_ZIP64_END_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_END = struct.Struct("<4sQ2H2L4Q")
_ZIP_CENTRAL_HEADER = struct.Struct("<4s4B4HL2L5H2L")


def detect_format(path: Path) -> ModelFormat:
    """Tell the checkpoint format from the file's bytes, in the order ``torch.load`` decides.

    zip (``PK\\x03\\x04`` at offset 0; then members: ``archive_format``/``models/*.json`` for
    pt2, ``constants.pkl`` for TorchScript, ``data.pkl`` for ``torch.save``; a zip with more members
    than the scan accepts is ``unknown``, its directory unread), tar (a first member that Python's
    tarfile reads, as ``torch.load`` tries; blocks of zeros are not one), safetensors (8-byte length,
    then ``{``), legacy ``torch.save`` (a pickle of the magic number), bare pickle (``\\x80`` +
    protocol 2-5).

    Raises:
        EmptyFileError: the file has no bytes.
        CorruptFileError: it starts like a zip archive that cannot be read.
    """
    if path.stat().st_size == 0:
        raise EmptyFileError(f"{path.name} is empty (0 bytes)")
    with path.open("rb") as stream:
        head = stream.read(64)
    if head.startswith(ZIP_MAGIC):
        return _zip_format(path)
    if _is_tar(path):
        return ModelFormat.torch_tar
    if head[8:9] == b"{":
        return ModelFormat.safetensors
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return ModelFormat.torch_legacy if _is_legacy_magic(head) else ModelFormat.pickle
    return ModelFormat.unknown


def _zip_format(path: Path) -> ModelFormat:
    limit = ScanLimits().max_members
    try:
        with path.open("rb") as stream:
            if zip_member_count(stream, limit) > limit:
                return ModelFormat.unknown  # the model_file check refuses it
            with zipfile.ZipFile(stream) as archive:
                members = {name.split("/", 1)[-1]: name for name in archive.namelist()}
                format_member = members.get("archive_format")
                if format_member is not None and archive.getinfo(format_member).file_size <= 16:
                    with archive.open(format_member) as content:
                        if content.read(17).strip() == b"pt2":
                            return ModelFormat.pt2
    except Exception as exc:  # BadZipFile, zlib.error, NotImplementedError (compression method), ...
        raise CorruptFileError(f"zip archive is truncated or corrupt: {exc}") from exc
    if any(name.startswith("models/") and name.endswith(".json") for name in members):
        return ModelFormat.pt2
    if "constants.pkl" in members:
        return ModelFormat.torchscript
    if "data.pkl" in members:
        return ModelFormat.torch_zip
    return ModelFormat.unknown


def _is_tar(path: Path) -> bool:
    """Does Python's tarfile read a first member? (It opens blocks of zeros as an empty archive.)"""
    try:
        with tarfile.open(path, mode="r:") as archive:
            return archive.next() is not None
    except (tarfile.TarError, OSError, ValueError, EOFError):
        return False


def _is_legacy_magic(head: bytes) -> bool:
    """Is the first pickle exactly the legacy ``torch.save`` magic number?"""
    try:
        values = [
            arg
            for opcode, arg, _ in pickletools.genops(io.BytesIO(head))
            if opcode.name not in ("PROTO", "FRAME", "STOP", "MEMOIZE", "BINPUT")
        ]
    except (ValueError, EOFError):
        return False
    return values == [LEGACY_MAGIC_NUMBER]


def is_zip(stream: IO[bytes]) -> bool:
    """Does the stream start like a zip archive? (Read from the start; left there.)"""
    head = stream.read(len(ZIP_MAGIC))
    stream.seek(0)
    return head == ZIP_MAGIC


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
