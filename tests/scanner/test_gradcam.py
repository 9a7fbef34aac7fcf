"""Grad-CAM: the last convolution is found in modules and exported programs, and on the BadNets model the heat moves
onto the trigger (the real one and the one Neural Cleanse recovers) once it is stamped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from scanner.classifier import with_normalization
from scanner.config import ModelOptions
from scanner.errors import GradCamUnavailableError
from scanner.gradcam import grad_cam, heat_fraction_inside, last_conv_layer
from scanner.loading import load_model
from scanner.neural_cleanse import reverse_engineer_triggers
from scanner.testing.attacks import patch_trigger
from scanner.testing.mnist import MnistSplit
from scanner.trigger import Trigger
from tests.factories import BadNetsModel

CPU = torch.device("cpu")
SAMPLES = 32  # clean non-target images stamped in the heat tests


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def program(mnist_cnn: nn.Module, images: torch.Tensor) -> torch.export.ExportedProgram:
    return torch.export.export(mnist_cnn, (images[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))


@pytest.fixture(scope="module")
def non_target(badnets: BadNetsModel, mnist: MnistSplit) -> torch.Tensor:
    return mnist.test_images[mnist.test_labels != badnets.target][:SAMPLES]


@pytest.fixture(scope="module")
def recovered(badnets: BadNetsModel, mnist: MnistSplit) -> Trigger:
    """Neural Cleanse's trigger for the target class only (one class: a few seconds)."""
    (trigger,) = reverse_engineer_triggers(badnets.model, mnist.test_images[:200], 10, classes=[badnets.target])
    return Trigger(trigger.mask, trigger.pattern)


def test_last_conv_of_a_module_is_the_last_that_runs(mnist_cnn: nn.Module, images: torch.Tensor) -> None:
    assert last_conv_layer(mnist_cnn, images[:1]) == "features.3"

    class HeadFirst(nn.Module):  # registered in the opposite order of the forward pass
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Conv2d(4, 4, 3, padding=1)
            self.early = nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.late(torch.relu(self.early(x))).mean(dim=(2, 3))

    model = HeadFirst().eval()
    assert last_conv_layer(model, images[:1]) == "late"
    assert grad_cam(model, images).layer == "late"


def test_last_conv_of_an_exported_program(
    mnist_cnn: nn.Module, images: torch.Tensor, program: torch.export.ExportedProgram
) -> None:
    assert last_conv_layer(program.module(), images[:1]) == "features.3 (conv2d_1)"
    decomposed = program.run_decompositions().module()  # aten.convolution instead of aten.conv2d
    assert last_conv_layer(decomposed, images[:1]).startswith("features.3 (")
    expected = grad_cam(mnist_cnn, images)
    for graph_module in (program.module(), decomposed):
        cam = grad_cam(graph_module, images)
        torch.testing.assert_close(cam.heatmaps, expected.heatmaps, atol=1e-5, rtol=1e-4)
        assert torch.equal(cam.predictions, expected.predictions)


def test_exported_program_inside_loaded_pt2_and_normalization(
    mnist_cnn: nn.Module, images: torch.Tensor, program: torch.export.ExportedProgram, tmp_path: Path
) -> None:
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    model = with_normalization(load_model(path, ModelOptions(), CPU).module, (0.0,), (1.0,))
    cam = grad_cam(model, images, batch_size=4)  # 4 + 2: the exported wrapper sees two batches
    torch.testing.assert_close(cam.heatmaps, grad_cam(mnist_cnn, images).heatmaps, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model(images), mnist_cnn(images))  # the program is back in place


def test_heatmaps_are_normalised_and_leave_the_model_as_it_was(mnist_cnn: nn.Module, images: torch.Tensor) -> None:
    before = mnist_cnn(images).detach()
    cam = grad_cam(mnist_cnn, images, torch.full((len(images),), 3))
    assert cam.heatmaps.shape == (6, 28, 28)
    assert cam.heatmaps.min() >= 0
    assert torch.all((cam.heatmaps.amax(dim=(1, 2)) == 1) | (cam.heatmaps.amax(dim=(1, 2)) == 0))
    assert cam.classes.tolist() == [3] * 6
    assert all(p.grad is None for p in mnist_cnn.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in mnist_cnn.modules())
    torch.testing.assert_close(mnist_cnn(images), before)


def test_model_without_convolution_is_refused(images: torch.Tensor) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    with pytest.raises(GradCamUnavailableError, match=r"no nn\.Conv2d") as caught:
        grad_cam(model, images)
    assert caught.value.code == "no_conv_layer"


def test_heat_fraction_inside_the_region() -> None:
    heat = torch.zeros(3, 4, 4)
    heat[0, 0, 0] = 1.0  # all heat inside
    heat[1] = 1.0  # evenly spread
    mask = torch.zeros(4, 4)
    mask[0, :2] = torch.tensor([0.9, 0.5])  # both at least half the maximum: a region of 2 pixels
    mask[3, 3] = 0.4  # below half the maximum: outside
    torch.testing.assert_close(heat_fraction_inside(heat, mask), torch.tensor([1.0, 2 / 16, 0.0]))
    torch.testing.assert_close(heat_fraction_inside(heat[1:2], torch.full((4, 4), 0.1)), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="all zero"):
        heat_fraction_inside(heat, torch.zeros(4, 4))


def _heat_shift(model: nn.Module, images: torch.Tensor, trigger: Trigger) -> tuple[float, float]:
    clean = heat_fraction_inside(grad_cam(model, images).heatmaps, trigger.mask).mean()
    stamped = heat_fraction_inside(grad_cam(model, trigger.stamp(images)).heatmaps, trigger.mask).mean()
    return float(clean), float(stamped)


def test_heat_moves_onto_the_real_trigger(badnets: BadNetsModel, non_target: torch.Tensor) -> None:
    clean, stamped = _heat_shift(badnets.model, non_target, badnets.trigger)
    area = float((badnets.trigger.mask > 0).double().mean())  # what evenly spread heat would give
    assert stamped > 5 * clean, (clean, stamped)
    assert stamped > area, (stamped, area)
    assert grad_cam(badnets.model, badnets.trigger.stamp(non_target)).predictions.eq(badnets.target).all()


def test_heat_moves_onto_the_recovered_trigger(
    badnets: BadNetsModel, non_target: torch.Tensor, recovered: Trigger
) -> None:
    region = recovered.mask >= recovered.mask.max() / 2
    real = badnets.trigger.mask > 0
    assert float((region & real).sum()) / float(region.sum()) > 0.5, "the recovered trigger sits on the real one"
    clean, stamped = _heat_shift(badnets.model, non_target, recovered)
    assert stamped > 3 * clean, (clean, stamped)
    assert stamped > float(region.double().mean()), stamped


def test_a_patch_draws_heat_on_a_clean_model_too(clean_model: nn.Module, non_target: torch.Tensor) -> None:
    """Grad-CAM explains, it does not detect: a white patch is salient to any MNIST model. What a clean model does
    not do is change its predictions for it (see tests/scanner/test_evidence.py)."""
    patch = patch_trigger((1, 28, 28))
    clean, stamped = _heat_shift(clean_model, non_target, patch)
    assert stamped > clean
    before = grad_cam(clean_model, non_target).predictions
    after = grad_cam(clean_model, patch.stamp(non_target)).predictions
    assert float((before == after).double().mean()) > 0.9
