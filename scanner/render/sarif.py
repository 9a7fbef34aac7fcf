"""SARIF 2.1.0 rendering of a verdict, for code-scanning dashboards (GitHub code scanning, GitLab, Azure DevOps).

:func:`sarif_log` is a pure function: the verdict dict (``Verdict.to_dict()``, or the ``result`` of a scan
resource) and the model path in, a SARIF log dict out. A server's ``422 unsafe_file`` refusal (a problem+json
body with ``findings``) is accepted in place of a verdict: its findings are the ``model_file`` detector's.

One result per flagged class per detector and one per unsafe finding, all ``level: error`` and located at the
model file. Rules:

==========  ================================================================================
``BDS001``  backdoor target class: Neural Cleanse reversed an abnormally small trigger for the class
``BDS002``  poisoned training samples: spectral signatures split the class into two populations
``BDS003``  unsafe file content: a pickle global outside the allowlist, native code, an unsafe program
``BDS004``  backdoor target class found without data: the class reaches an abnormally large logit margin
==========  ================================================================================

Detector errors (a verdict that is ``inconclusive`` because a detector crashed) are tool execution
notifications of the run's invocation, not results: they say the scan is incomplete, not that the model is bad.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import quote

from scanner._version import __version__

__all__ = ["RULES", "SARIF_SCHEMA_URI", "SARIF_VERSION", "sarif_log", "verdict_from_problem"]

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA_URI = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
TOOL_NAME = "backdoor-scan"

_NEURAL_CLEANSE = "BDS001"
_SPECTRAL = "BDS002"
_UNSAFE = "BDS003"
_MAX_MARGIN = "BDS004"

#: The rules of the tool driver, in ``ruleIndex`` order.
RULES: tuple[dict[str, Any], ...] = (
    {
        "id": _NEURAL_CLEANSE,
        "name": "BackdoorTargetClass",
        "shortDescription": {"text": "Backdoor target class (Neural Cleanse)"},
        "fullDescription": {
            "text": "Neural Cleanse reverse-engineered, for this class, a trigger far smaller than for the other"
            " classes (an outlier by the MAD anomaly index): a small patch sends most inputs to this class,"
            " which is what a backdoor (e.g. a BadNets sticker) does."
        },
        "help": {
            "text": "Do not deploy this model. Retrain it on data you trust, or inspect the recovered trigger"
            " mask and pattern (the scan's artifacts) to find the poisoned training samples."
        },
        "defaultConfiguration": {"level": "error"},
        "properties": {"tags": ["security", "backdoor", "neural-cleanse"], "security-severity": "9.0"},
    },
    {
        "id": _SPECTRAL,
        "name": "PoisonedTrainingSamples",
        "shortDescription": {"text": "Poisoned training samples (spectral signatures)"},
        "fullDescription": {
            "text": "Spectral signatures found two separate populations in the model's features of this class's"
            " training samples, and the model treats one of them as carrying a trigger: the training set was"
            " likely poisoned to plant a backdoor targeting this class."
        },
        "help": {
            "text": "Do not deploy this model. Remove the suspicious samples listed in the scan (the"
            " spectral-suspicious.json artifact lists them all) and retrain."
        },
        "defaultConfiguration": {"level": "error"},
        "properties": {"tags": ["security", "backdoor", "data-poisoning"], "security-severity": "8.0"},
    },
    {
        "id": _UNSAFE,
        "name": "UnsafeFileContent",
        "shortDescription": {"text": "Unsafe pickle global or unsafe file content"},
        "fullDescription": {
            "text": "Loading this checkpoint would import globals outside PyTorch's weights-only allowlist, load"
            " native code, or evaluate an unsafe program: opening the file can run arbitrary code. The file"
            " was not loaded and not scanned for backdoors."
        },
        "help": {
            "text": "Do not load this file. Ask for the weights as a safetensors state_dict or a torch.export"
            " archive (.pt2) instead of a pickled object."
        },
        "defaultConfiguration": {"level": "error"},
        "properties": {
            "tags": ["security", "unsafe-deserialization", "external/cwe/cwe-502"],
            "security-severity": "9.8",
        },
    },
)
RULES += (
    {
        "id": _MAX_MARGIN,
        "name": "BackdoorTargetClassDataFree",
        "shortDescription": {"text": "Backdoor target class (maximum margin, no data needed)"},
        "fullDescription": {
            "text": "Optimising inputs to favour each class, this class reached a logit margin over the others far"
            " larger than any other class did (the maximum-margin statistic of MM-BD; its order-statistic p-value"
            " under a Gamma null fitted to the other classes is below the significance): some input feature"
            " overrides everything else and sends the model to this class, which is what a backdoor trigger does."
        },
        "help": {
            "text": "Do not deploy this model. Look at the optimised input (the scan's artifacts) for a trigger, and"
            " scan again with clean samples (data) so that Neural Cleanse recovers the trigger itself."
        },
        "defaultConfiguration": {"level": "error"},
        "properties": {"tags": ["security", "backdoor", "data-free"], "security-severity": "9.0"},
    },
)
_RULE_INDEX = {rule["id"]: index for index, rule in enumerate(RULES)}

#: Per-class numbers copied into a result's ``properties``, by detector.
_CLASS_NUMBERS = {
    "neural_cleanse": ("mask_l1", "anomaly_index", "anomaly_index_l1", "attack_success_rate", "steps"),
    "spectral_signatures": ("samples", "separation", "score", "estimated_poisoned_fraction", "suspicious_count"),
    "max_margin": ("max_margin", "p_value"),
}


def verdict_from_problem(
    problem: Mapping[str, Any], model_sha256: str | None = None, size_bytes: int | None = None
) -> dict[str, Any]:
    """A verdict dict for a server's ``422 unsafe_file`` refusal: ``unsafe_file``, the problem's findings as the
    ``model_file`` detector's, and the problem itself under ``problem`` (the model was never scanned further)."""
    findings = [dict(finding) for finding in problem.get("findings") or ()]
    model_format = problem.get("format")
    return {
        "verdict": "unsafe_file",
        "flagged_classes": [],
        "detectors": {
            "model_file": {"status": "ok", "flagged_classes": [], "findings": findings, "format": model_format},
        },
        "errors": [],
        "model": {
            "format": model_format,
            "sha256": model_sha256,
            "size_bytes": size_bytes,
            "input_shape": None,
            "num_classes": None,
        },
        "problem": dict(problem),
    }


def _artifact_uri(model_path: PurePath, base: Path | None) -> str:
    """The model's URI: relative (to ``base``, or as given) when it does not climb out, else a ``file:`` URI."""
    path = Path(model_path)
    if base is not None:
        try:
            relative = path.resolve().relative_to(base.resolve())
        except ValueError:
            return path.resolve().as_uri()
        return quote(relative.as_posix(), safe="/")
    if path.is_absolute():
        return path.as_uri()
    normalized = posixpath.normpath(path.as_posix())
    if normalized == ".." or normalized.startswith("../"):
        return path.resolve().as_uri()
    return quote(normalized, safe="/")


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).hexdigest()


def _flagged_entries(detector: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The per-class entries of the flagged classes (a bare ``{"class": k}`` where the detector lists none)."""
    classes = [entry for entry in detector.get("classes") or () if isinstance(entry, Mapping)]
    by_class = {entry.get("class"): entry for entry in classes}
    flagged = [k for k in detector.get("flagged_classes") or () if isinstance(k, int)]
    flagged += [entry["class"] for entry in classes if entry.get("flagged") and entry.get("class") not in flagged]
    return [by_class.get(k, {"class": k}) for k in flagged]


def _fmt(value: object, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _nc_message(entry: Mapping[str, Any], threshold: object) -> str:
    text = f"Class {entry.get('class')} looks like a backdoor target: Neural Cleanse reversed a trigger"
    if _number(entry.get("mask_l1")) is not None:
        text += f" of L1 norm {_fmt(entry['mask_l1'])}"
    if _number(entry.get("attack_success_rate")) is not None:
        text += f" that sends {100 * float(entry['attack_success_rate']):.1f}% of other classes' samples to it"
    reasons = []
    index = _number(entry.get("anomaly_index"))
    if index is not None:
        limit = _number(threshold)
        above = limit is not None and index > limit
        reasons.append(
            f"anomaly index {_fmt(entry['anomaly_index'])}" + (f" > threshold {_fmt(threshold)}" if above else "")
        )
    z_test = entry.get("z_test")
    if isinstance(z_test, Mapping) and _number(z_test.get("z")) is not None:
        z, z_limit = _number(z_test.get("z")), _number(z_test.get("threshold"))
        above = z is not None and z_limit is not None and z > z_limit
        reasons.append(
            f"z {_fmt(z_test['z'])}"
            + (f" > threshold {_fmt(z_test['threshold'])}" if above else "")
            + " below the other classes"
        )
    if reasons:
        text += f" ({'; '.join(reasons)})"
    return text + "."


def _spectral_message(entry: Mapping[str, Any], threshold: object) -> str:
    text = f"Class {entry.get('class')} has poisoned training samples (spectral signatures"
    if _number(entry.get("score")) is not None:
        text += f": separation score {_fmt(entry['score'])}"
        text += f" > threshold {_fmt(threshold)}" if _number(threshold) is not None else ""
    text += ")"
    if _number(entry.get("suspicious_count")) is not None:
        text += f"; {entry['suspicious_count']} suspicious sample(s)"
        if _number(entry.get("estimated_poisoned_fraction")) is not None:
            text += f", about {100 * float(entry['estimated_poisoned_fraction']):.1f}% of the class"
    return text + "."


def _mm_message(entry: Mapping[str, Any], threshold: object) -> str:
    text = f"Class {entry.get('class')} looks like a backdoor target (found without data)"
    if _number(entry.get("max_margin")) is not None:
        text += f": inputs can be driven to a logit margin of {_fmt(entry['max_margin'])} over the other classes"
    if _number(entry.get("p_value")) is not None:
        text += f", p-value {_fmt(entry['p_value'], 3)}"
        text += f" < significance {_fmt(threshold)}" if _number(threshold) is not None else ""
    return text + "."


def _unsafe_message(finding: Mapping[str, Any]) -> str:
    names = [str(name) for name in finding.get("globals") or ()]
    member = finding.get("member")
    where = f" in {member!r}" if member else ""
    kind = str(finding.get("kind") or "")
    if names:
        text = f"Unsafe pickle global{'s' if len(names) > 1 else ''} {', '.join(names)}{where}"
        text += ": loading this file would import them and can run arbitrary code."
    else:
        text = f"Unsafe file content{where}" + (f" ({kind})" if kind else "") + "."
    detail = finding.get("message")
    return f"{text} {detail}" if detail else text


def _class_properties(detector_name: str, entry: Mapping[str, Any], detector: Mapping[str, Any]) -> dict[str, Any]:
    properties: dict[str, Any] = {"detector": detector_name, "class": entry.get("class")}
    for key in _CLASS_NUMBERS.get(detector_name, ()):
        if _number(entry.get(key)) is not None:
            properties[key] = entry[key]
    if _number(detector.get("threshold")) is not None:
        properties["threshold"] = detector["threshold"]
    if _number(detector.get("significance")) is not None:
        properties["significance"] = detector["significance"]
    if detector_name == "neural_cleanse" and detector.get("threshold_rule"):
        properties["threshold_rule"] = detector["threshold_rule"]
    return properties


def _notifications(verdict: Mapping[str, Any]) -> list[dict[str, Any]]:
    notes = []
    for name, detector in (verdict.get("detectors") or {}).items():
        if not isinstance(detector, Mapping):
            continue
        if detector.get("status") == "error":
            text = f"{name} failed: [{detector.get('code')}] {detector.get('detail')}"
            notes.append({"level": "error", "message": {"text": text}, "descriptor": {"id": str(name)}})
        elif detector.get("status") == "skipped":
            text = f"{name} skipped: {detector.get('reason')}"
            notes.append({"level": "note", "message": {"text": text}, "descriptor": {"id": str(name)}})
    return notes


def sarif_log(verdict: Mapping[str, Any], model_path: PurePath | str, *, base: Path | None = None) -> dict[str, Any]:
    """The SARIF 2.1.0 log of one scan.

    Args:
        verdict: ``Verdict.to_dict()`` (or a scan's ``result``), or a ``422 unsafe_file`` problem body.
        model_path: the scanned file, as the user named it.
        base: make the artifact URI relative to this directory (the repository root in CI) when the model is
            under it; without it the path is used as given (relative stays relative).
    """
    if "verdict" not in verdict and verdict.get("code") == "unsafe_file":
        verdict = verdict_from_problem(verdict)
    model_path = PurePath(model_path)
    uri = _artifact_uri(model_path, base)
    model = verdict.get("model") or {}
    sha256 = model.get("sha256") if isinstance(model.get("sha256"), str) else None
    location = {"physicalLocation": {"artifactLocation": {"uri": uri, "index": 0}}}
    results: list[dict[str, Any]] = []

    def add(rule_id: str, text: str, properties: dict[str, Any], *identity: object) -> None:
        results.append(
            {
                "ruleId": rule_id,
                "ruleIndex": _RULE_INDEX[rule_id],
                "level": "error",
                "message": {"text": text},
                "locations": [location],
                "partialFingerprints": {"backdoorScan/v1": _fingerprint(rule_id, sha256 or uri, *identity)},
                "properties": properties,
            }
        )

    detectors = verdict.get("detectors") or {}
    model_file = detectors.get("model_file")
    if isinstance(model_file, Mapping):
        for finding in model_file.get("findings") or ():
            properties = {
                "detector": "model_file",
                "member": finding.get("member"),
                "kind": finding.get("kind"),
                "globals": list(finding.get("globals") or ()),
            }
            add(_UNSAFE, _unsafe_message(finding), properties, finding.get("member"), *properties["globals"])
    for detector_name, rule_id, message in (
        ("neural_cleanse", _NEURAL_CLEANSE, _nc_message),
        ("spectral_signatures", _SPECTRAL, _spectral_message),
        ("max_margin", _MAX_MARGIN, _mm_message),
    ):
        detector = detectors.get(detector_name)
        if not isinstance(detector, Mapping) or detector.get("status") != "ok":
            continue
        threshold = detector.get("significance" if detector_name == "max_margin" else "threshold")
        for entry in _flagged_entries(detector):
            properties = _class_properties(detector_name, entry, detector)
            add(rule_id, message(entry, threshold), properties, entry.get("class"))

    artifact: dict[str, Any] = {"location": {"uri": uri}, "roles": ["analysisTarget"]}
    if isinstance(model.get("size_bytes"), int):
        artifact["length"] = model["size_bytes"]
    if sha256:
        artifact["hashes"] = {"sha-256": sha256}
    scanner_info = verdict.get("scanner") or {}
    invocation: dict[str, Any] = {"executionSuccessful": True}
    notifications = _notifications(verdict)
    if notifications:
        invocation["toolExecutionNotifications"] = notifications
    run_properties: dict[str, Any] = {
        "verdict": verdict.get("verdict"),
        "flagged_classes": list(verdict.get("flagged_classes") or ()),
        "model": dict(model),
    }
    if scanner_info:
        run_properties["scanner"] = dict(scanner_info)
    return {
        "$schema": SARIF_SCHEMA_URI,
        "version": SARIF_VERSION,
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": TOOL_NAME,
                        "version": str(scanner_info.get("version") or __version__),
                        "rules": [dict(rule) for rule in RULES],
                    }
                },
                "invocations": [invocation],
                "artifacts": [artifact],
                "results": results,
                "properties": run_properties,
            }
        ],
    }
