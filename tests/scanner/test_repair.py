"""Repair by unlearning, on the BadNets ``mnist_cnn`` trained at test time: the backdoor goes, clean accuracy stays."""

from __future__ import annotations

import copy

import pytest
import torch

from scanner.errors import InvalidOptionError
from scanner.repair import RepairConfig, unlearn
from scanner.testing.mnist import MnistSplit
from scanner.testing.training import accuracy
from scanner.trigger import attack_success_rate
from tests.factories import BadNetsModel

CPU = torch.device("cpu")


def test_unlearning_the_trigger_removes_the_backdoor_and_keeps_clean_accuracy(
    mnist: MnistSplit, badnets: BadNetsModel
) -> None:
    # the repair gets 500 clean test images; the other 500 are unseen by it and measure it
    given, unseen = slice(0, 500), slice(500, None)
    before_weights = copy.deepcopy(badnets.model.state_dict())
    asr_before = attack_success_rate(
        badnets.model, mnist.test_images[unseen], mnist.test_labels[unseen], badnets.trigger, badnets.target, device=CPU
    )
    assert asr_before >= 0.9

    result = unlearn(
        badnets.model,
        mnist.test_images[given],
        mnist.test_labels[given],
        {badnets.target: badnets.trigger},
        device=CPU,
        seed=0,
    )

    asr_after = attack_success_rate(
        result.model, mnist.test_images[unseen], mnist.test_labels[unseen], badnets.trigger, badnets.target, device=CPU
    )
    clean_before = accuracy(badnets.model, mnist.test_images[unseen], mnist.test_labels[unseen], device=CPU)
    clean_after = accuracy(result.model, mnist.test_images[unseen], mnist.test_labels[unseen], device=CPU)
    assert asr_after < 0.1
    assert clean_before - clean_after <= 0.03
    # its own numbers come from its held-out part, and agree in direction
    assert (result.train_samples, result.held_out_samples) == (350, 150)
    assert result.trigger_asr_before[badnets.target] >= 0.9
    assert result.trigger_asr_after[badnets.target] < 0.1
    assert result.accuracy_drop == pytest.approx(result.accuracy_before - result.accuracy_after)
    # the input model is untouched, the repaired one is frozen again
    for name, tensor in badnets.model.state_dict().items():
        assert torch.equal(tensor, before_weights[name]), name
    assert not any(p.requires_grad for p in result.model.parameters())


def test_unlearning_refuses_what_it_cannot_do(mnist: MnistSplit, badnets: BadNetsModel) -> None:
    images, labels = mnist.test_images[:50], mnist.test_labels[:50]
    with pytest.raises(ValueError, match="at least one reversed trigger"):
        unlearn(badnets.model, images, labels, {}, device=CPU)
    with pytest.raises(ValueError, match="cannot be split"):
        unlearn(badnets.model, images[:3], labels[:3], {0: badnets.trigger}, device=CPU)
    for field, value in [("epochs", 0), ("lr", float("nan")), ("stamp_fraction", 1.0), ("distill", -1.0)]:
        with pytest.raises(InvalidOptionError, match=field):
            RepairConfig(**{field: value})
