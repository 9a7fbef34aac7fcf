"""The ``max_margin`` detector: :func:`scanner.max_margin.max_margin`, the data-free test, as JSON.

It needs no samples, only the input shape and at least :data:`scanner.max_margin.MIN_CLASSES` classes, so it runs on
every scan by default, with or without data.

Details: ``significance``, ``largest_class`` and its ``p_value``, the fitted ``null`` (Gamma ``shape`` and ``scale``),
``starts`` and ``steps`` of the optimisation, ``optimised_images`` (the work: images sent through the model forward
and backward) and, per class, ``max_margin`` (logit units), ``p_value`` (``1 - F(max_margin) ** K`` under the null)
and ``flagged``; a flagged class adds the optimised ``input`` that reached its margin as a PNG. The inputs of the 16
classes with the largest margins are artifacts (``mm-class-K-input.png``; flagged classes also ``.npy``). A run whose
logits become non-finite, or whose classes leave no null to fit, reports the error ``undecidable`` (the verdict is
then ``inconclusive``).
"""

from __future__ import annotations

from typing import Any

from scanner.detectors.base import Detector, DetectorProgress, ScanInputs, npy_bytes, rounded
from scanner.max_margin import MIN_CLASSES, max_margin
from scanner.neural_cleanse import mask_png, png_base64
from scanner.verdict import DetectorResult, DetectorStatus

__all__ = ["MAX_MARGIN"]


def _needs_shape(inputs: ScanInputs) -> str | None:
    if inputs.input_shape is None:
        return "the model's input shape is unknown (give input_shape)"
    if inputs.num_classes < MIN_CLASSES:
        return f"the data-free test needs at least {MIN_CLASSES} classes, the model has {inputs.num_classes}"
    return None


def significant(value: float) -> float | None:
    """A p-value for JSON: three significant digits (rounding to decimals would turn 4e-8 into 0)."""
    finite = rounded(value)
    return None if finite is None else float(f"{value:.3g}")


def _run(inputs: ScanInputs, progress: DetectorProgress) -> DetectorResult:
    assert inputs.input_shape is not None
    config = inputs.config.max_margin
    result = max_margin(
        inputs.model,
        inputs.num_classes,
        inputs.input_shape,
        config,
        device=inputs.device,
        seed=inputs.config.seed,
        progress=progress,
    )
    classes: list[dict[str, Any]] = []
    artifacts: dict[str, bytes] = {}
    for label, (statistic, p_value) in enumerate(zip(result.statistics, result.p_values, strict=True)):
        stem = f"mm-class-{label}"
        flagged = label in result.flagged_classes
        entry: dict[str, Any] = {
            "class": label,
            "max_margin": rounded(statistic),
            "p_value": significant(p_value),
            "flagged": flagged,
        }
        names = {}
        image = result.inputs.get(label)
        if image is not None:
            names["input_png"] = f"{stem}-input.png"
            artifacts[f"{stem}-input.png"] = mask_png(image)
        if flagged and image is not None:
            entry["input"] = {"shape": list(image.shape), "png_base64": png_base64(image)}
            names["input_npy"] = f"{stem}-input.npy"
            artifacts[f"{stem}-input.npy"] = npy_bytes(image)
        entry["artifacts"] = names
        classes.append(entry)
    return DetectorResult(
        status=DetectorStatus.OK,
        flagged_classes=result.flagged_classes,
        details={
            "significance": config.significance,
            "largest_class": result.largest_class,
            "p_value": significant(result.p_values[result.largest_class]),
            "null": {"distribution": "gamma", "shape": rounded(result.null.shape), "scale": rounded(result.null.scale)},
            "starts": config.starts,
            "steps": config.steps,
            "optimised_images": result.images_total,
            "classes": classes,
        },
        duration_s=result.duration_s,
        artifacts=artifacts,
    )


#: A few seconds on MNIST-size models: random starts per class, optimised together.
MAX_MARGIN = Detector("max_margin", 0.1, _needs_shape, _run)
