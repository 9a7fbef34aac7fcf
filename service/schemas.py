"""API models: the upload form of ``POST /v1/scans`` (its options are :class:`service.options.ScanOptions`) for the
OpenAPI document, and ``ScanPublic``, the scan resource every route (and the completion webhook) returns."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from scanner.verdict import BACKDOOR_DETECTORS
from service.models import JobStatus, Scan
from service.options import ScanOptions

__all__ = [
    "ErrorPublic",
    "FilePublic",
    "JobPublic",
    "ModelPublic",
    "ProgressPublic",
    "RepairPublic",
    "ScanList",
    "ScanPublic",
    "WebhookPublic",
    "repair_form_schema",
    "upload_form_schema",
]


def upload_form_schema() -> dict[str, Any]:
    """The multipart request body of ``POST /v1/scans`` for the OpenAPI document (and Swagger UI's form)."""
    properties: dict[str, Any] = {
        "model": {"type": "string", "format": "binary", "description": "the checkpoint (.pt2, safetensors, .pt)"},
        "data": {
            "type": "string",
            "format": "binary",
            "description": "clean labelled samples (.npz or ImageFolder .zip)",
        },
        "training_data": {"type": "string", "format": "binary", "description": "the training set to inspect"},
    }
    properties["callback_url"] = {
        "type": "string",
        "description": "http(s) URL that gets the scan resource, signed (Standard Webhooks), when the scan ends",
        "examples": [""],
    }
    scalar = {int: "integer", float: "number", bool: "boolean", str: "string"}
    for name, info in ScanOptions.model_fields.items():
        annotation = info.annotation
        args = getattr(annotation, "__args__", (annotation,))
        base = next((a for a in args if a in scalar), str)
        prop: dict[str, Any] = {"type": scalar[base], "description": info.description or ""}
        if name in ("input_shape", "mean", "std", "detectors"):
            prop = {"type": "string", "description": f"{info.description} (comma-separated)"}
        if name == "detectors":
            prop["description"] += f", e.g. {','.join(BACKDOOR_DETECTORS)}"
        # Swagger UI fills each empty field with a sample ("string", 0, true) unless the schema gives one
        if info.default is not None:
            prop["default"] = info.default
        else:
            prop["examples"] = [""]
        properties[name] = prop
    return {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["model"], "properties": properties}}
        },
    }


class ProgressPublic(BaseModel):
    fraction: float = Field(description="0 to 1")
    stage: str
    message: str


class FilePublic(BaseModel):
    filename: str = Field(
        description="the name the client sent, without directories, control or bidi characters (display only;"
        " stored under a server-chosen name)"
    )
    sha256: str
    size_bytes: int


class ModelPublic(FilePublic):
    format: str


class ErrorPublic(BaseModel):
    code: str
    detail: str


class WebhookPublic(BaseModel):
    callback_url: str
    attempts: int
    delivered_at: datetime | None
    last_error: str | None


def _job_fields(job: Scan) -> dict[str, Any]:
    """What every job resource (scan, repair) shows of its row."""
    return {
        "id": job.id,
        "status": JobStatus(job.status),
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "progress": ProgressPublic(
            fraction=job.progress_fraction, stage=job.progress_stage, message=job.progress_message
        ),
        "attempts": job.attempts,
        "model": ModelPublic(
            filename=job.model_filename,
            sha256=job.model_sha256,
            size_bytes=job.model_size_bytes,
            format=job.model_format,
        ),
        "error": ErrorPublic(code=job.error_code, detail=job.error_detail or "") if job.error_code else None,
    }


class JobPublic(BaseModel):
    """What every job resource (scan, repair) has."""

    id: str
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: ProgressPublic
    attempts: int
    error: ErrorPublic | None


class ScanPublic(JobPublic):
    """A scan as clients see it."""

    model: ModelPublic
    data: FilePublic | None
    training_data: FilePublic | None
    options: dict[str, Any]
    verdict: str | None = Field(description="clean, backdoored, unsafe_file or inconclusive once succeeded")
    result: dict[str, Any] | None = Field(description="the full verdict once succeeded (see the README)")
    webhook: WebhookPublic | None
    links: dict[str, str]

    @classmethod
    def of(cls, scan: Scan) -> ScanPublic:
        base = f"/v1/scans/{scan.id}"
        data = training = None
        if scan.data_sha256 is not None:
            data = FilePublic(
                filename=scan.data_filename or "", sha256=scan.data_sha256, size_bytes=scan.data_size_bytes or 0
            )
        if scan.training_data_sha256 is not None:
            training = FilePublic(
                filename=scan.training_data_filename or "",
                sha256=scan.training_data_sha256,
                size_bytes=scan.training_data_size_bytes or 0,
            )
        return cls(
            **_job_fields(scan),
            data=data,
            training_data=training,
            options=scan.options,
            verdict=scan.verdict,
            result=scan.result,
            webhook=WebhookPublic(
                callback_url=scan.callback_url,
                attempts=scan.webhook_attempts,
                delivered_at=scan.webhook_delivered_at,
                last_error=scan.webhook_error,
            )
            if scan.callback_url
            else None,
            links={
                "self": base,
                "cancel": f"{base}/cancel",
                "artifacts": f"{base}/artifacts/{{name}}",
                "report": f"{base}/report",
            },
        )


class ScanList(BaseModel):
    items: list[ScanPublic]
    total: int
    limit: int
    offset: int


class RepairPublic(JobPublic):
    """A repair of a scan's model as clients see it."""

    scan_id: str = Field(description="the scan whose model is repaired")
    model: ModelPublic = Field(description="the scan's model, as uploaded")
    data: FilePublic | None = Field(description="the clean samples the repair fine-tunes on and measures with")
    classes: list[int] = Field(description="the flagged classes whose reversed triggers are unlearned")
    options: dict[str, Any]
    result: dict[str, Any] | None = Field(
        description="once succeeded: clean accuracy and the reversed triggers' attack success rate before and after"
        " (held-out samples), the re-scan's verdict, and the repaired files (see the README)"
    )
    links: dict[str, str]

    @classmethod
    def of(cls, repair: Scan) -> RepairPublic:
        base = f"/v1/repairs/{repair.id}"
        options = repair.options
        data = None
        if repair.data_sha256 is not None:
            data = FilePublic(
                filename=repair.data_filename or "", sha256=repair.data_sha256, size_bytes=repair.data_size_bytes or 0
            )
        links = {
            "self": base,
            "cancel": f"{base}/cancel",
            "scan": f"/v1/scans/{repair.parent_id}",
            "artifacts": f"{base}/artifacts/{{name}}",
        }
        result = repair.result
        if result is not None:
            links.update({name: f"{base}/artifacts/{name}" for name in result.get("files", [])})
        return cls(
            **_job_fields(repair),
            scan_id=repair.parent_id or "",
            data=data,
            classes=list(options.get("classes", [])),
            options=dict(options.get("repair", {})),
            result=result,
            links=links,
        )


def repair_form_schema() -> dict[str, Any]:
    """The multipart request body of ``POST /v1/scans/{id}/repair`` for the OpenAPI document."""
    from service.options import RepairOptions

    properties: dict[str, Any] = {
        "data": {
            "type": "string",
            "format": "binary",
            "description": "clean labelled samples (.npz or ImageFolder .zip); default: the scan's. More samples"
            " cost less accuracy",
        }
    }
    for name, info in RepairOptions.model_fields.items():
        properties[name] = {"type": "number", "description": info.description or "", "default": info.default}
    return {
        "required": False,
        "content": {"multipart/form-data": {"schema": {"type": "object", "properties": properties}}},
    }
