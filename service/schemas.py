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
    "ScanList",
    "ScanPublic",
    "WebhookPublic",
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
