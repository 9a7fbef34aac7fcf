from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from scanner.classifier import with_normalization
from scanner.config import ModelOptions
from scanner.features import FeatureExtractionError, penultimate_features
from scanner.loading import load_model
from scanner.loading.architectures import build_architecture

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(37, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _manual_penultimate(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    # mnist_cnn: features -> Flatten -> Linear(1568, 128) -> ReLU -> Linear(128, K); the head's input is after the ReLU.
    with torch.no_grad():
        hidden = model.get_submodule("classifier.1")(model.get_submodule("features")(images).flatten(1))
        return torch.relu(hidden)


@pytest.fixture(scope="module")
def program(mnist_cnn: nn.Module, images: torch.Tensor) -> torch.export.ExportedProgram:
    """``mnist_cnn`` exported with a dynamic batch axis (exporting takes seconds: done once)."""
    return torch.export.export(mnist_cnn, (images[:4],), dynamic_shapes=({0: torch.export.Dim("batch")},))


def test_hook_features_equal_manual_computation(mnist_cnn: nn.Module, images: torch.Tensor) -> None:
    features = penultimate_features(mnist_cnn, images, device=CPU, batch_size=16)
    assert features.shape == (37, 128)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, _manual_penultimate(mnist_cnn, images))


def test_features_do_not_depend_on_batch_size(mnist_cnn: nn.Module, images: torch.Tensor) -> None:
    whole = penultimate_features(mnist_cnn, images, device=CPU, batch_size=512)
    torch.testing.assert_close(penultimate_features(mnist_cnn, images, device=CPU, batch_size=5), whole)


def test_hook_is_removed_and_model_unchanged(mnist_cnn: nn.Module, images: torch.Tensor) -> None:
    head = mnist_cnn.get_submodule("classifier.3")
    penultimate_features(mnist_cnn, images, device=CPU)
    assert not head._forward_pre_hooks
    assert mnist_cnn(images[:2]).shape == (2, 10)


def test_graph_cut_equals_hook_on_exported_program(
    mnist_cnn: nn.Module, images: torch.Tensor, program: torch.export.ExportedProgram
) -> None:
    expected = penultimate_features(mnist_cnn, images, device=CPU)
    graph_module = program.module()
    torch.testing.assert_close(penultimate_features(graph_module, images, device=CPU, batch_size=16), expected)


def test_graph_cut_finds_addmm_after_decompositions(
    mnist_cnn: nn.Module, images: torch.Tensor, program: torch.export.ExportedProgram
) -> None:
    graph_module = program.run_decompositions().module()
    targets = {node.target for node in graph_module.graph.nodes}
    assert torch.ops.aten.addmm.default in targets
    assert torch.ops.aten.linear.default not in targets
    torch.testing.assert_close(
        penultimate_features(graph_module, images, device=CPU), _manual_penultimate(mnist_cnn, images)
    )


def test_graph_cut_inside_loaded_pt2_and_normalization_wrapper(
    mnist_cnn: nn.Module, images: torch.Tensor, program: torch.export.ExportedProgram, tmp_path: Path
) -> None:
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    loaded = load_model(path, ModelOptions(), CPU)
    # Identity normalisation keeps the numbers comparable; the cut must run inside both wrappers.
    model = with_normalization(loaded.module, (0.0,), (1.0,))
    features = penultimate_features(model, images, device=CPU, batch_size=16)
    torch.testing.assert_close(features, _manual_penultimate(mnist_cnn, images))
    # The exported program is back in place: the wrapper returns logits again.
    torch.testing.assert_close(model(images[:3]), mnist_cnn(images[:3]))


class _HeadRegisteredFirst(nn.Module):
    """The head is registered before the body, so registration order would pick the wrong layer."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.Tanh())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.head(self.body(images))
        return output


def test_head_is_the_last_linear_layer_that_runs() -> None:
    model = _HeadRegisteredFirst().eval()
    images = torch.rand(6, 1, 2, 2)
    expected = torch.tanh(model.body[1](images.flatten(1))).detach()
    torch.testing.assert_close(penultimate_features(model, images, device=CPU), expected)


def test_model_without_linear_head_is_rejected() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(FeatureExtractionError, match=r"no nn\.Linear") as caught:
        penultimate_features(model, torch.rand(2, 1, 5, 5), device=CPU)
    assert caught.value.code == "no_penultimate_layer"


def test_head_with_non_flat_input_is_rejected() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Linear(5, 3))  # Linear applied over the last image axis
    with pytest.raises(FeatureExtractionError, match=r"\(batch, features\)"):
        penultimate_features(model, torch.rand(2, 1, 5, 5), device=CPU)


@pytest.mark.parametrize(
    ("shape", "batch_size", "message"),
    [((4, 28, 28), 8, "must be"), ((0, 1, 28, 28), 8, "at least one image"), ((4, 1, 28, 28), 0, "batch_size")],
)
def test_bad_arguments_are_rejected(
    mnist_cnn: nn.Module, shape: tuple[int, ...], batch_size: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        penultimate_features(mnist_cnn, torch.rand(*shape), device=CPU, batch_size=batch_size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_features_on_cuda(mnist_cnn: nn.Module, images: torch.Tensor) -> None:
    device = torch.device("cuda")
    model = build_architecture("mnist_cnn", 10).eval()
    model.load_state_dict(mnist_cnn.state_dict())
    features = penultimate_features(model.to(device), images, device=device)
    assert features.device.type == "cuda"
    torch.testing.assert_close(features.cpu(), _manual_penultimate(mnist_cnn, images), rtol=1e-4, atol=1e-4)
