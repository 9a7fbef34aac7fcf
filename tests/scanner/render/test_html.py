"""The HTML report: a real scan of the BadNets model (``backdoor-scan scan --report``) gives one self-contained page
with the verdict, the recovered trigger, the evidence and the charts; everything from the verdict is escaped."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from html.parser import HTMLParser
from typing import Any

import pytest
import torch
from PIL import Image

from scanner.render.html import STYLE_SOURCE, render_html
from scanner.testing.mnist import MnistSplit
from service.cli import main
from tests.factories import BadNetsModel, to_uint8, write_npz

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Tags(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(page: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(page)
    parser.close()
    return parser.tags


@pytest.fixture(scope="module")
def scanned(badnets: BadNetsModel, mnist: MnistSplit, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``backdoor-scan scan badnets.pt2 --data ... --training-data ... --artifacts DIR --report FILE`` once."""
    root = tmp_path_factory.mktemp("html-report")
    program = torch.export.export(
        badnets.model, (mnist.test_images[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, root / "badnets.pt2")
    data = write_npz(root / "clean.npz", to_uint8(mnist.test_images[:200]), mnist.test_labels[:200].numpy())
    train = write_npz(root / "train.npz", to_uint8(badnets.poisoned.images), badnets.poisoned.labels.numpy())
    argv = [
        "scan", str(root / "badnets.pt2"), "--data", str(data), "--training-data", str(train), "--device", "cpu",
        "--format", "json", "--artifacts", str(root / "artifacts"), "--report", str(root / "report.html"),
    ]  # fmt: skip
    assert main(argv) == 1  # findings
    return {
        "page": (root / "report.html").read_text(encoding="utf-8"),
        "verdict": json.loads((root / "artifacts" / "verdict.json").read_text()),
        "artifacts": root / "artifacts",
    }


def test_report_shows_the_verdict_and_the_target(scanned: dict[str, Any], badnets: BadNetsModel) -> None:
    page, verdict = scanned["page"], scanned["verdict"]
    assert verdict["verdict"] == "backdoored"
    assert page.startswith("<!DOCTYPE html>")
    assert '<header class="banner bad" id="verdict">' in page
    assert ">BACKDOORED</div>" in page
    assert f"flagged classes: {badnets.target}</div>" in page
    assert f'id="nc-class-{badnets.target}"' in page
    assert f'id="spectral-class-{badnets.target}"' in page
    spectral_target = next(
        c for c in verdict["detectors"]["spectral_signatures"]["classes"] if c["class"] == badnets.target
    )
    persistence = spectral_target["trigger_persistence"]
    assert f"<td>confirmed ({persistence['suspicious']:.4g} vs {persistence['rest']:.4g})</td>" in page
    assert "a persistence gain of at least 0.18" in page
    assert page.count("<svg") == 2  # the anomaly-index chart and the target's score histogram
    assert f"threshold {verdict['detectors']['neural_cleanse']['threshold']:.4g}" in page  # the chart's line
    assert "badnets.pt2" in page


def test_report_carries_the_evidence_numbers(scanned: dict[str, Any], badnets: BadNetsModel) -> None:
    target = next(c for c in scanned["verdict"]["detectors"]["neural_cleanse"]["classes"] if c["flagged"])
    evidence = target["evidence"]
    gradcam = evidence["gradcam"]
    assert gradcam["status"] == "ok"
    assert gradcam["layer"].startswith("features.3")  # found in the exported program's graph
    assert gradcam["heat_in_trigger_stamped"] > 2 * gradcam["heat_in_trigger_clean"]
    assert evidence["stamped_predictions"].count(badnets.target) >= 7
    shift = f"{gradcam['heat_in_trigger_clean']:.4g} clean &rarr; {gradcam['heat_in_trigger_stamped']:.4g} stamped"
    assert shift in scanned["page"]
    assert target["artifacts"]["gradcam_png"] == f"nc-class-{badnets.target}-gradcam.png"
    assert (scanned["artifacts"] / target["artifacts"]["stamped_png"]).read_bytes().startswith(PNG_MAGIC)
    scores = json.loads((scanned["artifacts"] / "spectral-scores.json").read_text())
    assert list(scores["classes"]) == [str(badnets.target)]


def test_report_is_self_contained(scanned: dict[str, Any]) -> None:
    page = scanned["page"]
    assert not re.search(r"https?:", page), "no URL at all: nothing to fetch"
    assert "<script" not in page
    images = [attrs for tag, attrs in _tags(page) if tag == "img"]
    # Neural Cleanse: flagged mask and pattern, the two evidence strips, the gallery; max margin: the flagged class's
    # optimised input beside Neural Cleanse's pattern and mask
    assert len(images) == 2 + 2 + 2 * 10 + 3
    for attrs in images:
        source = attrs["src"] or ""
        assert source.startswith("data:image/png;base64,"), source[:60]
        png = base64.b64decode(source.removeprefix("data:image/png;base64,"), validate=True)
        assert Image.open(io.BytesIO(png)).size[0] > 0
    references = [value for _, attrs in _tags(page) for key, value in attrs.items() if key in ("href", "src")]
    assert all((value or "").startswith("data:") for value in references)


def test_report_has_one_inline_style_that_style_source_allows(scanned: dict[str, Any]) -> None:
    """The web page shows the report in an iframe that inherits its strict policy: one hashed ``<style>``, no
    ``style`` attribute anywhere."""
    page = scanned["page"]
    styles = re.findall(r"<style>(.*?)</style>", page, flags=re.DOTALL)
    assert len(styles) == 1
    digest = base64.b64encode(hashlib.sha256(styles[0].encode()).digest()).decode()
    assert f"'sha256-{digest}'" == STYLE_SOURCE
    assert not [tag for tag, attrs in _tags(page) if "style" in attrs]


def test_report_from_the_service_result_matches(scanned: dict[str, Any]) -> None:
    """The service stores artifact names as URLs; the page only uses their last segment."""
    verdict = scanned["verdict"]
    artifacts = {path.name: path.read_bytes() for path in scanned["artifacts"].iterdir()}
    as_urls = json.loads(
        json.dumps(verdict)
        .replace('"nc-class-', '"/v1/scans/abc/artifacts/nc-class-')
        .replace('"spectral-', '"/v1/scans/abc/artifacts/spectral-')
    )
    assert as_urls != verdict
    assert render_html(as_urls, artifacts, title="m") == render_html(verdict, artifacts, title="m")


def _hostile_verdict(payload: str) -> dict[str, Any]:
    return {
        "verdict": "backdoored",
        "flagged_classes": [payload],
        "detectors": {
            "model_file": {"status": "ok", "flagged_classes": [], "findings": [{"message": payload}]},
            "neural_cleanse": {
                "status": "ok",
                "flagged_classes": [0],
                "threshold": 2.0,
                "threshold_rule": payload,
                "classes": [
                    {
                        "class": payload,
                        "mask_l1": 3.0,
                        "anomaly_index": 9.0,
                        "flagged": True,
                        "artifacts": {"mask_png": f"../../{payload}.png", "stamped_png": "/etc/passwd"},
                        "evidence": {
                            "status": "ok",
                            "samples": 1,
                            "labels": [payload],
                            "stamped_predictions": [0],
                            "gradcam": {"status": "ok", "layer": payload, "heat_in_trigger_clean": payload},
                        },
                    }
                ],
            },
            "spectral_signatures": {"status": "skipped", "reason": payload},
        },
        "errors": [{"detector": payload, "code": payload, "detail": payload}],
        "model": {"format": payload, "sha256": payload, "input_shape": [payload]},
        "scanner": {"version": payload},
    }


def test_report_escapes_everything_from_the_verdict() -> None:
    payload = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    page = render_html(
        _hostile_verdict(payload),
        {"passwd": b"root:x:0:0", f"{payload}.png": PNG_MAGIC + b"not really"},
        title=f"model{payload}.pt2",
        settings={payload: payload, "options": {"arch": payload}},
    )
    assert "<script" not in page
    assert "onerror=" not in page.replace("onerror=alert(2)&gt;", "")  # only as escaped text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert not [attrs for tag, attrs in _tags(page) if tag == "img"], "no image: none is a PNG we can trust"
    assert page.count("not available") >= 2


def test_report_of_an_unsafe_file_and_of_an_inconclusive_scan() -> None:
    unsafe = {
        "verdict": "unsafe_file",
        "flagged_classes": [],
        "detectors": {
            "model_file": {"status": "ok", "findings": [{"message": "imports os.system"}]},
            "neural_cleanse": {"status": "skipped", "reason": "the model file is unsafe and was not loaded"},
        },
    }
    page = render_html(unsafe, {})
    assert '<header class="banner bad"' in page
    assert "imports os.system" in page
    inconclusive = render_html({"verdict": "inconclusive", "detectors": {}}, {})
    assert '<header class="banner unknown"' in inconclusive
    assert "INCONCLUSIVE" in inconclusive


def test_report_of_a_screened_run_draws_only_the_tested_classes() -> None:
    """A 40-class run that screened: the screened-out classes have no index and get no bar; the note says which
    classes were tested."""
    classes = [
        {"class": k, "mask_l1": 500.0, "anomaly_index": None, "screened_out": True, "flagged": False} for k in range(40)
    ]
    for k, l1, index in ((0, 8.0, 9.5), (3, 60.0, 0.4), (7, 70.0, 0.1), (9, 80.0, 0.5)):
        classes[k] = {"class": k, "mask_l1": l1, "anomaly_index": index, "screened_out": False, "flagged": k == 0}
    verdict = {
        "verdict": "backdoored",
        "flagged_classes": [0],
        "detectors": {
            "neural_cleanse": {
                "status": "ok",
                "flagged_classes": [0],
                "threshold": 5.0,
                "threshold_rule": "calibrated",
                "screening": {"steps": 30, "candidates": 2, "reference_classes": [3, 7, 9], "tested_classes": 4},
                "classes": classes,
            }
        },
    }
    page = render_html(verdict, {})
    assert "Screened: 4 of 40 classes tested" in page
    bars = re.findall(r"<title>class (\d+): anomaly index", page)
    assert sorted(map(int, bars)) == [0, 3, 7, 9]


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (4, 4), value).save(buffer, format="PNG")
    return buffer.getvalue()


def test_report_repair_section_shows_both_triggers_and_escapes() -> None:
    verdict = {
        "verdict": "backdoored",
        "flagged_classes": [0],
        "detectors": {"neural_cleanse": {"status": "ok", "classes": [{"class": 0, "mask_l1": 6.5, "flagged": True,
                      "artifacts": {"mask_png": "/v1/scans/x/artifacts/nc-class-0-mask.png"}}]},
                      "max_margin": {"status": "ok", "classes": [{"class": 0, "max_margin": 61.5}]}},
    }  # fmt: skip
    repair = {
        "id": "<b>r1</b>",
        "method": "unlearning",
        "repaired": False,
        "classes": [0],
        "rounds": 3,
        "clean_accuracy": {"before": 0.96, "after": 0.95, "drop": 0.01, "max_drop": 0.02},
        "trigger_attack_success_rate": {"0": {"before": 0.97, "after": 0.31}},
        "margin_caps": {"0": 20.25},
        "samples": {"fine_tuning": 350, "held_out": 150},
        "rescan": {"verdict": "backdoored", "detectors": {"neural_cleanse": {"classes": [
            {"class": 0, "mask_l1": 70.0, "artifacts": {"mask_png": "nc-class-0-mask.png"}}]},
            "max_margin": {"classes": [{"class": 0, "max_margin": 22.5}]}}},
        "files": ["repaired.pt2"],
    }  # fmt: skip
    before, after = _png(10), _png(200)
    page = render_html(
        verdict, {"nc-class-0-mask.png": before}, repair=repair, repair_artifacts={"nc-class-0-mask.png": after}
    )
    section = page[page.index('<section id="repair">') :]
    section = section[: section.index("</section>")]
    assert "&lt;b&gt;r1&lt;/b&gt;" in section
    assert "<b>r1</b>" not in section
    assert "the re-scan still flags a class" in section
    assert "in 3 round(s)" in section
    assert "<td>0.97</td><td>0.31</td>" in section
    assert "largest margin of class 0 on any input (held under 20.25)" in section
    assert "<td>61.5</td><td>22.5</td>" in section
    images = [attrs["src"] for tag, attrs in _tags(section) if tag == "img"]
    assert images == [
        "data:image/png;base64," + base64.b64encode(before).decode(),
        "data:image/png;base64," + base64.b64encode(after).decode(),
    ]
    assert "mask L1 6.5" in section
    assert "mask L1 70" in section
    assert 'id="repair"' not in render_html(verdict, {})  # no repair, no section
