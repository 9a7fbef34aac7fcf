"""backdoor-scan's scanner: a pure PyTorch library that checks image-classifier checkpoints for backdoors.

No web, no database, no environment reads, no printing: paths and frozen config in, dataclasses out.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("backdoor-scan")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from scanner.config import DataLimits, ModelOptions, ScanConfig
from scanner.device import resolve_device
from scanner.errors import ScannerError
from scanner.pipeline import scan
from scanner.verdict import Verdict, VerdictLabel

__all__ = [
    "DataLimits",
    "ModelOptions",
    "ScanConfig",
    "ScannerError",
    "Verdict",
    "VerdictLabel",
    "__version__",
    "resolve_device",
    "scan",
]
