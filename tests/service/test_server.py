"""End to end against a real ``backdoor-scan serve`` process (uvicorn on loopback + a worker process)."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.factories import BadNetsModel
from tests.servers import wait_for
from tests.service.conftest import Server, submit


def test_backdoored_and_clean_models_get_the_right_verdicts(
    make_server: Callable[..., Server], service_files: dict[str, Path], badnets: BadNetsModel
) -> None:
    server = make_server()
    server.start()
    with server.client() as client:
        backdoored = submit(client, {"model": service_files["badnets"], "data": service_files["data"]})
        clean = submit(client, {"model": service_files["clean"], "data": service_files["data"]}, arch="mnist_cnn")
        assert backdoored.status_code == 202, backdoored.text
        assert clean.status_code == 202, clean.text
        assert backdoored.headers["location"] == f"/v1/scans/{backdoored.json()['id']}"
        assert backdoored.json()["model"]["format"] == "pt2"

        seen_progress = set()
        scan_id = backdoored.json()["id"]
        deadline = time.monotonic() + 240
        while (scan := client.get(f"/v1/scans/{scan_id}").json())["status"] not in ("succeeded", "failed"):
            seen_progress.add(scan["progress"]["stage"])
            assert time.monotonic() < deadline, scan
            time.sleep(0.2)
        assert scan["status"] == "succeeded", scan["error"]
        assert "neural_cleanse" in seen_progress  # progress is written while the scan runs
        assert scan["verdict"] == "backdoored"
        assert scan["result"]["flagged_classes"] == [badnets.target]
        assert scan["progress"]["fraction"] == 1.0
        nc = scan["result"]["detectors"]["neural_cleanse"]
        target = next(entry for entry in nc["classes"] if entry["class"] == badnets.target)
        mask_url = target["artifacts"]["mask_png"]
        assert mask_url == f"/v1/scans/{scan_id}/artifacts/nc-class-{badnets.target}-mask.png"
        png = client.get(mask_url)
        assert png.status_code == 200
        assert png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG")
        npy = client.get(target["artifacts"]["mask_npy"])
        assert npy.status_code == 200
        assert np.lib.format.read_array(__import__("io").BytesIO(npy.content), allow_pickle=False).shape == (28, 28)

        clean_scan = wait_for(client, clean.json()["id"])
        assert clean_scan["status"] == "succeeded", clean_scan["error"]
        assert clean_scan["verdict"] == "clean"
        assert clean_scan["result"]["flagged_classes"] == []

        listed = client.get("/v1/scans", params={"status": "succeeded"}).json()
        assert {item["id"] for item in listed["items"]} == {scan_id, clean_scan["id"]}
        assert listed["total"] == 2

        metrics = client.get("/metrics").text
        assert 'bds_scans{status="succeeded"} 2.0' in metrics
        assert "bds_scan_duration_seconds_count 2.0" in metrics


def test_a_backdoored_upload_without_data_gets_its_verdict(
    make_server: Callable[..., Server], service_files: dict[str, Path], badnets: BadNetsModel
) -> None:
    """Issue 16: a pipeline that POSTs only its checkpoint gets ``backdoored`` with the right class."""
    server = make_server()
    server.start()
    with server.client() as client:
        response = submit(client, {"model": service_files["badnets"]})
        assert response.status_code == 202, response.text
        scan = wait_for(client, response.json()["id"])
        assert scan["status"] == "succeeded", scan["error"]
        assert scan["verdict"] == "backdoored"
        assert scan["result"]["flagged_classes"] == [badnets.target]
        detectors = scan["result"]["detectors"]
        assert detectors["neural_cleanse"] == {"status": "skipped", "reason": "no clean samples given (data)"}
        mm = detectors["max_margin"]
        assert mm["flagged_classes"] == [badnets.target]
        assert mm["p_value"] < mm["significance"]
        target = mm["classes"][badnets.target]
        png = client.get(target["artifacts"]["input_png"])
        assert png.status_code == 200
        assert png.content.startswith(b"\x89PNG")
        report = client.get(scan["links"]["report"])
        assert report.status_code == 200
        assert f'id="mm-class-{badnets.target}"' in report.text


def messages_in(log: Path) -> list[str]:
    """The messages of the JSON log lines in a log file."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                found.append(str(json.loads(line).get("message")))
    return found


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_restart_mid_queue_loses_nothing(
    make_server: Callable[..., Server], service_files: dict[str, Path], how: int
) -> None:
    """Stop the server while one scan runs and others wait; after a restart every scan finishes."""
    server = make_server()
    server.start()
    with server.client() as client:
        running = submit(
            client,
            {"model": service_files["badnets"], "data": service_files["data"]},
            detectors="neural_cleanse",
            nc_confirm_rounds="0",
        ).json()
        queued = [
            submit(
                client, {"model": service_files["tiny"]}, arch="mnist_cnn", seed=str(seed), detectors="neural_cleanse"
            ).json()
            for seed in range(3)
        ]
        wait_for(client, running["id"], until=("running",))
        time.sleep(1.0)
    first_log = server.log_path
    assert first_log is not None
    server.stop(how)
    # the worker (its output goes to serve's log) stops its scan at a progress point, gives it back and exits; with
    # SIGKILL it gets SIGTERM from the kernel when its parent dies. Issue 13: it used to exit while the scan thread
    # was inside torch, and aborted ("terminate called without an active exception")
    deadline = time.monotonic() + 30
    while "stopped" not in " ".join(messages_in(first_log)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "scan interrupted: the worker is stopping" in messages_in(first_log)
    assert "terminate called" not in first_log.read_text(errors="replace")

    server.start()
    with server.client() as client:
        finished = [wait_for(client, scan["id"]) for scan in [running, *queued]]
    assert [scan["status"] for scan in finished] == ["succeeded"] * 4, [scan["error"] for scan in finished]
    assert finished[0]["verdict"] == "backdoored"
    assert [scan["verdict"] for scan in finished[1:]] == ["inconclusive"] * 3  # no data, NC only: the file check
    assert finished[0]["attempts"] == 1  # an interrupted run is given back, not counted against the scan


def test_error_paths_over_the_network(
    make_server: Callable[..., Server], service_files: dict[str, Path], tmp_path: Path
) -> None:
    """The error paths of the contract through a real socket: problem+json, status and code."""
    import os

    import httpx

    from tests.malicious import MALICIOUS_BUILDERS
    from tests.service.conftest import API_KEY

    server = make_server(max_upload_mb="1")
    server.start(workers=0)

    def check(response: httpx.Response, status: int, code: str) -> None:
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == code
        assert response.json()["status"] == status

    unsafe = MALICIOUS_BUILDERS[sorted(MALICIOUS_BUILDERS)[0]](tmp_path, tmp_path / "pwned")
    with server.client() as client:
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(1_500_000))  # over the 1 MiB cap, under the body cap: refused while streaming
        check(submit(client, {"model": big}, arch="mnist_cnn"), 413, "upload_too_large")
        huge = tmp_path / "huge.bin"
        huge.write_bytes(os.urandom(12_000_000))  # over the body cap: refused from Content-Length, body unread
        check(submit(client, {"model": huge}, arch="mnist_cnn"), 413, "upload_too_large")
        check(
            submit(client, {"model": service_files["tiny"]}, arch="mnist_cnn", num_classes="1"), 422, "invalid_options"
        )
        check(client.get("/v1/scans/0123456789abcdef"), 404, "scan_not_found")
        check(submit(client, {"model": unsafe}, arch="mnist_cnn"), 422, "unsafe_file")
        corrupt = tmp_path / "corrupt.pt"
        corrupt.write_bytes(b"PK\x03\x04truncated zip")
        check(submit(client, {"model": corrupt}, arch="mnist_cnn"), 422, "corrupt_file")
        assert client.get("/v1/scans").json()["total"] == 0  # nothing refused was queued
    check(httpx.get(f"{server.url}/v1/scans"), 401, "missing_api_key")
    check(
        httpx.get(f"{server.url}/v1/scans", headers={"Authorization": f"Bearer {API_KEY}-not"}), 401, "invalid_api_key"
    )
    assert not (tmp_path / "pwned").exists()
    assert not list((server.data_dir / "data" / "scans").glob("*/*"))  # no upload left behind
