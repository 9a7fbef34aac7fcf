"""Submitting a scan (``POST /v1/scans`` without the HTTP): validate the upload and its options, answer a repeated
upload or a reused Idempotency-Key with the scan that exists, check the model file, insert, enqueue.

The router makes a :class:`ScanSubmission` (a new scan id and the directory its upload goes to), streams the upload
there (:func:`service.storage.parse_upload`) and calls :meth:`ScanSubmission.submit`; every refusal is a
:class:`ServiceError` (problem+json with a stable ``code``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from http import HTTPStatus

from scanner.errors import ScannerError
from scanner.loading import check_model_file
from service.deps import AppState
from service.jobs import FileInfo, NewScan, new_scan_id
from service.models import Scan
from service.options import OptionsError, ScanOptions, parse_options, scan_config
from service.problems import ServiceError, scanner_problem
from service.storage import ParsedUpload, ScanFiles, keep_if_created
from service.webhooks import check_callback_url

__all__ = ["FILE_FIELDS", "TEXT_FIELDS", "ScanSubmission", "check_idempotency_key", "dedup_key"]

logger = logging.getLogger(__name__)

#: The file parts of ``POST /v1/scans``.
FILE_FIELDS = ("model", "data", "training_data")
#: Its text fields: the scan options and the callback URL.
TEXT_FIELDS = frozenset([*ScanOptions.model_fields, "callback_url"])


def check_idempotency_key(value: str | None) -> str | None:
    """The ``Idempotency-Key`` header, checked before the upload is read.

    Raises:
        ServiceError: 422 ``invalid_idempotency_key``.
    """
    if value is None:
        return None
    if not 1 <= len(value) <= 255 or not value.isprintable():
        raise ServiceError(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1-255 printable characters",
        )
    return value


def dedup_key(files: Mapping[str, FileInfo], options: ScanOptions) -> str:
    """What makes two uploads the same: the digests of their files and their options."""
    identity = {
        "files": {name: files[name].sha256 for name in FILE_FIELDS if name in files},
        "options": options.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _repeated(scan: Scan, key: str) -> tuple[Scan, bool]:
    """The existing scan an upload repeats, unless its Idempotency-Key named another upload's scan (422)."""
    if scan.dedup_key != key:
        raise ServiceError(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used for a different upload",
            scan_id=scan.id,
        )
    return scan, False


class ScanSubmission:
    """One ``POST /v1/scans``: a new scan id, the directory its upload is streamed into (``files``), and the
    ``Idempotency-Key``, checked on construction (before the upload is read).

    Raises:
        ServiceError: 422 ``invalid_idempotency_key``.
    """

    def __init__(self, state: AppState, idempotency_key: str | None = None):
        self.state = state
        self.idempotency_key = check_idempotency_key(idempotency_key)
        self.scan_id = new_scan_id()
        self.files = ScanFiles(state.settings.scans_dir, self.scan_id)

    def accept(self, upload: ParsedUpload) -> tuple[Scan, bool]:
        """Validate, check the model file, then insert and enqueue; returns ``(scan, created)``, where ``created``
        is False for the existing scan this upload repeats. Blocking (the database, the model file): the API runs it
        in a threadpool through :meth:`submit`, which also removes the files a new scan does not keep.

        Raises:
            ServiceError: the refusal; checked in this order: no or an empty file (``missing_model``,
                ``empty_file``), a callback this server cannot send (``invalid_callback_url``,
                ``webhooks_not_configured``), invalid options (``invalid_options``), TorchScript on a server that
                forbids it (``trust_code_not_allowed``), options that do not go together (``invalid_option``), an
                Idempotency-Key used for another upload (``idempotency_key_reused``), then the model file's own
                check (``unsafe_file``, ``corrupt_file``, ``unsupported_format``, ...).
        """
        state = self.state
        uploaded = upload.files
        if "model" not in uploaded:
            raise ServiceError(HTTPStatus.UNPROCESSABLE_ENTITY, "missing_model", "the 'model' file part is required")
        for name, info in uploaded.items():
            if info.size_bytes == 0:
                raise ServiceError(HTTPStatus.UNPROCESSABLE_ENTITY, "empty_file", f"the {name!r} file is empty")
        fields = dict(upload.fields)
        callback_url = fields.pop("callback_url", None) or None
        if callback_url is not None:
            problem = check_callback_url(callback_url)
            if problem is not None:
                raise ServiceError(HTTPStatus.UNPROCESSABLE_ENTITY, "invalid_callback_url", problem)
            if state.settings.webhook_secret is None:
                raise ServiceError(
                    HTTPStatus.UNPROCESSABLE_ENTITY,
                    "webhooks_not_configured",
                    "this server has no webhook secret (BDS_WEBHOOK_SECRET), so it sends no callbacks",
                )
        try:
            options = parse_options(fields)
        except OptionsError as exc:
            raise ServiceError(
                HTTPStatus.UNPROCESSABLE_ENTITY, "invalid_options", exc.detail, errors=exc.errors
            ) from None
        if options.trust_code and not state.settings.allow_torchscript:
            raise ServiceError(
                HTTPStatus.FORBIDDEN,
                "trust_code_not_allowed",
                "this server does not load TorchScript (it runs code when loaded); export the model with torch.export",
            )
        try:
            config = scan_config(options)
        except ScannerError as exc:
            raise scanner_problem(exc) from None

        key = dedup_key(uploaded, options)
        store = state.store
        if self.idempotency_key is not None:
            existing = store.by_idempotency_key(self.idempotency_key)
            if existing is not None:
                return _repeated(existing, key)
        existing = store.reusable(key)
        if existing is not None:
            return existing, False

        model_path = self.files.upload("model")
        try:
            report = check_model_file(model_path, config.model)
        except ScannerError as exc:
            raise scanner_problem(exc, (model_path.name, uploaded["model"].filename)) from None

        scan, created = store.create(
            NewScan(
                id=self.scan_id,
                model=uploaded["model"],
                model_format=report.format.value,
                data=uploaded.get("data"),
                training_data=uploaded.get("training_data"),
                options=options.model_dump(mode="json", exclude_defaults=True),
                dedup_key=key,
                idempotency_key=self.idempotency_key,
                callback_url=callback_url,
            )
        )
        if not created:  # a concurrent request inserted first: its scan (submit removes this upload's files)
            return _repeated(scan, key)
        state.queue.enqueue_new(scan.id)
        return scan, True

    async def submit(self, upload: ParsedUpload) -> tuple[Scan, bool]:
        """:meth:`accept` in a threadpool. The upload's files stay only with a scan it created: they are removed on
        a refusal and for a repeated upload."""
        scan, created = await keep_if_created(self.accept, upload, self.files)
        if created:
            logger.info("scan queued", extra={"scan_id": scan.id, "sha256": scan.model_sha256})
        return scan, created
