"""backdoor-scan's scanner: a pure PyTorch library that checks image-classifier checkpoints for backdoors.

No web, no database, no environment reads, no printing: paths and frozen config in, dataclasses out.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("backdoor-scan")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from scanner.config import DataLimits, ModelOptions, ScanConfig  # noqa: E402
from scanner.device import resolve_device  # noqa: E402
from scanner.errors import ScannerError  # noqa: E402
from scanner.pipeline import scan  # noqa: E402
from scanner.verdict import Verdict, VerdictLabel  # noqa: E402

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
