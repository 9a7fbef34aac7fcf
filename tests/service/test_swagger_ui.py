"""Swagger UI at ``/docs`` in a real (headless) Chromium: it renders offline, authorizes, and submits a scan.

Needs the system Chromium (``apt-get install chromium``) and the ``playwright`` Python package; it never downloads
Playwright's own browsers. Skipped when either is missing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.service.conftest import API_KEY, Server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _missing() -> str | None:
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as error:
        return f"the playwright package cannot be imported: {error}"
    return None


MISSING = _missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def off_loopback(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about", "chrome", "devtools"):
        return False
    return parts.hostname not in LOOPBACK


def test_swagger_ui_submits_a_scan(
    make_server: Callable[..., Server], service_files: dict[str, Path], tmp_path: Path
) -> None:
    from playwright.sync_api import ConsoleMessage, Request, Route, expect, sync_playwright

    server = make_server()
    server.start(workers=0)  # the scan only has to exist; no worker needs to run it

    foreign: list[str] = []
    console_errors: list[str] = []

    def route(route: Route) -> None:
        # Record and refuse anything that would leave the machine (a CDN, fonts, telemetry).
        if off_loopback(route.request.url):
            foreign.append(route.request.url)
            route.abort()
        else:
            route.continue_()

    def on_request(request: Request) -> None:
        if off_loopback(request.url) and request.url not in foreign:
            foreign.append(request.url)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            console_errors.append(f"{message.text} ({message.location})")

    expect.set_options(timeout=15_000)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1000})
            context.set_default_timeout(15_000)
            context.route("**/*", route)
            page = context.new_page()
            page.on("request", on_request)
            page.on("console", on_console)
            page.on("pageerror", lambda error: console_errors.append(f"page error: {error}"))

            page.goto(server.url + "/docs", wait_until="networkidle")
            expect(page).to_have_title(re.compile("backdoor-scan"))
            expect(page.locator(".information-container .title")).to_contain_text("backdoor-scan")
            operation = page.locator(".opblock.opblock-post", has=page.locator('[data-path="/v1/scans"]'))
            expect(operation).to_have_count(1)
            expect(operation.locator(".opblock-summary-method")).to_have_text("POST")

            # Authorize with the API key (HTTP bearer scheme).
            page.get_by_role("button", name="Authorize", exact=True).click()
            dialog = page.locator(".dialog-ux .modal-ux")
            expect(dialog).to_be_visible()
            dialog.locator("#auth-bearer-value").fill(API_KEY)
            dialog.get_by_role("button", name="Apply credentials").click()
            expect(dialog.get_by_role("heading", name="Authorized")).to_be_visible()
            dialog.get_by_role("button", name="Close", exact=True).click()
            expect(dialog).to_be_hidden()

            # Expand POST /v1/scans and fill in the multipart form.
            operation.locator(".opblock-summary-control").click()
            try_out = operation.get_by_role("button", name=re.compile(r"^(Try it out|Cancel)$"))
            expect(try_out).to_be_visible()
            if try_out.inner_text().strip() == "Try it out":  # already on when tryItOutEnabled is set
                try_out.click()
            expect(try_out).to_have_text("Cancel")
            operation.locator('tr[data-property-name="model"] input[type="file"]').set_input_files(
                service_files["tiny"]
            )
            operation.locator('tr[data-property-name="arch"] input[type="text"]').fill("mnist_cnn")
            operation.get_by_role("button", name="Execute").click()

            # The live response (not the documented responses table): wait for any status, then check it.
            responses = operation.locator(".live-responses-table")
            status_cell = responses.locator("tbody .response-col_status").first
            expect(status_cell).to_have_text(re.compile(r"^\s*\d{3}\s*$"), timeout=30_000)
            status = status_cell.inner_text().strip()
            body_text = responses.locator("tbody .response-col_description .highlight-code pre").first.inner_text()
            sent = operation.locator(".curl-command").first.inner_text()
            page.screenshot(path=tmp_path / "swagger-ui.png", full_page=True)
        finally:
            browser.close()

    assert status == "202", f"Swagger UI got {status}: {body_text}\nit sent:\n{sent}"
    assert '"status"' in body_text, body_text
    body = json.loads(body_text)
    assert body["status"] == "queued", body
    scan_id = body["id"]
    assert isinstance(scan_id, str), body
    assert scan_id, body
    with server.client() as client:
        scan = client.get(f"/v1/scans/{scan_id}")
    assert scan.status_code == 200, scan.text
    assert scan.json()["id"] == scan_id

    assert not foreign, f"requests left loopback: {foreign}"
    assert not console_errors, f"browser console errors: {console_errors}"
    screenshot = (tmp_path / "swagger-ui.png").read_bytes()
    assert screenshot.startswith(PNG_MAGIC)
    assert len(screenshot) > 1000
