"""``GET /v1/scans/{id}/report`` of a real backdoored scan, opened in headless Chromium: it renders, every image loads,
nothing is fetched from anywhere, the console stays clean; the recovered trigger sits where the real one is.

Needs the system Chromium and the ``playwright`` package (see ``test_swagger_ui.py``); skipped when either is missing.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.factories import BadNetsModel, to_uint8, write_npz
from tests.servers import wait_for
from tests.service.conftest import API_KEY, Server, assert_problem, submit
from tests.service.test_swagger_ui import CHROMIUM, CHROMIUM_ARGS, MISSING, PNG_MAGIC

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def test_report_of_a_backdoored_scan_renders_in_chromium(
    make_server: Callable[..., Server],
    service_files: dict[str, Path],
    badnets: BadNetsModel,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import ConsoleMessage, Request, expect, sync_playwright

    train = write_npz(tmp_path / "train.npz", to_uint8(badnets.poisoned.images), badnets.poisoned.labels.numpy())
    server = make_server()
    server.start()
    with server.client() as client:
        assert_problem(client.get("/v1/scans/0123/report"), 404, "scan_not_found")
        uploads = {"model": service_files["badnets"], "data": service_files["data"], "training_data": train}
        created = submit(client, uploads)
        assert created.status_code == 202, created.text
        scan = created.json()
        report_url = scan["links"]["report"]
        assert report_url == f"/v1/scans/{scan['id']}/report"
        assert_problem(client.get(report_url), 409, "scan_not_finished")  # NC takes seconds: still queued or running
        scan = wait_for(client, scan["id"], timeout=300)
        assert scan["status"] == "succeeded", scan
        assert scan["verdict"] == "backdoored"
        response = client.get(report_url)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in response.headers["content-security-policy"]
        assert client.get(report_url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        target = next(c for c in scan["result"]["detectors"]["neural_cleanse"]["classes"] if c["flagged"])
        mask = np.load(io.BytesIO(client.get(target["artifacts"]["mask_npy"]).content), allow_pickle=False)

    # The recovered mask's hot region (at least half its maximum) lies on the real 3x3 patch.
    region = mask >= mask.max() / 2
    real = badnets.trigger.mask.numpy() > 0
    assert target["class"] == badnets.target
    assert (region & real).sum() / region.sum() > 0.5, (region.sum(), (region & real).sum())
    gradcam = target["evidence"]["gradcam"]
    assert gradcam["heat_in_trigger_stamped"] > 2 * gradcam["heat_in_trigger_clean"], gradcam

    requests: list[str] = []
    console_errors: list[str] = []

    def on_request(request: Request) -> None:
        if not request.url.startswith("data:"):
            requests.append(request.url)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            console_errors.append(f"{message.text} ({message.location})")

    screenshot = tmp_path / "report.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(
                viewport={"width": 1200, "height": 900}, extra_http_headers={"Authorization": f"Bearer {API_KEY}"}
            )
            context.set_default_timeout(15_000)
            page = context.new_page()
            page.on("request", on_request)
            page.on("console", on_console)
            page.on("pageerror", lambda error: console_errors.append(f"page error: {error}"))
            page.goto(server.url + report_url, wait_until="load")
            expect(page).to_have_title(re.compile("backdoor-scan report: badnets.pt2"))
            expect(page.locator("#verdict .verdict")).to_have_text("BACKDOORED")
            expect(page.locator(f"#nc-class-{badnets.target} h3")).to_contain_text(f"Class {badnets.target}")
            expect(page.locator(f"#spectral-class-{badnets.target} svg")).to_be_visible()
            expect(page.locator(f"#mm-class-{badnets.target} h3")).to_contain_text(f"Class {badnets.target}")
            widths = page.eval_on_selector_all("img", "images => images.map(i => i.complete && i.naturalWidth)")
            page.screenshot(path=screenshot, full_page=True)
        finally:
            browser.close()

    # Neural Cleanse: flagged mask and pattern, two evidence strips, the gallery; max margin: the flagged class's
    # optimised input beside Neural Cleanse's pattern and mask
    assert len(widths) == 2 + 2 + 2 * 10 + 3, widths
    assert all(width and width > 0 for width in widths), widths
    assert requests == [server.url + report_url], requests
    assert not console_errors, console_errors
    assert screenshot.read_bytes().startswith(PNG_MAGIC)
    assert screenshot.stat().st_size > 10_000
