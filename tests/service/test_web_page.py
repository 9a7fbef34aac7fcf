"""The web page at ``/`` and its try-an-image route, against one real ``backdoor-scan serve`` on loopback.

The browser test drives headless Chromium like a person: enter the key, submit a BadNets model made at test time with
clean samples, watch the scan's progress to the end, open the report, try a clean sample and an uploaded image; the
stamped prediction is the backdoor's target and the clean one is not. Then the same at a phone's size. Screenshots
are kept in the test's temporary directory, and copied to ``$BDS_TEST_ARTIFACTS`` when it is set.

The API tests of ``POST /v1/scans/{id}/try`` reuse the scan the browser made (or make it when the browser test did
not run) and cover every error code, with hostile images: a PNG that declares 20000x20000 pixels, a zlib bomb inside
a PNG of the right size, ``.npy`` files with NaN or a huge declared shape, parallel requests.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from scanner.testing.mnist import MnistSplit
from service.models import JobStatus, Scan
from service.problems import ServiceError
from service.tryout import MAX_IMAGE_BYTES, ImageTrials, TryRequest, check_triable, decode_image
from tests.factories import BadNetsModel, encode_image, to_uint8
from tests.servers import wait_for
from tests.service.conftest import API_KEY, Server, assert_problem, new_server, submit
from tests.service.test_swagger_ui import CHROMIUM, CHROMIUM_ARGS, MISSING, PNG_MAGIC, off_loopback

#: The clean samples uploaded with the model are the first 200 test images (``service_files["data"]``).
CLEAN_SAMPLES = 200


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One ``serve`` (API and one worker) for every test here."""
    server = new_server(tmp_path_factory.mktemp("web-page") / "server")
    server.start()
    yield server
    server.stop()


def _non_target_row(mnist: MnistSplit, badnets: BadNetsModel, start: int, stop: int) -> int:
    """A test image in ``[start, stop)`` whose label is not the target and that the model classifies correctly."""
    images, labels = mnist.test_images[start:stop], mnist.test_labels[start:stop]
    with torch.no_grad():
        predictions = badnets.model(images).argmax(dim=1)
    rows = torch.nonzero((labels != badnets.target) & (predictions == labels)).squeeze(1)
    return start + int(rows[0])


def _png_of(mnist: MnistSplit, row: int) -> bytes:
    return encode_image(to_uint8(mnist.test_images[row]))


def _keep_screenshots(paths: list[Path]) -> None:
    target = os.environ.get("BDS_TEST_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for path in paths:
            shutil.copy(path, Path(target) / path.name)


@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
def test_web_page_submits_scans_reports_and_tries_an_image(
    ui_server: Server, service_files: dict[str, Path], badnets: BadNetsModel, mnist: MnistSplit, tmp_path: Path
) -> None:
    from playwright.sync_api import ConsoleMessage, Page, Request, Route, expect, sync_playwright

    target = badnets.target
    sample = _non_target_row(mnist, badnets, 0, CLEAN_SAMPLES)  # a row of the uploaded clean samples
    upload_row = _non_target_row(mnist, badnets, CLEAN_SAMPLES, 400)  # an image the scan never saw
    image_path = tmp_path / f"digit-{int(mnist.test_labels[upload_row])}.png"
    image_path.write_bytes(_png_of(mnist, upload_row))

    foreign: list[str] = []
    console_errors: list[str] = []
    requested: list[str] = []

    def route(route: Route) -> None:
        if off_loopback(route.request.url):
            foreign.append(route.request.url)
            route.abort()
        else:
            route.continue_()

    def on_request(request: Request) -> None:
        requested.append(request.url)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            console_errors.append(f"{message.text} ({message.location})")

    def watch(page: Page) -> None:
        page.on("request", on_request)
        page.on("console", on_console)
        page.on("pageerror", lambda error: console_errors.append(f"page error: {error}"))

    def enter_key(page: Page) -> None:
        page.goto(ui_server.url + "/", wait_until="load")
        expect(page.locator("#key-view")).to_be_visible()
        page.locator("#key").fill(API_KEY)
        page.get_by_role("button", name="Continue").click()
        expect(page.locator("#list-view")).to_be_visible()

    def try_sample(page: Page) -> None:
        page.locator("#sample-form input[name=sample]").fill(str(sample))
        page.get_by_role("button", name="Try this sample").click()
        expect(page.locator("#try-result .note").first).to_contain_text(f"Clean sample {sample}")
        expect(page.locator(".tried[data-kind=clean] .prediction")).to_have_text(str(int(mnist.test_labels[sample])))
        expect(page.locator(f".tried[data-trigger='{target}'] .prediction")).to_have_text(str(target))

    screenshots: list[Path] = []
    expect.set_options(timeout=15_000)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.set_default_timeout(15_000)
            context.route("**/*", route)
            page = context.new_page()
            watch(page)
            enter_key(page)
            assert page.evaluate("sessionStorage.getItem('bds-api-key')") == API_KEY

            # Submit the backdoored model with clean samples through the form.
            page.locator("#submit-form input[name=model]").set_input_files(service_files["badnets"])
            page.locator("#submit-form input[name=data]").set_input_files(service_files["data"])
            page.get_by_role("checkbox", name="spectral signatures").uncheck()  # no training data; a quicker scan
            page.get_by_role("checkbox", name="max margin (data-free)").uncheck()
            with page.expect_response(lambda r: r.url.endswith("/v1/scans") and r.request.method == "POST") as sent:
                page.get_by_role("button", name="Scan", exact=True).click()
            assert sent.value.status == 202, sent.value.text()
            scan_id = sent.value.json()["id"]
            assert sent.value.json()["options"] == {"detectors": ["neural_cleanse"]}
            expect(page.locator("#submit-status")).to_have_text("Queued: badnets.pt2.")

            # Live progress: the row shows a progress bar while the scan runs, then the verdict.
            row = page.locator(f"#scan-{scan_id}")
            expect(row.locator("td.model")).to_have_text("badnets.pt2")
            seen: set[str] = set()
            deadline = time.monotonic() + 300
            while row.get_attribute("data-status") != "succeeded":
                status = row.get_attribute("data-status") or ""
                if status == "running" and "running" not in seen:
                    expect(row.locator("progress")).to_be_visible()
                    screenshots.append(tmp_path / "web-page-running.png")
                    page.screenshot(path=screenshots[-1], full_page=True)
                seen.add(status)
                assert status not in ("failed", "cancelled"), row.inner_text()
                assert time.monotonic() < deadline, f"scan still {status} after 300 s"
                page.wait_for_timeout(250)
            assert "running" in seen or "queued" in seen, seen
            expect(row.locator("progress")).to_have_count(0)
            expect(row.locator("td.verdict")).to_have_text("backdoored")
            expect(row.locator("td.flagged")).to_have_text(str(target))
            screenshots.append(tmp_path / "web-page-list.png")
            page.screenshot(path=screenshots[-1], full_page=True)

            # Open the report, in the page.
            row.get_by_role("link", name="Report and try an image").click()
            expect(page.locator("#scan-title")).to_have_text("badnets.pt2")
            report = page.frame_locator("#report")
            expect(report.locator("#verdict .verdict")).to_have_text("BACKDOORED")
            expect(report.locator(f"#nc-class-{target} h3")).to_contain_text(f"Class {target}")
            with page.expect_download() as download:
                page.get_by_role("link", name="Download the report (HTML)").click()
            assert download.value.suggested_filename == f"backdoor-scan-report-{scan_id}.html"
            saved = tmp_path / download.value.suggested_filename
            download.value.save_as(saved)
            assert saved.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")

            # Try one of the scan's clean samples, then an image of our own.
            try_sample(page)
            page.locator("#image-form input[name=image]").set_input_files(image_path)
            page.get_by_role("button", name="Try this image").click()
            expect(page.locator("#try-result .note").first).to_contain_text(image_path.name)
            clean_prediction = page.locator(".tried[data-kind=clean] .prediction")
            expect(clean_prediction).to_have_text(str(int(mnist.test_labels[upload_row])))
            assert clean_prediction.inner_text() != str(target)
            expect(page.locator(f".tried[data-trigger='{target}'] .prediction")).to_have_text(str(target))
            expect(page.locator(f".tried[data-trigger='{target}']")).to_have_class("tried flipped")
            widths = page.eval_on_selector_all("#try-result img", "images => images.map(i => i.naturalWidth)")
            assert widths == [112, 112, 112, 112], widths  # image and Grad-CAM, as is and stamped
            screenshots.append(tmp_path / "web-page-try.png")
            page.locator("#try").screenshot(path=screenshots[-1])
            # the report's sandboxed frame is painted apart: full-page screenshots leave it blank, the window's do not
            screenshots.append(tmp_path / "web-page-report.png")
            page.locator("#report").screenshot(path=screenshots[-1])
            page.locator("#try").evaluate("section => section.scrollIntoView()")
            screenshots.append(tmp_path / "web-page-scan.png")
            page.screenshot(path=screenshots[-1])
            assert context.cookies() == []

            # A phone: the same page, one column, nothing wider than the screen.
            phone = browser.new_context(
                viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True
            )
            phone.set_default_timeout(15_000)
            phone.route("**/*", route)
            small = phone.new_page()
            watch(small)
            enter_key(small)
            phone_row = small.locator(f"#scan-{scan_id}")
            expect(phone_row.locator("td.verdict")).to_have_text("backdoored")
            box = phone_row.bounding_box()
            assert box is not None
            assert box["width"] <= 390, box
            assert small.evaluate("document.documentElement.scrollWidth") <= 390
            screenshots.append(tmp_path / "web-page-phone-list.png")
            small.screenshot(path=screenshots[-1], full_page=True)
            phone_row.get_by_role("link", name="Report and try an image").click()
            expect(small.frame_locator("#report").locator("#verdict .verdict")).to_have_text("BACKDOORED")
            try_sample(small)
            assert small.evaluate("document.documentElement.scrollWidth") <= 390
            screenshots.append(tmp_path / "web-page-phone-try.png")
            small.screenshot(path=screenshots[-1], full_page=True)
        finally:
            browser.close()

    _keep_screenshots(screenshots)
    assert not foreign, f"requests left loopback: {foreign}"
    assert not console_errors, f"browser console errors: {console_errors}"
    assert not [url for url in requested if API_KEY in url], "the key went into a URL"
    for path in screenshots:
        assert path.read_bytes().startswith(PNG_MAGIC)


# --- the page itself ------------------------------------------------------------------------------------------


def test_page_and_assets_need_no_key_and_carry_a_strict_policy(ui_server: Server) -> None:
    with httpx.Client(base_url=ui_server.url, timeout=30) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert 'data-auth="required"' in page.text
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy
        assert "script-src 'self';" in policy
        assert "unsafe-inline" not in policy
        assert "unsafe-eval" not in policy
        assert "frame-ancestors 'none'" in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "<script>" not in page.text  # the one script is a file
        assert "http" not in page.text.replace("http-equiv", "")  # nothing from anywhere else
        for path, media_type in (("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")):
            asset = client.get(path)
            assert asset.status_code == 200
            assert asset.headers["content-type"].startswith(media_type)
            assert "http://" not in asset.text
            assert "https://" not in asset.text
        assert_problem(client.get("/v1/scans"), 401, "missing_api_key")
        assert_problem(client.get("/ui/other.js"), 404, "not_found")


def test_page_without_auth_does_not_ask_for_a_key(tmp_path: Path) -> None:
    from service.main import create_app
    from tests.service.conftest import make_settings

    with TestClient(create_app(make_settings(tmp_path, auth_disabled=True))) as client:
        assert 'data-auth="disabled"' in client.get("/").text


# --- POST /v1/scans/{id}/try ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backdoored_scan(ui_server: Server, service_files: dict[str, Path]) -> dict[str, Any]:
    """The succeeded scan of the BadNets model with clean samples: the browser test's, else a new one."""
    with ui_server.client() as client:
        for scan in client.get("/v1/scans", params={"status": "succeeded"}).json()["items"]:
            if scan["model"]["filename"] == "badnets.pt2" and scan["data"] is not None:
                return dict(scan)
        uploads = {"model": service_files["badnets"], "data": service_files["data"]}
        created = submit(client, uploads, detectors="neural_cleanse")  # what the browser test submits
        assert created.status_code == 202, created.text
        scan = wait_for(client, created.json()["id"], timeout=300)
    assert scan["status"] == "succeeded", scan
    return scan


@pytest.fixture(scope="module")
def dataless_scan(ui_server: Server, service_files: dict[str, Path]) -> dict[str, Any]:
    """A succeeded scan without clean samples (Neural Cleanse skipped): nothing flagged, nothing to pick."""
    with ui_server.client() as client:
        created = submit(client, {"model": service_files["tiny"]}, arch="mnist_cnn", detectors="neural_cleanse")
        assert created.status_code == 202, created.text
        scan = wait_for(client, created.json()["id"], timeout=120)
    assert scan["status"] == "succeeded", scan
    return scan


def _try(
    client: httpx.Client, scan_id: str, image: bytes | None = None, name: str = "image.png", **fields: str
) -> httpx.Response:
    """``POST /v1/scans/{id}/try`` as multipart/form-data (as browsers and ``curl -F`` send it), fields as parts."""
    parts: dict[str, tuple[str | None, bytes | str]] = {key: (None, value) for key, value in fields.items()}
    if image is not None:
        parts["image"] = (name, image)
    return client.post(f"/v1/scans/{scan_id}/try", files=parts or {"sample": (None, "")})


def test_try_a_sample_stamped_goes_to_the_target(
    ui_server: Server, backdoored_scan: dict[str, Any], badnets: BadNetsModel, mnist: MnistSplit
) -> None:
    sample = _non_target_row(mnist, badnets, 0, CLEAN_SAMPLES)
    with ui_server.client() as client:
        response = _try(client, backdoored_scan["id"], sample=str(sample))
    assert response.status_code == 200, response.text
    body = response.json()
    label = int(mnist.test_labels[sample])
    assert body["input"] == {"kind": "sample", "filename": None, "sample": sample, "row": sample, "label": label}
    assert body["input_shape"] == [1, 28, 28]
    assert body["clean"]["prediction"] == label != badnets.target
    assert [s["trigger_class"] for s in body["stamped"]] == [badnets.target]
    stamped = body["stamped"][0]
    assert stamped["prediction"] == badnets.target
    assert 0.5 < stamped["confidence"] <= 1
    assert body["not_stamped"] == []
    assert body["gradcam"]["status"] == "ok"
    assert body["gradcam"]["layer"].startswith("features.3")
    for tried in (body["clean"], stamped):
        for key in ("image_png", "gradcam_png"):
            assert tried[key].startswith("data:image/png;base64,")


def test_try_an_uploaded_png_and_the_same_npy(
    ui_server: Server, backdoored_scan: dict[str, Any], badnets: BadNetsModel, mnist: MnistSplit
) -> None:
    row = _non_target_row(mnist, badnets, CLEAN_SAMPLES, 400)
    pixels = to_uint8(mnist.test_images[row])  # (1, 28, 28)
    npy = io.BytesIO()
    np.save(npy, pixels[0].astype(np.float32) / 255)  # (H, W) float
    answers = []
    with ui_server.client() as client:
        for name, content in (("digit.png", encode_image(pixels)), ("digit.npy", npy.getvalue())):
            response = _try(client, backdoored_scan["id"], content, name)
            assert response.status_code == 200, response.text
            answers.append(response.json())
    for body, name in zip(answers, ("digit.png", "digit.npy"), strict=True):
        assert body["input"]["kind"] == "image"
        assert body["input"]["filename"] == name
        assert body["clean"]["prediction"] == int(mnist.test_labels[row]) != badnets.target
        assert body["stamped"][0]["prediction"] == badnets.target
    assert answers[0]["clean"]["confidence"] == pytest.approx(answers[1]["clean"]["confidence"], abs=1e-4)


def test_try_without_flagged_classes_still_predicts(ui_server: Server, dataless_scan: dict[str, Any]) -> None:
    with ui_server.client() as client:
        response = _try(client, dataless_scan["id"], encode_image(np.zeros((28, 28), np.uint8)))
        assert response.status_code == 200, response.text
        assert response.json()["stamped"] == []
        assert response.json()["not_stamped"] == []
        assert_problem(_try(client, dataless_scan["id"], sample="0"), 409, "no_samples")


def test_try_refusals(ui_server: Server, backdoored_scan: dict[str, Any], service_files: dict[str, Path]) -> None:
    scan_id = backdoored_scan["id"]
    png = encode_image(np.zeros((28, 28), np.uint8))
    with ui_server.client() as client:
        anonymous = httpx.post(f"{ui_server.url}/v1/scans/{scan_id}/try", files={"image": ("a.png", png)})
        assert_problem(anonymous, 401, "missing_api_key")
        assert_problem(_try(client, "0123", png), 404, "scan_not_found")
        assert_problem(_try(client, scan_id), 422, "missing_image")
        assert_problem(_try(client, scan_id, png, sample="1"), 422, "image_and_sample")
        for bad in ("-1", "one", "1.5", "1" * 12, "\u0661"):  # the last: an Arabic-Indic digit one
            assert_problem(_try(client, scan_id, sample=bad), 422, "invalid_sample")
        out_of_range = assert_problem(_try(client, scan_id, sample=str(CLEAN_SAMPLES)), 422, "sample_out_of_range")
        assert out_of_range["samples"] == CLEAN_SAMPLES
        assert_problem(_try(client, scan_id, b""), 422, "empty_file")
        assert_problem(_try(client, scan_id, b"GIF89a..."), 415, "unsupported_image")
        jpeg = encode_image(np.zeros((28, 28), np.uint8), "JPEG")
        assert_problem(_try(client, scan_id, jpeg), 415, "unsupported_image")
        assert_problem(client.post(f"/v1/scans/{scan_id}/try", json={"sample": 0}), 415, "unsupported_media_type")
        assert_problem(_try(client, scan_id, png, other="1"), 422, "invalid_upload")
        too_large = _try(client, scan_id, PNG_MAGIC + bytes(MAX_IMAGE_BYTES))
        assert_problem(too_large, 413, "upload_too_large")

        # a scan that has not succeeded yet
        queued = submit(client, {"model": service_files["clean"]}, arch="mnist_cnn", nc_max_steps="100")
        assert queued.status_code == 202, queued.text
        client.post(f"/v1/scans/{queued.json()['id']}/cancel")
        assert_problem(_try(client, queued.json()["id"], png), 409, "scan_not_finished")


def _png(width: int, height: int, idat: bytes, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """A PNG from its chunks: any declared size, any IDAT payload."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return PNG_MAGIC + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npy_declaring(shape: tuple[int, ...], payload: bytes = b"") -> bytes:
    """An .npy whose header declares ``shape`` (float32) but holds only ``payload``."""
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + payload


def test_try_hostile_images_are_refused_quickly(ui_server: Server, backdoored_scan: dict[str, Any]) -> None:
    scan_id = backdoored_scan["id"]
    rows = zlib.compress(bytes(29 * 28))  # a valid 28x28 grayscale image: filter byte + 28 pixels per row
    squeeze = zlib.compressobj(9)  # the image's rows, then 512 MiB of zeros: half a megabyte of IDAT
    bomb = squeeze.compress(bytes(29 * 28)) + b"".join(squeeze.compress(bytes(2**20)) for _ in range(512))
    bomb += squeeze.flush()
    with ui_server.client() as client:
        assert _try(client, scan_id, _png(28, 28, rows)).status_code == 200
        cases: list[tuple[bytes, int, str]] = [
            (_png(20000, 20000, rows), 422, "invalid_image"),  # Pillow's decompression-bomb cap, before any pixel
            (_png(4000, 4000, rows), 422, "image_shape_mismatch"),  # the header's size, before any pixel
            (_png(32, 32, rows), 422, "image_shape_mismatch"),
            (_png(28, 28, rows)[:-30], 422, "invalid_image"),  # cut short
            (_png(28, 28, b"not zlib"), 422, "invalid_image"),
            (_png(28, 28, rows, bit_depth=16), 422, "invalid_image"),  # 16 bits: refused, not clipped
            (_npy(np.full((28, 28), np.nan, np.float32)), 422, "invalid_image"),
            (_npy(np.full((28, 28), np.inf, np.float64)), 422, "invalid_image"),
            (_npy(np.full((28, 28), 2.0, np.float32)), 422, "invalid_image"),
            (_npy(np.zeros((28, 28), np.int64)), 422, "invalid_image"),
            (_npy(np.zeros((3, 28, 28), np.float32)), 422, "image_shape_mismatch"),
            (_npy_declaring((1, 28, 28)), 422, "invalid_image"),  # too few bytes
            (_npy_declaring((10**6, 10**6)), 422, "image_shape_mismatch"),  # never allocated
            (b"\x93NUMPY\x01\x00" + struct.pack("<H", 60000) + b"{" * 60000, 422, "invalid_image"),
        ]
        for content, status, code in cases:
            started = time.monotonic()
            assert_problem(_try(client, scan_id, content), status, code)
            assert time.monotonic() - started < 10
        started = time.monotonic()
        response = _try(client, scan_id, _png(28, 28, bomb))  # inflates to gigabytes if read to its end
        assert response.status_code in (200, 422), response.text
        assert time.monotonic() - started < 10
        assert "Traceback" not in response.text


def test_try_in_parallel_answers_or_asks_to_wait(
    ui_server: Server, backdoored_scan: dict[str, Any], mnist: MnistSplit
) -> None:
    png = _png_of(mnist, CLEAN_SAMPLES)
    with ui_server.client() as client, ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: _try(client, backdoored_scan["id"], png).status_code, range(32)))
        assert set(statuses) <= {200, 429}, statuses
        assert 200 in statuses
        assert _try(client, backdoored_scan["id"], png).status_code == 200  # nothing stuck after the burst


def test_try_admits_a_bounded_number_of_requests(tmp_path: Path) -> None:
    trials = ImageTrials(tmp_path, max_pending=2)

    async def third_is_refused() -> None:
        async with trials.admitted(), trials.admitted():
            with pytest.raises(ServiceError) as refused:
                async with trials.admitted():
                    pass
            assert refused.value.status == 429
            assert refused.value.code == "too_many_requests"
            assert refused.value.headers == {"Retry-After": "1"}
        async with trials.admitted(), trials.admitted():  # the places came back
            pass

    anyio.run(third_is_refused)


@pytest.mark.parametrize(
    ("status", "verdict", "options", "code"),
    [
        (JobStatus.running, None, {}, "scan_not_finished"),
        (JobStatus.failed, None, {}, "scan_not_finished"),
        (JobStatus.succeeded, "unsafe_file", {}, "unsafe_model"),
        (JobStatus.succeeded, "clean", {"trust_code": True}, "model_runs_code"),
    ],
)
def test_scans_whose_model_is_not_tried(
    status: JobStatus, verdict: str | None, options: dict[str, Any], code: str
) -> None:
    scan = Scan(status=status, verdict=verdict, options_json=json.dumps(options), result_json="{}" if verdict else None)
    with pytest.raises(ServiceError) as refused:
        check_triable(scan)
    assert refused.value.status == 409
    assert refused.value.code == code


def test_scan_that_can_be_tried() -> None:
    check_triable(Scan(status=JobStatus.succeeded, verdict="backdoored", options_json="{}", result_json="{}"))


def test_decode_image_fits_the_model_s_channels_or_refuses() -> None:
    grey = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    rgb = decode_image(encode_image(grey), (3, 28, 28))  # grayscale PNG, RGB model: the channel repeated
    assert rgb.shape == (3, 28, 28)
    assert rgb.dtype == torch.float32
    assert torch.equal(rgb[0], rgb[2])
    assert torch.equal(rgb[0], torch.from_numpy(grey.astype(np.float32) / 255))
    colour = np.stack([grey, np.zeros_like(grey), np.full_like(grey, 255)])  # (3, H, W) uint8
    assert decode_image(encode_image(colour), (1, 28, 28)).shape == (1, 28, 28)  # RGB PNG, grey model: luminance
    assert torch.equal(decode_image(_npy(colour), (3, 28, 28)), torch.from_numpy(colour.astype(np.float32) / 255))
    fortran = np.asfortranarray(colour.astype(np.float64) / 255)
    assert torch.allclose(decode_image(_npy(fortran), (3, 28, 28)), torch.from_numpy(colour.astype(np.float32) / 255))
    for content, shape in ((encode_image(grey), (4, 28, 28)), (_npy(grey), (3, 28, 28))):
        with pytest.raises(ServiceError) as refused:
            decode_image(content, shape)
        assert refused.value.code == "image_shape_mismatch"
        assert refused.value.extra == {"expected": list(shape)}


def test_try_on_a_scan_whose_files_are_gone(tmp_path: Path) -> None:
    """Deleted between the lookup and the load: a 409, not a 500."""
    scan = Scan(id="0" * 32, status=JobStatus.succeeded, verdict="clean", options_json="{}", result_json="{}")
    with pytest.raises(ServiceError) as refused:
        ImageTrials(tmp_path).try_on(scan, TryRequest(sample=0))
    assert refused.value.status == 409
    assert refused.value.code == "model_not_loadable"
