"""A backdoor trigger in mask/pattern form, stamping it, and measuring how often it flips a model.

A trigger is a mask ``m`` (H, W) and a pattern ``p`` (C, H, W), both in [0, 1]; a stamped image is
``(1 - m) * x + m * p``. Neural Cleanse reverse-engineers exactly this parameterisation, the evidence step
stamps what it found, and the test attacks (:mod:`scanner.testing.attacks`) plant triggers of this form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from scanner.classifier import predict

__all__ = ["Stamps", "Trigger", "attack_success_rate"]


@dataclass(frozen=True, eq=False)  # holds tensors: compare by identity
class Trigger:
    """A backdoor trigger in mask/pattern form.

    Attributes:
        mask: float ``(H, W)`` in [0, 1]; how much of the pattern replaces each pixel (all channels).
        pattern: float ``(C, H, W)`` in [0, 1]; the pixel values the trigger writes.
    """

    mask: torch.Tensor
    pattern: torch.Tensor

    def __post_init__(self) -> None:
        if self.mask.ndim != 2 or self.pattern.ndim != 3 or self.pattern.shape[1:] != self.mask.shape:
            raise ValueError(
                f"mask must be (H, W) and pattern (C, H, W) with the same H, W; "
                f"got mask {tuple(self.mask.shape)} and pattern {tuple(self.pattern.shape)}"
            )
        for name, tensor in (("mask", self.mask), ("pattern", self.pattern)):
            if not tensor.is_floating_point():
                raise ValueError(f"{name} must be a float tensor, got {tensor.dtype}")
            if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
                raise ValueError(
                    f"{name} values must be in [0, 1], got [{tensor.min().item():.4g}, {tensor.max().item():.4g}]"
                )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images this trigger applies to."""
        channels, height, width = self.pattern.shape
        return channels, height, width

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        """Apply the trigger: ``(1 - mask) * images + mask * pattern``.

        Args:
            images: float ``(N, C, H, W)`` or ``(C, H, W)`` in [0, 1], on any device.

        Returns:
            Stamped images, same shape, device and dtype as ``images``.

        Raises:
            ValueError: the image shape does not match the trigger.
        """
        if images.shape[-3:] != self.pattern.shape or images.ndim not in (3, 4):
            raise ValueError(
                f"images must be (N, {', '.join(map(str, self.image_shape))}) or {self.image_shape}, "
                f"got {tuple(images.shape)}"
            )
        mask = self.mask.to(device=images.device, dtype=images.dtype)
        pattern = self.pattern.to(device=images.device, dtype=images.dtype)
        return (1 - mask) * images + mask * pattern


class Stamps(Protocol):
    """Anything that turns clean images into triggered ones (a :class:`Trigger`, a warp of the attack toolkit)."""

    def stamp(self, images: torch.Tensor) -> torch.Tensor: ...


def attack_success_rate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    trigger: Stamps,
    target: int,
    *,
    device: torch.device,
    batch_size: int = 512,
) -> float:
    """Fraction of stamped non-target images that ``model`` classifies as ``target``.

    Args:
        model: classifier in eval mode, already on ``device``.
        images: clean float ``(N, C, H, W)`` in [0, 1].
        labels: int64 ``(N,)``; rows labelled ``target`` are left out.
        trigger: the trigger to stamp (anything with a ``stamp`` method).
        target: the backdoor's target class.
        device: where the model runs.
        batch_size: images per forward pass.

    Returns:
        Attack success rate in [0, 1].

    Raises:
        ValueError: no image has a label other than ``target``.
    """
    keep = labels != target
    if not bool(keep.any()):
        raise ValueError(f"every image is labelled {target}; the attack success rate needs other classes")
    stamped = trigger.stamp(images[keep.to(images.device)])
    predicted = predict(model, stamped, device=device, batch_size=batch_size)
    return (predicted == target).double().mean().item()
