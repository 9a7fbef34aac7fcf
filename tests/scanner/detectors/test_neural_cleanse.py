"""The detector adapters vote only when their statistic can decide: Neural Cleanse whose classes did not converge,
or whose model has too few classes for a MAD outlier test, is an error (verdict ``inconclusive``), never ``clean``
and never ``backdoored``. Real models trained at test time: the BadNets model and a clean one."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from scanner.config import NeuralCleanseConfig, ScanConfig
from scanner.detectors import ScanInputs
from scanner.detectors.neural_cleanse import NEURAL_CLEANSE
from scanner.errors import TooFewClassesError
from scanner.loading.samples import Samples
from scanner.neural_cleanse import neural_cleanse
from scanner.pipeline import run_detector
from scanner.testing.mnist import MnistSplit
from scanner.verdict import DetectorResult, DetectorStatus, ModelInfo, ScannerInfo, Verdict, VerdictLabel
from tests.factories import BadNetsModel

SAMPLES = 200
_CPU = torch.device("cpu")


def _neural_cleanse_result(model: nn.Module, mnist: MnistSplit, config: NeuralCleanseConfig) -> DetectorResult:
    clean = Samples(images=mnist.test_images[:SAMPLES], labels=mnist.test_labels[:SAMPLES])
    inputs = ScanInputs(
        model=model,
        num_classes=10,
        input_shape=(1, 28, 28),
        clean=clean,
        training=None,
        config=ScanConfig(neural_cleanse=config, detectors=("neural_cleanse",)),
        device=_CPU,
    )
    return run_detector(NEURAL_CLEANSE, inputs, lambda fraction, message: None)


def _label(result: DetectorResult) -> VerdictLabel:
    verdict = Verdict(
        detectors={
            "model_file": DetectorResult(status=DetectorStatus.OK),
            "neural_cleanse": result,
            "spectral_signatures": DetectorResult.skipped("no training data given"),
        },
        scanner=ScannerInfo(version="test", torch=torch.__version__, device="cpu", seed=0),
        model=ModelInfo(format="pt2", sha256="0" * 64, size_bytes=1),
    )
    return verdict.label


@pytest.mark.parametrize("max_steps", [1, 2, 30])
def test_backdoor_with_a_step_limit_is_inconclusive_not_clean(
    badnets: BadNetsModel, mnist: MnistSplit, max_steps: int
) -> None:
    """Issue 13: ``nc_max_steps=1`` turned the BadNets model's verdict from backdoored to clean."""
    result = _neural_cleanse_result(badnets.model, mnist, NeuralCleanseConfig(max_steps=max_steps))
    assert result.status is DetectorStatus.ERROR
    assert result.code == "not_converged"
    assert f"max_steps={max_steps}" in (result.detail or "")
    assert not result.flagged_classes
    assert _label(result) is VerdictLabel.INCONCLUSIVE


@pytest.mark.parametrize("max_steps", [2, 30])
def test_clean_model_with_a_step_limit_is_inconclusive_not_backdoored(
    clean_model: nn.Module, mnist: MnistSplit, max_steps: int
) -> None:
    """Issue 13: ``nc_max_steps=2`` on a clean model came back backdoored."""
    result = _neural_cleanse_result(clean_model, mnist, NeuralCleanseConfig(max_steps=max_steps))
    assert result.status is DetectorStatus.ERROR
    assert result.code == "not_converged"
    assert _label(result) is VerdictLabel.INCONCLUSIVE


def test_default_run_converges_and_votes(badnets: BadNetsModel, mnist: MnistSplit) -> None:
    """With the default step limit every class converges and the detector votes (the BadNets target is found)."""
    result = _neural_cleanse_result(badnets.model, mnist, replace(NeuralCleanseConfig(), confirm_rounds=0))
    assert result.status is DetectorStatus.OK, result.detail
    assert result.flagged_classes == (badnets.target,)
    steps = [entry["steps"] for entry in result.details["classes"]]
    assert max(steps) < NeuralCleanseConfig().max_steps
    assert _label(result) is VerdictLabel.BACKDOORED
    assert result.details["screening"] is None  # ten classes are never screened
    assert not any(entry["screened_out"] for entry in result.details["classes"])
    assert result.details["stamped_images"] == sum(steps) * 32


def test_screened_classes_are_reported_untested(badnets: BadNetsModel, mnist: MnistSplit) -> None:
    """A screened run says which classes it tested and against which references; a screened-out class has no index,
    is never flagged and does not make the run unconverged."""
    config = NeuralCleanseConfig(
        screen_above=3, screen_candidates=2, screen_references=5, anomaly_threshold=3.0, confirm_rounds=0
    )
    result = _neural_cleanse_result(badnets.model, mnist, config)
    assert result.status is DetectorStatus.OK, result.detail
    screening = result.details["screening"]
    assert len(screening["reference_classes"]) == 5
    classes = result.details["classes"]
    screened = [entry for entry in classes if entry["screened_out"]]
    assert screening["tested_classes"] == 10 - len(screened) >= 5
    assert all(entry["anomaly_index"] is None and not entry["flagged"] for entry in screened)
    assert all(entry["steps"] == config.screen_steps for entry in screened)
    assert result.flagged_classes == (badnets.target,)
    assert result.details["threshold_rule"] == "fixed"


def test_two_classes_are_too_few_for_the_outlier_test(mnist: MnistSplit) -> None:
    """A median and MAD of two trigger sizes never flag: Neural Cleanse refuses to vote on a binary classifier."""
    binary = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 2)).eval()
    images, labels = mnist.test_images[:40], (mnist.test_labels[:40] % 2)
    with pytest.raises(TooFewClassesError) as raised:
        neural_cleanse(binary, images, labels, 2)
    assert raised.value.code == "too_few_classes"
