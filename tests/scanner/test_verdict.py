from __future__ import annotations

import json

import pytest

from scanner.verdict import (
    DetectorResult,
    DetectorStatus,
    ModelInfo,
    ScannerInfo,
    Verdict,
    VerdictLabel,
    reversed_trigger_classes,
)

SCANNER = ScannerInfo(version="0.1.0", torch="2.14.1", device="cpu", seed=0)
MODEL = ModelInfo(format="pt2", sha256="ab" * 32, size_bytes=10, input_shape=(1, 28, 28), num_classes=10)
FILE_OK = DetectorResult(status=DetectorStatus.OK, details={"format": "pt2", "pickles_scanned": 2})
FILE_UNSAFE = DetectorResult(
    status=DetectorStatus.OK, findings=({"member": "data.pkl", "globals": ["posix.system"], "message": "bad"},)
)
NC_CLEAN = DetectorResult(status=DetectorStatus.OK, details={"threshold": 2.0, "classes": []})
NC_FLAG = DetectorResult(status=DetectorStatus.OK, flagged_classes=(3,), details={"threshold": 2.0})
SS_FLAG = DetectorResult(status=DetectorStatus.OK, flagged_classes=(3, 1))
SKIP = DetectorResult.skipped("no clean samples given (data)")
BROKEN = DetectorResult.error("detector_crashed", "RuntimeError: boom", duration_s=0.5)


def verdict(**detectors: DetectorResult) -> Verdict:
    return Verdict(detectors=detectors, scanner=SCANNER, model=MODEL)


@pytest.mark.parametrize(
    ("detectors", "label"),
    [
        ({"model_file": FILE_UNSAFE, "neural_cleanse": NC_FLAG}, VerdictLabel.UNSAFE_FILE),
        ({"model_file": FILE_OK, "neural_cleanse": NC_FLAG, "spectral_signatures": SKIP}, VerdictLabel.BACKDOORED),
        ({"model_file": FILE_OK, "neural_cleanse": NC_CLEAN, "spectral_signatures": SKIP}, VerdictLabel.CLEAN),
        ({"model_file": FILE_OK, "neural_cleanse": SKIP, "spectral_signatures": SKIP}, VerdictLabel.INCONCLUSIVE),
        ({"model_file": FILE_OK, "neural_cleanse": NC_CLEAN, "spectral_signatures": BROKEN}, VerdictLabel.INCONCLUSIVE),
        ({"model_file": FILE_OK, "neural_cleanse": BROKEN, "spectral_signatures": SS_FLAG}, VerdictLabel.BACKDOORED),
    ],
)
def test_verdict_label_from_detectors(detectors: dict[str, DetectorResult], label: VerdictLabel) -> None:
    result = verdict(**detectors)
    assert result.label is label
    assert result.has_findings == (label in (VerdictLabel.BACKDOORED, VerdictLabel.UNSAFE_FILE))


def test_verdict_to_dict_matches_schema() -> None:
    result = verdict(model_file=FILE_OK, neural_cleanse=NC_FLAG, spectral_signatures=SS_FLAG)
    out = json.loads(json.dumps(result.to_dict()))  # JSON-ready all the way down
    assert out["verdict"] == "backdoored"
    assert out["flagged_classes"] == [1, 3]
    assert out["errors"] == []
    assert out["detectors"]["model_file"] == {
        "status": "ok",
        "flagged_classes": [],
        "findings": [],
        "format": "pt2",
        "pickles_scanned": 2,
    }
    assert out["detectors"]["neural_cleanse"]["flagged_classes"] == [3]
    assert out["detectors"]["neural_cleanse"]["threshold"] == 2.0
    assert out["scanner"] == {"version": "0.1.0", "torch": "2.14.1", "device": "cpu", "seed": 0}
    assert out["model"]["input_shape"] == [1, 28, 28]


def test_verdict_errors_channel_lists_crashed_detectors() -> None:
    out = verdict(model_file=FILE_OK, neural_cleanse=BROKEN, spectral_signatures=SKIP).to_dict()
    assert out["errors"] == [{"detector": "neural_cleanse", "code": "detector_crashed", "detail": "RuntimeError: boom"}]
    assert out["detectors"]["neural_cleanse"] == {
        "status": "error",
        "code": "detector_crashed",
        "detail": "RuntimeError: boom",
        "duration_s": 0.5,
    }
    assert out["detectors"]["spectral_signatures"] == {"status": "skipped", "reason": "no clean samples given (data)"}


def test_detector_artifacts_are_not_in_json() -> None:
    result = DetectorResult(status=DetectorStatus.OK, artifacts={"nc-class-0-mask.npy": b"\x93NUMPY"})
    assert "artifacts" not in result.to_dict()


def test_reversed_trigger_classes_leave_out_screened_out_classes_and_undecided_runs() -> None:
    entries = [
        {"class": 0, "screened_out": False},
        {"class": 1, "screened_out": True},  # a many-class scan stopped it after the screen
        {"class": 2},
        {"class": "3"},  # not a class number
        "junk",
    ]
    assert reversed_trigger_classes("ok", entries) == {0, 2}
    assert reversed_trigger_classes("error", entries) == set()
    assert reversed_trigger_classes("ok", None) == set()
    assert reversed_trigger_classes("ok", {"class": 0}) == set()
