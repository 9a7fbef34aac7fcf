"""Repairs over HTTP: against a real ``serve``, a backdoored upload is scanned, repaired, downloaded and scanned again
(clean); in process, every refusal of ``POST /v1/scans/{id}/repair`` has its code."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from scanner.testing.mnist import MnistSplit
from service.jobs import FileInfo, NewScan, new_scan_id
from service.models import JobStatus
from service.storage import ScanFiles
from tests.factories import BadNetsModel, to_uint8, write_npz
from tests.servers import wait_for
from tests.service.conftest import AUTH, Server, assert_problem, post_scan, submit

FINAL = ("succeeded", "failed", "cancelled")


def wait_for_repair(client: httpx.Client | TestClient, repair_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    stages: set[str] = set()
    while (repair := client.get(f"/v1/repairs/{repair_id}").json())["status"] not in FINAL:
        stages.add(repair["progress"]["stage"])
        assert time.monotonic() < deadline, repair
        time.sleep(0.2)
    repair["seen_stages"] = sorted(stages)
    return repair


def test_scan_repair_download_rescan_is_clean(
    make_server: Callable[..., Server],
    service_files: dict[str, Path],
    badnets: BadNetsModel,
    mnist: MnistSplit,
    tmp_path: Path,
) -> None:
    clean_500 = write_npz(
        tmp_path / "clean-500.npz", to_uint8(mnist.test_images[:500]), mnist.test_labels[:500].numpy()
    )
    server = make_server()
    server.start()
    with server.client() as client:
        created = submit(client, {"model": service_files["badnets"], "data": service_files["data"]})
        scan = wait_for(client, created.json()["id"], timeout=300)
        assert scan["verdict"] == "backdoored", scan
        assert scan["result"]["flagged_classes"] == [badnets.target]

        with clean_500.open("rb") as data:
            response = client.post(f"/v1/scans/{scan['id']}/repair", files={"data": ("clean-500.npz", data)})
        assert response.status_code == 202, response.text
        repair = response.json()
        assert response.headers["location"] == repair["links"]["self"] == f"/v1/repairs/{repair['id']}"
        assert repair["scan_id"] == scan["id"]
        assert repair["classes"] == [badnets.target]
        assert repair["data"]["filename"] == "clean-500.npz"
        assert repair["options"] == {"max_accuracy_drop": 0.02}
        with clean_500.open("rb") as data:  # the same repair asked for again: the same job
            again = client.post(f"/v1/scans/{scan['id']}/repair", files={"data": ("clean-500.npz", data)})
        assert again.status_code == 200, again.text
        assert again.json()["id"] == repair["id"]
        assert client.get(f"/v1/scans/{repair['id']}").status_code == 404  # a repair is not a scan
        assert [item["id"] for item in client.get("/v1/scans").json()["items"]] == [scan["id"]]

        repair = wait_for_repair(client, repair["id"])
        assert repair["status"] == "succeeded", repair["error"]
        assert {"unlearning", "rescan"} <= set(repair["seen_stages"])
        result = repair["result"]
        assert result["repaired"] is True
        assert result["rescan"]["verdict"] == "clean"
        assert result["clean_accuracy"]["drop"] <= 0.02
        assert result["samples"] == {"fine_tuning": 350, "held_out": 150}
        rates = result["trigger_attack_success_rate"][str(badnets.target)]
        assert rates["before"] >= 0.9
        assert rates["after"] < 0.1
        assert result["files"] == ["repaired.pt2"]  # a .pt2 upload: no state_dict to give back
        assert [r["id"] for r in client.get(f"/v1/scans/{scan['id']}/repairs").json()] == [repair["id"]]

        download = client.get(repair["links"]["repaired.pt2"])
        assert download.status_code == 200
        repaired = tmp_path / "repaired.pt2"
        repaired.write_bytes(download.content)
        rescan = submit(client, {"model": repaired, "data": service_files["data"]})
        assert rescan.status_code == 202, rescan.text
        rescanned = wait_for(client, rescan.json()["id"], timeout=300)
        assert rescanned["status"] == "succeeded", rescanned["error"]
        assert rescanned["verdict"] == "clean", rescanned["result"]["flagged_classes"]

        # a second repair (other options) cancelled at once; the report of the scan shows the finished repair
        other = client.post(f"/v1/scans/{scan['id']}/repair", data={"max_accuracy_drop": "0.05"})
        assert other.status_code == 202, other.text
        cancelled = client.post(other.json()["links"]["cancel"])
        assert cancelled.status_code == 202
        assert wait_for_repair(client, other.json()["id"])["status"] == "cancelled"
        assert_problem(client.post(other.json()["links"]["cancel"]), 409, "repair_finished")
        report = client.get(f"/v1/scans/{scan['id']}/report")
        assert report.status_code == 200
        assert "Repair" in report.text
        assert repair["id"] in report.text


def test_repair_refusals(
    make_client: Callable[..., TestClient], tiny_model: Path, service_files: dict[str, Path]
) -> None:
    client = make_client()  # no worker: scans stay queued
    assert_problem(client.post("/v1/scans/0123/repair", headers=AUTH), 404, "scan_not_found")
    assert_problem(client.get("/v1/repairs/0123", headers=AUTH), 404, "repair_not_found")
    assert_problem(client.get("/v1/repairs/0123/artifacts/repaired.pt2", headers=AUTH), 404, "repair_not_found")
    assert client.post("/v1/scans/0123/repair").status_code == 401
    queued = post_scan(client, tiny_model, arch="mnist_cnn").json()
    url = f"/v1/scans/{queued['id']}/repair"
    assert_problem(client.post(url, headers=AUTH), 409, "scan_not_finished")
    for fields in ({"max_accuracy_drop": "0.5"}, {"max_accuracy_drop": "nan"}, {"epochs": "3"}):
        assert_problem(client.post(url, data=fields, headers=AUTH), 422, "invalid_options")
    assert_problem(
        client.post(url, content=b"{}", headers={**AUTH, "content-type": "application/json"}),
        415,
        "unsupported_media_type",
    )
    assert_problem(client.post(url, files={"data": ("d.npz", b"")}, headers=AUTH), 422, "empty_file")


def test_a_clean_verdict_has_nothing_to_repair(
    make_client: Callable[..., TestClient], tiny_model: Path, service_files: dict[str, Path]
) -> None:
    client = make_client(inline=True)  # the scan runs inside the POST
    created = post_scan(client, tiny_model, arch="mnist_cnn", detectors="max_margin").json()
    scan = client.get(f"/v1/scans/{created['id']}", headers=AUTH).json()
    assert scan["status"] == "succeeded", scan
    body = assert_problem(client.post(f"/v1/scans/{scan['id']}/repair", headers=AUTH), 409, "nothing_to_repair")
    assert "no detector flagged a class" in body["detail"]


def _succeeded_scan(client: TestClient, model_format: str = "pt2", data: bool = True, nc: bool = True) -> str:
    """A scan row that succeeded with class 0 flagged, made directly in the job table (no files but the uploads the
    flags ask for): for the refusals that need a finished scan. ``nc``: Neural Cleanse ran (reversing every class)
    and flagged it; else only the data-free test ran and flagged it."""
    state = client.app.state.bds  # type: ignore[attr-defined]
    files = ScanFiles(state.settings.scans_dir, scan_id := new_scan_id())
    files.root.mkdir(parents=True)
    files.upload("model").write_bytes(b"model")
    info = FileInfo("m.pt2", "0" * 64, 5)
    if data:
        files.upload("data").write_bytes(b"data")
    state.store.create(
        NewScan(
            id=scan_id,
            model=info,
            model_format=model_format,
            data=info if data else None,
            training_data=None,
            options={},
            dedup_key=scan_id,
            idempotency_key=None,
        )
    )
    assert state.store.claim(scan_id, "w")
    detectors: dict[str, Any] = {"max_margin": {"status": "ok", "flagged_classes": [0]}}
    if nc:
        classes = [{"class": k, "flagged": k == 0} for k in range(10)]
        detectors["neural_cleanse"] = {"status": "ok", "flagged_classes": [0], "classes": classes}
    else:
        detectors["neural_cleanse"] = {"status": "skipped", "reason": "no clean samples given (data)"}
    result = {"verdict": "backdoored", "flagged_classes": [0], "detectors": detectors}
    assert state.store.finish(scan_id, "w", JobStatus.succeeded, result=result, verdict="backdoored")
    return scan_id


def test_repair_refusals_of_a_finished_scan(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    for scan_id, code in [
        (_succeeded_scan(client, model_format="torchscript"), "repair_unsupported"),
        (_succeeded_scan(client, data=False), "missing_data"),
        (_succeeded_scan(client), "repair_unsupported"),  # the reversed triggers' files are gone
    ]:
        body = assert_problem(client.post(f"/v1/scans/{scan_id}/repair", headers=AUTH), 422, code)
        assert "Traceback" not in body["detail"]
    # a refused request leaves nothing behind
    scans_dir = client.app.state.bds.settings.scans_dir  # type: ignore[attr-defined]
    assert len(list(scans_dir.iterdir())) == 3


def test_a_class_flagged_without_a_reversed_trigger_is_repaired_too(make_client: Callable[..., TestClient]) -> None:
    # the data-free test flagged class 0 and Neural Cleanse did not run: the repair is queued without trigger files
    # and reverses class 0's itself (scanner.repair.repair_checkpoint's ``classes``)
    client = make_client()  # no worker: the repair stays queued
    scan_id = _succeeded_scan(client, nc=False)
    response = client.post(f"/v1/scans/{scan_id}/repair", headers=AUTH)
    assert response.status_code == 202, response.text
    assert response.json()["classes"] == [0]
    state = client.app.state.bds  # type: ignore[attr-defined]
    row = state.store.get(response.json()["id"])
    assert row.options["classes"] == [0]
    assert row.options["triggers"] == []
    assert not (state.settings.scans_dir / response.json()["id"] / "triggers").exists()


def test_parallel_identical_repair_requests_make_one_repair(make_client: Callable[..., TestClient]) -> None:
    client = make_client()  # no worker: the repair stays queued
    scan_id = _succeeded_scan(client)
    scans_dir = client.app.state.bds.settings.scans_dir  # type: ignore[attr-defined]
    for kind in ("mask", "pattern"):  # the reversed trigger's files, as the scan would have left them
        (scans_dir / scan_id / "artifacts").mkdir(exist_ok=True)
        (scans_dir / scan_id / "artifacts" / f"nc-class-0-{kind}.npy").write_bytes(b"npy")
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: client.post(f"/v1/scans/{scan_id}/repair", headers=AUTH), range(16)))
    assert sorted(r.status_code for r in responses) == [200] * 15 + [202], [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(client.get(f"/v1/scans/{scan_id}/repairs", headers=AUTH).json()) == 1
    assert len(list(scans_dir.iterdir())) == 2  # the scan's directory and the one repair's: the others were removed
