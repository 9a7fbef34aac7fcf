"""The classifier as the detectors see it: batched prediction, normalisation inside the model, the output check.

Detectors work in [0, 1] pixel space; a model trained on normalised inputs is wrapped in
:class:`NormalizedClassifier` so that normalisation happens inside the model. Whatever the upload was (an
exported program, a state_dict in an allowlisted architecture), :func:`class_count` is the one place that
decides whether its output is a classifier's ``(N, K)`` logits, both when a model is loaded and when a sample
set is checked against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from scanner.config import check_normalization
from scanner.errors import DataModelMismatchError, InvalidOptionError, ScannerError

__all__ = ["NormalizedClassifier", "check_samples", "class_count", "predict", "with_normalization"]

_CHECK_BATCH = 8  # images forwarded to check that a sample set fits the model


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """Predicted class of each image, computed in batches without gradients.

    Args:
        model: classifier in eval mode, already on ``device``.
        images: inputs, shape ``(N, C, H, W)``; moved to ``device`` one batch at a time.
        device: where the model runs.
        batch_size: images per forward pass.

    Returns:
        int64 class indices, shape ``(N,)``, on ``device``.
    """
    outputs = [model(batch.to(device)).argmax(dim=1) for batch in torch.split(images, batch_size)]
    if not outputs:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.cat(outputs)


def class_count(model: nn.Module, images: torch.Tensor, *, num_classes: int | None, device: torch.device) -> int:
    """Forward ``images`` once and return K, the number of logits per image: the one check of a model's output.

    Args:
        model: classifier in eval mode on ``device`` (wrapped with :func:`with_normalization` when it needs it).
        images: a small batch ``(N, C, H, W)``, ``N >= 1``.
        num_classes: the class count the caller expects, if known.
        device: where the model runs.

    Returns:
        K.

    Raises:
        DataModelMismatchError: the model fails on these images, or its output is not ``(N, K)`` with ``K >= 2``.
        InvalidOptionError: ``K`` differs from ``num_classes`` (the option disagrees with the model).
    """
    shape = tuple(images.shape[1:])
    try:
        with torch.no_grad():
            logits: object = model(images.to(device))
    except ScannerError:
        raise
    # an uploaded program may raise anything: eager shape errors (RuntimeError), guards of torch.export programs
    # (AssertionError), torch's argument checks (ValueError), ...; each means the model cannot take these inputs
    except Exception as error:
        text = str(error).strip()
        first_line = text.splitlines()[0] if text else type(error).__name__
        raise DataModelMismatchError(
            f"the model cannot classify images of shape {shape} (C, H, W): {first_line}"
        ) from error
    count = len(images)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != count:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise DataModelMismatchError(
            f"for {count} image(s) of shape {shape} the model returned {got}; a classifier returns ({count}, K)"
        )
    classes = logits.shape[1]
    if classes < 2:
        raise DataModelMismatchError(f"the model outputs {classes} logit per sample; a classifier needs at least 2")
    if num_classes is not None and classes != num_classes:
        raise InvalidOptionError(f"num_classes is {num_classes} but the model outputs {classes} logits")
    return int(classes)


def check_samples(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, num_classes: int | None, device: torch.device
) -> int:
    """Check that a sample set fits the model: its first few images classify (:func:`class_count`) and every
    label is one of the model's classes. Returns K.

    Raises:
        DataModelMismatchError: the model fails on the images, its output is not ``(N, K)`` with ``K >= 2``, or a
            label is ``>= K``.
        InvalidOptionError: ``K`` differs from ``num_classes``.
    """
    classes = class_count(model, images[:_CHECK_BATCH], num_classes=num_classes, device=device)
    if len(labels):
        max_label = int(labels.max())
        if max_label >= classes:
            raise DataModelMismatchError(
                f"the samples have label {max_label} but the model has {classes} classes (labels must be < {classes})"
            )
    return classes


class NormalizedClassifier(nn.Module):
    """Wrap a classifier so that it takes [0, 1] pixels: ``forward(x) = model((x - mean) / std)``.

    ``mean`` and ``std`` are per-channel buffers of shape ``(1, C, 1, 1)`` (or ``(1, 1, 1, 1)``,
    broadcast to all channels); they move with ``.to(device)``. The wrapped classifier stays
    reachable as ``.model`` (for feature hooks).

    Args:
        model: classifier trained on normalised inputs.
        mean: per-channel mean, in [0, 1] pixel units.
        std: per-channel standard deviation.

    Raises:
        InvalidOptionError: ``mean`` and ``std`` fail :func:`scanner.config.check_normalization`.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        check_normalization(mean, std)
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K)`` for images ``(N, C, H, W)`` in [0, 1]."""
        output: torch.Tensor = self.model((images - self.mean) / self.std)
        return output


def with_normalization(model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None) -> nn.Module:
    """``model`` wrapped in :class:`NormalizedClassifier`, or ``model`` itself when no normalisation is given.

    Raises:
        InvalidOptionError: only one of ``mean`` and ``std`` is given, or they are invalid.
    """
    check_normalization(mean, std)
    if mean is None or std is None:
        return model
    return NormalizedClassifier(model, mean, std)
