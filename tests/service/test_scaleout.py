"""Scale-out against real servers: huey on Redis, the job table on PostgreSQL, one API and separate workers.

Every test gets a fresh PostgreSQL database (dropped afterwards). The Redis tests use a database number of the
Redis at ``BDS_TEST_REDIS_URL`` (flushed before and after), or a private ``redis-server`` on a free port when
that one is not running; the restart test always starts its own (``--save ""``: a restart forgets every queued
message), never the shared one. ``.ci/run`` starts Redis and PostgreSQL on 127.0.0.1; without them (and
without a ``redis-server`` binary) these tests skip, saying which one is missing.

The tests name the database and Redis fixtures before ``make_server``: fixtures are torn down in reverse order,
so the processes stop before their database is dropped and their Redis flushed.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

import service.db
from service.config import Settings
from service.db import create_db_engine, migrate
from service.jobs import FileInfo, JobStore, NewScan, new_scan_id, utcnow
from service.models import JobStatus
from service.queue import build_huey
from tests.servers import free_port, wait_for
from tests.service.conftest import Server, WorkerProcess, submit
from tests.service.test_hostile import (
    RACERS,
    SHOWN_NAME,
    a_scan,
    check_migration_keeps_existing_duplicates,
    hostile_upload,
    racing_creates,
)

#: Admin connection used to create and drop a database per test (trust auth on loopback in CI).
POSTGRES_URL = os.environ.get("BDS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
#: A Redis database these tests may flush.
REDIS_URL = os.environ.get("BDS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
FINAL = ("succeeded", "failed", "cancelled")


# -- servers ---------------------------------------------------------------------------------------------


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (SQLAlchemy URL, psycopg 3), dropped after the test."""
    psycopg = pytest.importorskip("psycopg")
    from psycopg import sql

    try:
        admin = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        pytest.skip(
            f"PostgreSQL is not reachable at {POSTGRES_URL} ({str(exc).strip().splitlines()[0]}): .ci/run starts"
            " one; or point BDS_TEST_POSTGRES_URL at a server where this user may CREATE DATABASE"
        )
    name = f"bds_test_{secrets.token_hex(6)}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_url(POSTGRES_URL).set(drivername="postgresql+psycopg", database=name)
    yield url.render_as_string(hide_password=False)
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def job_store(postgres_url: str) -> Iterator[JobStore]:
    """The test's job table, as the test reads it (the processes under test migrate it)."""
    store = JobStore(create_db_engine(postgres_url))
    yield store
    store.engine.dispose()


@dataclass
class RedisServer:
    """A private ``redis-server`` on a free loopback port that keeps nothing on disk (a restart empties it)."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        options = ["--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [binary, *options, "--dir", str(self.directory)],
            stdout=(self.directory / "redis.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while not _redis_answers(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{(self.directory / 'redis.log').read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def _redis_answers(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    pytest.importorskip("redis")
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server binary to start a private Redis (apt-get install redis-server; .ci/run does)")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """An empty Redis database: ``BDS_TEST_REDIS_URL`` (flushed), else a private ``redis-server``."""
    redis = pytest.importorskip("redis")
    if _redis_answers(REDIS_URL):
        client = redis.Redis.from_url(REDIS_URL)
        client.flushdb()
        yield REDIS_URL
        client.flushdb()
        client.close()
        return
    if shutil.which("redis-server") is None:
        pytest.skip(
            f"Redis is not reachable at {REDIS_URL} and there is no redis-server binary to start one:"
            " .ci/run starts one; or set BDS_TEST_REDIS_URL"
        )
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    yield server.url
    server.stop()


# -- helpers ---------------------------------------------------------------------------------------------


def pid_of(worker_id: str | None) -> int:
    """The process id in a scan's ``worker_id`` (``host:pid:thread``)."""
    assert worker_id is not None
    return int(worker_id.split(":")[1])


def worker_with_pid(workers: list[WorkerProcess], pid: int) -> WorkerProcess:
    matches = [worker for worker in workers if worker.pid == pid]
    assert matches, f"pid {pid} is none of this test's workers"
    return matches[0]


def started_scans(worker: WorkerProcess) -> list[str]:
    """Ids of the scans this worker claimed (one ``scan started`` line per claim)."""
    return [str(r["scan_id"]) for r in worker.records() if str(r.get("message")).startswith("scan started")]


def queued_messages(queue_url: str, tmp_path: Path) -> int:
    huey = build_huey(Settings.model_validate({"queue_url": queue_url, "data_dir": tmp_path / "probe"}))
    try:
        return int(huey.pending_count())
    finally:
        huey.storage.pool.disconnect()


def tiny_scans(client: Any, service_files: dict[str, Path], seeds: range) -> list[str]:
    """Quick scans (no data and Neural Cleanse only: the file check only); distinct seeds, so none is deduplicated."""
    ids = []
    for seed in seeds:
        response = submit(
            client, {"model": service_files["tiny"]}, arch="mnist_cnn", seed=str(seed), detectors="neural_cleanse"
        )
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


# -- the job table on PostgreSQL -------------------------------------------------------------------------


def test_concurrent_starts_migrate_postgresql_once(postgres_url: str, tmp_path: Path) -> None:
    """An API and several workers starting together on an empty database: one migrates, the others wait."""
    code = (
        "import sys, time; from pathlib import Path; from service.db import create_db_engine, migrate\n"
        "engine = create_db_engine(sys.argv[1]); engine.connect().close(); Path(sys.argv[2]).touch()\n"
        "while not Path(sys.argv[3]).exists(): time.sleep(0.001)\n"
        "migrate(engine)\n"
    )
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{index}" for index in range(4)]
    processes = [
        subprocess.Popen([sys.executable, "-c", code, postgres_url, str(flag), str(go)], stderr=subprocess.PIPE)
        for flag in ready
    ]
    deadline = time.monotonic() + 60
    while not all(flag.exists() for flag in ready):
        assert time.monotonic() < deadline, "migration processes did not start"
        assert all(process.poll() is None for process in processes), [p.stderr.read() for p in processes if p.stderr]
        time.sleep(0.01)
    go.touch()
    errors = [process.communicate(timeout=60)[1].decode() for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, errors

    engine = create_db_engine(postgres_url)
    try:
        with engine.connect() as connection:
            versions = connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all()
    finally:
        engine.dispose()
    head = ScriptDirectory(str(Path(service.db.__file__).parent / "migrations")).get_current_head()
    assert versions == [head]
    assert head == "0004"  # a new revision: bump this, and check that it migrates a database at the one before


def test_job_table_on_postgresql(postgres_url: str) -> None:
    """The conditional UPDATEs, the reaper and UTC datetimes on PostgreSQL (``postgresql://`` means psycopg 3)."""
    engine = create_db_engine(postgres_url.replace("postgresql+psycopg://", "postgresql://"))
    assert engine.dialect.driver == "psycopg"
    try:
        migrate(engine)
        migrate(engine)  # a no-op when current
        store = JobStore(engine)
        model = FileInfo("model.safetensors", "ab" * 32, 123)
        new = NewScan(new_scan_id(), model, "safetensors", None, None, {"seed": 1}, "k" * 64, "idem-1")
        scan, created = store.create(new)
        again, created_again = store.create(dataclasses.replace(new, id=new_scan_id()))
        assert (created, created_again, again.id) == (True, False, scan.id)  # same idempotency key: the first

        stored = store.get(scan.id)
        assert stored is not None
        assert stored.created_at.tzinfo is not None
        assert stored.created_at.utcoffset() == timedelta(0)
        assert abs(stored.created_at - utcnow()) < timedelta(seconds=30)
        assert stored.created_at.astimezone(UTC) == scan.created_at

        assert store.claim(scan.id, "a:1:1")
        assert not store.claim(scan.id, "b:2:1")
        assert not store.heartbeat(scan.id, "b:2:1")
        assert store.heartbeat(scan.id, "a:1:1")
        assert store.reap(timedelta(seconds=60), max_attempts=2) == ([], [])
        assert store.reap(timedelta(seconds=-1), max_attempts=2) == ([scan.id], [])  # stale: re-queued
        assert store.claim(scan.id, "b:2:1")
        assert store.worker_gone("b:2") == [scan.id]  # stopped on purpose: back in the queue, attempt not counted
        assert store.claim(scan.id, "c:3:1")
        assert store.reap(timedelta(seconds=-1), max_attempts=2) == ([], [scan.id])  # 2 lost runs: worker_lost
        final = store.get(scan.id)
        assert final is not None
        assert (final.status, final.error_code, final.attempts) == (JobStatus.failed, "worker_lost", 2)
        assert store.counts_by_status() == {"failed": 1}
    finally:
        engine.dispose()


def test_identical_uploads_racing_on_postgresql_make_one_scan(job_store: JobStore) -> None:
    """20 inserts of the same upload at once, without and with distinct idempotency keys: one scan each time."""
    migrate(job_store.engine)
    for round_, keys in enumerate([[None] * RACERS, [f"key-{i}" for i in range(RACERS)]]):
        outcomes = racing_creates(job_store, a_scan(str(round_) * 64), keys)
        assert len({scan_id for scan_id, _ in outcomes}) == 1
        assert sorted(created for _, created in outcomes) == [False] * (RACERS - 1) + [True]
    assert job_store.list_scans(None, 50, 0)[1] == 2


def test_migration_keeps_duplicates_a_postgresql_database_holds(job_store: JobStore) -> None:
    check_migration_keeps_existing_duplicates(job_store.engine)


def test_nul_in_a_filename_is_no_error_on_postgresql(
    postgres_url: str, make_client: Callable[..., TestClient], tiny_model: Path
) -> None:
    """psycopg refuses NUL in text: the name is cleaned where it is taken from the upload, before the INSERT."""
    client = make_client(database_url=postgres_url)
    upload = hostile_upload({"model": ("ev\x00il\u202egnp.pt2", tiny_model.read_bytes())}, arch="mnist_cnn")
    response = client.post("/v1/scans", **upload)
    assert response.status_code == 202, response.text
    assert response.json()["model"]["filename"] == SHOWN_NAME


# -- API and workers as separate processes ---------------------------------------------------------------


def test_two_workers_share_the_queue_and_run_each_scan_once(
    postgres_url: str,
    redis_url: str,
    make_server: Callable[..., Server],
    job_store: JobStore,
    service_files: dict[str, Path],
) -> None:
    server = make_server(database_url=postgres_url, queue_url=redis_url)
    workers = [server.start_worker() for _ in range(2)]  # they and the API migrate the empty database together
    server.start(workers=0)
    for worker in workers:
        worker.wait_consuming()
    with server.client() as client:
        ids = tiny_scans(client, service_files, range(8))
        finished = [wait_for(client, scan_id, timeout=120) for scan_id in ids]

    assert [scan["status"] for scan in finished] == ["succeeded"] * 8, [scan["error"] for scan in finished]
    assert [scan["verdict"] for scan in finished] == ["inconclusive"] * 8
    assert [scan["attempts"] for scan in finished] == [1] * 8
    claims = {worker.pid: started_scans(worker) for worker in workers}
    assert sorted(scan_id for started in claims.values() for scan_id in started) == sorted(ids)  # once each
    assert all(claims.values()), f"one worker did all the work: {claims}"
    for scan_id in ids:  # and the job table names the worker that logged the claim
        row = job_store.get(scan_id)
        assert row is not None
        assert scan_id in claims[pid_of(row.worker_id)]


def test_kill_9_mid_scan_is_finished_by_the_other_worker(
    postgres_url: str,
    redis_url: str,
    make_server: Callable[..., Server],
    job_store: JobStore,
    service_files: dict[str, Path],
) -> None:
    server = make_server(database_url=postgres_url, queue_url=redis_url, heartbeat_timeout_s="3")
    workers = [server.start_worker() for _ in range(2)]
    server.start(workers=0)
    for worker in workers:
        worker.wait_consuming()
    with server.client() as client:
        # a Neural Cleanse scan in one round (its classes converge after 150 to 250 steps): long enough to kill,
        # and it flags the BadNets trigger
        files = {"model": service_files["badnets"], "data": service_files["data"]}
        scan = submit(client, files, nc_confirm_rounds="0", detectors="neural_cleanse").json()
        wait_for(client, scan["id"], until=("running",), timeout=60)
        running = job_store.get(scan["id"])
        assert running is not None
        victim = worker_with_pid(workers, pid_of(running.worker_id))
        victim.kill()
        finished = wait_for(client, scan["id"])

    assert finished["status"] == "succeeded", finished["error"]
    assert finished["attempts"] == 2
    assert finished["verdict"] == "backdoored"
    (survivor,) = [worker for worker in workers if worker is not victim]
    final = job_store.get(scan["id"])
    assert final is not None
    assert pid_of(final.worker_id) == survivor.pid
    assert "re-queued a scan whose worker was lost" in survivor.messages(scan["id"])


def test_scan_that_keeps_killing_its_worker_fails_with_worker_lost(
    postgres_url: str,
    redis_url: str,
    make_server: Callable[..., Server],
    job_store: JobStore,
    service_files: dict[str, Path],
) -> None:
    """Whichever worker claims the scan dies (kill -9) and is replaced; after BDS_MAX_ATTEMPTS runs it fails."""
    server = make_server(database_url=postgres_url, queue_url=redis_url, heartbeat_timeout_s="3", max_attempts="2")
    workers = [server.start_worker() for _ in range(2)]
    server.start(workers=0)
    for worker in workers:
        worker.wait_consuming()
    with server.client() as client:
        scan = submit(client, {"model": service_files["badnets"], "data": service_files["data"]}).json()
        killed: list[str] = []
        deadline = time.monotonic() + 180
        while (row := job_store.get(scan["id"])) is not None and row.status not in FINAL:
            assert time.monotonic() < deadline, f"scan still {row.status} after {len(killed)} kill(s)"
            if row.status == "running" and row.worker_id not in killed:
                assert row.worker_id is not None
                worker_with_pid(server.workers, pid_of(row.worker_id)).kill()
                killed.append(row.worker_id)
                server.start_worker()  # as an orchestrator would restart it
            time.sleep(0.1)
        finished = wait_for(client, scan["id"], timeout=30)

    assert finished["status"] == "failed"
    assert finished["error"]["code"] == "worker_lost"
    assert finished["attempts"] == 2
    assert len(killed) == 2


def test_redis_restart_loses_no_queued_scan(
    postgres_url: str,
    private_redis: RedisServer,
    make_server: Callable[..., Server],
    service_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    """Scans queued in a Redis that restarts empty still run: the reaper re-enqueues what the job table
    says is queued and the queue lacks. The API and running workers reconnect by themselves."""
    server = make_server(database_url=postgres_url, queue_url=private_redis.url)
    server.start(workers=0)
    with server.client() as client:
        lost = tiny_scans(client, service_files, range(4))
        assert queued_messages(private_redis.url, tmp_path) == 4
        private_redis.restart()
        assert queued_messages(private_redis.url, tmp_path) == 0  # --save "": the messages are gone

        after = tiny_scans(client, service_files, range(4, 5))  # the API reconnects on its own
        assert queued_messages(private_redis.url, tmp_path) == 1
        workers = [server.start_worker() for _ in range(2)]
        finished = [wait_for(client, scan_id, timeout=120) for scan_id in lost + after]
        assert [scan["status"] for scan in finished] == ["succeeded"] * 5, [scan["error"] for scan in finished]
        assert [scan["attempts"] for scan in finished] == [1] * 5
        reenqueued = {
            str(r["scan_id"])
            for worker in workers
            for r in worker.records()
            if r.get("message") == "enqueued a queued scan the queue did not hold"
        }
        assert reenqueued >= set(lost)

        private_redis.restart()  # with the workers running: their consumers reconnect and go on
        late = tiny_scans(client, service_files, range(5, 6))
        assert wait_for(client, late[0], timeout=120)["status"] == "succeeded"

        private_redis.stop()  # Redis down: submissions are still taken (the row is the truth), /readyz says 503
        down = tiny_scans(client, service_files, range(6, 7))
        assert client.get("/readyz").status_code == 503
        private_redis.start()
        assert wait_for(client, down[0], timeout=120)["status"] == "succeeded"
    claims = [scan_id for worker in workers for scan_id in started_scans(worker)]
    assert sorted(claims) == sorted(lost + after + late + down)  # each ran once
    assert all(worker.process.poll() is None for worker in workers)
