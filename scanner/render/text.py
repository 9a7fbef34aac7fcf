"""Plain renderings of a verdict: a text summary for terminals and an artifacts directory (no torch needed)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from scanner.verdict import Verdict

__all__ = ["render_text", "write_artifacts"]


def _describe(detector: Mapping[str, Any]) -> str:
    status = detector.get("status")
    if status == "skipped":
        return f"skipped ({detector.get('reason')})"
    if status == "error":
        return f"error [{detector.get('code')}]: {detector.get('detail')}"
    parts = [str(status)]
    if detector.get("flagged_classes"):
        parts.append(f"flagged classes {', '.join(map(str, detector['flagged_classes']))}")
    if detector.get("findings"):
        parts.append(f"{len(detector['findings'])} finding(s)")
    return ", ".join(parts)


def _finding_line(finding: object) -> str:
    if not isinstance(finding, Mapping):
        return str(finding)
    names = finding.get("globals") or ()
    text = str(finding.get("message") or finding)
    if names:
        text = f"{finding.get('member')}: {', '.join(map(str, names))}: {text}"
    return text


def _z_part(entry: Mapping[str, Any]) -> str:
    """`` z Z (threshold T),`` for the Neural Cleanse class that carries the z test, else nothing."""
    z_test = entry.get("z_test")
    if not isinstance(z_test, Mapping):
        return ""
    return f" z {z_test.get('z')} (threshold {z_test.get('threshold')}),"


#: What the text report says about a flagged class, per detector: the statistic that crossed the threshold first.
_FLAGGED_CLASS_LINES: dict[str, Callable[[Mapping[str, Any], object], str]] = {
    "neural_cleanse": lambda entry, threshold: (
        f"anomaly index {entry.get('anomaly_index')} (threshold {threshold}),{_z_part(entry)}"
        f" trigger L1 {entry.get('mask_l1')}, attack success {entry.get('attack_success_rate')}"
    ),
    "spectral_signatures": lambda entry, threshold: (
        f"score {entry.get('score')} (threshold {threshold}), {entry.get('suspicious_count')} suspicious samples"
    ),
    "max_margin": lambda entry, significance: (
        f"max margin {entry.get('max_margin')}, p-value {entry.get('p_value')} (significance {significance})"
    ),
}


def render_text(verdict: Mapping[str, Any], model_name: str) -> str:
    """A few lines for a terminal from a verdict's JSON (``Verdict.to_dict()`` or a scan's ``result``): the verdict,
    what was scanned, one line per detector, each finding, and each flagged class with its statistic.

    The one text renderer: ``backdoor-scan scan`` (a local verdict) and ``backdoor-scan submit`` (the server's
    ``result``, or a refusal turned into a verdict) print the same layout."""
    label = str(verdict.get("verdict", "?")).upper()
    flagged = verdict.get("flagged_classes") or []
    head = f"{model_name}: {label}" + (f" (flagged classes: {', '.join(map(str, flagged))})" if flagged else "")
    model = verdict.get("model") or {}
    facts = []
    if model.get("format"):
        facts.append(f"format {model['format']}")
    if model.get("sha256"):
        facts.append(f"sha256 {str(model['sha256'])[:16]}")
    if model.get("size_bytes") is not None:
        facts.append(f"{model['size_bytes']} bytes")
    if model.get("num_classes"):
        facts.append(f"{model['num_classes']} classes")
    if model.get("input_shape"):
        facts.append("input " + "x".join(map(str, model["input_shape"])))
    lines = [head]
    if facts:
        lines.append("  " + ", ".join(facts))
    if "problem" in verdict:
        lines.append("  refused by the server before scanning: the file was never loaded")
    for name, detector in (verdict.get("detectors") or {}).items():
        if not isinstance(detector, Mapping):
            continue
        lines.append(f"  {name}: {_describe(detector)}")
        lines.extend(f"    - {_finding_line(finding)}" for finding in detector.get("findings") or ())
        flagged_line = _FLAGGED_CLASS_LINES.get(name)
        for entry in detector.get("classes") or ():
            if flagged_line is not None and isinstance(entry, Mapping) and entry.get("flagged"):
                limit = detector.get("significance" if name == "max_margin" else "threshold")
                lines.append(f"    - class {entry.get('class')}: {flagged_line(entry, limit)}")
            elif isinstance(entry, Mapping) and entry.get("unconfirmed"):
                persistence = entry.get("trigger_persistence") or {}
                lines.append(
                    f"    - class {entry.get('class')}: split (score {entry.get('score')}) but unconfirmed: suspected "
                    f"members keep the class under blending {persistence.get('suspicious')}, "
                    f"the rest {persistence.get('rest')}"
                )
    return "\n".join(lines)


def write_artifacts(verdict: Verdict, directory: Path) -> list[Path]:
    """Write ``verdict.json`` and every detector artifact into ``directory`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "verdict.json"]
    written[0].write_text(json.dumps(verdict.to_dict(), indent=2) + "\n")
    for result in verdict.detectors.values():
        for name, content in result.artifacts.items():
            if Path(name).name != name:  # artifact names are ours, but never let one escape the directory
                raise ValueError(f"artifact name {name!r} is not a plain file name")
            path = directory / name
            path.write_bytes(content)
            written.append(path)
    return written
