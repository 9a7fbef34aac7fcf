"""Service fixtures: models exported at test time, and a real ``backdoor-scan serve`` process on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from scanner.testing.mnist import MnistSplit
from service.config import Settings
from service.db import create_db_engine
from service.jobs import JobStore
from service.main import create_app
from service.queue import ScanQueue
from service.worker import ScanExecutor
from tests.factories import BadNetsModel, to_uint8, write_npz
from tests.servers import free_port

API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "api_keys": (API_KEY, "second-key"),
        "device": "cpu",
        "log_json": False,
        **overrides,
    }
    return Settings.model_validate(values)


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(inline: bool = False, **overrides: Any) -> TestClient:
        settings = make_settings(tmp_path, **overrides)
        queue = None
        if inline:
            store = JobStore(create_db_engine(settings.resolved_database_url))
            queue = ScanQueue(settings, runner=ScanExecutor(settings, store).run, immediate=True)
        client = TestClient(create_app(settings, queue=queue), raise_server_exceptions=False)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scanner.loading.architectures import build_architecture

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("api") / "tiny.safetensors"
    save_file(build_architecture("mnist_cnn", 10).state_dict(), str(path))
    return path


def post_scan(
    client: TestClient, model: bytes | Path, headers: dict[str, str] | None = None, **fields: str
) -> httpx.Response:
    content = model.read_bytes() if isinstance(model, Path) else model
    return client.post(
        "/v1/scans", files={"model": ("model.safetensors", content)}, data=fields, headers=headers or AUTH
    )


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"].endswith(f"/{code}")
    assert body["detail"]
    assert "Traceback" not in response.text
    return body


@pytest.fixture(scope="session")
def service_files(
    tmp_path_factory: pytest.TempPathFactory, badnets: BadNetsModel, clean_model: torch.nn.Module, mnist: MnistSplit
) -> dict[str, Path]:
    """A BadNets model as .pt2, a clean one as safetensors, 200 clean samples, and a tiny model for quick scans."""
    from scanner.loading.architectures import build_architecture

    root = tmp_path_factory.mktemp("service-files")
    program = torch.export.export(
        badnets.model, (mnist.test_images[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, root / "badnets.pt2")
    save_file(clean_model.state_dict(), str(root / "clean.safetensors"))
    write_npz(root / "clean.npz", to_uint8(mnist.test_images[:200]), mnist.test_labels[:200].numpy())
    torch.manual_seed(1)
    save_file(build_architecture("mnist_cnn", 10).state_dict(), str(root / "tiny.safetensors"))
    return {
        "badnets": root / "badnets.pt2",
        "clean": root / "clean.safetensors",
        "data": root / "clean.npz",
        "tiny": root / "tiny.safetensors",
    }


@dataclass
class WorkerProcess:
    """A ``backdoor-scan worker`` child process and its log (JSON lines)."""

    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def records(self) -> list[dict[str, Any]]:
        """The JSON log records written so far (other lines, e.g. tracebacks of a crash, are skipped)."""
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):  # a line cut short by kill -9
                    records.append(json.loads(line))
        return records

    def messages(self, scan_id: str | None = None) -> list[str]:
        return [str(r.get("message")) for r in self.records() if scan_id is None or r.get("scan_id") == scan_id]

    def wait_consuming(self, timeout: float = 90) -> None:
        """Until huey's consumer runs (the worker has migrated, started its reaper and reads the queue)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(m.startswith("Huey consumer started") for m in self.messages()):
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.2)
        raise TimeoutError(f"worker not consuming after {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        """kill -9, as a crash or the OOM killer would."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


@dataclass
class Server:
    """A ``backdoor-scan serve`` child process with its own data directory (and, with :meth:`start_worker`,
    ``backdoor-scan worker`` processes beside it, sharing its settings and data directory)."""

    data_dir: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    workers: list[WorkerProcess] = field(default_factory=list)

    def start_worker(self, *args: str) -> WorkerProcess:
        """Start ``backdoor-scan worker ARGS`` with this server's environment (returns at once)."""
        log_path = self.data_dir / f"worker-{len(self.workers)}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", *args],
            env=self.env,
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
        )
        worker = WorkerProcess(process, log_path)
        self.workers.append(worker)
        return worker

    def stop_workers(self) -> None:
        for worker in self.workers:  # all at once: each gives back its scan and exits
            if worker.process.poll() is None:
                worker.process.terminate()
        for worker in self.workers:
            worker.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)

    def start(self, workers: int = 1, ready_timeout: float = 90, wait_for_workers: bool = True) -> None:
        """Start ``serve`` and wait until ``/readyz`` says a worker beats (``/livez`` without workers, or with
        ``wait_for_workers=False``)."""
        self.log_path = self.data_dir / f"serve-{time.monotonic_ns()}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port), "--workers", str(workers)],
            env=self.env,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
        )
        deadline = time.monotonic() + ready_timeout
        path = "/readyz" if workers and wait_for_workers else "/livez"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {ready_timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (``sig``), and the workers started with :meth:`start_worker` (SIGTERM)."""
        self.stop_workers()
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path else ""


def new_server(data_dir: Path, **settings: str) -> Server:
    """A :class:`Server` (not started) on ``data_dir`` (created), with quick heartbeats and ``BDS_*`` overrides."""
    data_dir.mkdir()
    env = {
        **os.environ,
        "BDS_DATA_DIR": str(data_dir / "data"),
        "BDS_API_KEYS": API_KEY,
        "BDS_HEARTBEAT_INTERVAL_S": "0.5",
        "BDS_HEARTBEAT_TIMEOUT_S": "5",
        "BDS_REAPER_INTERVAL_S": "1",
        "BDS_TORCH_THREADS": "1",
        "BDS_DEVICE": "cpu",
        **{f"BDS_{name.upper()}": value for name, value in settings.items()},
    }
    return Server(data_dir=data_dir, env=env)


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def make(**settings: str) -> Server:
        server = new_server(tmp_path / f"server-{len(servers)}", **settings)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def submit(client: httpx.Client, files: dict[str, Path], **fields: str) -> httpx.Response:
    handles = {name: (path.name, path.read_bytes()) for name, path in files.items()}
    return client.post("/v1/scans", files=handles, data=fields)
