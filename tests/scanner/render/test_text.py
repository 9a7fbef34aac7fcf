"""The one text renderer, used by ``backdoor-scan scan`` (a local verdict) and ``submit`` (the server's result)."""

from __future__ import annotations

from scanner.render.text import render_text


def _verdict() -> dict[str, object]:
    return {
        "verdict": "backdoored",
        "flagged_classes": [0],
        "model": {
            "format": "pt2",
            "sha256": "ab" * 32,
            "size_bytes": 1234,
            "num_classes": 10,
            "input_shape": [1, 28, 28],
        },
        "detectors": {
            "model_file": {"status": "ok", "findings": []},
            "neural_cleanse": {
                "status": "ok",
                "flagged_classes": [0],
                "threshold": 2.5,
                "classes": [
                    {"class": 0, "flagged": True, "anomaly_index": 4.1, "mask_l1": 9.0, "attack_success_rate": 1.0},
                    {"class": 1, "flagged": False, "anomaly_index": 0.2, "mask_l1": 40.0, "attack_success_rate": 0.99},
                ],
            },
            "spectral_signatures": {"status": "skipped", "reason": "no training data given (training_data)"},
        },
    }


def test_text_report_names_the_verdict_the_model_and_each_flagged_class() -> None:
    lines = render_text(_verdict(), "model.pt2").splitlines()
    assert lines[0] == "model.pt2: BACKDOORED (flagged classes: 0)"
    assert lines[1] == "  format pt2, sha256 abababababababab, 1234 bytes, 10 classes, input 1x28x28"
    assert "  neural_cleanse: ok, flagged classes 0" in lines
    assert "    - class 0: anomaly index 4.1 (threshold 2.5), trigger L1 9.0, attack success 1.0" in lines
    assert not any(line.startswith("    - class 1") for line in lines)
    assert "  spectral_signatures: skipped (no training data given (training_data))" in lines


def test_text_report_of_a_refusal_says_the_file_was_never_loaded() -> None:
    refused = {
        "verdict": "unsafe_file",
        "problem": {"code": "unsafe_file"},
        "detectors": {
            "model_file": {
                "status": "ok",
                "findings": [{"member": "archive/data.pkl", "globals": ["os.system"], "message": "not allowed"}],
            }
        },
    }
    lines = render_text(refused, "evil.pt").splitlines()
    assert lines[0] == "evil.pt: UNSAFE_FILE"
    assert "  refused by the server before scanning: the file was never loaded" in lines
    assert "    - archive/data.pkl: os.system: not allowed" in lines


def test_text_report_gives_the_z_of_the_class_that_carries_it() -> None:
    verdict = _verdict()
    nc = verdict["detectors"]["neural_cleanse"]  # type: ignore[index]
    nc["classes"][0]["z_test"] = {"z": 5.2, "threshold": 3.61}
    lines = render_text(verdict, "model.pt2").splitlines()
    expected = "anomaly index 4.1 (threshold 2.5), z 5.2 (threshold 3.61), trigger L1 9.0, attack success 1.0"
    assert f"    - class 0: {expected}" in lines


def test_text_report_says_which_spectral_splits_the_side_test_did_not_confirm() -> None:
    verdict = _verdict()
    detectors = verdict["detectors"]
    assert isinstance(detectors, dict)
    detectors["spectral_signatures"] = {
        "status": "ok",
        "flagged_classes": [7],
        "threshold": 2.0,
        "classes": [
            {"class": 1, "flagged": False, "score": 4.08, "unconfirmed": True,
             "trigger_persistence": {"suspicious": 0.19, "rest": 0.11}},
            {"class": 7, "flagged": True, "score": 2.5, "suspicious_count": 40},
            {"class": 8, "flagged": False, "score": 1.1},
        ],
    }  # fmt: skip
    lines = render_text(verdict, "model.pt2").splitlines()
    assert "    - class 7: score 2.5 (threshold 2.0), 40 suspicious samples" in lines
    assert (
        "    - class 1: split (score 4.08) but unconfirmed: suspected members keep the class under blending 0.19, "
        "the rest 0.11"
    ) in lines
    assert not any(line.startswith("    - class 8") for line in lines)
