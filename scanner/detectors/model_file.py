"""The ``model_file`` detector: the static check of the uploaded file, as a verdict entry.

It runs before anything is loaded (inside :func:`scanner.loading.load_model`, or at submit through
:func:`scanner.loading.check_model_file`); an unsafe file stops the scan with the verdict ``unsafe_file``.
Details: the ``format`` and how many pickles were walked; ``findings`` lists what was refused and why.
"""

from __future__ import annotations

from scanner.loading import ModelFileReport
from scanner.verdict import DetectorResult, DetectorStatus

__all__ = ["model_file_result"]


def model_file_result(report: ModelFileReport, duration_s: float) -> DetectorResult:
    """The verdict entry of a model-file check."""
    return DetectorResult(
        status=DetectorStatus.OK,
        findings=tuple(finding.to_dict() for finding in report.findings),
        details={"format": report.format.value, "pickles_scanned": report.pickles_scanned},
        duration_s=duration_s,
    )
