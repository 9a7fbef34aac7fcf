"""Trigger evidence: predictions and Grad-CAM before and after stamping, as JSON and PNG strips; never fails a scan."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from torch import nn

from scanner.detectors.neural_cleanse import _evidence
from scanner.evidence import evidence_pngs, trigger_evidence, try_image
from scanner.neural_cleanse import ClassTrigger
from scanner.testing.attacks import patch_trigger
from scanner.testing.mnist import MnistSplit
from scanner.trigger import Trigger
from tests.factories import BadNetsModel

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_backdoor_evidence_flips_predictions_and_moves_heat(badnets: BadNetsModel, mnist: MnistSplit) -> None:
    images, labels = mnist.test_images[:200], mnist.test_labels[:200]
    evidence = trigger_evidence(badnets.model, images, labels, badnets.trigger, badnets.target)
    entry = evidence.to_dict()
    json.dumps(entry)  # JSON-ready
    assert entry["status"] == "ok"
    assert entry["samples"] == 8
    assert badnets.target not in entry["labels"]
    assert entry["labels"] == labels[entry["sample_indices"]].tolist()
    assert entry["stamped_predictions"] == [badnets.target] * 8
    assert entry["stamped_to_target"] == 1.0
    gradcam = entry["gradcam"]
    assert gradcam["status"] == "ok"
    assert gradcam["layer"] == "features.3"
    assert gradcam["heat_in_trigger_stamped"] > 3 * gradcam["heat_in_trigger_clean"]
    assert gradcam["trigger_area_fraction"] == round(9 / 784, 4)

    pngs = evidence_pngs(evidence)
    assert set(pngs) == {"stamped", "gradcam"}
    for png in pngs.values():
        assert png.startswith(PNG_MAGIC)
        image = Image.open(io.BytesIO(png))
        assert image.mode == "RGB"
        assert image.width > 8 * 112  # 8 columns of 112-pixel tiles
        assert image.height > 2 * 112  # 2 rows


def test_clean_model_keeps_its_predictions_under_the_patch(clean_model: nn.Module, mnist: MnistSplit) -> None:
    images, labels = mnist.test_images[:200], mnist.test_labels[:200]
    entry = trigger_evidence(clean_model, images, labels, patch_trigger((1, 28, 28)), 0, samples=32).to_dict()
    assert entry["stamped_to_target"] < 0.1
    same = sum(a == b for a, b in zip(entry["clean_predictions"], entry["stamped_predictions"], strict=True))
    assert same / 32 > 0.9


def test_without_convolution_gradcam_is_skipped_and_predictions_remain(mnist: MnistSplit) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    evidence = trigger_evidence(model, mnist.test_images[:20], mnist.test_labels[:20], patch_trigger((1, 28, 28)), 0)
    entry = evidence.to_dict()
    assert entry["status"] == "ok"
    assert entry["gradcam"]["status"] == "skipped"
    assert "Conv2d" in entry["gradcam"]["reason"]
    assert set(evidence_pngs(evidence)) == {"stamped"}


def test_only_target_samples_is_refused(badnets: BadNetsModel, mnist: MnistSplit) -> None:
    images = mnist.test_images[:4]
    with pytest.raises(ValueError, match="nothing to stamp"):
        trigger_evidence(badnets.model, images, torch.zeros(4, dtype=torch.int64), badnets.trigger, 0)


def test_a_failing_evidence_is_reported_not_raised(badnets: BadNetsModel, mnist: MnistSplit) -> None:
    wrong_size = ClassTrigger(
        target=0, trigger=Trigger(torch.ones(5, 5), torch.ones(1, 5, 5)), mask_l1=25.0, reached_threshold=True, steps=1
    )
    entry, pngs = _evidence(badnets.model, mnist.test_images[:20], mnist.test_labels[:20], wrong_size, int)
    assert entry["status"] == "error"
    assert entry["code"] == "evidence_failed"
    assert pngs == {}


def test_try_image_stamped_goes_to_the_target_and_draws_the_heat(badnets: BadNetsModel, mnist: MnistSplit) -> None:
    row = int(torch.nonzero(mnist.test_labels != badnets.target)[0])
    image, label = mnist.test_images[row], int(mnist.test_labels[row])
    other = patch_trigger((1, 28, 28), size=3, position="top_left")
    tried = try_image(badnets.model, image, {badnets.target: badnets.trigger, 5: other})
    assert tried.clean.prediction == label
    assert tried.stamped[badnets.target].prediction == badnets.target
    assert list(tried.stamped) == [badnets.target, 5]
    for version in (tried.clean, *tried.stamped.values()):
        assert 0 < version.confidence <= 1
        for png in (version.image_png, version.gradcam_png):
            assert png is not None
            assert Image.open(io.BytesIO(png)).size == (112, 112)  # 28 pixels, 4 times
    assert tried.stamped[badnets.target].confidence > 0.9
    assert tried.gradcam_layer == "features.3"
    assert tried.gradcam_problem is None


def test_try_image_without_convolution_still_predicts(mnist: MnistSplit) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    tried = try_image(model, mnist.test_images[0], {})
    assert tried.stamped == {}
    assert tried.clean.gradcam_png is None
    assert tried.gradcam_problem is not None
    assert tried.gradcam_problem[0] == "skipped"
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        try_image(model, mnist.test_images[:2], {})
