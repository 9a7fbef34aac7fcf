"""The ``max_margin`` adapter: JSON details and artifacts for people and tools, a skip where it cannot run, an error
(verdict ``inconclusive``) where its statistic cannot decide, and how its vote combines with the other detectors'."""

from __future__ import annotations

import base64
import json

import pytest
import torch
from torch import nn

from scanner.config import MaxMarginConfig, ScanConfig
from scanner.detectors import ScanInputs
from scanner.detectors.max_margin import MAX_MARGIN
from scanner.pipeline import run_detector
from scanner.render.html import render_html
from scanner.render.sarif import sarif_log
from scanner.render.text import render_text
from scanner.verdict import DetectorResult, DetectorStatus, ModelInfo, ScannerInfo, Verdict, VerdictLabel
from tests.factories import BadNetsModel

_CPU = torch.device("cpu")
_PNG = b"\x89PNG\r\n\x1a\n"


def _inputs(model: nn.Module, *, num_classes: int = 10, shape: tuple[int, int, int] | None = (1, 28, 28)) -> ScanInputs:
    return ScanInputs(
        model=model,
        num_classes=num_classes,
        input_shape=shape,
        clean=None,
        training=None,
        config=ScanConfig(max_margin=MaxMarginConfig(steps=150)),
        device=_CPU,
    )


def _verdict(**detectors: DetectorResult) -> Verdict:
    results = {
        "model_file": DetectorResult(status=DetectorStatus.OK),
        "neural_cleanse": DetectorResult.skipped("no clean samples given (data)"),
        "spectral_signatures": DetectorResult.skipped("no training data given (training_data)"),
    }
    results.update(detectors)
    return Verdict(
        detectors=results,
        scanner=ScannerInfo(version="test", torch=torch.__version__, device="cpu", seed=0),
        model=ModelInfo(format="pt2", sha256="0" * 64, size_bytes=1, input_shape=(1, 28, 28), num_classes=10),
    )


@pytest.fixture(scope="module")
def flagged(badnets: BadNetsModel) -> DetectorResult:
    return run_detector(MAX_MARGIN, _inputs(badnets.model), lambda fraction, message: None)


def test_the_backdoor_is_reported_with_its_evidence(flagged: DetectorResult, badnets: BadNetsModel) -> None:
    assert flagged.status is DetectorStatus.OK
    assert flagged.flagged_classes == (badnets.target,)
    details = flagged.to_dict()
    json.dumps(details, allow_nan=False)  # strict JSON
    assert details["largest_class"] == badnets.target
    assert 0.0 < details["p_value"] < details["significance"]
    assert details["null"]["distribution"] == "gamma"
    assert details["null"]["shape"] > 0
    assert 10 * 8 <= details["optimised_images"] <= 10 * 8 * 150
    target = details["classes"][badnets.target]
    assert target["flagged"] is True
    assert target["max_margin"] == max(c["max_margin"] for c in details["classes"])
    assert base64.b64decode(target["input"]["png_base64"]).startswith(_PNG)
    assert target["input"]["shape"] == [1, 28, 28]
    assert all("input" not in c for c in details["classes"] if not c["flagged"])
    for entry in details["classes"]:
        assert flagged.artifacts[entry["artifacts"]["input_png"]].startswith(_PNG)
    assert f"mm-class-{badnets.target}-input.npy" in flagged.artifacts


def test_a_checkpoint_alone_is_backdoored_and_the_reports_say_why(
    flagged: DetectorResult, badnets: BadNetsModel
) -> None:
    verdict = _verdict(max_margin=flagged)
    assert verdict.label is VerdictLabel.BACKDOORED
    assert verdict.flagged_classes == (badnets.target,)
    as_json = verdict.to_dict()
    text = render_text(as_json, "model.pt2")
    assert f"class {badnets.target}: max margin" in text
    assert "p-value" in text
    sarif = sarif_log(as_json, "model.pt2")
    (result,) = sarif["runs"][0]["results"]
    assert result["ruleId"] == "BDS004"
    assert result["properties"]["class"] == badnets.target
    assert result["properties"]["significance"] == as_json["detectors"]["max_margin"]["significance"]
    page = render_html(as_json, flagged.artifacts)
    assert f'id="mm-class-{badnets.target}"' in page
    assert "optimised input" in page
    assert "max margin flagged class" in page


def test_a_clean_checkpoint_alone_is_clean(clean_model: nn.Module) -> None:
    result = run_detector(MAX_MARGIN, _inputs(clean_model), lambda fraction, message: None)
    assert result.status is DetectorStatus.OK
    assert result.flagged_classes == ()
    assert _verdict(max_margin=result).label is VerdictLabel.CLEAN


@pytest.mark.parametrize(
    ("num_classes", "shape", "reason"),
    [(10, None, "input shape is unknown"), (4, (1, 28, 28), "at least 5 classes")],
)
def test_skipped_where_it_cannot_run(num_classes: int, shape: tuple[int, int, int] | None, reason: str) -> None:
    assert reason in (MAX_MARGIN.needs(_inputs(nn.Identity(), num_classes=num_classes, shape=shape)) or "")


class _NaNAwayFromGrey(nn.Module):
    """A hostile model: finite logits on plain inputs, NaN once an input drifts away from uniform grey."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(images)
        spread = (images - 0.5).abs().flatten(1).amax(dim=1, keepdim=True)
        return torch.where(spread > 0.4, torch.full_like(logits, float("nan")), logits)


def test_a_statistic_that_cannot_decide_is_an_error_and_inconclusive(clean_model: nn.Module) -> None:
    result = run_detector(MAX_MARGIN, _inputs(_NaNAwayFromGrey(clean_model)), lambda fraction, message: None)
    assert result.status is DetectorStatus.ERROR
    assert result.code == "undecidable"
    assert _verdict(max_margin=result).label is VerdictLabel.INCONCLUSIVE


def _ok(*classes: int) -> DetectorResult:
    return DetectorResult(status=DetectorStatus.OK, flagged_classes=classes)


@pytest.mark.parametrize(
    ("nc", "mm", "label", "classes"),
    [
        (_ok(3), _ok(3), VerdictLabel.BACKDOORED, (3,)),  # agree
        (_ok(3), _ok(5), VerdictLabel.BACKDOORED, (3, 5)),  # disagree on the class: every flagged class is listed
        (_ok(), _ok(5), VerdictLabel.BACKDOORED, (5,)),  # one finding is enough
        (_ok(3), _ok(), VerdictLabel.BACKDOORED, (3,)),
        (_ok(), _ok(), VerdictLabel.CLEAN, ()),
        (_ok(), DetectorResult.error("undecidable", "x"), VerdictLabel.INCONCLUSIVE, ()),  # an error never votes clean
        (DetectorResult.error("not_converged", "x"), _ok(), VerdictLabel.INCONCLUSIVE, ()),
        (DetectorResult.error("not_converged", "x"), _ok(4), VerdictLabel.BACKDOORED, (4,)),  # a finding stands
        (DetectorResult.skipped("no clean samples given (data)"), _ok(), VerdictLabel.CLEAN, ()),  # clean without data
        (
            DetectorResult.skipped("no clean samples given (data)"),
            DetectorResult.skipped("not requested (detectors option)"),
            VerdictLabel.INCONCLUSIVE,
            (),
        ),
    ],
)
def test_how_the_detectors_combine(
    nc: DetectorResult, mm: DetectorResult, label: VerdictLabel, classes: tuple[int, ...]
) -> None:
    verdict = _verdict(neural_cleanse=nc, max_margin=mm)
    assert verdict.label is label
    assert verdict.flagged_classes == classes
