"""The classifier as the detectors see it: normalisation inside the model, and the one check that a model's output
is a classifier's ``(N, K)`` logits (used when a model is loaded and when samples are checked against it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scanner.classifier import NormalizedClassifier, check_samples, class_count, with_normalization
from scanner.errors import DataModelMismatchError, InvalidOptionError
from scanner.loading.architectures import build_architecture

CPU = torch.device("cpu")


def test_normalized_classifier_equals_normalising_by_hand() -> None:
    inner = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    images = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    wrapped = with_normalization(inner, mean, std)

    expected = inner((images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    assert isinstance(wrapped, NormalizedClassifier)
    assert wrapped.model is inner
    assert torch.allclose(wrapped(images), expected)
    assert wrapped.double()(images.double()).dtype == torch.float64


def test_with_normalization_without_values_returns_the_model() -> None:
    model = nn.Linear(2, 2)
    assert with_normalization(model, None, None) is model


@pytest.mark.parametrize(
    ("mean", "std", "match"),
    [
        ((0.5,), None, "together"),
        ((0.5, 0.5), (0.2,), "mean has 2 values but std has 1"),
        ((), (), "at least one value"),
        ((0.5,), (0.0,), "std values must be finite and in"),
    ],
)
def test_with_normalization_refuses_bad_values(
    mean: tuple[float, ...] | None, std: tuple[float, ...] | None, match: str
) -> None:
    with pytest.raises(InvalidOptionError, match=match) as caught:
        with_normalization(nn.Linear(2, 2), mean, std)
    assert caught.value.code == "invalid_option"


def _samples(shape: tuple[int, int, int], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(len(labels), *shape), torch.tensor(labels)


@pytest.fixture(scope="module")
def mnist_cnn() -> nn.Module:
    return build_architecture("mnist_cnn", 10).eval()


def test_check_samples_returns_the_class_count(mnist_cnn: nn.Module) -> None:
    assert check_samples(mnist_cnn, *_samples((1, 28, 28), [0, 9, 3]), num_classes=10, device=CPU) == 10
    assert check_samples(mnist_cnn, *_samples((1, 28, 28), [1]), num_classes=None, device=CPU) == 10


@pytest.mark.parametrize(
    ("samples", "num_classes", "match"),
    [
        (_samples((3, 32, 32), [0, 1]), None, r"images of shape \(3, 32, 32\)"),
        (_samples((1, 28, 28), [0, 12]), None, "label 12 but the model has 10 classes"),
    ],
    ids=["wrong-shape", "label-out-of-range"],
)
def test_check_samples_refuses_mismatches(
    mnist_cnn: nn.Module, samples: tuple[torch.Tensor, torch.Tensor], num_classes: int | None, match: str
) -> None:
    with pytest.raises(DataModelMismatchError, match=match) as caught:
        check_samples(mnist_cnn, *samples, num_classes=num_classes, device=CPU)
    assert caught.value.code == "data_model_mismatch"


def test_check_samples_refuses_a_num_classes_option_the_model_disagrees_with(
    mnist_cnn: nn.Module,
) -> None:
    """The option is wrong, not the data: ``invalid_option``, as when loading a state_dict (issue 13)."""
    with pytest.raises(InvalidOptionError, match="num_classes is 5 but the model outputs 10 logits") as caught:
        check_samples(mnist_cnn, *_samples((1, 28, 28), [0, 1]), num_classes=5, device=CPU)
    assert caught.value.code == "invalid_option"


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Sequential(nn.Flatten(0)), r"returned \(32,\); a classifier returns \(2, K\)"),
        (nn.Sequential(nn.Flatten(), nn.Linear(16, 1)), "1 logit per sample"),
    ],
    ids=["not-2d", "one-logit"],
)
def test_check_samples_refuses_non_classifier_outputs(model: nn.Module, match: str) -> None:
    with pytest.raises(DataModelMismatchError, match=match):
        check_samples(model, *_samples((1, 4, 4), [0, 1]), num_classes=None, device=CPU)


def test_class_count_of_a_model_that_raises_anything_is_a_mismatch_not_a_crash() -> None:
    class Broken(nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            raise KeyError("an uploaded program may raise anything")

    with pytest.raises(DataModelMismatchError, match="cannot classify images of shape"):
        class_count(Broken(), torch.zeros(1, 1, 4, 4), num_classes=None, device=CPU)
