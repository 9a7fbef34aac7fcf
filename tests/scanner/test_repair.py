"""Repair by unlearning, on the BadNets ``mnist_cnn`` trained at test time: the backdoor goes, clean accuracy stays;
a checkpoint in, a repaired checkpoint out (both formats), re-scanned; a repair that costs too much is refused."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from scanner.config import MaxMarginConfig, ModelOptions, ScanConfig
from scanner.errors import InvalidDataError, InvalidOptionError, ScanCancelled
from scanner.loading import load_model
from scanner.max_margin import max_margin
from scanner.repair import (
    MIN_SAMPLES,
    REPAIRED_PT2,
    REPAIRED_SAFETENSORS,
    RESCAN_DETECTORS,
    RepairConfig,
    RepairRefusedError,
    RepairUnsupportedError,
    read_triggers,
    repair_checkpoint,
    unlearn,
)
from scanner.testing.mnist import MnistSplit
from scanner.testing.training import accuracy
from scanner.trigger import attack_success_rate
from tests.factories import BadNetsModel, to_uint8, write_npz

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
    shape = tuple(mnist.test_images.shape[1:])
    margins_before = max_margin(badnets.model, 10, shape, MaxMarginConfig(), device=CPU, seed=1)
    assert margins_before.flagged_classes == (badnets.target,)
    cap = float(np.median([m for k, m in enumerate(margins_before.statistics) if k != badnets.target]))

    result = unlearn(
        badnets.model,
        mnist.test_images[given],
        mnist.test_labels[given],
        {badnets.target: badnets.trigger},
        device=CPU,
        seed=0,
        margin_caps={badnets.target: cap},
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
    # the margin term: the largest margin the target reaches on any input, searched from other random starts than
    # the pool's, fell from an outlier to about the other classes' median, and the data-free test flags nothing
    margins_after = max_margin(result.model, 10, shape, MaxMarginConfig(), device=CPU, seed=2)
    assert margins_after.statistics[badnets.target] < 0.5 * margins_before.statistics[badnets.target]
    assert margins_after.statistics[badnets.target] < 1.5 * cap
    assert margins_after.flagged_classes == ()


def test_unlearning_refuses_what_it_cannot_do(mnist: MnistSplit, badnets: BadNetsModel) -> None:
    images, labels = mnist.test_images[:50], mnist.test_labels[:50]
    with pytest.raises(ValueError, match="at least one reversed trigger"):
        unlearn(badnets.model, images, labels, {}, device=CPU)
    with pytest.raises(ValueError, match="cannot be split"):
        unlearn(badnets.model, images[:3], labels[:3], {0: badnets.trigger}, device=CPU)
    for field, value in [("epochs", 0), ("lr", float("nan")), ("stamp_fraction", 1.0), ("distill", -1.0)]:
        with pytest.raises(InvalidOptionError, match=field):
            RepairConfig(**{field: value})


@pytest.fixture(scope="module")
def repair_files(tmp_path_factory: pytest.TempPathFactory, mnist: MnistSplit, badnets: BadNetsModel) -> dict[str, Path]:
    """The BadNets model as a safetensors state_dict (``arch=mnist_cnn``) and 500 clean test images."""
    root = tmp_path_factory.mktemp("repair")
    save_file(badnets.model.state_dict(), str(root / "badnets.safetensors"))
    write_npz(root / "clean.npz", to_uint8(mnist.test_images[:500]), mnist.test_labels[:500].numpy())
    return {"model": root / "badnets.safetensors", "data": root / "clean.npz"}


STATE_DICT = ScanConfig(model=ModelOptions(arch="mnist_cnn", num_classes=10))


def test_a_repaired_checkpoint_is_given_back_in_both_formats_and_scans_clean(
    tmp_path: Path, mnist: MnistSplit, badnets: BadNetsModel, repair_files: dict[str, Path]
) -> None:
    # a class flagged with no trigger given (by the data-free test, say): the repair reverses it itself
    stages: list[str] = []
    report = repair_checkpoint(
        repair_files["model"],
        repair_files["data"],
        {},
        tmp_path / "out",
        classes=[badnets.target],
        scan_config=STATE_DICT,
        device=CPU,
        progress=lambda fraction, stage, message: stages.append(stage),
    )

    assert report.files == (REPAIRED_PT2, REPAIRED_SAFETENSORS)
    exported = load_model(tmp_path / "out" / REPAIRED_PT2, ModelOptions(), CPU).module
    weights = load_model(tmp_path / "out" / REPAIRED_SAFETENSORS, STATE_DICT.model, CPU).module
    unseen_images, unseen_labels = mnist.test_images[500:], mnist.test_labels[500:]
    assert torch.allclose(exported(unseen_images[:64]), weights(unseen_images[:64]), atol=1e-4)
    asr = attack_success_rate(exported, unseen_images, unseen_labels, badnets.trigger, badnets.target, device=CPU)
    assert asr < 0.1
    drop = accuracy(badnets.model, unseen_images, unseen_labels, device=CPU) - accuracy(
        exported, unseen_images, unseen_labels, device=CPU
    )
    assert drop <= 0.03
    # the re-scan (Neural Cleanse on the given samples, and the data-free test) of the saved file flags nothing
    assert report.repaired
    assert report.rescan.label.value == "clean"
    assert set(report.rescan.detectors) >= set(RESCAN_DETECTORS)
    assert report.rescan.detectors["spectral_signatures"].status.value == "skipped"
    assert stages[0] == "loading"
    assert {"margins", "reversing", "unlearning", "rescan"} <= set(stages)
    assert stages[-1] == "done"
    summary = report.to_dict()
    assert summary["classes"] == [badnets.target]
    assert summary["samples"] == {"fine_tuning": 350, "held_out": 150}
    assert summary["trigger_attack_success_rate"][str(badnets.target)]["before"] >= 0.9
    assert summary["trigger_attack_success_rate"][str(badnets.target)]["after"] < 0.1
    assert summary["clean_accuracy"]["max_drop"] == RepairConfig().max_accuracy_drop
    assert summary["rescan"]["verdict"] == "clean"
    json.dumps(summary)  # JSON-ready


def test_a_repair_that_costs_too_much_accuracy_is_refused_with_its_numbers(
    tmp_path: Path, badnets: BadNetsModel, repair_files: dict[str, Path]
) -> None:
    # a learning rate 100x the default wrecks the model: the held-out check catches it, nothing is written
    reckless = RepairConfig(lr=0.3, epochs=3, distill=0.0, rounds=1)
    with pytest.raises(RepairRefusedError, match=r"held-out clean accuracy \(\d+\.\d% -> \d+\.\d% on 150 samples\)"):
        repair_checkpoint(
            repair_files["model"],
            repair_files["data"],
            {badnets.target: badnets.trigger},
            tmp_path / "out",
            scan_config=STATE_DICT,
            config=reckless,
            device=CPU,
        )
    assert not (tmp_path / "out" / REPAIRED_PT2).exists()


def test_triggers_are_read_only_from_sound_arrays(tmp_path: Path) -> None:
    good = {"mask": np.full((4, 4), 0.5, np.float32), "pattern": np.ones((1, 4, 4), np.float32)}

    def files(**arrays: np.ndarray) -> dict[str, bytes]:
        out = {}
        for kind, array in {**good, **arrays}.items():
            buffer = io.BytesIO()
            np.save(buffer, array)
            out[f"nc-class-3-{kind}.npy"] = buffer.getvalue()
        return out

    triggers = read_triggers([3], files().__getitem__)
    assert torch.equal(triggers[3].mask, torch.full((4, 4), 0.5))
    nan = np.full((4, 4), np.nan, np.float32)
    for bad in ({"mask": nan}, {"pattern": np.full((1, 4, 4), 2.0, np.float32)}, {"mask": np.ones((3, 4), np.float32)}):
        with pytest.raises(RepairUnsupportedError, match="class 3"):
            read_triggers([3], files(**bad).__getitem__)
    with pytest.raises(RepairUnsupportedError, match="class 4"):
        read_triggers([4], files().__getitem__)  # missing
    pickled = io.BytesIO()
    np.save(pickled, np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(RepairUnsupportedError, match="class 3"):
        read_triggers([3], {**files(), "nc-class-3-mask.npy": pickled.getvalue()}.__getitem__)


def test_a_repair_without_a_trigger_is_refused(tmp_path: Path, repair_files: dict[str, Path]) -> None:
    with pytest.raises(RepairUnsupportedError, match="nothing to unlearn"):
        repair_checkpoint(repair_files["model"], repair_files["data"], {}, tmp_path, scan_config=STATE_DICT, device=CPU)


def test_a_repair_needs_enough_clean_samples(
    tmp_path: Path, mnist: MnistSplit, badnets: BadNetsModel, repair_files: dict[str, Path]
) -> None:
    few = write_npz(
        tmp_path / "few.npz", to_uint8(mnist.test_images[: MIN_SAMPLES - 1]), mnist.test_labels[: MIN_SAMPLES - 1]
    )
    with pytest.raises(InvalidDataError, match=f"at least {MIN_SAMPLES} clean samples"):
        repair_checkpoint(
            repair_files["model"], few, {badnets.target: badnets.trigger}, tmp_path, scan_config=STATE_DICT, device=CPU
        )


@pytest.mark.parametrize("stage", ["unlearning", "rescan"])
def test_a_repair_stops_at_its_next_progress_point(
    stage: str, tmp_path: Path, badnets: BadNetsModel, repair_files: dict[str, Path]
) -> None:
    """A cancel (the progress callback raising) stops the repair within a batch or a re-scan step, nothing kept."""
    calls: list[str] = []

    def progress(fraction: float, current: str, message: str) -> None:
        calls.append(current)
        if current == stage:
            raise ScanCancelled("cancelled by request")

    with pytest.raises(ScanCancelled):
        repair_checkpoint(
            repair_files["model"],
            repair_files["data"],
            {badnets.target: badnets.trigger},
            tmp_path / "out",
            scan_config=STATE_DICT,
            device=CPU,
            progress=progress,
        )
    assert calls[-1] == stage
    assert "done" not in calls
