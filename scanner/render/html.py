"""The scan report as one self-contained HTML page: the verdict, trigger images, Grad-CAM panels and charts.

Everything is inline: CSS in a ``<style>`` element, images as ``data:`` URIs, charts as SVG drawn here; no script,
no external reference, so the page works offline and under ``Content-Security-Policy: default-src 'none'``. Every
value taken from the verdict or the artifacts (file names, class names, layer names) is escaped: they may come from
untrusted uploads.

The page is built from the verdict dict (``Verdict.to_dict()``, or the ``result`` of a scan resource, whose artifact
names are URLs: only the last path segment is used) and the artifact bytes by file name.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["STYLE_SOURCE", "render_html"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_BANNER_CLASS = {"backdoored": "bad", "unsafe_file": "bad", "clean": "good"}
_FLAGGED, _SMALL_SIDE, _LARGE_SIDE = "#c0392b", "#2e86c1", "#aab7b8"
_HISTOGRAM_BINS = 30
_MAX_AXIS_LABELS = 40

_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; color: #1c2833; background: #f4f6f7; }
main { max-width: 1100px; margin: 0 auto; padding: 0 20px 40px; }
.banner { padding: 22px 20px; color: #fff; background: #7f8c8d; }
.banner.bad { background: #b03a2e; } .banner.good { background: #1e8449; }
.banner .verdict { font-size: 30px; font-weight: 700; letter-spacing: .04em; }
.banner .inner { max-width: 1100px; margin: 0 auto; }
section, article { background: #fff; border-radius: 6px; padding: 14px 18px; margin: 18px 0; }
article { border: 1px solid #d5d8dc; }
article.flagged { border-left: 5px solid #c0392b; }
h2 { margin: 0 0 8px; font-size: 21px; } h3 { margin: 4px 0 8px; font-size: 17px; } h4 { margin: 14px 0 6px; }
table { border-collapse: collapse; margin: 6px 0; }
td, th { border: 1px solid #d5d8dc; padding: 3px 8px; text-align: left; } th { background: #eaeded; }
tr.flagged td { background: #fdedec; font-weight: 600; }
code, .mono { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; word-break: break-all; }
figure { display: inline-block; margin: 4px 10px 4px 0; vertical-align: top; text-align: center; }
figcaption { font-size: 13px; color: #566573; }
img.pixel { image-rendering: pixelated; width: 168px; height: auto; border: 1px solid #d5d8dc; background: #000; }
img.thumb { image-rendering: pixelated; width: 72px; height: auto; border: 1px solid #d5d8dc; background: #000; }
img.strip { max-width: 100%; height: auto; border: 1px solid #d5d8dc; }
.gallery { display: flex; flex-wrap: wrap; gap: 8px; }
.card { border: 1px solid #d5d8dc; border-radius: 4px; padding: 6px; font-size: 12px; text-align: center; }
.card.flagged { border: 2px solid #c0392b; background: #fdedec; }
.legend span { display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px; vertical-align: -1px; }
.swatch-flagged { background: #c0392b; } .swatch-small { background: #2e86c1; } .swatch-large { background: #aab7b8; }
.missing { display: inline-block; padding: 8px; color: #7b241c; background: #fdedec; font-size: 13px; }
.note { color: #566573; font-size: 13px; }
.big { font-size: 18px; font-weight: 600; }
svg text { font: 11px system-ui, sans-serif; fill: #1c2833; }
"""

#: The CSP source expression that allows the page's one ``<style>`` element and nothing else (the page has no
#: ``style`` attribute): a page that shows the report in an ``iframe srcdoc``, which inherits that page's policy,
#: can say ``style-src 'self' STYLE_SOURCE`` instead of ``'unsafe-inline'``.
STYLE_SOURCE = f"'sha256-{base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()}'"


def render_html(
    verdict: Mapping[str, Any],
    artifacts: Mapping[str, bytes],
    *,
    title: str | None = None,
    settings: Mapping[str, Any] | None = None,
    repair: Mapping[str, Any] | None = None,
    repair_artifacts: Mapping[str, bytes] | None = None,
) -> str:
    """One self-contained HTML page for a scan.

    Args:
        verdict: the verdict dict (see the README, "The verdict").
        artifacts: artifact bytes by file name (``nc-class-0-mask.png``, ``spectral-scores.json``, ...); images that
            are missing or are not PNG are shown as "not available".
        title: what was scanned (e.g. the model's file name), shown under the verdict.
        settings: extra rows for the "Settings and timings" table (scan options, timestamps); values that are not
            strings or numbers are shown as JSON.
        repair: a repair of the scanned model (:meth:`scanner.repair.RepairReport.to_dict`, with an ``id`` where it
            has one): a section with its before/after numbers and each repaired class's reversed trigger before and
            after.
        repair_artifacts: the repair's artifacts (its re-scan's trigger images) by file name.

    Returns:
        The page, an HTML5 document.
    """
    page = _Page(artifacts)
    label = str(verdict.get("verdict", "unknown"))
    detectors = _dict(verdict.get("detectors"))
    body = [
        _banner(label, _list(verdict.get("flagged_classes")), detectors, title),
        "<main>",
        _model_section(_dict(verdict.get("model"))),
        _detectors_section(detectors),
        _model_file_section(_dict(detectors.get("model_file"))),
        page.neural_cleanse(_dict(detectors.get("neural_cleanse"))),
        page.spectral(_dict(detectors.get("spectral_signatures"))),
        page.max_margin(_dict(detectors.get("max_margin")), _dict(detectors.get("neural_cleanse"))),
        _repair_section(repair, page, _Page(repair_artifacts or {}), detectors) if repair else "",
        _settings_section(verdict, detectors, settings or {}),
        _errors_section(_list(verdict.get("errors"))),
        "</main>",
    ]
    heading = f"backdoor-scan report: {title}" if title else "backdoor-scan report"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(heading)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body>\n</html>\n"
    )


# --- small helpers ----------------------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _number(value: object) -> float | None:
    """A finite JSON number, else None (booleans and strings are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _fmt(value: object) -> str:
    """A value for a table cell, escaped."""
    if value is None:
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    number = _number(value)
    if number is not None:
        return _e(value if isinstance(value, int) else f"{number:.4g}")
    if isinstance(value, str):
        return _e(value)
    return f'<span class="mono">{_e(json.dumps(value, default=str))}</span>'


def _classes(values: Sequence[Any]) -> str:
    return ", ".join(_fmt(v) for v in values) or "none"


def _table(header: Sequence[str], rows: Sequence[tuple[Sequence[str], bool]]) -> str:
    """A table; cells are already-escaped HTML. Each row comes with whether it is highlighted."""
    head = "".join(f"<th>{cell}</th>" for cell in header)
    body = "".join(
        f"<tr{' class=flagged' if flagged else ''}>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"
        for cells, flagged in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _pairs(rows: Sequence[tuple[str, object]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(key)}</th><td>{_fmt(value)}</td></tr>" for key, value in rows) + "</table>"


# --- sections that need only the verdict ----------------------------------------------------------------------


def _banner(label: str, flagged: list[Any], detectors: Mapping[str, Any], title: str | None) -> str:
    css = _BANNER_CLASS.get(label, "unknown")
    reasons = []
    for name in ("neural_cleanse", "spectral_signatures", "max_margin"):
        found = _list(_dict(detectors.get(name)).get("flagged_classes"))
        if found:
            reasons.append(f"{_e(name.replace('_', ' '))} flagged class {_classes(found)}")
    if _list(_dict(detectors.get("model_file")).get("findings")):
        reasons.append("the model file imports code outside the allowlist: it was not loaded")
    lines = [f'<div class="verdict">{_e(label.upper().replace("_", " "))}</div>']
    if flagged:
        lines.append(f'<div class="big">flagged classes: {_classes(flagged)}</div>')
    if reasons:
        lines.append(f"<div>{'; '.join(reasons)}</div>")
    if title:
        lines.append(f'<div class="mono">{_e(title)}</div>')
    return f'<header class="banner {css}" id="verdict"><div class="inner">{"".join(lines)}</div></header>'


def _model_section(model: Mapping[str, Any]) -> str:
    shape = _list(model.get("input_shape"))
    rows = [
        ("format", model.get("format")),
        ("sha256", model.get("sha256")),
        ("size (bytes)", model.get("size_bytes")),
        ("input shape", " x ".join(str(v) for v in shape) if shape else None),
        ("classes", model.get("num_classes")),
    ]
    return f'<section id="model"><h2>Model</h2>{_pairs(rows)}</section>'


def _detectors_section(detectors: Mapping[str, Any]) -> str:
    rows = []
    for name, raw in detectors.items():
        result = _dict(raw)
        status = result.get("status")
        note = result.get("reason") or (f"[{result.get('code')}] {result.get('detail')}" if status == "error" else "")
        flagged = _list(result.get("flagged_classes"))
        rows.append(
            (
                [_e(name), _fmt(status), _classes(flagged) if status == "ok" else "", _fmt(result.get("duration_s")),
                 _fmt(note)],
                bool(flagged),
            )
        )  # fmt: skip
    return (
        '<section id="detectors"><h2>Detectors</h2>'
        + _table(["detector", "status", "flagged classes", "duration (s)", "note"], rows)
        + "</section>"
    )


def _model_file_section(model_file: Mapping[str, Any]) -> str:
    findings = [_dict(f) for f in _list(model_file.get("findings"))]
    if not findings:
        return ""
    items = "".join(f"<li>{_fmt(f.get('message', json.dumps(f, default=str)))}</li>" for f in findings)
    return f'<section id="model-file"><h2>Unsafe model file</h2><ul>{items}</ul></section>'


def _settings_section(verdict: Mapping[str, Any], detectors: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    scanner = _dict(verdict.get("scanner"))
    nc = _dict(detectors.get("neural_cleanse"))
    spectral = _dict(detectors.get("spectral_signatures"))
    rows: list[tuple[str, object]] = [
        ("scanner version", scanner.get("version")),
        ("torch", scanner.get("torch")),
        ("device", scanner.get("device")),
        ("seed", scanner.get("seed")),
    ]
    if nc.get("status") == "ok":
        rows += [
            ("Neural Cleanse threshold", nc.get("threshold")),
            ("Neural Cleanse threshold rule", nc.get("threshold_rule")),
            ("Neural Cleanse samples used", nc.get("samples_used")),
            ("Neural Cleanse rounds", nc.get("rounds")),
        ]
    if spectral.get("status") == "ok":
        rows.append(("spectral signatures threshold", spectral.get("threshold")))
    max_margin = _dict(detectors.get("max_margin"))
    if max_margin.get("status") == "ok":
        rows += [
            ("max margin significance", max_margin.get("significance")),
            ("max margin starts x steps", f"{max_margin.get('starts')} x {max_margin.get('steps')}"),
        ]
    rows += [(str(key), value) for key, value in settings.items()]
    rows += [
        (f"{name} duration (s)", _dict(result).get("duration_s"))
        for name, result in detectors.items()
        if _dict(result).get("duration_s") is not None
    ]
    return f'<section id="settings"><h2>Settings and timings</h2>{_pairs(rows)}</section>'


def _errors_section(errors: list[Any]) -> str:
    if not errors:
        return ""
    items = "".join(
        f"<li>{_fmt(_dict(e).get('detector'))}: [{_fmt(_dict(e).get('code'))}] {_fmt(_dict(e).get('detail'))}</li>"
        for e in errors
    )
    return f'<section id="errors"><h2>Errors</h2><ul>{items}</ul></section>'


# --- sections with images ----------------------------------------------------------------------------------------


def _repair_section(repair: Mapping[str, Any], scan: _Page, repaired: _Page, detectors: Mapping[str, Any]) -> str:
    """Before/after numbers of a repair, and each repaired class's trigger as reversed on the scanned model and on the
    repaired one (its re-scan)."""
    nc = _dict(detectors.get("neural_cleanse"))
    accuracy = _dict(repair.get("clean_accuracy"))
    samples = _dict(repair.get("samples"))
    rescan = _dict(repair.get("rescan"))
    rates = _dict(repair.get("trigger_attack_success_rate"))
    caps = _dict(repair.get("margin_caps"))
    after_detectors = _dict(rescan.get("detectors"))
    after_nc = _dict(after_detectors.get("neural_cleanse"))
    margin_before = {
        str(c.get("class")): c for c in map(_dict, _list(_dict(detectors.get("max_margin")).get("classes")))
    }
    margin_after = {
        str(c.get("class")): c for c in map(_dict, _list(_dict(after_detectors.get("max_margin")).get("classes")))
    }
    before_classes = {str(c.get("class")): c for c in map(_dict, _list(nc.get("classes")))}
    after_classes = {str(c.get("class")): c for c in map(_dict, _list(after_nc.get("classes")))}
    named = f"Repair <code>{_e(repair.get('id'))}</code>: " if repair.get("id") else ""
    outcome = "the re-scan flags nothing" if repair.get("repaired") is True else "the re-scan still flags a class"
    rows = [
        (["clean accuracy (held out)", _fmt(accuracy.get("before")), _fmt(accuracy.get("after"))], False),
        *(
            (
                [f"attack success rate of class {_e(target)}'s reversed trigger", _fmt(_dict(rate).get("before")),
                 _fmt(_dict(rate).get("after"))],
                True,
            )
            for target, rate in rates.items()
        ),
        *(
            (
                [f"largest margin of class {_e(target)} on any input (held under {_fmt(cap)})",
                 _fmt(margin_before.get(target, {}).get("max_margin")),
                 _fmt(margin_after.get(target, {}).get("max_margin"))],
                True,
            )
            for target, cap in caps.items()
        ),
        (["re-scan verdict (Neural Cleanse, maximum margin)", "-", _fmt(rescan.get("verdict"))], False),
    ]  # fmt: skip
    parts = [
        '<section id="repair"><h2>Repair</h2>',
        f"<p>{named}{_e(repair.get('method', 'unlearning')).capitalize()} of the reversed"
        f" trigger(s) of class {_classes(_list(repair.get('classes')))} in {_fmt(repair.get('rounds'))} round(s), "
        f"fine-tuned on {_fmt(samples.get('fine_tuning'))} clean samples and measured on "
        f"{_fmt(samples.get('held_out'))} held out; clean accuracy lost {_fmt(accuracy.get('drop'))} (bound "
        f"{_fmt(accuracy.get('max_drop'))}); {outcome}. Files: {_e(', '.join(map(str, _list(repair.get('files')))))}."
        "</p>",
        _table(["", "before", "after"], rows),
    ]
    for target in map(str, _list(repair.get("classes"))):
        before, after = before_classes.get(target, {}), after_classes.get(target, {})
        parts.append(
            f"<h3>Class {_e(target)}: the reversed trigger before and after</h3>"
            f"<figure>{scan.class_image(before, 'mask', f'class {target} mask, scanned model', 'pixel')}"
            f"<figcaption>scanned model: mask L1 {_fmt(before.get('mask_l1'))}</figcaption></figure>"
            f"<figure>{repaired.class_image(after, 'mask', f'class {target} mask, repaired model', 'pixel')}"
            f"<figcaption>repaired model: mask L1 {_fmt(after.get('mask_l1'))}</figcaption></figure>"
        )
    parts.append("</section>")
    return "\n".join(parts)


class _Page:
    """Looks artifacts up by the names (or URLs) the verdict gives."""

    def __init__(self, artifacts: Mapping[str, bytes]) -> None:
        self.artifacts = artifacts

    def artifact(self, reference: object) -> bytes | None:
        if not isinstance(reference, str) or not reference:
            return None
        return self.artifacts.get(reference.rsplit("/", 1)[-1])

    def image(self, png: bytes | None, alt: str, css: str) -> str:
        if png is None or not png.startswith(_PNG_MAGIC):
            return f'<span class="missing">{_e(alt)}: not available</span>'
        data = base64.b64encode(png).decode("ascii")
        return f'<img class="{css}" alt="{_e(alt)}" src="data:image/png;base64,{data}">'

    def class_image(self, entry: Mapping[str, Any], kind: str, alt: str, css: str) -> str:
        """The mask or pattern of a class: its artifact, else the PNG inlined in the verdict (flagged classes)."""
        png = self.artifact(_dict(entry.get("artifacts")).get(f"{kind}_png"))
        if png is None:
            inline = _dict(entry.get(kind)).get("png_base64")
            if isinstance(inline, str):
                try:
                    png = base64.b64decode(inline, validate=True)
                except ValueError:
                    png = None
        return self.image(png, alt, css)

    # --- Neural Cleanse ---

    def neural_cleanse(self, nc: Mapping[str, Any]) -> str:
        if nc.get("status") != "ok":
            return ""
        classes = [_dict(c) for c in _list(nc.get("classes"))]
        threshold = _number(nc.get("threshold"))
        parts = [
            '<section id="neural-cleanse"><h2>Neural Cleanse</h2>',
            f"<p>Reversed trigger per class; a class whose mask is an outlier on the small side (anomaly index above "
            f"{_fmt(threshold)}, {_fmt(nc.get('threshold_rule'))}) is flagged"
            + (
                f", and so is the class with the smallest mask when its z (its distance below the other classes, in "
                f"their standard deviations) exceeds {_fmt(_dict(nc.get('z_test')).get('threshold'))}"
                if _number(_dict(nc.get("z_test")).get("threshold")) is not None
                else ""
            )
            + f". Samples used: "
            f"{_fmt(nc.get('samples_used'))}.</p>",
            _screening_note(_dict(nc.get("screening")), len(classes)),
            _anomaly_chart(classes, threshold),
            '<p class="legend"><span class="swatch-flagged"></span>flagged'
            '<span class="swatch-small"></span>smaller mask than the median'
            '<span class="swatch-large"></span>larger (never flagged)</p>',
        ]
        parts += [self.flagged_class(entry, threshold) for entry in classes if entry.get("flagged") is True]
        parts.append("<h3>All classes</h3>")
        parts.append('<div class="gallery">' + "".join(self.card(entry) for entry in classes) + "</div>")
        rows = [
            (
                [_fmt(c.get("class")), _fmt(c.get("mask_l1")), _fmt(c.get("anomaly_index")),
                 _fmt(c.get("anomaly_index_l1")), _fmt(c.get("attack_success_rate")), _fmt(c.get("steps")),
                 _fmt(c.get("flagged"))],
                c.get("flagged") is True,
            )
            for c in classes
        ]  # fmt: skip
        header = ["class", "mask L1", "anomaly index", "index (paper, L1)", "attack success", "steps", "flagged"]
        parts.append(_table(header, rows))
        parts.append("</section>")
        return "".join(parts)

    def card(self, entry: Mapping[str, Any]) -> str:
        k = _fmt(entry.get("class"))
        flagged = entry.get("flagged") is True
        return (
            f'<div class="card{" flagged" if flagged else ""}">'
            + self.class_image(entry, "mask", f"class {entry.get('class')} mask", "thumb")
            + " "
            + self.class_image(entry, "pattern", f"class {entry.get('class')} pattern", "thumb")
            + f"<div>class {k} &middot; L1 {_fmt(entry.get('mask_l1'))} &middot; index "
            f"{_fmt(entry.get('anomaly_index'))}</div></div>"
        )

    def flagged_class(self, entry: Mapping[str, Any], threshold: float | None) -> str:
        k = entry.get("class")
        z_test = _dict(entry.get("z_test"))
        names = _dict(entry.get("artifacts"))
        parts = [
            f'<article class="flagged" id="nc-class-{_e(k)}">',
            f"<h3>Class {_fmt(k)}: anomaly index {_fmt(entry.get('anomaly_index'))} (threshold {_fmt(threshold)}), "
            + (f"z {_fmt(z_test.get('z'))} (threshold {_fmt(z_test.get('threshold'))}), " if z_test else "")
            + f"mask L1 {_fmt(entry.get('mask_l1'))}, attack success {_fmt(entry.get('attack_success_rate'))}</h3>",
            "<figure>" + self.class_image(entry, "mask", f"class {k} recovered mask", "pixel")
            + "<figcaption>recovered mask</figcaption></figure>",
            "<figure>" + self.class_image(entry, "pattern", f"class {k} recovered pattern", "pixel")
            + "<figcaption>recovered pattern</figcaption></figure>",
        ]  # fmt: skip
        evidence = _dict(entry.get("evidence"))
        if evidence.get("status") != "ok":
            if evidence:
                parts.append(f'<p class="note">No evidence: [{_fmt(evidence.get("code"))}] '
                             f"{_fmt(evidence.get('detail'))}</p>")  # fmt: skip
            parts.append("</article>")
            return "".join(parts)
        parts += [
            "<h4>Stamped examples</h4>",
            f"<p>The recovered trigger on {_fmt(evidence.get('samples'))} clean samples of other classes: "
            f"{sum(p == k for p in _list(evidence.get('stamped_predictions')))} of them are then classified as class "
            f"{_fmt(k)} (before: {sum(p == k for p in _list(evidence.get('clean_predictions')))}).</p>",
            self.image(self.artifact(names.get("stamped_png")), f"class {k} stamped examples", "strip"),
            _predictions_table(evidence),
            "<h4>Grad-CAM: where the model looks, clean vs stamped</h4>",
        ]
        gradcam = _dict(evidence.get("gradcam"))
        if gradcam.get("status") == "ok":
            parts += [
                f"<p>Share of the heat inside the trigger: <span class=big>{_fmt(gradcam.get('heat_in_trigger_clean'))}"
                f" clean &rarr; {_fmt(gradcam.get('heat_in_trigger_stamped'))} stamped</span> (mean over the samples;"
                f" the trigger covers {_fmt(gradcam.get('trigger_area_fraction'))} of the image). Layer "
                f"<code>{_e(gradcam.get('layer'))}</code>; each heatmap explains the image's predicted class.</p>",
                self.image(self.artifact(names.get("gradcam_png")), f"class {k} Grad-CAM heatmaps", "strip"),
            ]
        else:
            reason = gradcam.get("reason") or gradcam.get("detail")
            parts.append(f'<p class="note">Grad-CAM {_fmt(gradcam.get("status"))}: {_fmt(reason)}</p>')
        parts.append("</article>")
        return "".join(parts)

    # --- maximum margin (data-free) ---

    def max_margin(self, mm: Mapping[str, Any], nc: Mapping[str, Any]) -> str:
        if mm.get("status") != "ok":
            return ""
        classes = [_dict(c) for c in _list(mm.get("classes"))]
        null = _dict(mm.get("null"))
        nc_classes = {c.get("class"): c for c in (_dict(x) for x in _list(nc.get("classes")))}
        parts = [
            '<section id="max-margin"><h2>Maximum margin (no data needed)</h2>',
            f"<p>For every class, random images were optimised to maximise the class's logit over the largest other "
            f"one. The largest class's margin is tested against a Gamma distribution fitted to the other classes "
            f"(shape {_fmt(null.get('shape'))}, scale {_fmt(null.get('scale'))}); it is flagged when its p-value "
            f"is below {_fmt(mm.get('significance'))}. Largest: class {_fmt(mm.get('largest_class'))}, p-value "
            f"{_fmt(mm.get('p_value'))}.</p>",
        ]
        for entry in classes:
            if entry.get("flagged") is not True:
                continue
            k = entry.get("class")
            figures = [
                "<figure>" + self.class_image(entry, "input", f"class {k} optimised input", "pixel")
                + "<figcaption>optimised input (max margin)</figcaption></figure>"
            ]  # fmt: skip
            nc_entry = _dict(nc_classes.get(k))
            if nc_entry.get("flagged") is True:
                figures.append(
                    "<figure>" + self.class_image(nc_entry, "pattern", f"class {k} Neural Cleanse pattern", "pixel")
                    + "<figcaption>Neural Cleanse pattern</figcaption></figure>"
                    + "<figure>" + self.class_image(nc_entry, "mask", f"class {k} Neural Cleanse mask", "pixel")
                    + "<figcaption>Neural Cleanse mask</figcaption></figure>"
                )  # fmt: skip
            parts.append(
                f'<article class="flagged" id="mm-class-{_e(k)}"><h3>Class {_fmt(k)}: max margin '
                f"{_fmt(entry.get('max_margin'))}, p-value {_fmt(entry.get('p_value'))}</h3>" + "".join(figures)
                + "</article>"
            )  # fmt: skip
        rows = [
            ([_fmt(c.get("class")), _fmt(c.get("max_margin")), _fmt(c.get("p_value")), _fmt(c.get("flagged"))],
             c.get("flagged") is True)
            for c in classes
        ]  # fmt: skip
        parts.append(_table(["class", "max margin", "p-value", "flagged"], rows))
        parts.append("</section>")
        return "".join(parts)

    # --- spectral signatures ---

    def spectral(self, spectral: Mapping[str, Any]) -> str:
        if spectral.get("status") != "ok":
            return ""
        classes = [_dict(c) for c in _list(spectral.get("classes"))]
        scores = self.spectral_scores(_dict(spectral.get("artifacts")).get("scores_json"))
        parts = [
            '<section id="spectral"><h2>Spectral signatures</h2>',
            f"<p>Each class's penultimate features split in two; a class whose separation score exceeds "
            f"{_fmt(spectral.get('threshold'))} is flagged when the side test confirms it (blended with other images, "
            f"its suspected members keep the class clearly more often than the rest: a persistence gain of at least "
            f"{_fmt(spectral.get('min_persistence_gain'))}); otherwise it is unconfirmed. Estimated poisoned samples: "
            f"{_fmt(spectral.get('estimated_poisoned_samples'))}.</p>",
        ]
        for entry in classes:
            if entry.get("flagged") is not True:
                continue
            k = entry.get("class")
            persistence = _dict(entry.get("trigger_persistence"))
            parts.append(
                f'<article class="flagged" id="spectral-class-{_e(k)}"><h3>Class {_fmt(k)}: score '
                f"{_fmt(entry.get('score'))}, estimated poisoned fraction "
                f"{_fmt(entry.get('estimated_poisoned_fraction'))} ({_fmt(entry.get('suspicious_count'))} of "
                f"{_fmt(entry.get('samples'))} samples)</h3>"
            )
            series = scores.get(str(k))
            if series is not None:
                parts.append(_histogram(*series))
                parts.append(
                    '<p class="legend"><span class="swatch-flagged"></span>suspected poison'
                    '<span class="swatch-large"></span>rest of the class &middot; score 0: the mean of the rest,'
                    " 1: the mean of the suspected part</p>"
                )
            else:
                parts.append('<span class="missing">score histogram: not available</span>')
            parts.append(
                f"<p>Trigger persistence under blending (STRIP): suspected {_fmt(persistence.get('suspicious'))}, "
                f"rest {_fmt(persistence.get('rest'))}.</p></article>"
            )
        rows = [
            ([_fmt(c.get("class")), _fmt(c.get("samples")), _fmt(c.get("separation")), _fmt(c.get("score")),
              _fmt(c.get("flagged")), _side_test(c)], c.get("flagged") is True)
            for c in classes
        ]  # fmt: skip
        parts.append(_table(["class", "samples", "separation", "score", "flagged", "side test"], rows))
        parts.append("</section>")
        return "".join(parts)

    def spectral_scores(self, reference: object) -> dict[str, tuple[list[float], list[bool]]]:
        """Per flagged class (as a string): poison scores and suspicious flags, from ``spectral-scores.json``."""
        raw = self.artifact(reference)
        if raw is None:
            return {}
        try:
            document = json.loads(raw)
        except ValueError:
            return {}
        out = {}
        for label, value in _dict(_dict(document).get("classes")).items():
            scores = [_number(s) for s in _list(_dict(value).get("poison_score"))]
            flags = _list(_dict(value).get("suspicious"))
            if scores and len(flags) == len(scores):
                kept = [(s, f is True) for s, f in zip(scores, flags, strict=True) if s is not None]
                out[str(label)] = ([s for s, _ in kept], [f for _, f in kept])
        return out


def _predictions_table(evidence: Mapping[str, Any]) -> str:
    columns = max(len(_list(evidence.get(key))) for key in ("labels", "clean_predictions", "stamped_predictions"))
    header = ["", *[f"#{i + 1}" for i in range(columns)]]
    rows = [
        ([_e(name), *[_fmt(v) for v in _list(evidence.get(key))]], False)
        for name, key in (
            ("label", "labels"),
            ("clean prediction", "clean_predictions"),
            ("stamped prediction", "stamped_predictions"),
        )
    ]
    return _table(header, rows)


# --- charts (inline SVG) -----------------------------------------------------------------------------------------


def _screening_note(screening: Mapping[str, Any], count: int) -> str:
    """One line on a screened run: which classes were tested (the others have no index and no bar)."""
    if not screening:
        return ""
    return (
        f"<p>Screened: {_fmt(screening.get('tested_classes'))} of {count} classes tested, the smallest masks after "
        f"{_fmt(screening.get('steps'))} steps and the reference classes {_fmt(screening.get('reference_classes'))}, "
        "whose median and MAD set the scale; the other classes stopped after the screen.</p>"
    )


def _anomaly_chart(classes: list[Mapping[str, Any]], threshold: float | None) -> str:
    """Bars of each class's anomaly index, coloured by side, with the threshold as a dashed line."""
    if not classes:
        return ""
    width, height, left, right, top, bottom = 880, 260, 46, 12, 14, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [_number(c.get("anomaly_index")) for c in classes]
    finite = [v for v in values if v is not None]
    top_value = max([*finite, threshold or 0.0, 1e-9]) * 1.15
    tested = [c for c in classes if c.get("screened_out") is not True]  # a screened-out class's L1 is a bound
    l1 = sorted(v for v in (_number(c.get("mask_l1")) for c in tested) if v is not None)
    median = l1[len(l1) // 2] if l1 else None
    slot = plot_w / len(classes)
    parts = _svg_with_grid("anomaly index per class", (width, height, left, right, top, plot_h), top_value)
    for i, (entry, value) in enumerate(zip(classes, values, strict=True)):
        if entry.get("screened_out") is True:  # not tested: no bar
            continue
        shown = top_value if value is None else value
        bar_h = plot_h * shown / top_value
        x = left + i * slot + slot * 0.1
        l1_value = _number(entry.get("mask_l1"))
        colour = (
            _FLAGGED
            if entry.get("flagged") is True
            else _SMALL_SIDE
            if median is not None and l1_value is not None and l1_value < median
            else _LARGE_SIDE
        )
        tip = f"class {entry.get('class')}: anomaly index {value if value is not None else 'infinite'}, L1 {l1_value}"
        parts.append(
            f'<rect x="{x:.1f}" y="{top + plot_h - bar_h:.1f}" width="{max(slot * 0.8, 0.5):.1f}" '
            f'height="{bar_h:.1f}" fill="{colour}"><title>{_e(tip)}</title></rect>'
        )
        if len(classes) <= _MAX_AXIS_LABELS:
            parts.append(
                f'<text x="{x + slot * 0.4:.1f}" y="{height - bottom + 14}" text-anchor="middle">'
                f"{_e(entry.get('class'))}</text>"
            )
    if threshold is not None:
        y = top + plot_h * (1 - threshold / top_value)
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#c0392b" '
            'stroke-width="1.5" stroke-dasharray="6 4"/>'
        )
        parts.append(f'<text x="{width - right}" y="{y - 4:.1f}" text-anchor="end">threshold {threshold:.4g}</text>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#566573"/>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle">class</text>')
    parts.append("</svg>")
    return "".join(parts)


def _svg_with_grid(label: str, frame: tuple[int, int, int, int, int, int], top_value: float) -> list[str]:
    """The opening ``<svg>`` of a chart and its horizontal grid lines with their labels.

    ``frame`` is ``(width, height, left, right, top, plot_h)``; ``top_value`` is the value at the top of the plot.
    """
    width, height, left, right, top, plot_h = frame
    parts = [f'<svg role="img" aria-label="{label}" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}">']  # fmt: skip
    for tick in _ticks(top_value):
        y = top + plot_h * (1 - tick / top_value)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eaeded"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
    return parts


def _side_test(entry: Mapping[str, Any]) -> str:
    """A spectral class's side test in a table cell: persistence of the suspected members vs the rest, and what it
    decided (only classes over the threshold are tested)."""
    persistence = _dict(entry.get("trigger_persistence"))
    if not persistence:
        return "-"
    outcome = "unconfirmed" if entry.get("unconfirmed") is True else "confirmed"
    return f"{outcome} ({_fmt(persistence.get('suspicious'))} vs {_fmt(persistence.get('rest'))})"


def _histogram(scores: list[float], suspicious: list[bool]) -> str:
    """Stacked histogram of one class's poison scores: the suspected part over the rest."""
    width, height, left, right, top, bottom = 640, 200, 46, 12, 10, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    low, high = min(scores), max(scores)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    step = (high - low) / _HISTOGRAM_BINS
    counts = [[0, 0] for _ in range(_HISTOGRAM_BINS)]
    for score, flag in zip(scores, suspicious, strict=True):
        counts[min(int((score - low) / step), _HISTOGRAM_BINS - 1)][int(flag)] += 1
    peak = float(max(max(rest + suspected for rest, suspected in counts), 1))
    parts = _svg_with_grid("poison score histogram", (width, height, left, right, top, plot_h), peak)
    bar_w = plot_w / _HISTOGRAM_BINS
    for i, (rest, suspected) in enumerate(counts):
        x = left + i * bar_w
        base = float(top + plot_h)
        for count, colour in ((rest, _LARGE_SIDE), (suspected, _FLAGGED)):
            if count:
                h = plot_h * count / peak
                base -= h
                parts.append(
                    f'<rect x="{x + 0.5:.1f}" y="{base:.1f}" width="{max(bar_w - 1, 0.5):.1f}" height="{h:.1f}" '
                    f'fill="{colour}"><title>{count} samples in [{low + i * step:.3g}, {low + (i + 1) * step:.3g})'
                    "</title></rect>"
                )
    marks = [low, high, *(v for v in (0.0, 1.0) if low + 0.08 * (high - low) < v < high - 0.08 * (high - low))]
    for value in sorted(marks):
        x = left + plot_w * (value - low) / (high - low)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" stroke="#566573"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{value:.3g}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 2}" text-anchor="middle">poison score</text>')
    parts.append("</svg>")
    return "".join(parts)


def _ticks(top: float) -> list[float]:
    """Up to about five round tick values from 0 to below ``top``."""
    raw = top / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    count = int(top / step) + 1
    return [round(i * step, 10) for i in range(count) if i * step < top]
