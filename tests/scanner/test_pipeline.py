"""``scanner.scan()`` end to end: a real BadNets model trained at test time is reported ``backdoored`` and a clean
one ``clean``; the detectors share the progress bar by the pipeline's budget; a crashing detector costs only its
own entry. A whole scan's bounds: progress (where the service reads cancel requests and its time limit) comes at
least every few seconds in every phase, and the clean samples that Neural Cleanse reads are cut to its sample
budget before they are decoded. Real MNIST samples, repeated to a large upload."""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from scanner.config import MaxMarginConfig, ModelOptions, NeuralCleanseConfig, ScanConfig
from scanner.detectors import Detector, DetectorProgress, ScanInputs
from scanner.errors import ScanCancelled
from scanner.pipeline import scan
from scanner.testing.mnist import MnistSplit
from scanner.verdict import DetectorResult, DetectorStatus, VerdictLabel
from tests.factories import BadNetsModel, to_uint8, write_npz

_CPU = torch.device("cpu")
#: the largest pause between two progress calls that a cancel or the time limit may wait for (on 2 busy cores)
_MOST_SECONDS_WITHOUT_PROGRESS = 3.0


@pytest.fixture(scope="module")
def model_file(badnets: BadNetsModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pipeline") / "badnets.safetensors"
    save_file(badnets.model.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def large_set(mnist: MnistSplit, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24,000 real MNIST samples (the test split repeated, shuffled), as an .npz."""
    count = 24_000
    repeats = -(-count // len(mnist.test_labels))
    order = np.random.default_rng(0).permutation(count)
    x = np.tile(to_uint8(mnist.test_images), (repeats, 1, 1, 1))[:count][order]
    y = np.tile(mnist.test_labels.numpy(), repeats)[:count][order]
    return write_npz(tmp_path_factory.mktemp("pipeline") / "large.npz", x, y, compressed=True)


@pytest.fixture(scope="module")
def poisoned_training_set(badnets: BadNetsModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The BadNets model's own (poisoned) training set, as uploaded."""
    path = tmp_path_factory.mktemp("pipeline") / "training.npz"
    return write_npz(path, to_uint8(badnets.poisoned.images), badnets.poisoned.labels.numpy())


@pytest.fixture(scope="module")
def clean_training_set(mnist: MnistSplit, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pipeline") / "clean-training.npz"
    return write_npz(path, to_uint8(mnist.train_images), mnist.train_labels.numpy())


def _spectral_only() -> ScanConfig:
    return ScanConfig(model=ModelOptions(arch="mnist_cnn"), detectors=("spectral_signatures",))


def test_scan_reports_the_backdoored_model_and_what_it_scanned(model_file: Path, poisoned_training_set: Path) -> None:
    stages: list[tuple[float, str]] = []
    verdict = scan(
        model_file,
        _spectral_only(),
        _CPU,
        training_data_path=poisoned_training_set,
        progress=lambda fraction, stage, message: stages.append((fraction, stage)),
    )

    assert verdict.label is VerdictLabel.BACKDOORED
    assert verdict.flagged_classes == (0,)
    assert verdict.detectors["model_file"].status is DetectorStatus.OK
    assert verdict.detectors["neural_cleanse"].reason == "not requested (detectors option)"
    assert verdict.detectors["spectral_signatures"].flagged_classes == (0,)
    content = model_file.read_bytes()
    assert verdict.model.sha256 == hashlib.sha256(content).hexdigest()
    assert verdict.model.size_bytes == len(content)
    assert verdict.model.format == "safetensors"
    assert verdict.model.num_classes == 10
    assert verdict.model.input_shape == (1, 28, 28)
    fractions = [fraction for fraction, _ in stages]
    assert fractions == sorted(fractions)
    assert stages[-1] == (1.0, "done")
    assert [stage for stage in dict.fromkeys(stage for _, stage in stages)] == [
        "model_file",
        "data",
        "spectral_signatures",
        "done",
    ]


def test_scan_reports_the_clean_model_clean(clean_model: nn.Module, clean_training_set: Path, tmp_path: Path) -> None:
    path = tmp_path / "clean.safetensors"
    save_file(clean_model.state_dict(), str(path))
    verdict = scan(path, _spectral_only(), _CPU, training_data_path=clean_training_set)
    assert verdict.label is VerdictLabel.CLEAN
    assert verdict.flagged_classes == ()


@pytest.mark.parametrize("backdoored", [True, False])
def test_a_checkpoint_alone_gets_a_verdict(
    model_file: Path, clean_model: nn.Module, badnets: BadNetsModel, tmp_path: Path, backdoored: bool
) -> None:
    """Issue 16: without data both data-driven detectors are skipped, and the data-free test decides."""
    path = model_file
    if not backdoored:
        path = tmp_path / "clean.safetensors"
        save_file(clean_model.state_dict(), str(path))
    config = ScanConfig(model=ModelOptions(arch="mnist_cnn"), max_margin=MaxMarginConfig(steps=150))
    verdict = scan(path, config, _CPU)
    assert verdict.detectors["neural_cleanse"].reason == "no clean samples given (data)"
    assert verdict.detectors["spectral_signatures"].status is DetectorStatus.SKIPPED
    assert verdict.detectors["max_margin"].status is DetectorStatus.OK
    if backdoored:
        assert verdict.label is VerdictLabel.BACKDOORED
        assert verdict.flagged_classes == (badnets.target,)
    else:
        assert verdict.label is VerdictLabel.CLEAN


def test_without_data_and_without_the_data_free_test_nothing_decides(model_file: Path) -> None:
    config = ScanConfig(model=ModelOptions(arch="mnist_cnn"), detectors=("neural_cleanse", "spectral_signatures"))
    verdict = scan(model_file, config, _CPU)
    assert verdict.detectors["max_margin"].reason == "not requested (detectors option)"
    assert verdict.label is VerdictLabel.INCONCLUSIVE


def _fake(name: str, share: float, run: Callable[[ScanInputs, DetectorProgress], DetectorResult]) -> Detector:
    return Detector(name, share, lambda inputs: None, run)


def _reports_its_range(inputs: ScanInputs, progress: DetectorProgress) -> DetectorResult:
    progress(0.0, "start")
    progress(1.0, "end")
    return DetectorResult(status=DetectorStatus.OK)


def _crashes(inputs: ScanInputs, progress: DetectorProgress) -> DetectorResult:
    raise RuntimeError("a detector bug")


@pytest.mark.parametrize(
    ("requested", "ranges"),
    [
        (
            ("neural_cleanse", "spectral_signatures"),
            {"neural_cleanse": (0.1, 0.775), "spectral_signatures": (0.775, 1.0)},
        ),
        (("spectral_signatures",), {"spectral_signatures": (0.1, 1.0)}),
    ],
)
def test_detectors_that_run_share_the_progress_bar_by_their_share(
    model_file: Path,
    poisoned_training_set: Path,
    monkeypatch: pytest.MonkeyPatch,
    requested: tuple[str, ...],
    ranges: dict[str, tuple[float, float]],
) -> None:
    registry = (_fake("neural_cleanse", 3.0, _reports_its_range), _fake("spectral_signatures", 1.0, _reports_its_range))
    monkeypatch.setattr("scanner.pipeline.DETECTORS", registry)
    seen: dict[str, list[float]] = {}
    config = ScanConfig(model=ModelOptions(arch="mnist_cnn"), detectors=requested)
    scan(
        model_file,
        config,
        _CPU,
        training_data_path=poisoned_training_set,
        progress=lambda fraction, stage, message: seen.setdefault(stage, []).append(fraction),
    )
    for name, (start, end) in ranges.items():
        assert seen[name] == [pytest.approx(start), pytest.approx(end)]
    assert set(seen) - set(ranges) == {"model_file", "data", "done"}


def test_a_crashing_detector_costs_only_its_own_entry(
    model_file: Path, poisoned_training_set: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = (_fake("neural_cleanse", 1.0, _crashes), _fake("spectral_signatures", 1.0, _reports_its_range))
    monkeypatch.setattr("scanner.pipeline.DETECTORS", registry)
    config = ScanConfig(model=ModelOptions(arch="mnist_cnn"))
    verdict = scan(model_file, config, _CPU, training_data_path=poisoned_training_set)
    crashed = verdict.detectors["neural_cleanse"]
    assert crashed.status is DetectorStatus.ERROR
    assert crashed.code == "detector_crashed"
    assert crashed.detail == "RuntimeError: a detector bug"
    assert verdict.detectors["spectral_signatures"].status is DetectorStatus.OK
    assert verdict.label is VerdictLabel.INCONCLUSIVE


def _config() -> ScanConfig:
    # a short Neural Cleanse (it reports not_converged): the phases, not the verdict, are under test here
    return ScanConfig(
        model=ModelOptions(arch="mnist_cnn"),
        neural_cleanse=NeuralCleanseConfig(max_steps=100, confirm_rounds=0),
        max_margin=MaxMarginConfig(steps=40),
    )


def test_progress_comes_every_few_seconds_in_every_phase(model_file: Path, large_set: Path) -> None:
    """Issue 13: a cancel waited 106 s (20k samples) and over 300 s (200k) in phases that reported no progress."""
    calls: list[tuple[float, str, str]] = []

    def progress(fraction: float, stage: str, message: str) -> None:
        calls.append((time.monotonic(), stage, message))

    started = time.monotonic()
    verdict = scan(model_file, _config(), _CPU, data_path=large_set, training_data_path=large_set, progress=progress)
    calls.append((time.monotonic(), "returned", ""))

    stages = {stage for _, stage, _ in calls}
    assert {"model_file", "data", "neural_cleanse", "spectral_signatures", "max_margin", "done"} <= stages
    gaps = [(later[0] - earlier[0], f"{earlier[1]}: {earlier[2]}") for earlier, later in itertools.pairwise(calls)]
    longest = max(gaps)
    assert longest[0] < _MOST_SECONDS_WITHOUT_PROGRESS, f"{longest[0]:.1f} s after '{longest[1]}'"
    assert calls[0][0] - started < _MOST_SECONDS_WITHOUT_PROGRESS
    assert verdict.detectors["spectral_signatures"].status.value == "ok"
    assert verdict.detectors["neural_cleanse"].details.get("samples_used", 1000) <= 1000


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ("data", "samples"),
        ("neural_cleanse", "attack success"),
        ("spectral_signatures", "penultimate features"),
        ("max_margin", "class margins"),
    ],
)
def test_a_cancel_stops_the_scan_in_each_phase(model_file: Path, large_set: Path, stage: str, message: str) -> None:
    seen: list[str] = []

    def progress(fraction: float, now_stage: str, now_message: str) -> None:
        seen.append(now_stage)
        if now_stage == stage and message in now_message:
            raise ScanCancelled("cancelled by request")

    with pytest.raises(ScanCancelled):
        scan(model_file, _config(), _CPU, data_path=large_set, training_data_path=large_set, progress=progress)
    assert seen[-1] == stage
    if stage not in ("spectral_signatures", "max_margin"):
        assert "spectral_signatures" not in seen
    if stage != "max_margin":
        assert "max_margin" not in seen
