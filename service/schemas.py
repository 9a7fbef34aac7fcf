"""API models: ``ScanOptions`` accepted with an upload, ``ScanPublic`` returned; and the one function that
turns accepted options into scanner config."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from scanner.config import MAX_ABS_MEAN, MAX_STD, MIN_STD, NeuralCleanseConfig, ScanConfig, SpectralConfig
from scanner.config import ModelOptions as ScannerModelOptions
from scanner.verdict import BACKDOOR_DETECTORS
from service.jobs import JobStatus, Scan

__all__ = [
    "ErrorPublic",
    "ModelPublic",
    "ProgressPublic",
    "ScanList",
    "ScanOptions",
    "ScanPublic",
    "scan_config",
]


def _numbers(value: object, kind: type[int] | type[float], name: str) -> object:
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        if not text:
            return None
        try:
            return [kind(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(f"{name} must be comma-separated numbers") from None
    return value


#: The smallest ``nc_max_steps``: a class's cost schedule needs 5 steps to switch its L1 cost on, 5 more to raise
#: and 5 to lower it, then 50 without a 2% smaller mask to stop (65 at the very least); the classes of the bench and
#: test models stopped after 140 to 530 steps. A limit below that can only end in ``not_converged``.
MIN_NC_MAX_STEPS = 100

# normalisation values: finite, no denormals (see scanner.config)
_Mean = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_ABS_MEAN, le=MAX_ABS_MEAN)]
_Std = Annotated[float, Field(allow_inf_nan=False, ge=MIN_STD, le=MAX_STD)]


class ScanOptions(BaseModel):
    """Options of one scan, sent as multipart form fields beside the files."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str | None = Field(
        default=None, max_length=64, description="architecture of a state_dict: mnist_cnn, cifar_cnn, resnet18, ..."
    )
    num_classes: int | None = Field(default=None, ge=2, le=100_000, description="class count for arch")
    input_shape: list[int] | None = Field(
        default=None, min_length=3, max_length=3, description="C,H,W of one input image, e.g. 1,28,28"
    )
    mean: list[_Mean] | None = Field(
        default=None, min_length=1, max_length=16, description="per-channel mean, e.g. 0.1307"
    )
    std: list[_Std] | None = Field(
        default=None, min_length=1, max_length=16, description="per-channel std, e.g. 0.3081"
    )
    detectors: list[Literal["neural_cleanse", "spectral_signatures"]] | None = Field(
        default=None, min_length=1, description="backdoor detectors to run (default: all whose data is given)"
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="random seed")
    trust_code: bool = Field(default=False, description="load TorchScript (runs code; the server must allow it)")
    nc_restarts: int | None = Field(default=None, ge=1, le=5, description="Neural Cleanse restarts per class")
    nc_confirm_rounds: int | None = Field(
        default=None, ge=0, le=5, description="Neural Cleanse rounds added when the decision is close (default 1)"
    )
    nc_precision: Literal["auto", "fp32", "bf16"] | None = Field(
        default=None, description="Neural Cleanse model passes: auto (bf16 on CPUs with native bf16), fp32 or bf16"
    )
    nc_max_steps: int | None = Field(
        default=None,
        ge=MIN_NC_MAX_STEPS,
        le=10_000,
        description="Neural Cleanse step limit per class (default 1000; fewer steps than a class needs to converge "
        "make the detector report not_converged)",
    )
    nc_anomaly_threshold: float | None = Field(
        default=None, gt=0, le=100, description="fixed anomaly-index threshold (default: calibrated)"
    )
    spectral_threshold: float | None = Field(default=None, gt=0, le=100, description="spectral separation threshold")

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, data: object) -> object:
        """A blank form field means "not given" (Swagger UI sends every field it shows, empty or not)."""
        if isinstance(data, dict):
            return {
                key: value
                for key, value in data.items()
                if not (key in cls.model_fields and isinstance(value, str) and not value.strip())
            }
        return data

    @field_validator("input_shape", mode="before")
    @classmethod
    def _shape(cls, value: object) -> object:
        return _numbers(value, int, "input_shape")

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _floats(cls, value: object) -> object:
        return _numbers(value, float, "mean/std")

    @field_validator("detectors", mode="before")
    @classmethod
    def _names(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()] or None
        return value


#: The form fields of ``POST /v1/scans`` besides the option fields.
FILE_FIELDS = ("model", "data", "training_data")


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


def scan_config(options: ScanOptions) -> ScanConfig:
    """The one place where accepted options become scanner config.

    Raises:
        InvalidOptionError: the combination is invalid (for example mean without std).
    """
    model = ScannerModelOptions(
        arch=options.arch,
        num_classes=options.num_classes,
        input_shape=(options.input_shape[0], options.input_shape[1], options.input_shape[2])
        if options.input_shape
        else None,
        mean=tuple(options.mean) if options.mean else None,
        std=tuple(options.std) if options.std else None,
        trust_code=options.trust_code,
    )
    neural_cleanse = NeuralCleanseConfig()
    if options.nc_restarts is not None:
        neural_cleanse = replace(neural_cleanse, restarts=options.nc_restarts)
    if options.nc_confirm_rounds is not None:
        neural_cleanse = replace(neural_cleanse, confirm_rounds=options.nc_confirm_rounds)
    if options.nc_precision is not None:
        neural_cleanse = replace(neural_cleanse, precision=options.nc_precision)
    if options.nc_max_steps is not None:
        neural_cleanse = replace(neural_cleanse, max_steps=options.nc_max_steps)
    if options.nc_anomaly_threshold is not None:
        neural_cleanse = replace(neural_cleanse, anomaly_threshold=options.nc_anomaly_threshold)
    spectral = SpectralConfig()
    if options.spectral_threshold is not None:
        spectral = replace(spectral, threshold=options.spectral_threshold)
    return ScanConfig(
        model=model,
        seed=options.seed,
        neural_cleanse=neural_cleanse,
        spectral=spectral,
        detectors=tuple(options.detectors) if options.detectors else BACKDOOR_DETECTORS,
    )


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
