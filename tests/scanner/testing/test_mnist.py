"""The many-class task made from real digits: two MNIST digits side by side, class = the two-digit number."""

from __future__ import annotations

import pytest
import torch

from scanner.testing.mnist import MnistSplit, two_digit_split


def _halves_come_from(images: torch.Tensor, labels: torch.Tensor, digits: MnistSplit, train: bool) -> bool:
    pool_images = digits.train_images if train else digits.test_images
    pool_labels = digits.train_labels if train else digits.test_labels
    flat = pool_images.flatten(1)
    for image, label in zip(images, labels, strict=True):
        for half, digit in ((image[..., :28], int(label) // 10), (image[..., 28:], int(label) % 10)):
            same = (flat == half.flatten()).all(dim=1)
            if not bool(same.any()) or int(pool_labels[same][0]) != digit:
                return False
    return True


@pytest.mark.parametrize("classes", [100, 43])
def test_two_digit_split_labels_every_composite_by_its_two_digits(mnist: MnistSplit, classes: int) -> None:
    task = two_digit_split(mnist, classes=classes, train_per_class=3, test_per_class=2, seed=1)
    assert task.train_images.shape == (3 * classes, 1, 28, 56)
    assert task.test_images.shape == (2 * classes, 1, 28, 56)
    assert torch.bincount(task.train_labels, minlength=classes).tolist() == [3] * classes
    assert torch.bincount(task.test_labels, minlength=classes).tolist() == [2] * classes
    # each half is a real digit of the right class, test composites only from test digits
    assert _halves_come_from(task.train_images[:40], task.train_labels[:40], mnist, train=True)
    assert _halves_come_from(task.test_images[:40], task.test_labels[:40], mnist, train=False)
    assert not torch.equal(task.train_labels[:classes], torch.arange(classes))  # shuffled


def test_two_digit_split_is_seeded(mnist: MnistSplit) -> None:
    one = two_digit_split(mnist, classes=10, train_per_class=2, test_per_class=1, seed=3)
    two = two_digit_split(mnist, classes=10, train_per_class=2, test_per_class=1, seed=3)
    other = two_digit_split(mnist, classes=10, train_per_class=2, test_per_class=1, seed=4)
    assert torch.equal(one.train_images, two.train_images)
    assert not torch.equal(one.train_images, other.train_images)


@pytest.mark.parametrize(("classes", "per_class"), [(1, 1), (101, 1), (10, 0)])
def test_two_digit_split_refuses_bad_sizes(mnist: MnistSplit, classes: int, per_class: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        two_digit_split(mnist, classes=classes, train_per_class=per_class)
