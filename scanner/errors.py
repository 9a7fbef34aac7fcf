"""Errors raised by the scanner, each with a stable machine-readable ``code``.

The codes are part of the public contract (CLI stderr, verdict JSON, HTTP problem+json):
never rename one, only add new ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scanner.loading.types import ModelFileReport

__all__ = [
    "AllowlistUnavailableError",
    "CorruptFileError",
    "DataModelMismatchError",
    "DeviceUnavailableError",
    "EmptyFileError",
    "FeatureExtractionError",
    "GradCamUnavailableError",
    "InvalidDataError",
    "InvalidOptionError",
    "NotConvergedError",
    "ScanCancelled",
    "ScannerError",
    "StateDictMismatchError",
    "TooFewClassesError",
    "TrustRequiredError",
    "UndecidableError",
    "UnknownArchitectureError",
    "UnsafeFileError",
    "UnsupportedFormatError",
]


class ScannerError(Exception):
    """Base class: a failure the caller can act on, with a stable ``code`` and a human ``detail``."""

    code: str = "scanner_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class InvalidOptionError(ScannerError):
    """An option is missing, malformed or inconsistent with another option."""

    code = "invalid_option"


class EmptyFileError(ScannerError):
    """The uploaded file has no bytes."""

    code = "empty_file"


class UnsupportedFormatError(ScannerError):
    """The file is not one of the accepted model formats (and is never unpickled)."""

    code = "unsupported_format"


class CorruptFileError(ScannerError):
    """The file claims a known format but is truncated or internally inconsistent."""

    code = "corrupt_file"


class UnsafeFileError(ScannerError):
    """A pickle inside the file would import globals outside the weights-only allowlist.

    ``report`` is the :class:`scanner.loading.types.ModelFileReport` that names the findings.
    """

    code = "unsafe_file"

    def __init__(self, detail: str, report: ModelFileReport) -> None:
        super().__init__(detail)
        self.report = report


class TrustRequiredError(ScannerError):
    """The format runs code when loaded (TorchScript) and the caller did not opt in."""

    code = "trust_required"


class UnknownArchitectureError(ScannerError):
    """A state_dict needs ``arch`` and the name is missing or not allowlisted."""

    code = "unknown_architecture"


class StateDictMismatchError(ScannerError):
    """The state_dict does not fit the architecture (missing/unexpected keys, shapes)."""

    code = "state_dict_mismatch"


class InvalidDataError(ScannerError):
    """A sample file (.npz or ImageFolder .zip) is malformed, unsafe or out of range."""

    code = "invalid_data"


class DataModelMismatchError(ScannerError):
    """The samples do not fit the model (input shape, class count, labels)."""

    code = "data_model_mismatch"


class DeviceUnavailableError(ScannerError):
    """The requested device does not exist on this machine."""

    code = "device_unavailable"


class ScanCancelled(ScannerError):
    """Raised by a progress callback to stop a scan at the next progress point (never swallowed)."""

    code = "cancelled"


class AllowlistUnavailableError(ScannerError):
    """torch's weights-only allowlist cannot be read, so no file can be checked (fail closed)."""

    code = "allowlist_unavailable"


class FeatureExtractionError(ScannerError):
    """The model has no linear classification head whose input could be read."""

    code = "no_penultimate_layer"


class GradCamUnavailableError(ScannerError):
    """The model has no 2-D convolution whose activations Grad-CAM could read (a skip reason in the evidence)."""

    code = "no_conv_layer"


class NotConvergedError(ScannerError):
    """A detector's optimisation did not converge for some classes, so its statistic cannot decide either way
    (a detector error: the verdict is ``inconclusive`` unless another detector found something)."""

    code = "not_converged"


class TooFewClassesError(ScannerError):
    """The model has too few classes for the detector's outlier test (a median/MAD of two values never flags)."""

    code = "too_few_classes"


class UndecidableError(ScannerError):
    """A detector ran but its statistic cannot decide (non-finite outputs, no spread to fit a null to)."""

    code = "undecidable"
