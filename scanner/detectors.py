"""The backdoor detectors a scan runs, behind one small interface.

A detector says whether it can run on the inputs (``needs`` returns a skip reason or ``None``) and turns
them into a :class:`DetectorResult`. The pipeline contains crashes; detectors only raise for bad input.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from scanner.attacks import Trigger
from scanner.config import NeuralCleanseConfig, ScanConfig
from scanner.data import Samples
from scanner.errors import NotConvergedError
from scanner.evidence import evidence_pngs, trigger_evidence
from scanner.neural_cleanse import ClassTrigger, NeuralCleanseResult, mask_png, neural_cleanse, png_base64
from scanner.spectral import needs_training_data, spectral_detector
from scanner.verdict import DetectorResult, DetectorStatus

__all__ = ["DETECTORS", "Detector", "Progress", "ScanInputs"]

logger = logging.getLogger(__name__)

#: ``progress(fraction, stage, message)``; fraction in [0, 1]. May raise ScanCancelled to stop the scan.
Progress = Callable[[float, str, str], None]


@dataclass(frozen=True)
class ScanInputs:
    """What the detectors get: the model in [0, 1] pixel space on ``device`` and the decoded data."""

    model: nn.Module
    num_classes: int
    input_shape: tuple[int, int, int] | None
    clean: Samples | None
    training: Samples | None
    config: ScanConfig
    device: torch.device
    progress: Progress


@dataclass(frozen=True)
class Detector:
    name: str
    needs: Callable[[ScanInputs], str | None]
    run: Callable[[ScanInputs], DetectorResult]


def _npy(array: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.detach().cpu().numpy(), allow_pickle=False)
    return buffer.getvalue()


def _rounded(value: float) -> float | None:
    """JSON has no inf/nan: such values become null."""
    return round(value, 4) if np.isfinite(value) else None


def _needs_clean(inputs: ScanInputs) -> str | None:
    return None if inputs.clean is not None else "no clean samples given (data)"


def _evidence(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    trigger: ClassTrigger,
    upload_row: Callable[[int], int],
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The ``evidence`` entry of a flagged class and its PNG strips by kind (``stamped``, ``gradcam``); a failure is
    reported in the entry, never raised. ``upload_row`` turns a sample's index into its row in the uploaded file."""
    try:
        evidence = trigger_evidence(model, images, labels, Trigger(trigger.mask, trigger.pattern), trigger.target)
        pngs = evidence_pngs(evidence)
    except Exception as exc:  # pictures for people never cost the scan its verdict
        logger.warning("trigger evidence failed for class %d", trigger.target, exc_info=True)
        return {"status": "error", "code": "evidence_failed", "detail": f"{type(exc).__name__}: {exc}"}, {}
    entry = evidence.to_dict()
    entry["sample_indices"] = [upload_row(row) for row in entry["sample_indices"]]
    return entry, pngs


def _run_neural_cleanse(inputs: ScanInputs) -> DetectorResult:
    assert inputs.clean is not None
    started = time.perf_counter()
    images = inputs.clean.images.to(inputs.device)
    labels = inputs.clean.labels.to(inputs.device)

    def progress(fraction: float, message: str) -> None:
        inputs.progress(0.1 + 0.85 * fraction, "neural_cleanse", message)

    result = neural_cleanse(
        inputs.model,
        images,
        labels,
        inputs.num_classes,
        inputs.config.neural_cleanse,
        seed=inputs.config.seed,
        progress=progress,
    )
    _require_convergence(result, inputs.config.neural_cleanse)
    classes = []
    artifacts: dict[str, bytes] = {}
    for trigger, index, index_l1, flagged, rate in zip(
        result.triggers,
        result.anomaly_indices,
        result.anomaly_indices_l1,
        result.flagged,
        result.attack_success_rates,
        strict=True,
    ):
        stem = f"nc-class-{trigger.target}"
        entry: dict[str, object] = {
            "class": trigger.target,
            "mask_l1": round(trigger.mask_l1, 4),
            "anomaly_index": _rounded(index),
            "anomaly_index_l1": _rounded(index_l1),
            "attack_success_rate": _rounded(rate),
            "reached_threshold": trigger.reached_threshold,
            "steps": trigger.steps,
            "flagged": flagged,
        }
        names = {
            "mask_png": f"{stem}-mask.png",
            "pattern_png": f"{stem}-pattern.png",
            "mask_npy": f"{stem}-mask.npy",
            "pattern_npy": f"{stem}-pattern.npy",
        }
        if flagged:
            entry["mask"] = {"shape": list(trigger.mask.shape), "png_base64": png_base64(trigger.mask)}
            entry["pattern"] = {"shape": list(trigger.pattern.shape), "png_base64": png_base64(trigger.pattern)}
            entry["evidence"], pngs = _evidence(inputs.model, images, labels, trigger, inputs.clean.upload_row)
            for kind, png in pngs.items():
                names[f"{kind}_png"] = f"{stem}-{kind}.png"
                artifacts[f"{stem}-{kind}.png"] = png
        entry["artifacts"] = names
        artifacts[f"{stem}-mask.png"] = mask_png(trigger.mask)
        artifacts[f"{stem}-pattern.png"] = mask_png(trigger.pattern)
        artifacts[f"{stem}-mask.npy"] = _npy(trigger.mask)
        artifacts[f"{stem}-pattern.npy"] = _npy(trigger.pattern)
        classes.append(entry)
    return DetectorResult(
        status=DetectorStatus.OK,
        flagged_classes=tuple(result.flagged_classes),
        details={
            "threshold": round(result.threshold, 4),
            "threshold_rule": (
                "fixed"
                if inputs.config.neural_cleanse.anomaly_threshold is not None
                else f"calibrated: {inputs.config.neural_cleanse.false_positive_rate:g} false-positive rate "
                f"for {inputs.num_classes} classes"
            ),
            "anomaly_scale": inputs.config.neural_cleanse.anomaly_scale,
            "rounds": result.rounds,
            "samples_used": int(min(len(images), inputs.config.neural_cleanse.max_samples)),
            "classes": classes,
        },
        duration_s=time.perf_counter() - started,
        artifacts=artifacts,
    )


def _require_convergence(result: NeuralCleanseResult, config: NeuralCleanseConfig) -> None:
    """A Neural Cleanse run votes only when every class converged: a class stopped at the step limit reports an
    upper bound of its trigger size, which can hide a target (a backdoor reported clean) or make an ordinary class
    look small (a clean model reported backdoored).

    Raises:
        NotConvergedError: naming the classes, why each did not converge, and what to change.
    """
    unconverged = set(result.unconverged_classes)
    if not unconverged:
        return
    never = [t.target for t in result.triggers if t.target in unconverged and not t.reached_threshold]
    cut = [t.target for t in result.triggers if t.target in unconverged and t.reached_threshold]
    reasons = []
    if never:
        reasons.append(
            f"{_class_list(never)} never met the {config.attack_success_threshold:.0%} attack-success threshold"
        )
    if cut:
        reasons.append(f"{_class_list(cut)} stopped at the step limit before their mask stopped shrinking")
    raise NotConvergedError(
        f"Neural Cleanse did not converge for {len(unconverged)} of {len(result.triggers)} classes within "
        f"max_steps={config.max_steps} ({'; '.join(reasons)}), so its outlier test cannot decide either way; "
        "run it with more steps (nc_max_steps, default 1000)"
    )


def _class_list(classes: list[int]) -> str:
    shown = ", ".join(map(str, classes[:10]))
    more = f" and {len(classes) - 10} more" if len(classes) > 10 else ""
    return f"class{'es' if len(classes) > 1 else ''} {shown}{more}"


DETECTORS: tuple[Detector, ...] = (
    Detector("neural_cleanse", _needs_clean, _run_neural_cleanse),
    Detector("spectral_signatures", needs_training_data, spectral_detector),
)
