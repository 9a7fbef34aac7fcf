"""The worker and the job table: one owner per scan, heartbeats, the reaper, cancel, time limit, catch-all."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from service.config import Settings
from service.db import create_db_engine, migrate
from service.jobs import FileInfo, JobStore, NewScan, new_scan_id, utcnow
from service.models import JobStatus, Scan
from service.queue import ScanQueue
from service.storage import ScanFiles
from service.worker import Reaper, ScanExecutor
from tests.servers import wait_for
from tests.service.conftest import AUTH, Server, submit


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.model_validate(
        {"data_dir": tmp_path / "data", "device": "cpu", "heartbeat_interval_s": 0.2, "max_attempts": 2}
    )


@pytest.fixture
def store(settings: Settings) -> JobStore:
    engine = create_db_engine(settings.resolved_database_url)
    migrate(engine)
    migrate(engine)  # applying again is a no-op
    return JobStore(engine)


def add_scan(settings: Settings, store: JobStore, files: dict[str, Path], options: dict[str, Any] | None = None) -> str:
    scan_id = new_scan_id()
    stored = ScanFiles(settings.scans_dir, scan_id)
    stored.root.mkdir(parents=True)
    for name, path in files.items():
        shutil.copy(path, stored.upload(name))
    info = {name: FileInfo(path.name, name * 8, path.stat().st_size) for name, path in files.items()}
    store.create(
        NewScan(
            id=scan_id,
            model=info["model"],
            model_format="unknown",
            data=info.get("data"),
            training_data=None,
            options=options or {},
            dedup_key=scan_id,
            idempotency_key=None,
        )
    )
    return scan_id


def backdate_heartbeat(store: JobStore, scan_id: str, seconds: float) -> None:
    with store._session() as session:
        session.execute(
            update(Scan).where(Scan.id == scan_id).values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )


def test_a_scan_is_claimed_once(settings: Settings, store: JobStore, service_files: dict[str, Path]) -> None:
    scan_id = add_scan(settings, store, {"model": service_files["tiny"]})
    assert store.claim(scan_id, "a:1:1")
    assert not store.claim(scan_id, "b:2:1")
    assert not store.heartbeat(scan_id, "b:2:1")
    assert store.heartbeat(scan_id, "a:1:1")
    assert not store.finish(scan_id, "b:2:1", JobStatus.succeeded)  # only the owner may finish it
    scan = store.get(scan_id)
    assert scan is not None
    assert (scan.status, scan.attempts, scan.worker_id) == ("running", 1, "a:1:1")


def test_reaper_requeues_then_fails_with_worker_lost(
    settings: Settings, store: JobStore, service_files: dict[str, Path]
) -> None:
    queue = ScanQueue(settings)
    reaper = Reaper(settings, store, queue, "reaper:1")
    scan_id = add_scan(settings, store, {"model": service_files["tiny"]})

    assert store.claim(scan_id, "dead:1:1")
    assert reaper.reap_once() == ([], [])  # the heartbeat is fresh
    backdate_heartbeat(store, scan_id, settings.heartbeat_timeout_s + 1)
    requeued, lost = reaper.reap_once()
    assert (requeued, lost) == ([scan_id], [])
    scan = store.get(scan_id)
    assert scan is not None
    assert (scan.status, scan.worker_id, scan.attempts) == ("queued", None, 1)
    assert scan_id in queue.pending_scan_ids()

    assert store.claim(scan_id, "dead:2:1")  # attempt 2 of max_attempts=2 dies too
    backdate_heartbeat(store, scan_id, settings.heartbeat_timeout_s + 1)
    assert reaper.reap_once()[1] == [scan_id]
    scan = store.get(scan_id)
    assert scan is not None
    assert (scan.status, scan.error_code) == ("failed", "worker_lost")


def test_reaper_enqueues_queued_scans_the_queue_lost(
    settings: Settings, store: JobStore, service_files: dict[str, Path]
) -> None:
    queue = ScanQueue(settings)
    scan_id = add_scan(settings, store, {"model": service_files["tiny"]})  # inserted, never enqueued
    reaper = Reaper(settings, store, queue, "reaper:1")
    assert reaper.reap_once() == ([], [])  # too fresh: the API may be about to enqueue it
    with store._session() as session:
        session.execute(update(Scan).where(Scan.id == scan_id).values(updated_at=utcnow() - timedelta(minutes=5)))
    assert reaper.reap_once() == ([scan_id], [])
    assert queue.pending_scan_ids() == {scan_id}
    assert reaper.reap_once() == ([], [])  # now the queue holds it


def test_stopping_worker_gives_its_scan_back(
    settings: Settings, store: JobStore, service_files: dict[str, Path]
) -> None:
    scan_id = add_scan(settings, store, {"model": service_files["tiny"]})
    store.worker_beat("host:7", "cpu")
    assert store.live_workers(timedelta(seconds=60)) == 1
    assert store.claim(scan_id, "host:7:123")
    assert store.worker_gone("host:7") == [scan_id]
    scan = store.get(scan_id)
    assert scan is not None
    assert (scan.status, scan.attempts) == ("queued", 0)
    assert store.live_workers(timedelta(seconds=60)) == 0


def run_in_thread(executor: ScanExecutor, scan_id: str) -> threading.Thread:
    thread = threading.Thread(target=executor.run, args=(scan_id,))
    thread.start()
    return thread


def wait_status(store: JobStore, scan_id: str, predicate: Callable[[Scan], bool], timeout: float = 120) -> Scan:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        scan = store.get(scan_id)
        if scan is not None and predicate(scan):
            return scan
        time.sleep(0.05)
    raise TimeoutError(scan_id)


def test_cancel_stops_a_running_scan(settings: Settings, store: JobStore, service_files: dict[str, Path]) -> None:
    scan_id = add_scan(settings, store, {"model": service_files["badnets"], "data": service_files["data"]})
    thread = run_in_thread(ScanExecutor(settings, store), scan_id)
    wait_status(store, scan_id, lambda scan: scan.progress_stage == "neural_cleanse")
    store.request_cancel(scan_id)
    started = time.monotonic()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert time.monotonic() - started < 10  # stopped at a progress point, not at the end of the scan
    scan = store.get(scan_id)
    assert scan is not None
    assert (scan.status, scan.error_code) == ("cancelled", "cancelled")


def test_time_limit_fails_the_scan(settings: Settings, store: JobStore, service_files: dict[str, Path]) -> None:
    limited = settings.model_copy(update={"scan_time_limit_s": 1.0})
    scan_id = add_scan(limited, store, {"model": service_files["badnets"], "data": service_files["data"]})
    ScanExecutor(limited, store).run(scan_id)
    scan = store.get(scan_id)
    assert scan is not None
    assert (scan.status, scan.error_code) == ("failed", "time_limit_exceeded")
    assert scan.duration_s is not None
    assert scan.duration_s < 30


def test_unexpected_errors_become_internal_error_logged_once(
    settings: Settings,
    store: JobStore,
    service_files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internals /etc/passwd")

    monkeypatch.setattr("scanner.pipeline.scan", explode)
    scan_id = add_scan(settings, store, {"model": service_files["tiny"]}, {"arch": "mnist_cnn"})
    with caplog.at_level(logging.ERROR):
        ScanExecutor(settings, store).run(scan_id)
    scan = store.get(scan_id)
    assert scan is not None
    assert (scan.status, scan.error_code) == ("failed", "internal_error")
    assert "secret" not in (scan.error_detail or "")
    crashes = [record for record in caplog.records if record.exc_info]
    assert len(crashes) == 1
    assert "secret internals" in str(crashes[0].exc_info[1])  # type: ignore[index]


def test_killed_worker_scan_is_requeued_and_finishes(
    make_server: Callable[..., Server], service_files: dict[str, Path]
) -> None:
    """kill -9 of the worker process mid-scan: serve starts another worker, whose reaper re-queues the scan."""
    import os
    import signal

    server = make_server(heartbeat_timeout_s="3")
    server.start()
    with server.client() as client:
        files = {"model": service_files["badnets"], "data": service_files["data"]}
        scan = submit(client, files, detectors="neural_cleanse", nc_confirm_rounds="0").json()
        wait_for(client, scan["id"], until=("running",))
        engine = create_db_engine(f"sqlite:///{server.data_dir / 'data' / 'jobs.sqlite3'}")
        running = JobStore(engine).get(scan["id"])
        assert running is not None
        assert running.worker_id is not None
        os.kill(int(running.worker_id.split(":")[1]), signal.SIGKILL)
        finished = wait_for(client, scan["id"])
    assert finished["status"] == "succeeded", finished["error"]
    assert finished["attempts"] == 2
    assert finished["verdict"] == "backdoored"


# -- one worker per GPU ----------------------------------------------------------------------------------


def test_worker_refuses_a_gpu_this_machine_lacks(tmp_path: Path) -> None:
    """``worker --device cuda:N`` checks the device before it touches the job table or the queue: one line, exit 2."""
    import os
    import subprocess
    import sys

    import torch

    device = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: absent on every machine
    env = {**os.environ, "BDS_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "worker", "--device", device],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"backdoor-scan: error [device_unavailable]: device '{device}' requested but ")
    assert not (tmp_path / "data").exists()  # refused before the job table or the queue was opened


def test_the_api_process_never_touches_cuda(
    make_client: Callable[..., Any], service_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``serve`` starts its workers after building the API, and GPU workers need a process in which CUDA was never
    initialised before it forked: building the API and checking uploads must not call into CUDA at all."""
    import torch

    def no_cuda(*args: object, **kwargs: object) -> None:
        raise AssertionError("the API process called into CUDA")

    for name in ("is_available", "device_count", "init", "_lazy_init", "current_device", "set_device"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    client = make_client()
    uploads = [
        ({"model": ("badnets.pt2", service_files["badnets"].read_bytes())}, {}),
        ({"model": ("tiny.safetensors", service_files["tiny"].read_bytes())}, {"arch": "mnist_cnn"}),
    ]
    for files, fields in uploads:
        response = client.post("/v1/scans", files=files, data=fields, headers=AUTH)
        assert response.status_code == 202, response.text
    assert client.get("/readyz").status_code in (200, 503)
    assert client.get("/metrics").status_code == 200
    assert not torch.cuda.is_initialized()


def test_serve_does_not_restart_a_worker_that_refuses_its_device(make_server: Callable[..., Server]) -> None:
    """A worker that exits 2 (a settings error) would only fail the same way again: no restart loop."""
    import torch

    server = make_server(device=f"cuda:{torch.cuda.device_count()}")
    server.start(workers=1, wait_for_workers=False)
    deadline = time.monotonic() + 90
    while "refused to start" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    time.sleep(2.5)  # the supervisor checks every second
    log = server.log()
    assert log.count("backdoor-scan: error [device_unavailable]") == 1, log
    assert log.count("refused to start") == 1, log
    with server.client() as client:
        assert client.get("/readyz").status_code == 503  # no worker beats


def test_data_errors_name_the_clients_file(
    settings: Settings, store: JobStore, service_files: dict[str, Path], tmp_path: Path
) -> None:
    """Issue 13: a worker-side data error named the stored copy (``data.upload: expected an .npz...``)."""
    sent = tmp_path / "my-samples.npz"
    sent.write_bytes(b"not a zip archive")
    scan_id = add_scan(settings, store, {"model": service_files["tiny"], "data": sent}, {"arch": "mnist_cnn"})
    ScanExecutor(settings, store).run(scan_id)
    scan = store.get(scan_id)
    assert scan is not None
    assert (scan.status, scan.error_code) == ("failed", "invalid_data")
    assert "my-samples.npz" in (scan.error_detail or "")
    assert ".upload" not in (scan.error_detail or "")
