"""The scan result: per-detector results in three channels (findings, errors, skipped) and the overall verdict.

``Verdict.to_dict()`` is the JSON contract of DESIGN.md section 5 (the ``result`` of a scan resource).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "BACKDOOR_DETECTORS",
    "DetectorResult",
    "DetectorStatus",
    "ModelInfo",
    "ScannerInfo",
    "Verdict",
    "VerdictLabel",
    "reversed_trigger_classes",
]

#: Detectors that look for backdoors (as opposed to ``model_file``, which looks for unsafe pickles).
BACKDOOR_DETECTORS = ("neural_cleanse", "spectral_signatures", "max_margin")


class VerdictLabel(StrEnum):
    BACKDOORED = "backdoored"
    CLEAN = "clean"
    UNSAFE_FILE = "unsafe_file"
    INCONCLUSIVE = "inconclusive"


class DetectorStatus(StrEnum):
    OK = "ok"
    ERROR = "error"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class DetectorResult:
    """What one detector reported.

    Attributes:
        status: ``ok`` (it ran), ``error`` (it crashed: ``code`` + ``detail``) or ``skipped`` (``reason``).
        flagged_classes: classes this detector considers backdoor targets.
        findings: JSON-ready findings (``model_file``: one per pickle member with unsafe globals).
        details: detector-specific JSON-ready fields (per-class statistics, threshold, ...).
        duration_s: wall time of the detector, when it ran.
        artifacts: files for people to look at (name -> bytes, e.g. trigger mask PNG/npy); not part of
            ``to_dict()``: the CLI writes them to ``--artifacts DIR``, the service serves them.
    """

    status: DetectorStatus
    flagged_classes: tuple[int, ...] = ()
    findings: tuple[Mapping[str, Any], ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)
    code: str | None = None
    detail: str | None = None
    reason: str | None = None
    duration_s: float | None = None
    artifacts: Mapping[str, bytes] = field(default_factory=dict)

    @classmethod
    def skipped(cls, reason: str) -> DetectorResult:
        return cls(status=DetectorStatus.SKIPPED, reason=reason)

    @classmethod
    def error(cls, code: str, detail: str, duration_s: float | None = None) -> DetectorResult:
        return cls(status=DetectorStatus.ERROR, code=code, detail=detail, duration_s=duration_s)

    def to_dict(self) -> dict[str, Any]:
        if self.status is DetectorStatus.SKIPPED:
            return {"status": self.status.value, "reason": self.reason}
        if self.status is DetectorStatus.ERROR:
            out: dict[str, Any] = {"status": self.status.value, "code": self.code, "detail": self.detail}
        else:
            out = {"status": self.status.value, "flagged_classes": list(self.flagged_classes)}
            out["findings"] = [dict(f) for f in self.findings]
            out.update(self.details)
        if self.duration_s is not None:
            out["duration_s"] = round(self.duration_s, 3)
        return out


@dataclass(frozen=True)
class ScannerInfo:
    version: str
    torch: str
    device: str
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "torch": self.torch, "device": self.device, "seed": self.seed}


@dataclass(frozen=True)
class ModelInfo:
    """What was scanned: the detected format, and what loading revealed (``None`` when not loaded)."""

    format: str
    sha256: str
    size_bytes: int
    input_shape: tuple[int, int, int] | None = None
    num_classes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "num_classes": self.num_classes,
        }


@dataclass(frozen=True)
class Verdict:
    """The result of one scan. The label, flagged classes and errors are derived from the detectors."""

    detectors: Mapping[str, DetectorResult]
    scanner: ScannerInfo
    model: ModelInfo

    @property
    def label(self) -> VerdictLabel:
        """``unsafe_file`` beats ``backdoored`` beats ``clean``; ``clean`` needs every backdoor detector that
        was asked to run to have run, and at least one of them; anything less is ``inconclusive``."""
        model_file = self.detectors.get("model_file")
        if model_file is not None and model_file.findings:
            return VerdictLabel.UNSAFE_FILE
        if self.flagged_classes:
            return VerdictLabel.BACKDOORED
        backdoor = [self.detectors[name] for name in BACKDOOR_DETECTORS if name in self.detectors]
        ran = [r for r in backdoor if r.status is DetectorStatus.OK]
        failed = [r for r in backdoor if r.status is DetectorStatus.ERROR]
        if ran and not failed:
            return VerdictLabel.CLEAN
        return VerdictLabel.INCONCLUSIVE

    @property
    def flagged_classes(self) -> tuple[int, ...]:
        return tuple(sorted({k for r in self.detectors.values() for k in r.flagged_classes}))

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [
            {"detector": name, "code": r.code, "detail": r.detail}
            for name, r in self.detectors.items()
            if r.status is DetectorStatus.ERROR
        ]

    @property
    def has_findings(self) -> bool:
        """True for the labels a pipeline should fail on by default (``backdoored``, ``unsafe_file``)."""
        return self.label in (VerdictLabel.BACKDOORED, VerdictLabel.UNSAFE_FILE)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.label.value,
            "flagged_classes": list(self.flagged_classes),
            "detectors": {name: r.to_dict() for name, r in self.detectors.items()},
            "errors": self.errors,
            "model": self.model.to_dict(),
            "scanner": self.scanner.to_dict(),
        }


def reversed_trigger_classes(status: object, classes: object) -> set[int]:
    """The classes whose Neural Cleanse trigger a scan reversed to convergence, from the detector's ``status`` and
    its per-class ``classes`` entries: every class of a run that decided (``ok``), except those a many-class scan
    screened out (their masks stopped after the screen: a rough start, not a trigger worth unlearning)."""
    if status != "ok" or not isinstance(classes, list):
        return set()
    return {
        int(entry["class"])
        for entry in classes
        if isinstance(entry, dict) and isinstance(entry.get("class"), int) and not entry.get("screened_out")
    }
