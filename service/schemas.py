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


class ScanPublic(BaseModel):
    """A scan as clients see it."""

    id: str
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: ProgressPublic
    attempts: int
    model: ModelPublic
    data: FilePublic | None
    training_data: FilePublic | None
    options: dict[str, Any]
    verdict: str | None = Field(description="clean, backdoored, unsafe_file or inconclusive once succeeded")
    result: dict[str, Any] | None = Field(description="the full verdict once succeeded (see the README)")
    error: ErrorPublic | None
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
            id=scan.id,
            status=JobStatus(scan.status),
            created_at=scan.created_at,
            updated_at=scan.updated_at,
            started_at=scan.started_at,
            finished_at=scan.finished_at,
            progress=ProgressPublic(
                fraction=scan.progress_fraction, stage=scan.progress_stage, message=scan.progress_message
            ),
            attempts=scan.attempts,
            model=ModelPublic(
                filename=scan.model_filename,
                sha256=scan.model_sha256,
                size_bytes=scan.model_size_bytes,
                format=scan.model_format,
            ),
            data=data,
            training_data=training,
            options=scan.options,
            verdict=scan.verdict,
            result=scan.result,
            error=ErrorPublic(code=scan.error_code, detail=scan.error_detail or "") if scan.error_code else None,
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


class RepairPublic(BaseModel):
    """A repair of a scan's model as clients see it."""

    id: str
    scan_id: str = Field(description="the scan whose model is repaired")
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: ProgressPublic
    attempts: int
    model: ModelPublic = Field(description="the scan's model, as uploaded")
    data: FilePublic | None = Field(description="the clean samples the repair fine-tunes on and measures with")
    classes: list[int] = Field(description="the flagged classes whose reversed triggers are unlearned")
    options: dict[str, Any]
    result: dict[str, Any] | None = Field(
        description="once succeeded: clean accuracy and the reversed triggers' attack success rate before and after"
        " (held-out samples), the re-scan's verdict, and the repaired files (see the README)"
    )
    error: ErrorPublic | None
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
            id=repair.id,
            scan_id=repair.parent_id or "",
            status=JobStatus(repair.status),
            created_at=repair.created_at,
            updated_at=repair.updated_at,
            started_at=repair.started_at,
            finished_at=repair.finished_at,
            progress=ProgressPublic(
                fraction=repair.progress_fraction, stage=repair.progress_stage, message=repair.progress_message
            ),
            attempts=repair.attempts,
            model=ModelPublic(
                filename=repair.model_filename,
                sha256=repair.model_sha256,
                size_bytes=repair.model_size_bytes,
                format=repair.model_format,
            ),
            data=data,
            classes=list(options.get("classes", [])),
            options=dict(options.get("repair", {})),
            result=result,
            error=ErrorPublic(code=repair.error_code, detail=repair.error_detail or "") if repair.error_code else None,
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
