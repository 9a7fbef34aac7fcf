"""Neural Cleanse on 100 classes (issue 15): two real MNIST digits side by side (1 x 28 x 56, class = the two-digit
number), a BadNets model and a clean one trained here. The screen tests only the smallest masks and 16 reference
classes; the target must survive it and be flagged, the clean model must not be. Slow (two trainings and two
100-class scans): ``make test-slow``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scanner.config import NeuralCleanseConfig
from scanner.neural_cleanse import NeuralCleanseResult, neural_cleanse
from scanner.testing.attacks import patch_trigger, poison_dataset
from scanner.testing.mnist import MnistSplit, two_digit_split
from scanner.testing.training import accuracy, train_classifier
from scanner.trigger import attack_success_rate

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")
CLASSES, TARGET, SAMPLES = 100, 0, 500


def _network() -> nn.Module:
    """The bench's wide CNN for 28 x 56 inputs: conv 1->32 (pad 1), conv 32->64, fc 64x6x13 -> 128 -> 100."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 6 * 13, 128),
        nn.ReLU(),
        nn.Linear(128, CLASSES),
    )


@pytest.fixture(scope="module")
def task(mnist: MnistSplit) -> MnistSplit:
    return two_digit_split(mnist, classes=CLASSES, train_per_class=60, test_per_class=10)


def _scan(task: MnistSplit, backdoored: bool) -> tuple[NeuralCleanseResult, float, float]:
    """Train (backdoored: 3x3 white patch bottom right, 10%, target 0) and scan; returns the result, the clean
    accuracy and the real trigger's attack success rate."""
    trigger = patch_trigger(task.train_images.shape[1:], size=3, position="bottom_right")
    images, labels = task.train_images, task.train_labels
    if backdoored:
        poisoned = poison_dataset(images, labels, trigger, target=TARGET, rate=0.1, seed=0)
        images, labels = poisoned.images, poisoned.labels
    torch.manual_seed(0)
    model = train_classifier(_network(), images, labels, epochs=8, batch_size=64, lr=2e-3, seed=0, device=CPU).eval()
    clean_accuracy = accuracy(model, task.test_images, task.test_labels, device=CPU)
    asr = attack_success_rate(model, task.test_images, task.test_labels, trigger, TARGET, device=CPU)
    result = neural_cleanse(
        model, task.test_images[:SAMPLES], task.test_labels[:SAMPLES], CLASSES, NeuralCleanseConfig(), seed=0
    )
    return result, clean_accuracy, asr


def _check_screen(result: NeuralCleanseResult) -> None:
    config = NeuralCleanseConfig()
    assert result.reference_classes is not None
    assert len(result.reference_classes) == config.screen_references
    tested = [t for t in result.triggers if not t.screened_out]
    assert len(tested) <= config.screen_candidates + config.screen_references
    assert result.unconverged_classes == []
    # the screened-out classes did a screen's work only: far less than the tested ones
    screened_work = sum(t.images for t in result.triggers if t.screened_out)
    assert screened_work == (CLASSES - len(tested)) * config.screen_steps * config.screen_batch_size


def test_backdoored_100_class_model_is_flagged_with_its_target(task: MnistSplit) -> None:
    result, clean_accuracy, asr = _scan(task, backdoored=True)
    assert clean_accuracy > 0.85
    assert asr > 0.95
    _check_screen(result)
    assert TARGET in [t.target for t in result.triggers if not t.screened_out]
    assert result.flagged_classes == [TARGET]


def test_clean_100_class_model_is_not_flagged(task: MnistSplit) -> None:
    result, clean_accuracy, _ = _scan(task, backdoored=False)
    assert clean_accuracy > 0.85
    _check_screen(result)
    assert result.flagged_classes == []
