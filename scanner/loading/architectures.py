"""Allowlisted architectures that a state_dict (safetensors or torch.save) can be loaded into.

Built-in small CNNs (exact layer shapes below) plus a fixed list of torchvision classification
models. Nothing outside these names is ever constructed from user input.

``mnist_cnn`` (input 1x28x28)::

    features.0  Conv2d(1, 16, 3, padding=1)    -> 16x28x28, ReLU, MaxPool2d(2) -> 16x14x14
    features.3  Conv2d(16, 32, 3, padding=1)   -> 32x14x14, ReLU, MaxPool2d(2) -> 32x7x7
    classifier.1 Linear(1568, 128), ReLU
    classifier.3 Linear(128, num_classes)

``cifar_cnn`` (input 3x32x32)::

    features.0  Conv2d(3, 32, 3, padding=1), ReLU
    features.2  Conv2d(32, 32, 3, padding=1), ReLU, MaxPool2d(2) -> 32x16x16
    features.5  Conv2d(32, 64, 3, padding=1), ReLU
    features.7  Conv2d(64, 64, 3, padding=1), ReLU, MaxPool2d(2) -> 64x8x8
    classifier.1 Linear(4096, 256), ReLU
    classifier.3 Linear(256, num_classes)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from scanner.errors import UnknownArchitectureError

__all__ = ["ARCHITECTURES", "Architecture", "build_architecture"]


class MnistCnn(nn.Module):
    """Small two-block CNN for 1x28x28 inputs (see the module docstring for shapes)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, images):  # type: ignore[no-untyped-def]
        return self.classifier(self.features(images))


class CifarCnn(nn.Module):
    """Small VGG-style CNN for 3x32x32 inputs (see the module docstring for shapes)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 256),
            nn.ReLU(),
            nn.Linear(256, num_classes),
        )

    def forward(self, images):  # type: ignore[no-untyped-def]
        return self.classifier(self.features(images))


@dataclass(frozen=True)
class Architecture:
    """A constructor and the input shape ``(C, H, W)`` it expects by default."""

    build: Callable[[int], nn.Module]
    default_input_shape: tuple[int, int, int]


def _torchvision(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision.models

        constructor: Callable[..., nn.Module] = getattr(torchvision.models, name)
        return constructor(weights=None, num_classes=num_classes)

    return build


_TORCHVISION_NAMES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg11",
    "vgg11_bn",
    "vgg16",
    "vgg16_bn",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "densenet121",
    "shufflenet_v2_x1_0",
)

ARCHITECTURES: dict[str, Architecture] = {
    "mnist_cnn": Architecture(MnistCnn, (1, 28, 28)),
    "cifar_cnn": Architecture(CifarCnn, (3, 32, 32)),
    **{name: Architecture(_torchvision(name), (3, 224, 224)) for name in _TORCHVISION_NAMES},
}


def build_architecture(name: str | None, num_classes: int) -> nn.Module:
    """Construct an allowlisted architecture with random weights.

    Raises:
        UnknownArchitectureError: ``name`` is missing or not in :data:`ARCHITECTURES`.
    """
    if name is None:
        raise UnknownArchitectureError(
            f"a state_dict needs an architecture: pass arch (one of {', '.join(sorted(ARCHITECTURES))})"
        )
    if name not in ARCHITECTURES:
        raise UnknownArchitectureError(f"unknown arch {name!r}; allowed: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name].build(num_classes)
