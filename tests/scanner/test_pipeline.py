"""A whole scan's bounds: progress (where the service reads cancel requests and its time limit) comes at least
every few seconds in every phase, and the clean samples that Neural Cleanse reads are cut to its sample budget
before they are decoded. Real models trained at test time, real MNIST samples repeated to a large upload."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from scanner.config import ModelOptions, NeuralCleanseConfig, ScanConfig
from scanner.datasets import MnistSplit
from scanner.errors import ScanCancelled
from scanner.pipeline import scan
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


def _config() -> ScanConfig:
    # a short Neural Cleanse (it reports not_converged): the phases, not the verdict, are under test here
    return ScanConfig(
        model=ModelOptions(arch="mnist_cnn"), neural_cleanse=NeuralCleanseConfig(max_steps=100, confirm_rounds=0)
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
    assert {"model_file", "data", "neural_cleanse", "spectral_signatures", "done"} <= stages
    gaps = [(later[0] - earlier[0], f"{earlier[1]}: {earlier[2]}") for earlier, later in itertools.pairwise(calls)]
    longest = max(gaps)
    assert longest[0] < _MOST_SECONDS_WITHOUT_PROGRESS, f"{longest[0]:.1f} s after '{longest[1]}'"
    assert calls[0][0] - started < _MOST_SECONDS_WITHOUT_PROGRESS
    assert verdict.detectors["spectral_signatures"].status.value == "ok"
    assert verdict.detectors["neural_cleanse"].details.get("samples_used", 1000) <= 1000


@pytest.mark.parametrize(
    ("stage", "message"),
    [("data", "samples"), ("neural_cleanse", "attack success"), ("spectral_signatures", "penultimate features")],
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
    if stage != "spectral_signatures":
        assert "spectral_signatures" not in seen
