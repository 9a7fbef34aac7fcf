"""The ``spectral_signatures`` adapter: the JSON details, artifacts and skip reasons of
:func:`scanner.spectral.detect_poisoned_samples`, on the BadNets model trained at test time and a clean one."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from scanner.config import ScanConfig, SpectralConfig
from scanner.detectors import ScanInputs
from scanner.detectors.spectral import SPECTRAL_SIGNATURES
from scanner.errors import UndecidableError
from scanner.loading import Samples
from scanner.pipeline import run_detector
from scanner.testing.mnist import MnistSplit
from scanner.verdict import DetectorResult, DetectorStatus, ModelInfo, ScannerInfo, Verdict, VerdictLabel
from tests.factories import BadNetsModel

CPU = torch.device("cpu")


def _inputs(model: nn.Module, training: Samples | None, config: SpectralConfig | None = None) -> ScanInputs:
    return ScanInputs(
        model=model,
        num_classes=10,
        input_shape=(1, 28, 28),
        clean=None,
        training=training,
        config=ScanConfig(spectral=config or SpectralConfig()),
        device=CPU,
    )


def _run(inputs: ScanInputs, progress: list[tuple[float, str]] | None = None) -> DetectorResult:
    seen = [] if progress is None else progress
    return SPECTRAL_SIGNATURES.run(inputs, lambda fraction, message: seen.append((fraction, message)))


def test_detector_reports_flagged_class_and_capped_suspicious_list(badnets: BadNetsModel) -> None:
    progress: list[tuple[float, str]] = []
    training = Samples(images=badnets.poisoned.images, labels=badnets.poisoned.labels)
    inputs = _inputs(badnets.model, training, SpectralConfig(max_listed=25))
    assert SPECTRAL_SIGNATURES.needs(inputs) is None
    result = _run(inputs, progress)

    assert result.status is DetectorStatus.OK
    assert result.flagged_classes == (badnets.target,)
    verdict = json.loads(json.dumps(result.to_dict()))  # JSON-ready
    assert verdict["flagged_classes"] == [badnets.target]
    entry = next(item for item in verdict["classes"] if item["class"] == badnets.target)
    assert entry["flagged"] is True
    assert entry["score"] > verdict["threshold"]
    assert len(entry["suspicious"]) == 25
    assert entry["suspicious_truncated"] is True
    scores = [item["score"] for item in entry["suspicious"]]
    assert scores == sorted(scores, reverse=True)
    assert 0.4 < entry["estimated_poisoned_fraction"] < 0.6
    assert verdict["estimated_poisoned_samples"] == entry["suspicious_count"]
    assert not any(item["flagged"] for item in verdict["classes"] if item["class"] != badnets.target)

    # The artifact lists every suspicious sample; its indices point into the uploaded training data.
    artifact = json.loads(result.artifacts[verdict["artifacts"]["suspicious_json"]])
    listed = [item["index"] for item in artifact["classes"][str(badnets.target)]]
    assert len(listed) == entry["suspicious_count"]
    assert [item["index"] for item in entry["suspicious"]] == listed[:25]
    poisoned = set(badnets.poisoned.poisoned_indices.tolist())
    assert len(poisoned & set(listed)) >= 0.9 * len(poisoned)

    fractions = [fraction for fraction, _ in progress]
    assert fractions[0] == 0.0
    assert fractions[-1] == 1.0
    assert fractions == sorted(fractions)  # the detector's own share of the bar, from start to end


def test_detector_names_image_paths_of_imagefolder_uploads(badnets: BadNetsModel) -> None:
    images, labels = badnets.poisoned.images, badnets.poisoned.labels
    paths = tuple(f"{int(label)}/{row:05d}.png" for row, label in enumerate(labels))
    result = _run(_inputs(badnets.model, Samples(images=images, labels=labels, paths=paths)))
    entry = next(item for item in result.details["classes"] if item["flagged"])
    assert all(item["path"] == paths[item["index"]] for item in entry["suspicious"])


def test_detector_is_skipped_without_training_data(clean_model: nn.Module) -> None:
    inputs = _inputs(clean_model, None)
    assert SPECTRAL_SIGNATURES.needs(inputs) == "no training data given (training_data)"
    assert _run(inputs).to_dict() == {"status": "skipped", "reason": "no training data given (training_data)"}


def test_detector_needs_three_classes_with_enough_samples(clean_model: nn.Module, mnist: MnistSplit) -> None:
    keep = mnist.train_labels < 2
    training = Samples(images=mnist.train_images[keep], labels=mnist.train_labels[keep])
    reason = SPECTRAL_SIGNATURES.needs(_inputs(clean_model, training))
    assert reason is not None
    assert "at least 3 classes" in reason


def test_unconfirmed_splits_alone_make_the_detector_undecidable_not_clean(source_specific: BadNetsModel) -> None:
    """The source-specific model: classes split by their cover samples, none confirmed by the side test. The detector
    neither flags a wrong class nor says clean: it reports ``undecidable`` and names the classes."""
    training = Samples(images=source_specific.poisoned.images, labels=source_specific.poisoned.labels)
    with pytest.raises(UndecidableError) as raised:
        _run(_inputs(source_specific.model, training))
    assert "source-specific" in raised.value.detail
    assert raised.value.code == "undecidable"

    # through the pipeline's runner it is the detector's error: with another detector clean, the verdict is not clean
    result = run_detector(SPECTRAL_SIGNATURES, _inputs(source_specific.model, training), lambda f, m: None)
    assert result.status is DetectorStatus.ERROR
    assert result.code == "undecidable"
    verdict = Verdict(
        detectors={"spectral_signatures": result, "max_margin": DetectorResult(status=DetectorStatus.OK)},
        scanner=ScannerInfo(version="test", torch=torch.__version__, device="cpu", seed=0),
        model=ModelInfo(format="pt2", sha256="0" * 64, size_bytes=1),
    )
    assert verdict.label is VerdictLabel.INCONCLUSIVE

    # with the confirmation off, the same run flags a class the backdoor does not map to
    loose = _run(_inputs(source_specific.model, training, SpectralConfig(min_persistence_gain=0.0)))
    assert set(loose.flagged_classes) - {source_specific.target}
