"""The trigger in mask/pattern form: stamping, its checks, and the attack success rate it measures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scanner.testing.attacks import patch_trigger
from scanner.trigger import Trigger, attack_success_rate

CPU = torch.device("cpu")


def _images(count: int = 20, shape: tuple[int, int, int] = (1, 8, 8), seed: int = 0) -> torch.Tensor:
    return torch.rand(count, *shape, generator=torch.Generator().manual_seed(seed))


def test_stamp_blends_mask_and_pattern() -> None:
    mask = torch.zeros(4, 4)
    mask[0, 0], mask[1, 1] = 1.0, 0.25
    pattern = torch.full((2, 4, 4), 0.8)
    images = torch.full((3, 2, 4, 4), 0.4)

    stamped = Trigger(mask=mask, pattern=pattern).stamp(images)

    assert stamped.shape == images.shape
    assert torch.allclose(stamped[:, :, 0, 0], torch.tensor(0.8))
    assert torch.allclose(stamped[:, :, 1, 1], torch.tensor(0.75 * 0.4 + 0.25 * 0.8))
    assert torch.equal(stamped[:, :, 2:, 2:], images[:, :, 2:, 2:])


def test_stamp_follows_input_dtype_and_accepts_a_single_image() -> None:
    trigger = patch_trigger((1, 8, 8), size=2)
    stamped = trigger.stamp(_images(2).double())
    assert stamped.dtype == torch.float64
    assert trigger.stamp(_images(1)[0]).shape == (1, 8, 8)


def test_stamp_rejects_wrong_image_shape() -> None:
    with pytest.raises(ValueError, match=r"\(1, 8, 8\)"):
        patch_trigger((1, 8, 8)).stamp(torch.zeros(2, 3, 8, 8))


def test_trigger_rejects_out_of_range_values() -> None:
    with pytest.raises(ValueError, match=r"mask values must be in \[0, 1\]"):
        Trigger(mask=torch.full((2, 2), 1.5), pattern=torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="same H, W"):
        Trigger(mask=torch.zeros(2, 2), pattern=torch.zeros(1, 3, 3))


class _CornerDetector(nn.Module):
    """Class 0 when the top-left pixel is bright, else class 1 (of 3): a backdoor by construction."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        bright = (images[:, 0, 0, 0] > 0.9).float()
        return torch.stack([bright, 1 - bright, torch.zeros_like(bright)], dim=1)


def test_attack_success_rate_counts_stamped_non_target_images_sent_to_the_target() -> None:
    images = _images(30) * 0.5  # no pixel is bright: nothing is class 0 unstamped
    labels = torch.arange(30) % 3
    corner = torch.zeros(8, 8)
    corner[0, 0] = 1.0
    trigger = Trigger(mask=corner, pattern=torch.ones(1, 8, 8))
    assert attack_success_rate(_CornerDetector(), images, labels, trigger, 0, device=CPU) == 1.0
    elsewhere = torch.zeros(8, 8)
    elsewhere[7, 7] = 1.0
    miss = Trigger(mask=elsewhere, pattern=torch.ones(1, 8, 8))
    assert attack_success_rate(_CornerDetector(), images, labels, miss, 0, device=CPU) == 0.0
    with pytest.raises(ValueError, match="every image is labelled 0"):
        attack_success_rate(_CornerDetector(), images, torch.zeros(30, dtype=torch.int64), trigger, 0, device=CPU)
