"""Plain renderings of a verdict: a text summary for terminals and an artifacts directory."""

from __future__ import annotations

import json
from pathlib import Path

from scanner.verdict import DetectorResult, DetectorStatus, Verdict

__all__ = ["render_text", "write_artifacts"]


def _describe(result: DetectorResult) -> str:
    if result.status is DetectorStatus.SKIPPED:
        return f"skipped ({result.reason})"
    if result.status is DetectorStatus.ERROR:
        return f"error [{result.code}]: {result.detail}"
    parts = ["ok"]
    if result.flagged_classes:
        parts.append(f"flagged classes {', '.join(map(str, result.flagged_classes))}")
    if result.findings:
        parts.append(f"{len(result.findings)} finding(s)")
    return ", ".join(parts)


def render_text(verdict: Verdict, model_name: str) -> str:
    """A few lines for a terminal: the verdict, what was scanned, one line per detector, each finding."""
    label = verdict.label.value.upper()
    flagged = f" (flagged classes: {', '.join(map(str, verdict.flagged_classes))})" if verdict.flagged_classes else ""
    model = verdict.model
    facts = [f"format {model.format}", f"sha256 {model.sha256[:16]}", f"{model.size_bytes} bytes"]
    if model.num_classes:
        facts.append(f"{model.num_classes} classes")
    if model.input_shape:
        facts.append("input " + "x".join(map(str, model.input_shape)))
    lines = [f"{model_name}: {label}{flagged}", "  " + ", ".join(facts)]
    for name, result in verdict.detectors.items():
        lines.append(f"  {name}: {_describe(result)}")
        lines.extend(f"    - {finding.get('message', finding)}" for finding in result.findings)
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
