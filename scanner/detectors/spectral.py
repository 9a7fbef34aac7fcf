"""The ``spectral_signatures`` detector: :func:`scanner.spectral.detect_poisoned_samples` on the uploaded training data.

Details (JSON): ``threshold``, ``min_persistence_gain``, ``estimated_poisoned_samples`` and, per analysed class,
``class``, ``samples``, ``separation``, ``score``, ``flagged``; a class over the threshold that the side test did not
confirm adds ``unconfirmed: true`` and its ``trigger_persistence``; flagged classes add
``estimated_poisoned_fraction``, ``suspicious_count``, ``trigger_persistence`` and up to
``max_listed`` ``suspicious`` samples (``index`` into the training data, ``score``, ``path`` for
ImageFolder uploads), most suspicious first. The artifact ``spectral-suspicious.json`` lists all;
``spectral-scores.json`` holds, per flagged class, every sample's ``poison_score`` (0 at the other component's
mean, 1 at the suspected one's) and whether it is ``suspicious``, in the class's order (for histograms).

When classes are over the threshold but none is confirmed (the cover samples of a source-specific backdoor, a class
that is naturally two clusters), the detector cannot decide: it reports the error ``undecidable`` with those classes
and their persistence, so the verdict is never ``clean`` on its word.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from scanner.detectors.base import Detector, DetectorProgress, ScanInputs
from scanner.errors import UndecidableError
from scanner.spectral import MIN_CLASS_SAMPLES, MIN_CLASSES, ClassSplit, detect_poisoned_samples
from scanner.verdict import DetectorResult, DetectorStatus

__all__ = ["SPECTRAL_SIGNATURES"]

_ARTIFACT_NAME = "spectral-suspicious.json"
_SCORES_NAME = "spectral-scores.json"


def _needs_training_data(inputs: ScanInputs) -> str | None:
    """Skip reason for the ``spectral_signatures`` detector, or ``None`` when it can run."""
    if inputs.training is None:
        return "no training data given (training_data)"
    counts = torch.bincount(inputs.training.labels)
    if int((counts >= MIN_CLASS_SAMPLES).sum()) < MIN_CLASSES:
        return f"the training data needs at least {MIN_CLASSES} classes with {MIN_CLASS_SAMPLES} or more samples"
    return None


def _run(inputs: ScanInputs, progress: DetectorProgress) -> DetectorResult:
    training = inputs.training
    if training is None:
        return DetectorResult.skipped("no training data given (training_data)")
    config = inputs.config.spectral

    result = detect_poisoned_samples(
        inputs.model,
        training.images,
        training.labels,
        config=config,
        device=inputs.device,
        seed=inputs.config.seed,
        progress=progress,
    )
    if result.unconfirmed_classes and not result.flagged_classes:
        raise UndecidableError(_undecided(result.unconfirmed_classes, result.persistence, config.min_persistence_gain))
    classes: list[dict[str, Any]] = []
    complete: dict[str, list[dict[str, Any]]] = {}
    scores: dict[str, dict[str, list[Any]]] = {}
    for split in result.classes:
        entry: dict[str, Any] = {
            "class": split.label,
            "samples": len(split.indices),
            "separation": round(split.separation, 4),
            "score": round(split.score, 4) if math.isfinite(split.score) else None,
            "flagged": split.flagged,
        }
        if split.unconfirmed:
            suspected, other = result.persistence[split.label]
            entry["unconfirmed"] = True
            entry["trigger_persistence"] = {"suspicious": round(suspected, 4), "rest": round(other, 4)}
        if split.flagged:
            listed = _suspicious_samples(split, training.paths)
            suspected, other = result.persistence.get(split.label, (math.nan, math.nan))
            entry["estimated_poisoned_fraction"] = round(split.poisoned_fraction, 4)
            entry["suspicious_count"] = len(listed)
            entry["trigger_persistence"] = {"suspicious": round(suspected, 4), "rest": round(other, 4)}
            entry["suspicious"] = listed[: config.max_listed]
            entry["suspicious_truncated"] = len(listed) > config.max_listed
            complete[str(split.label)] = listed
            scores[str(split.label)] = {
                "poison_score": [round(value, 4) for value in split.poison_score.tolist()],
                "suspicious": split.suspicious.tolist(),
            }
        classes.append(entry)
    artifact = json.dumps({"classes": complete}, indent=1).encode()
    return DetectorResult(
        status=DetectorStatus.OK,
        flagged_classes=result.flagged_classes,
        details={
            "threshold": result.threshold,
            "min_persistence_gain": config.min_persistence_gain,
            "estimated_poisoned_samples": sum(len(v) for v in complete.values()),
            "classes": classes,
            "artifacts": {"suspicious_json": _ARTIFACT_NAME, "scores_json": _SCORES_NAME},
        },
        duration_s=result.duration_s,
        artifacts={
            _ARTIFACT_NAME: artifact,
            _SCORES_NAME: json.dumps({"classes": scores}, separators=(",", ":")).encode(),
        },
    )


def _undecided(labels: tuple[int, ...], persistence: dict[int, tuple[float, float]], gain: float) -> str:
    parts = ", ".join(f"{k} ({persistence[k][0]:.2f} vs {persistence[k][1]:.2f})" for k in labels)
    return (
        f"class{'es' if len(labels) > 1 else ''} {parts} split into two sub-populations, but the suspected members "
        f"do not keep their class under blending clearly more often than the rest (a gain under {gain:g}): the split "
        "is not a trigger of that class (the cover samples of a source-specific backdoor, or a class that is "
        "naturally two clusters), so spectral signatures cannot decide"
    )


def _suspicious_samples(split: ClassSplit, paths: tuple[str, ...] | None) -> list[dict[str, Any]]:
    """The suspected component's members, most suspicious first, as JSON-ready dicts."""
    rows = torch.nonzero(split.suspicious).squeeze(1)
    rows = rows[split.poison_score[rows].argsort(descending=True)]
    listed = []
    for row in rows.tolist():
        index = int(split.indices[row])
        item: dict[str, Any] = {"index": index, "score": round(float(split.poison_score[row]), 4)}
        if paths is not None:
            item["path"] = paths[index]
        listed.append(item)
    return listed


#: Features, mixtures and the side test: seconds where Neural Cleanse takes minutes.
SPECTRAL_SIGNATURES = Detector("spectral_signatures", 0.05, _needs_training_data, _run)
