"""Neural Cleanse on a 100-class model made at test time: the screen's default path (slow: two trainings, two scans).

Two real MNIST digits side by side (1 x 28 x 56), class = the two-digit number, 60 training composites a class; a
clean model and a BadNets one (3x3 white patch bottom right, 10% poisoned, target 0), the same CNN and seed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scanner.config import NeuralCleanseConfig
from scanner.neural_cleanse import neural_cleanse
from scanner.testing.attacks import patch_trigger, poison_dataset
from scanner.testing.mnist import MnistSplit, two_digit_split
from scanner.testing.training import train_classifier, wide_cnn
from scanner.trigger import attack_success_rate

pytestmark = pytest.mark.slow

CLASSES, TARGET = 100, 0


@pytest.fixture(scope="module")
def task(mnist: MnistSplit) -> MnistSplit:
    return two_digit_split(mnist, classes=CLASSES, train_per_class=60, test_per_class=10)


def _train(task: MnistSplit, backdoored: bool) -> nn.Module:
    images, labels = task.train_images, task.train_labels
    if backdoored:
        trigger = patch_trigger(images.shape[1:], size=3)
        poisoned = poison_dataset(images, labels, trigger, target=TARGET, rate=0.1, seed=0)
        images, labels = poisoned.images, poisoned.labels
    torch.manual_seed(0)
    network = wide_cnn(width=56, classes=CLASSES)
    cpu = torch.device("cpu")
    model = train_classifier(network, images, labels, epochs=8, batch_size=64, lr=2e-3, seed=0, device=cpu)
    return model.eval()


def test_a_screened_100_class_scan_flags_the_backdoor_and_not_the_clean_model(task: MnistSplit) -> None:
    config = NeuralCleanseConfig(precision="fp32")
    assert config.screens(CLASSES)
    images, labels = task.test_images[:500], task.test_labels[:500]
    backdoored = _train(task, backdoored=True)
    trigger = patch_trigger(images.shape[1:], size=3)
    assert attack_success_rate(backdoored, images, labels, trigger, TARGET, device=torch.device("cpu")) > 0.9
    found = neural_cleanse(backdoored, images, labels, CLASSES, config, seed=1)
    assert found.flagged_classes == [TARGET]
    assert found.reference_classes is not None
    assert len(found.reference_classes) == config.screen_references
    tested = [t.target for t in found.triggers if not t.screened_out]
    # the candidates and the references run to convergence, no other class: the screen is what keeps the cost
    assert TARGET in tested
    assert len(tested) <= config.screen_candidates + config.screen_references
    assert not found.unconverged_classes
    assert found.triggers[TARGET].mask_l1 < 0.2 * sorted(t.mask_l1 for t in found.triggers)[CLASSES // 2]

    clean = neural_cleanse(_train(task, backdoored=False), images, labels, CLASSES, config, seed=1)
    assert clean.flagged_classes == []
    assert not clean.unconverged_classes
