"""The ``neural_cleanse`` detector: :func:`scanner.neural_cleanse.neural_cleanse` on the clean samples, as JSON.

Details: ``threshold`` (of the MAD anomaly index) and how it was chosen, ``z_test`` (the class with the smallest
mask, its z and the z threshold: ``null`` when only the MAD index decides), ``rounds``, ``stamped_images`` (the
work: images sent through the model forward and backward), ``samples_used``, ``screening`` (``null``, or the screen
of a many-class model: its steps, candidates and reference classes) and, per class, ``mask_l1``, ``anomaly_index``
(``null`` for a screened-out class, which is not tested), ``attack_success_rate``, ``steps``, ``screened_out``,
``flagged`` (and ``z_test`` on the smallest class); flagged classes add the mask and pattern as PNG and the trigger
evidence (stamped samples, Grad-CAM). Every class's mask and pattern are artifacts (PNG, npy). The detector votes
only when every tested class converged (otherwise ``not_converged``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from scanner.config import NeuralCleanseConfig
from scanner.detectors.base import Detector, DetectorProgress, ScanInputs, npy_bytes, rounded
from scanner.errors import NotConvergedError
from scanner.evidence import evidence_pngs, trigger_evidence
from scanner.neural_cleanse import ClassTrigger, NeuralCleanseResult, mask_png, neural_cleanse, png_base64
from scanner.verdict import DetectorResult, DetectorStatus

__all__ = ["NEURAL_CLEANSE"]

logger = logging.getLogger(__name__)


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
        evidence = trigger_evidence(model, images, labels, trigger.trigger, trigger.target)
        pngs = evidence_pngs(evidence)
    except Exception as exc:  # pictures for people never cost the scan its verdict
        logger.warning("trigger evidence failed for class %d", trigger.target, exc_info=True)
        return {"status": "error", "code": "evidence_failed", "detail": f"{type(exc).__name__}: {exc}"}, {}
    entry = evidence.to_dict()
    entry["sample_indices"] = [upload_row(row) for row in entry["sample_indices"]]
    return entry, pngs


def _run(inputs: ScanInputs, progress: DetectorProgress) -> DetectorResult:
    assert inputs.clean is not None
    started = time.perf_counter()
    images = inputs.clean.images.to(inputs.device)
    labels = inputs.clean.labels.to(inputs.device)

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
            "anomaly_index": rounded(index),
            "anomaly_index_l1": rounded(index_l1),
            "attack_success_rate": rounded(rate),
            "reached_threshold": trigger.reached_threshold,
            "steps": trigger.steps,
            "screened_out": trigger.screened_out,
            "flagged": flagged,
        }
        if trigger.target == result.smallest_class and result.z_threshold is not None:
            entry["z_test"] = {"z": rounded(result.smallest_z), "threshold": round(result.z_threshold, 4)}
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
        artifacts[f"{stem}-mask.npy"] = npy_bytes(trigger.mask)
        artifacts[f"{stem}-pattern.npy"] = npy_bytes(trigger.pattern)
        classes.append(entry)
    config = inputs.config.neural_cleanse
    references = result.reference_classes
    rule = "fixed"
    if config.anomaly_threshold is None:
        rule = f"calibrated: {config.false_positive_rate:g} false-positive rate for {inputs.num_classes} classes"
        if references is not None:
            rule += f", judged against {len(references)} reference classes"
    return DetectorResult(
        status=DetectorStatus.OK,
        flagged_classes=tuple(result.flagged_classes),
        details={
            "threshold": round(result.threshold, 4),
            "threshold_rule": rule,
            "z_test": {
                "class": result.smallest_class,
                "z": rounded(result.smallest_z),
                "threshold": None if result.z_threshold is None else round(result.z_threshold, 4),
            },
            "anomaly_scale": config.anomaly_scale,
            "rounds": result.rounds,
            "stamped_images": result.images_total,
            "samples_used": int(min(len(images), config.max_samples)),
            "screening": None
            if references is None
            else {
                "steps": config.screen_steps,
                "candidates": config.screen_candidates,
                "reference_classes": references,
                "tested_classes": sum(not t.screened_out for t in result.triggers),
            },
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


#: Most of a scan's time: trigger search for every class, plus evidence for the flagged ones.
NEURAL_CLEANSE = Detector("neural_cleanse", 0.85, _needs_clean, _run)
