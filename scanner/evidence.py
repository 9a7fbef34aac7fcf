"""Evidence for people: what a reversed trigger does to clean images, and where the model looks before and after.

For a class that Neural Cleanse flagged, a few clean samples of other classes are stamped with the class's reversed
trigger (``(1 - m) * x + m * p``, in [0, 1] pixel space). The evidence records the predictions before and after, and
the Grad-CAM heatmaps (:mod:`scanner.gradcam`) of both, with the share of the heat that lies inside the trigger
(:func:`scanner.gradcam.heat_fraction_inside`): a backdoor's trigger moves the prediction to its class and pulls
the heat onto itself. It also renders both as PNG strips.

:func:`try_image` is the same comparison for one image of the user's choice: its prediction and confidence as it is
and with each given trigger stamped on, with the Grad-CAM of each (the web page's "try an image").

Grad-CAM explains a prediction, it does not detect a backdoor: on small models any high-contrast patch draws heat
(a white 3x3 patch on a clean MNIST model drew as large a share as the real trigger on a backdoored one); the flipped
predictions are what a clean model does not show.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from scanner.classifier import predict
from scanner.errors import GradCamUnavailableError
from scanner.gradcam import GradCam, grad_cam, heat_fraction_inside
from scanner.trigger import Trigger

__all__ = ["Tried", "TriedImage", "TriggerEvidence", "evidence_pngs", "trigger_evidence", "try_image"]

logger = logging.getLogger(__name__)

DEFAULT_SAMPLES = 8
#: Side of one tile in the PNG strips, in pixels (images are scaled to fit; small ones by whole factors).
_TILE = 112
_GAP = 4
_CAPTION = 14
_OVERLAY_ALPHA = 0.5
#: A "jet" colour map: heat 0 is dark blue, 1 dark red.
_JET_STOPS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_JET_RGB = np.array([[0, 0, 0.5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0.5, 0, 0]])


@dataclass(frozen=True, eq=False)  # holds tensors: compare by identity
class TriggerEvidence:
    """A trigger stamped on a few clean samples of other classes.

    Attributes:
        target: the class the trigger was reversed for.
        indices: int64 ``(n,)``, CPU: the samples' rows in the clean data.
        labels: int64 ``(n,)``, CPU: their labels.
        clean: float ``(n, C, H, W)`` in [0, 1], CPU: the samples.
        stamped: the same, with the trigger.
        clean_predictions, stamped_predictions: int64 ``(n,)``, CPU.
        region_fraction: share of the image inside the trigger's region (what evenly spread heat would give).
        clean_cam, stamped_cam: Grad-CAM of the predictions (heatmaps on the CPU); ``None`` when it could not run.
        heat_clean, heat_stamped: float ``(n,)``, CPU: each heatmap's share of heat inside the trigger's region.
        gradcam_problem: why Grad-CAM did not run: ``("skipped", reason)`` or ``("error", detail)``.
    """

    target: int
    indices: Tensor
    labels: Tensor
    clean: Tensor
    stamped: Tensor
    clean_predictions: Tensor
    stamped_predictions: Tensor
    region_fraction: float
    clean_cam: GradCam | None = None
    stamped_cam: GradCam | None = None
    heat_clean: Tensor | None = None
    heat_stamped: Tensor | None = None
    gradcam_problem: tuple[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON of the evidence (see the README, "The HTML report")."""
        gradcam: dict[str, Any]
        if self.clean_cam is not None and self.heat_clean is not None and self.heat_stamped is not None:
            gradcam = {
                "status": "ok",
                "layer": self.clean_cam.layer,
                "heat_in_trigger_clean": round(float(self.heat_clean.mean()), 4),
                "heat_in_trigger_stamped": round(float(self.heat_stamped.mean()), 4),
                "trigger_area_fraction": round(self.region_fraction, 4),
            }
        else:
            status, text = self.gradcam_problem or ("skipped", "not computed")
            gradcam = {"status": status, "reason" if status == "skipped" else "detail": text}
        return {
            "status": "ok",
            "samples": len(self.indices),
            "sample_indices": self.indices.tolist(),
            "labels": self.labels.tolist(),
            "clean_predictions": self.clean_predictions.tolist(),
            "stamped_predictions": self.stamped_predictions.tolist(),
            "stamped_to_target": round(float((self.stamped_predictions == self.target).double().mean()), 4),
            "gradcam": gradcam,
        }


def trigger_evidence(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    trigger: Trigger,
    target: int,
    *,
    samples: int = DEFAULT_SAMPLES,
) -> TriggerEvidence:
    """Stamp ``trigger`` on the first ``samples`` clean images not labelled ``target``; predict and Grad-CAM both.

    Grad-CAM explains each image's predicted class. When it cannot run (no convolution, e.g. TorchScript) or fails,
    the evidence says why and still carries the predictions.

    Args:
        model: classifier in eval mode on the device of ``images``, taking ``(N, C, H, W)`` in [0, 1].
        images: clean samples ``(N, C, H, W)`` in [0, 1].
        labels: int64 ``(N,)``.
        trigger: the (reversed) trigger; mask ``(H, W)`` and pattern ``(C, H, W)`` in [0, 1].
        target: the class the trigger belongs to.
        samples: how many images to stamp.

    Returns:
        The evidence, all tensors on the CPU.

    Raises:
        ValueError: no image has a label other than ``target``, or the trigger does not fit the images.
    """
    rows = torch.nonzero(labels.cpu() != target).squeeze(1)[:samples]
    if len(rows) == 0:
        raise ValueError(f"every clean sample is labelled {target}: there is nothing to stamp")
    clean = images[rows.to(images.device)]
    stamped = trigger.stamp(clean)
    device = images.device
    clean_predictions = predict(model, clean, device=device).cpu()
    stamped_predictions = predict(model, stamped, device=device).cpu()
    region = trigger.mask >= trigger.mask.max() / 2
    evidence = TriggerEvidence(
        target=target,
        indices=rows,
        labels=labels.cpu()[rows],
        clean=clean.detach().cpu(),
        stamped=stamped.detach().cpu(),
        clean_predictions=clean_predictions,
        stamped_predictions=stamped_predictions,
        region_fraction=float(region.double().mean()),
    )
    try:
        clean_cam = _on_cpu(grad_cam(model, clean))
        stamped_cam = _on_cpu(grad_cam(model, stamped))
    except GradCamUnavailableError as exc:
        return replace(evidence, gradcam_problem=("skipped", exc.detail))
    except Exception as exc:  # Grad-CAM is a picture for people: it never costs the scan its verdict
        logger.warning("Grad-CAM failed for class %d", target, exc_info=True)
        return replace(evidence, gradcam_problem=("error", f"{type(exc).__name__}: {exc}"))
    return replace(
        evidence,
        clean_cam=clean_cam,
        stamped_cam=stamped_cam,
        heat_clean=heat_fraction_inside(clean_cam.heatmaps, trigger.mask),
        heat_stamped=heat_fraction_inside(stamped_cam.heatmaps, trigger.mask),
    )


def _on_cpu(cam: GradCam) -> GradCam:
    return GradCam(
        heatmaps=cam.heatmaps.detach().cpu(),
        classes=cam.classes.cpu(),
        predictions=cam.predictions.cpu(),
        layer=cam.layer,
    )


def evidence_pngs(evidence: TriggerEvidence) -> dict[str, bytes]:
    """PNG strips of the evidence, one column per sample.

    Returns:
        ``"stamped"``: the clean samples (captioned ``label -> prediction``) over the stamped ones (captioned with
        their prediction); ``"gradcam"`` (only when Grad-CAM ran): the same two rows with the heatmaps overlaid.
    """
    clean_captions = [
        f"{label}: pred {prediction}"
        for label, prediction in zip(evidence.labels.tolist(), evidence.clean_predictions.tolist(), strict=True)
    ]
    stamped_captions = [f"stamped: pred {prediction}" for prediction in evidence.stamped_predictions.tolist()]
    captions = [clean_captions, stamped_captions]
    pngs = {"stamped": _grid_png([_rgb(evidence.clean), _rgb(evidence.stamped)], captions)}
    if evidence.clean_cam is not None and evidence.stamped_cam is not None:
        overlays = [
            _heat_overlay(evidence.clean, evidence.clean_cam.heatmaps),
            _heat_overlay(evidence.stamped, evidence.stamped_cam.heatmaps),
        ]
        pngs["gradcam"] = _grid_png(overlays, captions)
    return pngs


def _heat_overlay(images: Tensor, heatmaps: Tensor) -> npt.NDArray[np.float64]:
    """Heatmaps in a jet colour map over the images (grey when they have one channel).

    Args:
        images: ``(N, C, H, W)`` in [0, 1], C in (1, 3) (other counts show their first channel).
        heatmaps: ``(N, H, W)`` in [0, 1].

    Returns:
        ``(N, H, W, 3)`` float64 RGB in [0, 1].
    """
    heat = heatmaps.detach().cpu().double().clamp(0, 1).numpy()
    colours = np.stack([np.interp(heat, _JET_STOPS, _JET_RGB[:, c]) for c in range(3)], axis=-1)
    return (1 - _OVERLAY_ALPHA) * _rgb(images) + _OVERLAY_ALPHA * colours


def _rgb(images: Tensor) -> npt.NDArray[np.float64]:
    """``(N, C, H, W)`` in [0, 1] -> ``(N, H, W, 3)``: RGB as is, anything else from its first channel."""
    array = images.detach().cpu().double().clamp(0, 1).numpy()
    if array.shape[1] == 3:
        return np.transpose(array, (0, 2, 3, 1))
    return np.repeat(array[:, 0, :, :, None], 3, axis=-1)


def _grid_png(rows: Sequence[npt.NDArray[np.float64]], captions: Sequence[Sequence[str]]) -> bytes:
    """Rows of ``(n, H, W, 3)`` images in [0, 1] as one PNG, each tile with a caption underneath."""
    count, height, width = rows[0].shape[:3]
    scale = _TILE / max(height, width)
    if scale >= 1:
        scale = float(int(scale))
    tile_w, tile_h = max(1, round(width * scale)), max(1, round(height * scale))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR
    canvas = Image.new(
        "RGB",
        (count * (tile_w + _GAP) + _GAP, len(rows) * (tile_h + _CAPTION + _GAP) + _GAP),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, (row, row_captions) in enumerate(zip(rows, captions, strict=True)):
        top = _GAP + r * (tile_h + _CAPTION + _GAP)
        for c, (image, caption) in enumerate(zip(row, row_captions, strict=True)):
            left = _GAP + c * (tile_w + _GAP)
            pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
            canvas.paste(Image.fromarray(pixels).resize((tile_w, tile_h), resample), (left, top))
            draw.text((left + 1, top + tile_h + 1), caption, fill=(0, 0, 0), font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class TriedImage:
    """One image through the model.

    Attributes:
        prediction: the predicted class.
        confidence: the softmax probability of that class (0 when the model's output is not a number).
        image_png: the image as a PNG, enlarged by a whole factor (nearest neighbour) when it is small.
        gradcam_png: the Grad-CAM heatmap of the prediction over the image (same size), or ``None`` when Grad-CAM
            did not run.
    """

    prediction: int
    confidence: float
    image_png: bytes
    gradcam_png: bytes | None


@dataclass(frozen=True)
class Tried:
    """An image as it is and with each trigger stamped on (see :func:`try_image`).

    Attributes:
        clean: the image as it is.
        stamped: by trigger class, in the order the triggers were given.
        gradcam_layer: the convolutional layer the heatmaps come from, or ``None`` when Grad-CAM did not run.
        gradcam_problem: why it did not run: ``("skipped", reason)`` or ``("error", detail)``.
    """

    clean: TriedImage
    stamped: dict[int, TriedImage]
    gradcam_layer: str | None = None
    gradcam_problem: tuple[str, str] | None = None


def try_image(model: nn.Module, image: Tensor, triggers: Mapping[int, Trigger]) -> Tried:
    """The model's prediction and Grad-CAM on ``image`` as it is and with each trigger stamped on.

    Grad-CAM explains each version's predicted class; when it cannot run (no convolution) or fails, the predictions
    still come back and ``gradcam_problem`` says why.

    Args:
        model: classifier in eval mode on the device of ``image``, taking ``(N, C, H, W)`` in [0, 1].
        image: one image ``(C, H, W)`` in [0, 1].
        triggers: the triggers to stamp, by the class they were reversed for; each fits ``image``.

    Returns:
        The clean and stamped versions' predictions, confidences and PNGs.

    Raises:
        ValueError: ``image`` is not ``(C, H, W)``, or a trigger does not fit it.
    """
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    batch = torch.stack([image, *(trigger.stamp(image) for trigger in triggers.values())])
    with torch.no_grad():
        probabilities = torch.nan_to_num(F.softmax(model(batch).float(), dim=1), nan=0.0)
    confidences, predictions = probabilities.max(dim=1)
    layer, heatmaps, problem = None, None, None
    try:
        cam = grad_cam(model, batch)
        layer, heatmaps = cam.layer, cam.heatmaps
    except GradCamUnavailableError as exc:
        problem = ("skipped", exc.detail)
    except Exception as exc:  # a picture for people: the predictions still count
        logger.warning("Grad-CAM failed on a tried image", exc_info=True)
        problem = ("error", f"{type(exc).__name__}: {exc}")
    images = _rgb(batch)
    overlays = _heat_overlay(batch, heatmaps) if heatmaps is not None else None
    tried = [
        TriedImage(
            prediction=int(predictions[row]),
            confidence=float(confidences[row]),
            image_png=_png(images[row]),
            gradcam_png=None if overlays is None else _png(overlays[row]),
        )
        for row in range(len(batch))
    ]
    return Tried(
        clean=tried[0],
        stamped=dict(zip(triggers, tried[1:], strict=True)),
        gradcam_layer=layer,
        gradcam_problem=problem,
    )


def _png(image: npt.NDArray[np.float64]) -> bytes:
    """An ``(H, W, 3)`` image in [0, 1] as a PNG, enlarged by a whole factor to about one tile when it is smaller."""
    height, width = image.shape[:2]
    scale = max(1, _TILE // max(height, width))
    pixels = (np.clip(np.nan_to_num(image), 0, 1) * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels)
    if scale > 1:
        picture = picture.resize((width * scale, height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
