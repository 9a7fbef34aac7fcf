"""Backdoor attacks used to make known-bad models for tests and benchmarks.

BadNets (Gu, Dolan-Gavitt, Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning
Model Supply Chain", 2017): stamp a small patch on a fraction of the training images and relabel
them to one target class (all-to-one). The blended variant follows Chen et al., "Targeted Backdoor
Attacks on Deep Learning Systems Using Data Poisoning", 2017 (a full-image pattern mixed in with a
small weight).

A trigger is a mask ``m`` (H, W) and a pattern ``p`` (C, H, W), both in [0, 1]; a stamped image is
``(1 - m) * x + m * p``: the same parameterisation that Neural Cleanse reverse-engineers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scanner.trigger import Trigger

__all__ = [
    "BadNetsRecipe",
    "PoisonedDataset",
    "blend_trigger",
    "patch_trigger",
    "poison_dataset",
]

_CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


def _shape(image_shape: tuple[int, ...] | torch.Size) -> tuple[int, int, int]:
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {tuple(image_shape)}")
    channels, height, width = image_shape
    return channels, height, width


def patch_trigger(
    image_shape: tuple[int, ...] | torch.Size,
    *,
    size: int = 3,
    position: str | tuple[int, int] = "bottom_right",
    pattern: str | torch.Tensor = "white",
) -> Trigger:
    """A square BadNets patch: the mask is 1 on a ``size`` x ``size`` square and 0 elsewhere.

    Args:
        image_shape: ``(C, H, W)`` of the images.
        size: side of the square, in pixels.
        position: ``(row, col)`` of the square's top-left pixel, or a corner name
            (``top_left``, ``top_right``, ``bottom_left``, ``bottom_right``; flush with the border).
        pattern: ``"white"`` (all ones), ``"checkerboard"`` (ones and zeros, one at the top-left
            pixel), or a float tensor in [0, 1] of shape ``(size, size)`` or ``(C, size, size)``.

    Returns:
        The trigger; its tensors are float32 on the CPU.

    Raises:
        ValueError: the square does not fit in the image, or an argument is malformed.
    """
    channels, height, width = _shape(image_shape)
    if not 1 <= size <= min(height, width):
        raise ValueError(f"size must be in [1, {min(height, width)}], got {size}")
    if isinstance(position, str):
        if position not in _CORNERS:
            raise ValueError(f"position must be (row, col) or one of {', '.join(_CORNERS)}, got {position!r}")
        row = 0 if position.startswith("top") else height - size
        col = 0 if position.endswith("left") else width - size
    else:
        row, col = position
    if not (0 <= row <= height - size and 0 <= col <= width - size):
        raise ValueError(f"a {size}x{size} patch at (row, col) = ({row}, {col}) does not fit in {height}x{width}")

    if isinstance(pattern, torch.Tensor):
        if pattern.shape not in ((size, size), (channels, size, size)):
            raise ValueError(
                f"pattern must be ({size}, {size}) or ({channels}, {size}, {size}), got {tuple(pattern.shape)}"
            )
        patch = pattern.to(dtype=torch.float32, device="cpu").expand(channels, size, size)
    elif pattern == "white":
        patch = torch.ones(channels, size, size)
    elif pattern == "checkerboard":
        grid = torch.arange(size)
        patch = ((grid[:, None] + grid[None, :]) % 2 == 0).float().expand(channels, size, size)
    else:
        raise ValueError(f"pattern must be 'white', 'checkerboard' or a tensor, got {pattern!r}")

    mask = torch.zeros(height, width)
    mask[row : row + size, col : col + size] = 1.0
    full_pattern = torch.zeros(channels, height, width)
    full_pattern[:, row : row + size, col : col + size] = patch
    return Trigger(mask=mask, pattern=full_pattern)


def blend_trigger(
    image_shape: tuple[int, ...] | torch.Size,
    *,
    alpha: float = 0.1,
    pattern: str | torch.Tensor = "noise",
    seed: int = 0,
) -> Trigger:
    """A blended trigger: the whole pattern mixed into the image with weight ``alpha`` (mask = alpha everywhere).

    Args:
        image_shape: ``(C, H, W)`` of the images.
        alpha: blend weight in (0, 1].
        pattern: ``"noise"`` (uniform noise from a CPU generator seeded with ``seed``) or a float
            tensor in [0, 1] of shape ``(C, H, W)``.
        seed: seed for the noise pattern.

    Returns:
        The trigger; its tensors are float32 on the CPU.

    Raises:
        ValueError: ``alpha`` is out of range or ``pattern`` is malformed.
    """
    channels, height, width = _shape(image_shape)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if isinstance(pattern, torch.Tensor):
        if pattern.shape != (channels, height, width):
            raise ValueError(f"pattern must be {(channels, height, width)}, got {tuple(pattern.shape)}")
        full_pattern = pattern.to(dtype=torch.float32, device="cpu")
    elif pattern == "noise":
        full_pattern = torch.rand(channels, height, width, generator=torch.Generator().manual_seed(seed))
    else:
        raise ValueError(f"pattern must be 'noise' or a tensor, got {pattern!r}")
    return Trigger(mask=torch.full((height, width), float(alpha)), pattern=full_pattern)


@dataclass(frozen=True, eq=False)  # holds tensors: compare by identity
class PoisonedDataset:
    """A training set after all-to-one poisoning.

    Attributes:
        images: ``(N, C, H, W)``, the poisoned rows stamped with the trigger.
        labels: int64 ``(N,)``, the poisoned rows relabelled to the target.
        poisoned_indices: int64 ``(P,)`` on the CPU, sorted: the rows that were poisoned.
    """

    images: torch.Tensor
    labels: torch.Tensor
    poisoned_indices: torch.Tensor


def poison_dataset(
    images: torch.Tensor, labels: torch.Tensor, trigger: Trigger, *, target: int, rate: float, seed: int
) -> PoisonedDataset:
    """All-to-one poisoning: stamp ``round(rate * N)`` images whose label is not ``target`` and relabel them.

    The rows are drawn with a seeded CPU generator, so the result depends only on the inputs and
    ``seed``. The inputs are not modified.

    Args:
        images: float ``(N, C, H, W)`` in [0, 1].
        labels: int64 ``(N,)``.
        trigger: the trigger to stamp; its image shape must match.
        target: the class the backdoor maps to, in ``[0, labels.max()]``.
        rate: fraction of the whole set to poison, in (0, 1).
        seed: seed of the row selection.

    Returns:
        The poisoned copy and the poisoned row indices.

    Raises:
        ValueError: shapes do not match, ``rate``/``target`` are out of range, or there are not
            enough non-target rows.
    """
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)}, {tuple(labels.shape)}"
        )
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate must be in (0, 1), got {rate}")
    if len(labels) == 0 or not 0 <= target <= int(labels.max()):
        raise ValueError(
            f"target must be a class index in [0, {int(labels.max()) if len(labels) else -1}], got {target}"
        )
    count = round(rate * len(labels))
    candidates = torch.nonzero(labels.cpu() != target).squeeze(1)
    if not 1 <= count <= len(candidates):
        raise ValueError(
            f"rate {rate} of {len(labels)} samples asks for {count} poisoned rows; "
            f"between 1 and {len(candidates)} (the non-target rows) are possible"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]].sort().values
    rows = chosen.to(images.device)
    poisoned_images = images.clone()
    poisoned_images[rows] = trigger.stamp(images[rows])
    poisoned_labels = labels.clone()
    poisoned_labels[rows] = target
    return PoisonedDataset(images=poisoned_images, labels=poisoned_labels, poisoned_indices=chosen)


@dataclass(frozen=True)
class BadNetsRecipe:
    """The BadNets attack that tests and benchmarks share: a white square patch, all-to-one.

    Defaults: a 3x3 white patch flush with the bottom-right corner, target class 0, 10% of the
    training set poisoned.
    """

    patch_size: int = 3
    position: str = "bottom_right"
    target: int = 0
    rate: float = 0.1
    seed: int = 0

    def poison(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[Trigger, PoisonedDataset]:
        """Build the trigger for ``images`` and poison a copy of the set.

        Args:
            images: float ``(N, C, H, W)`` in [0, 1].
            labels: int64 ``(N,)``.

        Returns:
            ``(trigger, poisoned)``: train on ``poisoned.images`` / ``poisoned.labels``.
        """
        trigger = patch_trigger(images.shape[1:], size=self.patch_size, position=self.position)
        poisoned = poison_dataset(images, labels, trigger, target=self.target, rate=self.rate, seed=self.seed)
        return trigger, poisoned
