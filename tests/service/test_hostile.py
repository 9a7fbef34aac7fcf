"""Hostile clients (issue 13): identical uploads raced against each other, and file names made to break the
job table or to spoof the name people see."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from alembic.config import Config
from fastapi.testclient import TestClient
from sqlalchemy import Engine, insert, select

import service.db
from service.db import create_db_engine, migrate
from service.jobs import FileInfo, JobStore, NewScan, new_scan_id, utcnow
from service.models import JobStatus, Scan
from service.storage import client_filename
from tests.service.conftest import AUTH, Server

RACERS = 20


def racing_creates(store: JobStore, new: NewScan, keys: list[str | None]) -> list[tuple[str, bool]]:
    """``store.create`` of the same scan (fresh ids, the given idempotency keys) from threads released together:
    each thread's ``(scan id, created)``."""
    barrier = threading.Barrier(len(keys))

    def create(key: str | None) -> tuple[str, bool]:
        attempt = dataclasses.replace(new, id=new_scan_id(), idempotency_key=key)
        barrier.wait(timeout=30)
        scan, created = store.create(attempt)
        return scan.id, created

    with ThreadPoolExecutor(len(keys)) as pool:
        return list(pool.map(create, keys))


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[JobStore]:
    """A job table on a fresh SQLite database, migrated."""
    engine = create_db_engine(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    try:
        migrate(engine)
        yield JobStore(engine)
    finally:
        engine.dispose()


def a_scan(dedup_key: str = "d" * 64) -> NewScan:
    model = FileInfo("model.safetensors", "ab" * 32, 123)
    return NewScan(new_scan_id(), model, "safetensors", None, None, {"arch": "mnist_cnn"}, dedup_key, None)


# -- duplicate scans ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_keys", [False, True], ids=["no-idempotency-key", "distinct-idempotency-keys"])
def test_identical_uploads_released_together_make_one_scan(
    make_server: Callable[..., Server], tiny_model: Path, with_keys: bool
) -> None:
    """20 identical uploads at the same instant against a real server: one scan, one stored copy."""
    server = make_server()
    server.start(workers=0)
    content = tiny_model.read_bytes()
    barrier = threading.Barrier(RACERS)

    def upload(index: int) -> httpx.Response:
        headers = {"Idempotency-Key": f"racer-{index}"} if with_keys else {}
        with server.client() as client:
            assert client.get("/livez").status_code == 200  # connected before the release
            barrier.wait(timeout=30)
            return client.post(
                "/v1/scans",
                files={"model": ("tiny.safetensors", content)},
                data={"arch": "mnist_cnn"},
                headers=headers,
            )

    with ThreadPoolExecutor(RACERS) as pool:
        responses = list(pool.map(upload, range(RACERS)))

    assert all(r.status_code in (200, 202) for r in responses), [r.text for r in responses if r.is_error]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1, f"{len(ids)} scans from one upload"
    (scan_id,) = ids
    assert sorted(r.status_code for r in responses) == [200] * (RACERS - 1) + [202]
    assert {r.headers["location"] for r in responses} == {f"/v1/scans/{scan_id}"}
    with server.client() as client:
        listed = client.get("/v1/scans").json()
    assert [item["id"] for item in listed["items"]] == [scan_id]
    assert listed["total"] == 1
    scans_dir = server.data_dir / "data" / "scans"  # the losers' copies are gone
    assert sorted(path.relative_to(scans_dir).as_posix() for path in scans_dir.rglob("*")) == [
        scan_id,
        f"{scan_id}/model.upload",
    ]


@pytest.mark.parametrize("with_keys", [False, True], ids=["no-idempotency-key", "distinct-idempotency-keys"])
def test_job_table_keeps_one_live_scan_per_upload(sqlite_store: JobStore, with_keys: bool) -> None:
    """The job table itself refuses a second live scan of the same upload; the loser gets the winner's scan."""
    keys: list[str | None] = [f"key-{i}" if with_keys else None for i in range(RACERS)]
    outcomes = racing_creates(sqlite_store, a_scan(), keys)
    assert len({scan_id for scan_id, _ in outcomes}) == 1
    assert sorted(created for _, created in outcomes) == [False] * (RACERS - 1) + [True]
    assert sqlite_store.list_scans(None, 50, 0)[1] == 1


def test_a_winner_cancelled_before_the_lookup_leaves_the_way_free(
    sqlite_store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loser's insert hits the unique index, but the winner is cancelled before the loser looks it up: the loser
    inserts again and gets a scan (it used to re-raise the IntegrityError: a 500)."""
    winner, created = sqlite_store.create(a_scan())
    assert created
    lookup = sqlite_store.reusable
    raced: list[str] = []

    def cancelled_first(dedup_key: str) -> Scan | None:
        if not raced:
            raced.append(dedup_key)
            sqlite_store.request_cancel(winner.id)
        return lookup(dedup_key)

    monkeypatch.setattr(sqlite_store, "reusable", cancelled_first)
    loser, created = sqlite_store.create(a_scan())
    assert created
    assert raced
    assert loser.id != winner.id
    assert sqlite_store.get(winner.id).status == JobStatus.cancelled  # type: ignore[union-attr]


def test_a_failed_or_cancelled_scan_does_not_block_a_new_one(sqlite_store: JobStore) -> None:
    first, created = sqlite_store.create(a_scan())
    assert created
    sqlite_store.request_cancel(first.id)
    second, created = sqlite_store.create(a_scan())
    assert created
    assert second.id != first.id
    assert sqlite_store.claim(second.id, "w:1:1")
    assert sqlite_store.finish(second.id, "w:1:1", JobStatus.failed, error_code="internal_error", error_detail="x")
    third, created = sqlite_store.create(a_scan())
    assert created
    again, created = sqlite_store.create(a_scan())
    assert (again.id, created) == (third.id, False)


def upgrade_to(engine: Engine, revision: str) -> None:
    """Migrate an empty database to an old revision (as a deployment of that version left it)."""
    config = Config()
    config.set_main_option("script_location", str(Path(service.db.__file__).parent / "migrations"))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def check_migration_keeps_existing_duplicates(engine: Engine) -> None:
    """Duplicates that a database at 0002 already holds survive the upgrade: the newest live scan of an upload
    stays the one that is reused, the older live ones are marked as its duplicates, nothing is deleted or changes
    status."""
    upgrade_to(engine, "0002")
    now = utcnow()
    rows = [  # (id, status, dedup key, age in seconds)
        ("a-old-succeeded", "succeeded", "a", 30),
        ("a-old-queued", "queued", "a", 20),
        ("a-newest", "running", "a", 10),
        ("a-failed", "failed", "a", 5),
        ("b-only", "queued", "b", 10),
        ("c-cancelled-1", "cancelled", "c", 20),
        ("c-cancelled-2", "cancelled", "c", 10),
    ]
    with engine.begin() as connection:
        for scan_id, status, dedup, age in rows:
            created_at = now - timedelta(seconds=age)
            connection.execute(
                insert(Scan).values(
                    id=scan_id,
                    status=status,
                    created_at=created_at,
                    updated_at=created_at,
                    progress_message="",
                    model_filename="m.pt2",
                    model_sha256="ab" * 32,
                    model_size_bytes=1,
                    model_format="pt2",
                    options_json="{}",
                    dedup_key=dedup * 64,
                )
            )

    migrate(engine)

    with engine.connect() as connection:
        after = {row.id: (row.status, row.duplicate_of) for row in connection.execute(select(Scan))}
        kinds = {(row.kind, row.parent_id) for row in connection.execute(select(Scan))}
    assert kinds == {("scan", None)}  # 0004: every job made before repairs is a scan
    assert after == {
        "a-old-succeeded": ("succeeded", "a-newest"),
        "a-old-queued": ("queued", "a-newest"),
        "a-newest": ("running", None),
        "a-failed": ("failed", None),
        "b-only": ("queued", None),
        "c-cancelled-1": ("cancelled", None),
        "c-cancelled-2": ("cancelled", None),
    }
    store = JobStore(engine)
    reused = store.reusable("a" * 64)
    assert reused is not None
    assert reused.id == "a-newest"
    assert store.create(a_scan("a" * 64))[0].id == "a-newest"  # the index holds from now on
    assert store.create(a_scan("b" * 64))[0].id == "b-only"
    assert store.create(a_scan("c" * 64))[1]  # only cancelled scans of it: a new one


def test_migration_keeps_duplicates_an_old_database_holds(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    try:
        check_migration_keeps_existing_duplicates(engine)
    finally:
        engine.dispose()


# -- hostile file names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("model.safetensors", "model.safetensors"),
        ("../../../etc/evil.safetensors", "evil.safetensors"),
        ("C:\\Users\\me\\model.pt2", "model.pt2"),
        ("mo\x00del.pt2", "model.pt2"),
        ("model\r\nX-Injected: 1.pt2", "modelX-Injected: 1.pt2"),
        ("a\x1b[31mred\x7f\x85\x9f.pt2", "a[31mred.pt2"),
        ("invoice\u202egnp.pt2", "invoicegnp.pt2"),
        ("\u202a\u202b\u202c\u202d\u2066\u2067\u2068\u2069\u200e\u200f\u061cx.pt2", "x.pt2"),
        ("  spaced.pt2  ", "spaced.pt2"),
        ("modèle-模型.pt2", "modèle-模型.pt2"),
        ("x" * 300 + ".pt2", "x" * 255),
        ("\x00\u202e/..", "model"),
        ("..", "model"),
        ("dir/", "model"),
        (" \t ", "model"),
        ("", "model"),
    ],
)
def test_client_filename(sent: str, stored: str) -> None:
    assert client_filename(sent, "model") == stored


HOSTILE_NAME = "../ev\x00il\u202egnp\x1b.pt2\x7f\u0085"
SHOWN_NAME = "evilgnp.pt2"


def hostile_upload(files: dict[str, tuple[str, bytes]], **fields: str) -> dict[str, Any]:
    """Keyword arguments of ``client.post`` for a multipart body that carries the file names byte for byte
    (httpx would percent-encode control characters, as browsers do; a hostile client does not)."""
    boundary = "hostile-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n\r\n'.encode()
        + content
        + b"\r\n"
        for name, (filename, content) in files.items()
    ]
    parts += [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    return {
        "content": b"".join(parts) + f"--{boundary}--\r\n".encode(),
        "headers": {**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    }


def test_hostile_filenames_are_stored_and_shown_sanitised(
    make_client: Callable[..., TestClient], tiny_model: Path, tmp_path: Path
) -> None:
    client = make_client(inline=True)  # the scan runs at once (file check only): its report exists
    upload = hostile_upload({"model": (HOSTILE_NAME, tiny_model.read_bytes())}, arch="mnist_cnn")
    response = client.post("/v1/scans", **upload)
    assert response.status_code == 202, response.text
    scan_id = response.json()["id"]
    assert response.json()["model"]["filename"] == SHOWN_NAME
    scan = client.get(f"/v1/scans/{scan_id}", headers=AUTH).json()
    assert scan["status"] == "succeeded", scan
    assert scan["model"]["filename"] == SHOWN_NAME
    assert [item["model"]["filename"] for item in client.get("/v1/scans", headers=AUTH).json()["items"]] == [SHOWN_NAME]
    report = client.get(f"/v1/scans/{scan_id}/report", headers=AUTH)
    assert report.status_code == 200
    assert f"<title>backdoor-scan report: {SHOWN_NAME}</title>" in report.text
    assert not any(char in report.text for char in "\x00\x1b\x7f\x85\u202e")

    engine = create_db_engine(f"sqlite:///{tmp_path / 'data' / 'jobs.sqlite3'}")
    try:
        stored = JobStore(engine).get(scan_id)
    finally:
        engine.dispose()
    assert stored is not None
    assert stored.model_filename == SHOWN_NAME
    assert sorted(p.name for p in (tmp_path / "data" / "scans" / scan_id).iterdir()) == ["artifacts", "model.upload"]


def test_hostile_data_filenames_are_sanitised(make_client: Callable[..., TestClient], tiny_model: Path) -> None:
    files = {
        "model": ("model.safetensors", tiny_model.read_bytes()),
        "data": ("\u202eda\x00ta.npz", b"samples"),
        "training_data": ("\x00\u2066", b"training samples"),
    }
    response = make_client().post("/v1/scans", **hostile_upload(files, arch="mnist_cnn"))
    assert response.status_code == 202, response.text
    assert response.json()["data"]["filename"] == "data.npz"
    assert response.json()["training_data"]["filename"] == "training_data"  # nothing left: the field's name
