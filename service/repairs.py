"""Asking for a repair (``POST /v1/scans/{id}/repair`` without the HTTP): check that the scan can be repaired, give
the repair its own copy of what it needs, insert it as a job, enqueue it.

A repair is a job row of kind ``repair`` whose ``parent_id`` is the scan. Its directory holds everything it runs on,
linked (or copied) from the scan's at creation: the model upload, the clean samples (the scan's, or a file sent with
the request) and the reversed triggers of the flagged classes. So a repair runs, and is served, whatever happens to
its scan afterwards (a deleted scan leaves its repairs intact).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from http import HTTPStatus
from pathlib import Path
from typing import Any

from scanner.verdict import reversed_trigger_classes
from service.deps import AppState
from service.jobs import FileInfo, NewScan, new_scan_id
from service.models import JobKind, JobStatus, Scan
from service.options import OptionsError, RepairOptions, parse_fields
from service.problems import ServiceError
from service.storage import ParsedUpload, ScanFiles, keep_if_created

__all__ = [
    "REPAIR_FILE_FIELDS",
    "REPAIR_TEXT_FIELDS",
    "TRIGGERS_DIR",
    "RepairRequest",
    "flagged_triggers",
    "repair_targets",
]

logger = logging.getLogger(__name__)

#: The file part of ``POST /v1/scans/{id}/repair``: clean samples (optional when the scan had some).
REPAIR_FILE_FIELDS = ("data",)
REPAIR_TEXT_FIELDS = frozenset(RepairOptions.model_fields)
#: Under a repair's directory: the scan's reversed triggers (``nc-class-K-mask.npy``, ``-pattern.npy``).
TRIGGERS_DIR = "triggers"


def _neural_cleanse(scan: Scan) -> dict[str, Any]:
    """The Neural Cleanse detector's part of a scan's result (empty when it has none)."""
    found = ((scan.result or {}).get("detectors") or {}).get("neural_cleanse") or {}
    return found if isinstance(found, dict) else {}


def flagged_triggers(scan: Scan) -> list[int]:
    """The classes whose trigger Neural Cleanse reversed and flagged in a succeeded scan."""
    neural_cleanse = _neural_cleanse(scan)
    if neural_cleanse.get("status") != "ok":
        return []
    return sorted(int(k) for k in neural_cleanse.get("flagged_classes") or [])


def repair_targets(scan: Scan) -> tuple[list[int], list[int]]:
    """What a repair of a succeeded scan unlearns: ``(classes, with_trigger)``. ``classes`` are those the verdict
    flags, whichever detector flagged them; ``with_trigger`` those of them whose Neural Cleanse trigger the scan
    reversed to convergence (every class, unless a many-class scan screened it out). The repair reverses the others'
    itself."""
    classes = sorted(int(k) for k in (scan.result or {}).get("flagged_classes") or [])
    neural_cleanse = _neural_cleanse(scan)
    reversed_ = reversed_trigger_classes(neural_cleanse.get("status"), neural_cleanse.get("classes"))
    return classes, [k for k in classes if k in reversed_]


def _link(source: Path, destination: Path) -> None:
    """A hard link where the file system allows one (no copy of a large upload), else a copy."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


class RepairRequest:
    """One ``POST /v1/scans/{id}/repair``: a new repair id and the directory its optional data file is streamed into.
    :meth:`submit` checks the scan and the options, links the scan's files, inserts and enqueues."""

    def __init__(self, state: AppState, scan_id: str):
        self.state = state
        self.scan_id = scan_id
        self.repair_id = new_scan_id()
        self.files = ScanFiles(state.settings.scans_dir, self.repair_id)

    def accept(self, upload: ParsedUpload) -> tuple[Scan, bool]:
        """Returns ``(repair, created)``; ``created`` is False when the same repair (same scan, samples and options)
        is queued, running or succeeded already: that one is returned.

        Raises:
            ServiceError: in this order: ``scan_not_found`` (404); ``invalid_options``, ``empty_file`` (422);
                ``scan_not_finished`` (409: the scan has not succeeded); ``nothing_to_repair`` (409: no detector
                flagged a class); ``repair_unsupported`` (422: a TorchScript model); ``missing_data`` (422: no clean
                samples sent and the scan's are gone).
        """
        state = self.state
        scan = state.store.get_kind(self.scan_id, JobKind.scan)
        if scan is None:
            raise ServiceError(HTTPStatus.NOT_FOUND, "scan_not_found", f"no scan with id {self.scan_id!r}")
        try:
            options = parse_fields(RepairOptions, upload.fields)
        except OptionsError as exc:
            raise ServiceError(
                HTTPStatus.UNPROCESSABLE_ENTITY, "invalid_options", exc.detail, errors=exc.errors
            ) from None
        data = upload.files.get("data")
        if data is not None and data.size_bytes == 0:
            raise ServiceError(HTTPStatus.UNPROCESSABLE_ENTITY, "empty_file", "the 'data' file is empty")
        if scan.status != JobStatus.succeeded:
            raise ServiceError(
                HTTPStatus.CONFLICT,
                "scan_not_finished",
                f"the scan is {scan.status}: only a succeeded scan is repaired",
            )
        classes, with_trigger = repair_targets(scan)
        if not classes:
            raise ServiceError(
                HTTPStatus.CONFLICT,
                "nothing_to_repair",
                f"the scan's verdict is {scan.verdict} and no detector flagged a class: there is nothing to unlearn",
            )
        if scan.model_format == "torchscript":
            raise ServiceError(
                HTTPStatus.UNPROCESSABLE_ENTITY,
                "repair_unsupported",
                "a TorchScript model cannot be given back as .pt2: upload a torch.export archive",
            )
        source = ScanFiles(state.settings.scans_dir, scan.id)
        if data is None:
            if scan.data_sha256 is None or not source.upload("data").is_file():
                raise ServiceError(
                    HTTPStatus.UNPROCESSABLE_ENTITY,
                    "missing_data",
                    "a repair fine-tunes on clean labelled samples: send a 'data' file (the scan had none)",
                )
            data = FileInfo(scan.data_filename or "data", scan.data_sha256, scan.data_size_bytes or 0)
            try:
                _link(source.upload("data"), self.files.upload("data"))
            except OSError:
                raise ServiceError(
                    HTTPStatus.UNPROCESSABLE_ENTITY, "missing_data", "the scan's clean samples are gone: send 'data'"
                ) from None
        stored = options.model_dump(mode="json")
        key = hashlib.sha256(
            json.dumps({"repair_of": scan.id, "data": data.sha256, "options": stored}, sort_keys=True).encode()
        ).hexdigest()
        existing = state.store.reusable(key)
        if existing is not None:
            return existing, False
        try:
            _link(source.upload("model"), self.files.upload("model"))
            for target in with_trigger:
                for kind in ("mask", "pattern"):
                    name = f"nc-class-{target}-{kind}.npy"
                    _link(source.artifacts / name, self.files.root / TRIGGERS_DIR / name)
        except OSError:
            raise ServiceError(
                HTTPStatus.UNPROCESSABLE_ENTITY,
                "repair_unsupported",
                "the scan's model or reversed triggers are no longer on the server: scan the model again",
            ) from None
        options_json: dict[str, Any] = {
            "scan": scan.options,
            "repair": stored,
            "classes": classes,
            "triggers": with_trigger,
        }
        repair, created = state.store.create(
            NewScan(
                id=self.repair_id,
                kind=JobKind.repair,
                parent_id=scan.id,
                model=FileInfo(scan.model_filename, scan.model_sha256, scan.model_size_bytes),
                model_format=scan.model_format,
                data=data,
                training_data=None,
                options=options_json,
                dedup_key=key,
                idempotency_key=None,
            )
        )
        if not created:
            return repair, False
        state.queue.enqueue_new(repair.id)
        return repair, True

    async def submit(self, upload: ParsedUpload) -> tuple[Scan, bool]:
        """:meth:`accept` in a threadpool; the request's files stay only with a repair it created."""
        repair, created = await keep_if_created(self.accept, upload, self.files)
        if created:
            logger.info("repair queued", extra={"scan_id": repair.id})
        return repair, created
