"""Every untrusted byte enters the scanner here: model files (checked statically, then loaded without running
code) and sample sets (decoded under caps).

- :func:`check_model_file`: the static check that the API runs at submit (format, pickles, archive members,
  ``.pt2`` programs, state-dict headers); never loads anything.
- :func:`load_model`: the same check, then the classifier, frozen, on a device.
- :func:`load_samples`: ``.npz`` or ImageFolder ``.zip`` -> tensors.
"""

from scanner.loading.archive_check import scan_model_file
from scanner.loading.exported import ExportedClassifier
from scanner.loading.model import check_model_file, load_model
from scanner.loading.samples import Samples, load_samples
from scanner.loading.sniff import detect_format
from scanner.loading.types import FindingKind, LoadedModel, ModelFileReport, ModelFormat, PickleFinding, ScanLimits

__all__ = [
    "ExportedClassifier",
    "FindingKind",
    "LoadedModel",
    "ModelFileReport",
    "ModelFormat",
    "PickleFinding",
    "Samples",
    "ScanLimits",
    "check_model_file",
    "detect_format",
    "load_model",
    "load_samples",
    "scan_model_file",
]
