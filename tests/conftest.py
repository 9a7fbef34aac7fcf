"""Session fixtures: the real MNIST subset and two models trained on it, one clean and one BadNets-backdoored.

The models are trained once (a few seconds each, on one CPU thread) and their weights
are kept in pytest's cache directory (``.pytest_cache``), keyed by the recipe and its source
code, so later sessions reload them; ``pytest --cache-clear`` retrains. All fixtures here are
shared across the session: treat their tensors and models as read-only (``copy.deepcopy`` a
model before changing it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from scanner.testing.attacks import BadNetsRecipe, patch_trigger, poison_dataset_source_specific
from scanner.testing.mnist import MnistSplit, load_mnist_split
from scanner.testing.training import train_mnist_cnn
from tests.factories import SOURCE_CLASS, BadNetsModel, trained_mnist_cnn

_CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def model_cache_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where trained test models are kept: pytest's cache, or a session temp dir when the cache plugin is off."""
    cache = getattr(request.config, "cache", None)
    if cache is None:
        return tmp_path_factory.mktemp("trained-models")
    directory: Path = cache.mkdir("trained-models")
    return directory


@pytest.fixture(scope="session")
def mnist() -> MnistSplit:
    """The 5,000-image MNIST subset split per class: 4,000 train / 1,000 test, float ``(N, 1, 28, 28)`` in [0, 1]."""
    return load_mnist_split(test_fraction=0.2, seed=0)


@pytest.fixture(scope="session")
def clean_model(mnist: MnistSplit, model_cache_dir: Path) -> nn.Module:
    """``mnist_cnn`` trained on the clean train split (eval mode, CPU; about 96% test accuracy)."""
    return trained_mnist_cnn(
        model_cache_dir,
        "clean",
        "train_mnist_cnn(split seed 0, test_fraction 0.2, defaults)",
        lambda: train_mnist_cnn(mnist.train_images, mnist.train_labels, device=_CPU),
    )


@pytest.fixture(scope="session")
def badnets(mnist: MnistSplit, model_cache_dir: Path) -> BadNetsModel:
    """``mnist_cnn`` trained on the train split with 10% BadNets poisoning (3x3 white patch, bottom-right, target 0).

    Yields the model (eval mode, CPU), the trigger, the target class and the poisoned training
    set with its poisoned row indices (the ground truth for spectral signatures).
    """
    recipe = BadNetsRecipe()
    trigger, poisoned = recipe.poison(mnist.train_images, mnist.train_labels)
    model = trained_mnist_cnn(
        model_cache_dir,
        "badnets",
        f"{recipe!r}, train_mnist_cnn(split seed 0, test_fraction 0.2, defaults)",
        lambda: train_mnist_cnn(poisoned.images, poisoned.labels, device=_CPU),
    )
    return BadNetsModel(model=model, trigger=trigger, target=recipe.target, poisoned=poisoned)


@pytest.fixture(scope="session")
def backdoored_model(badnets: BadNetsModel) -> nn.Module:
    """The BadNets-backdoored ``mnist_cnn`` of :func:`badnets` (eval mode, CPU)."""
    return badnets.model


@pytest.fixture(scope="session")
def source_specific(mnist: MnistSplit, model_cache_dir: Path) -> BadNetsModel:
    """``mnist_cnn`` with a source-specific backdoor: a 4x4 white patch (bottom right) sends only class 3 to 7.

    5% of the training set (half of class 3) is stamped and relabelled 7, and as many cover samples (stamped images of
    the other classes, true label kept) teach the model that the patch alone does not decide. ``poisoned_indices`` are
    the relabelled rows; ``target`` is 7 (source :data:`SOURCE_CLASS`).
    """
    trigger = patch_trigger((1, 28, 28), size=4, position="bottom_right")
    poisoned = poison_dataset_source_specific(
        mnist.train_images, mnist.train_labels, trigger, source=SOURCE_CLASS, target=7, rate=0.05, seed=0
    )
    model = trained_mnist_cnn(
        model_cache_dir,
        "source-specific",
        "patch 4x4 bottom_right, source 3, target 7, rate 0.05, cover_ratio 1, seed 0; train_mnist_cnn(defaults)",
        lambda: train_mnist_cnn(poisoned.images, poisoned.labels, device=_CPU),
    )
    return BadNetsModel(model=model, trigger=trigger, target=7, poisoned=poisoned)
