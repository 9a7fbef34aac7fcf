from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from scanner.errors import InvalidOptionError
from scanner.spectral import (
    MIN_CLASS_SAMPLES,
    SpectralConfig,
    SpectralReport,
    class_splits,
    detect_poisoned_samples,
    persistence_gain,
    trigger_persistence,
)
from scanner.testing.attacks import BadNetsRecipe, class_mapping, mapped_success_rate
from scanner.testing.mnist import MnistSplit
from scanner.testing.training import train_mnist_cnn
from tests.factories import SOURCE_CLASS, BadNetsModel, one_intraop_thread

CPU = torch.device("cpu")
TARGET = 3


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    above = (pos[:, None] > neg[None, :]).double().mean() + 0.5 * (pos[:, None] == neg[None, :]).double().mean()
    return float(above)


def synthetic_features(
    fraction: float, *, seed: int, classes: int = 10, per_class: int = 400, dim: int = 32, shift: float = 6.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian classes that vary most along the first axes, and a sub-population of class 3 shifted along the last.

    The shift (12 standard deviations along its axis) is smaller than the spread along the first axis (3 vs 0.5
    per axis), so at small fractions it is not the top singular direction of the raw class features.

    Returns:
        ``(features (N, dim), labels (N,), planted row indices)``.
    """
    generator = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.5, dim)
    means = torch.randn(classes, dim, generator=generator) * 10
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = means[labels] + torch.randn(len(labels), dim, generator=generator) * scales
    rows = torch.nonzero(labels == TARGET).squeeze(1)
    planted = rows[torch.randperm(len(rows), generator=generator)[: round(fraction * len(rows))]].sort().values
    features[planted, -1] += shift
    return features, labels, planted


@pytest.mark.parametrize("fraction", [0.02, 0.2, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_planted_subpopulation_is_flagged_and_separated(fraction: float, seed: int) -> None:
    features, labels, planted = synthetic_features(fraction, seed=seed)
    splits = class_splits(features, labels)
    assert [split.label for split in splits if split.flagged] == [TARGET]
    target = next(split for split in splits if split.label == TARGET)
    truth = torch.isin(target.indices, planted)
    # Without the model the smaller component is the suspect: right below one half, a coin flip at one half.
    if fraction < 0.5:
        assert torch.equal(target.suspicious, truth)
        assert auroc(target.poison_score, truth) > 0.99
        assert target.poisoned_fraction == pytest.approx(fraction, abs=0.01)
    else:
        assert torch.equal(target.suspicious, truth) or torch.equal(target.suspicious, ~truth)
    assert target.separation > 6.0
    others = [split for split in splits if split.label != TARGET]
    assert max(split.separation for split in others) < 4.0


def test_wide_features_are_reduced_before_whitening() -> None:
    features, labels, planted = synthetic_features(0.2, seed=0, dim=96)
    splits = class_splits(features, labels, config=SpectralConfig(max_features=48))
    assert [split.label for split in splits if split.flagged] == [TARGET]
    target = next(split for split in splits if split.label == TARGET)
    assert torch.equal(target.suspicious, torch.isin(target.indices, planted))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_synthetic_classes_flag_nothing(seed: int) -> None:
    features, labels, _ = synthetic_features(0.0, seed=seed)
    splits = class_splits(features, labels)
    assert not any(split.flagged for split in splits)
    assert all(math.isfinite(split.score) for split in splits)


def test_planted_direction_below_the_top_raw_direction_is_found() -> None:
    # The paper's score (squared projection on the top singular vector of the centred raw class features) misses
    # a 2% sub-population that varies along a low-variance axis; whitening by the other classes finds it.
    features, labels, planted = synthetic_features(0.02, seed=0)
    rows = torch.nonzero(labels == TARGET).squeeze(1)
    centred = features[rows] - features[rows].mean(0)
    top = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    truth = torch.isin(rows, planted)
    assert auroc((centred @ top) ** 2, truth) < 0.8
    target = next(split for split in class_splits(features, labels) if split.label == TARGET)
    assert auroc(target.poison_score, truth) > 0.99


def test_swapped_split_takes_the_other_component() -> None:
    features, labels, _ = synthetic_features(0.2, seed=0)
    target = next(split for split in class_splits(features, labels) if split.label == TARGET)
    other = target.swapped()
    assert torch.equal(other.suspicious, ~target.suspicious)
    assert other.poisoned_fraction == pytest.approx(1 - target.poisoned_fraction)
    torch.testing.assert_close(other.poison_score, 1 - target.poison_score)


def test_too_few_classes_are_not_compared() -> None:
    features, labels, _ = synthetic_features(0.2, seed=0, classes=4)
    keep = labels >= 2  # classes 2 and 3 only: no cross-class statistic
    splits = class_splits(features[keep], labels[keep])
    assert [split.label for split in splits] == [2, 3]
    assert not any(split.flagged for split in splits)
    assert all(math.isnan(split.score) for split in splits)


def test_classes_with_too_few_samples_are_left_out() -> None:
    features, labels, _ = synthetic_features(0.0, seed=0, classes=5)
    tiny = torch.nonzero(labels == 4).squeeze(1)[: MIN_CLASS_SAMPLES - 1]
    keep = (labels != 4) | torch.isin(torch.arange(len(labels)), tiny)
    splits = class_splits(features[keep], labels[keep])
    assert [split.label for split in splits] == [0, 1, 2, 3]


def test_mismatched_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="expected features"):
        class_splits(torch.zeros(10, 4), torch.zeros(9, dtype=torch.int64))


@pytest.mark.parametrize(
    "options", [{"directions": 0}, {"shrinkage": 0.0}, {"threshold": -1.0}, {"max_features": 1}, {"batch_size": 0}]
)
def test_invalid_config_is_rejected(options: dict[str, float]) -> None:
    with pytest.raises(InvalidOptionError, match="spectral signatures option"):
        SpectralConfig(**options)  # type: ignore[arg-type]


class _TriggerPixelModel(nn.Module):
    """Class 0 when the top-left pixel is bright, class 1 otherwise: the top-left pixel is a trigger."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([8 * images[:, 0, 0, 0], images.flatten(1).mean(1) * 4], dim=1)


def test_trigger_persistence_separates_triggered_from_clean_probes() -> None:
    clean = torch.full((4, 1, 4, 4), 0.5)
    clean[:, 0, 0, 0] = 0.0
    triggered = clean.clone()
    triggered[:, 0, 0, 0] = 1.0
    partners = clean[:, None].expand(4, 3, 1, 4, 4)  # blends keep half of the probe's top-left pixel
    model = _TriggerPixelModel()
    assert trigger_persistence(model, triggered, partners, 0, device=CPU, batch_size=5) == 1.0
    assert trigger_persistence(model, clean, partners, 0, device=CPU) == 0.0
    with pytest.raises(ValueError, match="partners must be"):
        trigger_persistence(model, clean, partners[:2], 0, device=CPU)


# -- real models: the session fixtures train mnist_cnn on the MNIST subset, clean and 10% BadNets --------------


@pytest.fixture(scope="module")
def badnets_report(badnets: BadNetsModel) -> SpectralReport:
    return detect_poisoned_samples(badnets.model, badnets.poisoned.images, badnets.poisoned.labels, device=CPU)


def test_badnets_target_and_poisoned_samples_are_found(badnets: BadNetsModel, badnets_report: SpectralReport) -> None:
    # 10% of the training set poisoned, all to one: half of the target class is poison, so the side test decides.
    assert badnets_report.flagged_classes == (badnets.target,)
    target = next(split for split in badnets_report.classes if split.label == badnets.target)
    truth = torch.isin(target.indices, badnets.poisoned.poisoned_indices)
    suspicious = target.suspicious
    assert int((suspicious & truth).sum()) / int(truth.sum()) >= 0.9  # recall
    assert int((suspicious & truth).sum()) / int(suspicious.sum()) >= 0.9  # precision
    assert auroc(target.poison_score, truth) >= 0.95
    assert target.poisoned_fraction == pytest.approx(float(truth.double().mean()), abs=0.05)
    suspected, other = badnets_report.persistence[badnets.target]
    assert suspected > other


def test_clean_model_flags_nothing(clean_model: nn.Module, mnist: MnistSplit) -> None:
    report = detect_poisoned_samples(clean_model, mnist.train_images, mnist.train_labels, device=CPU)
    assert report.flagged_classes == ()
    assert report.persistence == {}
    assert len(report.classes) == 10


@pytest.mark.slow
def test_one_percent_badnets_poisoning_is_found(mnist: MnistSplit) -> None:
    # 1% of the training set (40 images) relabelled to class 5: about 9% of the target class.
    recipe = BadNetsRecipe(target=5, rate=0.01, seed=3)
    _, poisoned = recipe.poison(mnist.train_images, mnist.train_labels)
    with one_intraop_thread():
        model = train_mnist_cnn(poisoned.images, poisoned.labels, device=CPU, seed=3)
    report = detect_poisoned_samples(model, poisoned.images, poisoned.labels, device=CPU)
    assert report.flagged_classes == (5,)
    target = next(split for split in report.classes if split.label == 5)
    truth = torch.isin(target.indices, poisoned.poisoned_indices)
    assert int((target.suspicious & truth).sum()) >= 0.9 * int(truth.sum())
    assert auroc(target.poison_score, truth) >= 0.95
    assert np.isclose(target.poisoned_fraction, float(truth.double().mean()), atol=0.03)


def test_cover_samples_of_a_source_specific_backdoor_are_not_flagged_as_targets(
    mnist: MnistSplit, source_specific: BadNetsModel
) -> None:
    """The cover samples (stamped, true label kept) split their classes as a real poison does; without the side test's
    confirmation such a class was flagged, a wrong class. Their members do not keep the class under blending more
    than the rest, so the class is unconfirmed, not flagged."""
    model, poisoned = source_specific.model, source_specific.poisoned
    mapping = class_mapping(10, kind="source_specific", source=SOURCE_CLASS, target=source_specific.target)
    asr = mapped_success_rate(model, mnist.test_images, mnist.test_labels, source_specific.trigger, mapping, device=CPU)
    assert asr >= 0.9

    unchecked = detect_poisoned_samples(
        model, poisoned.images, poisoned.labels, config=SpectralConfig(min_persistence_gain=0.0), device=CPU
    )
    wrong = set(unchecked.flagged_classes) - {source_specific.target}
    assert wrong, "the split alone flags a class the backdoor does not map to"

    report = detect_poisoned_samples(model, poisoned.images, poisoned.labels, device=CPU)
    assert set(report.flagged_classes) <= {source_specific.target}
    assert wrong <= set(report.unconfirmed_classes)
    for label in report.unconfirmed_classes:
        suspected, rest = report.persistence[label]
        assert persistence_gain(suspected, rest) < SpectralConfig().min_persistence_gain
    assert not set(report.flagged_classes) & set(report.unconfirmed_classes)


def test_a_real_target_is_confirmed_by_the_side_test(badnets: BadNetsModel, badnets_report: SpectralReport) -> None:
    suspected, rest = badnets_report.persistence[badnets.target]
    assert persistence_gain(suspected, rest) >= SpectralConfig().min_persistence_gain
    assert badnets_report.unconfirmed_classes == ()


def test_persistence_gain_is_the_relative_drop_in_how_often_the_class_is_lost() -> None:
    # a class that keeps its label under blending 73% of the time: 87.5% for the suspected members is a real gain
    assert persistence_gain(0.875, 0.729) == pytest.approx(0.539, abs=1e-3)
    # a class that keeps it 12% of the time: 22% is not
    assert persistence_gain(0.22, 0.12) == pytest.approx(0.114, abs=1e-3)
    assert persistence_gain(0.3, 0.3) == 0.0
    assert persistence_gain(0.2, 0.4) < 0
    assert persistence_gain(1.0, 1.0) == 0.0  # the rest never loses it: nothing to confirm
