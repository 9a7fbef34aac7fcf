"""Scan options: ``ScanOptions`` (what the API accepts as form fields, the worker reads back from the job table and
``backdoor-scan scan`` builds from its flags) and :func:`scan_config`, the one place they become scanner config.

Normalisation values are checked by the scanner's own checks (:mod:`scanner.config`), not again here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from scanner.config import (
    ModelOptions,
    NeuralCleanseConfig,
    RepairConfig,
    ScanConfig,
    SpectralConfig,
    check_mean,
    check_std,
)
from scanner.errors import InvalidOptionError
from scanner.verdict import BACKDOOR_DETECTORS

__all__ = [
    "MAX_ACCURACY_DROP",
    "MIN_NC_MAX_STEPS",
    "OptionsError",
    "RepairOptions",
    "ScanOptions",
    "parse_fields",
    "parse_options",
    "scan_config",
]

#: The smallest ``nc_max_steps``: a class's cost schedule needs 5 steps to switch its L1 cost on, 5 more to raise
#: and 5 to lower it, then 30 without a 2% smaller mask to stop (45 at the very least); the wide-CNN bench classes
#: stopped after 110 to 160 steps in one round. A limit below that can only end in ``not_converged``.
MIN_NC_MAX_STEPS = 100
Options = TypeVar("Options", bound=BaseModel)

#: The loosest accuracy bound a repair accepts: a model that lost more than 10 points is not a repair.
MAX_ACCURACY_DROP = 0.1


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
    mean: list[float] | None = Field(
        default=None, min_length=1, max_length=16, description="per-channel mean, e.g. 0.1307"
    )
    std: list[float] | None = Field(
        default=None, min_length=1, max_length=16, description="per-channel std, e.g. 0.3081"
    )
    detectors: list[Literal["neural_cleanse", "spectral_signatures", "max_margin"]] | None = Field(
        default=None,
        min_length=1,
        description="backdoor detectors to run (default: all that can run; max_margin needs no data)",
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

    @field_validator("mean", "std")
    @classmethod
    def _normalization(cls, values: list[float] | None, info: ValidationInfo) -> list[float] | None:
        """Each field by the scanner's own check, so that an error names the field; whether mean and std go
        together is :func:`scan_config`'s question."""
        if values is not None:
            try:
                (check_mean if info.field_name == "mean" else check_std)(values)
            except InvalidOptionError as exc:
                raise ValueError(exc.detail) from None
        return values

    @field_validator("detectors", mode="before")
    @classmethod
    def _names(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()] or None
        return value


class OptionsError(InvalidOptionError):
    """Option fields that failed validation (code ``invalid_option``); ``errors`` has one entry per field error
    (``loc``, ``msg``, ``type``), and ``detail`` joins them."""

    def __init__(self, errors: Sequence[Mapping[str, Any]]):
        self.errors = [dict(error) for error in errors]
        super().__init__("; ".join(f"{'.'.join(error['loc'])}: {error['msg']}" for error in self.errors))


def parse_options(values: Mapping[str, object]) -> ScanOptions:
    """Validate scan option fields (form fields of the API, or the CLI's flags).

    Raises:
        OptionsError: a field is unknown or invalid.
    """
    return parse_fields(ScanOptions, values)


def parse_fields(model: type[Options], values: Mapping[str, object]) -> Options:
    """Validate option fields as ``model`` (:class:`ScanOptions`, :class:`RepairOptions`).

    Raises:
        OptionsError: a field is unknown or invalid.
    """
    try:
        return model.model_validate(dict(values))
    except ValidationError as exc:
        raise OptionsError(
            [
                {"loc": [str(part) for part in error["loc"]], "msg": error["msg"], "type": error["type"]}
                for error in exc.errors(include_url=False, include_context=False, include_input=False)
            ]
        ) from None


class RepairOptions(BaseModel):
    """Options of one repair (``POST /v1/scans/{id}/repair`` form fields, ``backdoor-scan repair`` flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_accuracy_drop: float = Field(
        default=RepairConfig().max_accuracy_drop,
        ge=0.0,
        le=MAX_ACCURACY_DROP,
        description="the largest loss of held-out clean accuracy (0..1) a repair may cost; more is refused",
    )

    def config(self) -> RepairConfig:
        return RepairConfig(max_accuracy_drop=self.max_accuracy_drop)


def scan_config(options: ScanOptions) -> ScanConfig:
    """The one place where accepted options become scanner config (the API, the worker and ``backdoor-scan scan``).

    Raises:
        InvalidOptionError: the combination is invalid (for example mean without std).
    """
    model = ModelOptions(
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
