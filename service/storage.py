"""Files on disk: uploads streamed under server-chosen names with a size cap, and scan artifacts.

Layout under ``BDS_DATA_DIR/scans/{scan_id}/``: ``model.upload``, ``data.upload``, ``training_data.upload``
and ``artifacts/`` (names made by the detectors, checked to be plain file names).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import IO

import anyio.to_thread
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from service.jobs import FileInfo
from service.models import Scan
from service.problems import ServiceError

__all__ = ["ParsedUpload", "ScanFiles", "UploadParser", "client_filename", "keep_if_created", "parse_upload"]

_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Dropped from client file names: C0 and C1 controls, DEL, line and paragraph separators, and the bidi controls
#: that make a name display as another ("invoice\u202egnp.pt2" shows as "invoice2tp.png").
_UNSHOWN = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
MAX_FILENAME_CHARS = 255
MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 64


def client_filename(sent: str, fallback: str) -> str:
    """The name a client sent for a file, fit to store and show: without the characters above, without any
    directory (``/`` or ``\\``), at most 255 characters; ``fallback`` when nothing is left."""
    name = re.split(r"[/\\]", _UNSHOWN.sub("", sent))[-1].strip()
    return name[:MAX_FILENAME_CHARS] if name not in ("", ".", "..") else fallback


class ScanFiles:
    """Where one scan's files live."""

    def __init__(self, scans_dir: Path, scan_id: str):
        self.root = scans_dir / scan_id
        self.artifacts = self.root / "artifacts"

    def upload(self, field_name: str) -> Path:
        return self.root / f"{field_name}.upload"

    def artifact(self, name: str) -> Path | None:
        """The path of an artifact by its public name, or None when the name is not a plain artifact name."""
        if not _ARTIFACT_NAME.match(name):
            return None
        return self.artifacts / name

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    named: bool = False  # the part came with a non-empty ``filename``
    handle: IO[bytes] | None = None
    digest: hashlib._Hash | None = None
    size: int = 0
    value: bytearray = field(default_factory=bytearray)


@dataclass
class ParsedUpload:
    """The files (stored) and the text fields of one ``POST /v1/scans``."""

    files: dict[str, FileInfo] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)


def _too_large(what: str, limit: int) -> ServiceError:
    return ServiceError(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        "upload_too_large",
        f"{what} is larger than the limit of {limit} bytes ({limit / 2**20:g} MiB)",
        limit_bytes=limit,
    )


def _bad(detail: str) -> ServiceError:
    return ServiceError(HTTPStatus.UNPROCESSABLE_ENTITY, "invalid_upload", detail)


class UploadParser:
    """A push parser for ``multipart/form-data``: file parts go straight to disk while being hashed and counted.

    Crossing ``max_file_bytes`` raises at once (nothing more of the body is read); text fields are capped at
    64 KiB, and field names outside ``file_fields`` and ``text_fields`` are refused.
    """

    def __init__(
        self,
        boundary: bytes,
        files: ScanFiles,
        file_fields: tuple[str, ...],
        text_fields: frozenset[str],
        max_file_bytes: int,
    ):
        self._files = files
        self._file_fields = file_fields
        self._text_fields = text_fields
        self._max_file_bytes = max_file_bytes
        self._part = _Part()
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._parts = 0
        self.result = ParsedUpload()
        callbacks: dict[str, Callable[..., None]] = {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_header_field": lambda data, start, end: self._header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
        }
        self._parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]

    def write(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise _bad(f"malformed multipart body: {exc}") from None

    def finish(self) -> ParsedUpload:
        try:
            self._parser.finalize()
        except MultipartParseError as exc:
            raise _bad(f"malformed multipart body: {exc}") from None
        if self._part.handle is not None:
            raise _bad("the multipart body ended inside a part")
        return self.result

    def close(self) -> None:
        if self._part.handle is not None:
            self._part.handle.close()
            self._part.handle = None

    def _on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise _bad(f"more than {MAX_PARTS} parts")
        self._part = _Part()
        self._headers = {}

    def _on_header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get(b"content-disposition"))
        if disposition != b"form-data" or b"name" not in params:
            raise _bad("every part needs 'Content-Disposition: form-data; name=...'")
        name = params[b"name"].decode("utf-8", "replace")
        if name in self.result.files or name in self.result.fields:
            raise _bad(f"field {name!r} was sent twice")
        self._part.name = name
        if name in self._file_fields:
            filename = params.get(b"filename")
            self._part.named = bool(filename)
            self._part.filename = client_filename(filename.decode("utf-8", "replace"), name) if filename else name
            self._files.root.mkdir(parents=True, exist_ok=True)
            self._part.handle = self._files.upload(name).open("wb")
            self._part.digest = hashlib.sha256()
        elif name not in self._text_fields:
            allowed = ", ".join([*self._file_fields, *sorted(self._text_fields)])
            raise _bad(f"unknown field {name!r}; accepted fields: {allowed}")

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        piece = data[start:end]
        part.size += len(piece)
        if part.handle is not None and part.digest is not None:
            if part.size > self._max_file_bytes:
                raise _too_large(f"the {part.name!r} file", self._max_file_bytes)
            part.digest.update(piece)
            part.handle.write(piece)
        else:
            if part.size > MAX_FIELD_BYTES:
                raise _too_large(f"field {part.name!r}", MAX_FIELD_BYTES)
            part.value.extend(piece)

    def _on_part_end(self) -> None:
        part = self._part
        if part.handle is not None and part.digest is not None:
            part.handle.close()
            part.handle = None
            if part.size == 0 and not part.named:
                # a blank form field in place of a file (Swagger UI, or an HTML form with no file picked): not sent
                self._files.upload(part.name).unlink(missing_ok=True)
                return
            filename = part.filename or part.name
            self.result.files[part.name] = FileInfo(
                filename=filename, sha256=part.digest.hexdigest(), size_bytes=part.size
            )
        elif part.name:
            try:
                self.result.fields[part.name] = part.value.decode("utf-8")
            except UnicodeDecodeError:
                raise _bad(f"field {part.name!r} is not UTF-8 text") from None


def multipart_boundary(content_type: str | None) -> bytes:
    media_type, params = parse_options_header(content_type)
    if media_type != b"multipart/form-data" or not params.get(b"boundary"):
        raise ServiceError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the scan as multipart/form-data (a 'model' file part and option fields)",
        )
    return params[b"boundary"]


async def parse_upload(
    chunks: AsyncIterator[bytes],
    content_type: str | None,
    content_length: str | None,
    files: ScanFiles,
    file_fields: tuple[str, ...],
    text_fields: frozenset[str],
    max_file_bytes: int,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> ParsedUpload:
    """Stream a multipart request body to disk; parsing and file writes run in a worker thread so the
    event loop stays free. Raises :class:`ServiceError` (413, 415, 422) and leaves no partial files behind."""
    boundary = multipart_boundary(content_type)
    max_body = len(file_fields) * max_file_bytes + MAX_PARTS * (MAX_FIELD_BYTES + 1024)
    if content_length is not None and content_length.isdigit() and int(content_length) > max_body:
        raise _too_large("the request body", max_body)
    parser = UploadParser(boundary, files, file_fields, text_fields, max_file_bytes)
    received = 0
    try:
        async for chunk in chunks:
            received += len(chunk)
            on_bytes(len(chunk))
            if received > max_body:
                raise _too_large("the request body", max_body)
            if chunk:
                await anyio.to_thread.run_sync(parser.write, chunk)
        parsed = parser.finish()
    except ClientDisconnect:
        parser.close()
        files.remove()
        raise ServiceError(
            HTTPStatus.BAD_REQUEST, "upload_incomplete", "the client went away during the upload"
        ) from None
    except BaseException:
        parser.close()
        files.remove()
        raise
    parser.close()
    return parsed


async def keep_if_created(
    accept: Callable[[ParsedUpload], tuple[Scan, bool]], upload: ParsedUpload, files: ScanFiles
) -> tuple[Scan, bool]:
    """Run a blocking ``accept(upload) -> (job, created)`` (database, file checks) in a worker thread; the
    request's files stay only with a job it created: they are removed on a refusal and for a repeated request."""
    try:
        job, created = await anyio.to_thread.run_sync(accept, upload)
    except BaseException:
        files.remove()
        raise
    if not created:
        files.remove()
    return job, created
