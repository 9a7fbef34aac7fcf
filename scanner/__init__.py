"""backdoor-scan's scanner: a pure PyTorch library that checks image-classifier checkpoints for backdoors.

No web, no database, no environment reads, no printing: paths and frozen config in, dataclasses out.

The layers, each importing only from the ones before it (``tests/test_architecture.py`` checks this):

1. leaves: ``_version``, ``errors``, ``verdict``, ``config``, ``stats``, ``device``
2. shared model pieces: ``classifier`` (predict, normalisation, the output check), ``trigger``, ``layers``
3. ``loading/``: every untrusted byte enters here (model files, sample sets)
4. algorithms, no JSON: ``neural_cleanse``, ``features``, ``spectral``, ``gradcam``, ``evidence``
5. ``detectors/``: one adapter per detector to a ``DetectorResult``, and the registry
6. ``pipeline``: :func:`scan`, which runs the registry and gives each detector its share of the progress bar
7. ``render/``: text, SARIF and HTML from a verdict
8. ``testing/``: attacks, training, MNIST; for tests and ``bench/`` only

The names below are loaded on first use, so that ``scanner._version`` or ``scanner.render.text`` can be
imported without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from scanner._version import __version__

if TYPE_CHECKING:
    from scanner.config import DataLimits, ModelOptions, ScanConfig
    from scanner.device import resolve_device
    from scanner.errors import ScannerError
    from scanner.pipeline import scan
    from scanner.verdict import Verdict, VerdictLabel

_EXPORTS = {
    "DataLimits": "scanner.config",
    "ModelOptions": "scanner.config",
    "ScanConfig": "scanner.config",
    "ScannerError": "scanner.errors",
    "Verdict": "scanner.verdict",
    "VerdictLabel": "scanner.verdict",
    "resolve_device": "scanner.device",
    "scan": "scanner.pipeline",
}

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'scanner' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
