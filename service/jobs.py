"""The job table: the source of truth for every scan (the queue only carries scan ids).

Workers move a scan through ``queued -> running -> succeeded|failed|cancelled`` with single conditional
UPDATE statements, so two workers (or a worker and the reaper) can never both own one scan.
"""

from __future__ import annotations

import fcntl
import json
import logging
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    Boolean,
    CursorResult,
    DateTime,
    Dialect,
    Engine,
    Float,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    Update,
    create_engine,
    delete,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

__all__ = ["FileInfo", "JobStatus", "JobStore", "NewScan", "Scan", "Worker", "create_db_engine", "migrate", "utcnow"]

logger = logging.getLogger(__name__)


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


FINISHED = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)
_INSERT_TRIES = 3
#: A scan in these states answers a repeated upload (one that failed or was cancelled does not).
REUSABLE = (JobStatus.queued, JobStatus.running, JobStatus.succeeded)
#: The rows of the unique index over ``dedup_key`` (migration 0003): at most one reusable scan per upload.
_ONE_PER_UPLOAD = text("status IN ('queued', 'running', 'succeeded') AND duplicate_of IS NULL")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps naive strings)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC).replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Scan(Base):
    """One scan request and everything known about it."""

    __tablename__ = "scans"
    __table_args__ = (
        Index(
            "uq_scans_live_dedup_key",
            "dedup_key",
            unique=True,
            sqlite_where=_ONE_PER_UPLOAD,
            postgresql_where=_ONE_PER_UPLOAD,
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    progress_fraction: Mapped[float] = mapped_column(Float, default=0.0)
    progress_stage: Mapped[str] = mapped_column(String(64), default="queued")
    progress_message: Mapped[str] = mapped_column(String(500), default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    model_filename: Mapped[str] = mapped_column(String(255))
    model_sha256: Mapped[str] = mapped_column(String(64), index=True)
    model_size_bytes: Mapped[int] = mapped_column(Integer)
    model_format: Mapped[str] = mapped_column(String(32))
    data_filename: Mapped[str | None] = mapped_column(String(255))
    data_sha256: Mapped[str | None] = mapped_column(String(64))
    data_size_bytes: Mapped[int | None] = mapped_column(Integer)
    training_data_filename: Mapped[str | None] = mapped_column(String(255))
    training_data_sha256: Mapped[str | None] = mapped_column(String(64))
    training_data_size_bytes: Mapped[int | None] = mapped_column(Integer)
    options_json: Mapped[str] = mapped_column(Text)
    dedup_key: Mapped[str] = mapped_column(String(64), index=True)
    #: Set by migration 0003 on older reusable scans of an upload made twice before the index existed: the scan
    #: that answers the upload now (the newest). Never set on scans made since.
    duplicate_of: Mapped[str | None] = mapped_column(String(32))
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    verdict: Mapped[str | None] = mapped_column(String(32))
    result_json: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_detail: Mapped[str | None] = mapped_column(Text)
    duration_s: Mapped[float | None] = mapped_column(Float)
    callback_url: Mapped[str | None] = mapped_column(Text)
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    webhook_delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    webhook_error: Mapped[str | None] = mapped_column(Text)

    @property
    def options(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.options_json)
        return loaded

    @property
    def result(self) -> dict[str, Any] | None:
        if self.result_json is None:
            return None
        loaded: dict[str, Any] = json.loads(self.result_json)
        return loaded


class Worker(Base):
    """A worker process, beating while it runs (for ``/readyz`` and operators)."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    device: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


@dataclass(frozen=True)
class FileInfo:
    """An uploaded file as stored: the client's name (for display only), its digest and size."""

    filename: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class NewScan:
    id: str
    model: FileInfo
    model_format: str
    data: FileInfo | None
    training_data: FileInfo | None
    options: dict[str, Any]
    dedup_key: str
    idempotency_key: str | None
    callback_url: str | None = None


def _updated(session: Session, statement: Update) -> int:
    """Run an UPDATE; returns the number of rows it changed."""
    result = session.execute(statement)
    return int(cast(CursorResult[Any], result).rowcount)


def _ended(status: JobStatus, now: datetime, code: str | None = None, detail: str | None = None) -> dict[str, Any]:
    """The columns every move to a final status sets."""
    return {
        "status": status,
        "finished_at": now,
        "updated_at": now,
        "error_code": code,
        "error_detail": detail,
        "progress_stage": str(status),
        "progress_message": detail or ("scan finished" if status is JobStatus.succeeded else str(status)),
    }


def new_scan_id() -> str:
    return secrets.token_hex(16)


def create_db_engine(url: str) -> Engine:
    """An engine for the job table.

    SQLite gets WAL and a busy timeout so API and workers share the file. A server database (PostgreSQL,
    ``postgresql://`` meaning psycopg 3) gets a checked pool: a connection the server dropped (restart,
    failover, idle timeout) is replaced before use, and connecting gives up after 10 s instead of hanging.
    """
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() != "sqlite":
        connect_args = {"connect_timeout": 10} if parsed.get_backend_name() == "postgresql" else {}
        return create_engine(parsed, pool_pre_ping=True, pool_recycle=1800, connect_args=connect_args)
    if parsed.database:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


#: Key of the PostgreSQL advisory lock held while migrating (any constant bigint; "bds-migr" in ASCII).
PG_MIGRATION_LOCK = 0x6264732D6D696772


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """One SQLite process migrates at a time (an API and its workers may start together): a file lock beside
    the database file. PostgreSQL takes an advisory lock inside the migration's transaction instead."""
    database = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    if not database:
        yield
        return
    with open(f"{database}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (run at every start; a no-op when current)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with _migration_lock(engine), engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # held until this transaction commits: the others wait, then find the schema at head (PostgreSQL
            # DDL is transactional, so a process that dies mid-migration leaves nothing half-done)
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class JobStore:
    """All reads and writes of the job table."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def ping(self) -> None:
        with self._session() as session:
            session.execute(select(1))

    # -- API side ------------------------------------------------------------------------------------

    def create(self, new: NewScan) -> tuple[Scan, bool]:
        """Insert a queued scan; returns ``(scan, created)``. An insert that loses to a concurrent one, with the
        same idempotency key or of the same upload while the other is reusable (a unique index), gets the
        winner's scan back: the one its idempotency key names, else the reusable scan of the upload. A winner that
        stopped being reusable (cancelled, failed, deleted) before it could be looked up leaves the way free: the
        insert is tried again."""
        for _ in range(_INSERT_TRIES - 1):
            try:
                return self._insert(new), True
            except IntegrityError:
                existing = None if new.idempotency_key is None else self.by_idempotency_key(new.idempotency_key)
                existing = existing or self.reusable(new.dedup_key)
                if existing is not None:
                    return existing, False
        return self._insert(new), True

    def _insert(self, new: NewScan) -> Scan:
        now = utcnow()
        scan = Scan(
            id=new.id,
            status=JobStatus.queued,
            created_at=now,
            updated_at=now,
            progress_fraction=0.0,
            progress_stage="queued",
            progress_message="waiting for a worker",
            attempts=0,
            cancel_requested=False,
            model_filename=new.model.filename,
            model_sha256=new.model.sha256,
            model_size_bytes=new.model.size_bytes,
            model_format=new.model_format,
            data_filename=new.data.filename if new.data else None,
            data_sha256=new.data.sha256 if new.data else None,
            data_size_bytes=new.data.size_bytes if new.data else None,
            training_data_filename=new.training_data.filename if new.training_data else None,
            training_data_sha256=new.training_data.sha256 if new.training_data else None,
            training_data_size_bytes=new.training_data.size_bytes if new.training_data else None,
            options_json=json.dumps(new.options, sort_keys=True),
            dedup_key=new.dedup_key,
            idempotency_key=new.idempotency_key,
            callback_url=new.callback_url,
            webhook_attempts=0,
        )
        with self._session() as session:
            session.add(scan)
        return scan

    def get(self, scan_id: str) -> Scan | None:
        with self._session() as session:
            return session.get(Scan, scan_id)

    def by_idempotency_key(self, key: str) -> Scan | None:
        with self._session() as session:
            return session.scalars(select(Scan).where(Scan.idempotency_key == key)).first()

    def reusable(self, dedup_key: str) -> Scan | None:
        """A scan of the same files with the same options that has not failed or been cancelled."""
        with self._session() as session:
            return session.scalars(
                select(Scan)
                .where(Scan.dedup_key == dedup_key, Scan.status.in_(REUSABLE))
                .order_by(Scan.created_at.desc(), Scan.id.desc())
            ).first()

    def list_scans(self, status: JobStatus | None, limit: int, offset: int) -> tuple[Sequence[Scan], int]:
        with self._session() as session:
            query = select(Scan)
            count = select(func.count()).select_from(Scan)
            if status is not None:
                query = query.where(Scan.status == status)
                count = count.where(Scan.status == status)
            rows = session.scalars(query.order_by(Scan.created_at.desc(), Scan.id).limit(limit).offset(offset)).all()
            return rows, int(session.scalar(count) or 0)

    def request_cancel(self, scan_id: str) -> Scan | None:
        """Cancel a queued scan at once; ask a running one to stop at its next progress point."""
        now = utcnow()
        with self._session() as session:
            _updated(
                session,
                update(Scan)
                .where(Scan.id == scan_id, Scan.status == JobStatus.queued)
                .values(cancel_requested=True, **_ended(JobStatus.cancelled, now, "cancelled", "cancelled by request")),
            )
            _updated(
                session,
                update(Scan)
                .where(Scan.id == scan_id, Scan.status == JobStatus.running)
                .values(cancel_requested=True, updated_at=now, progress_message="cancellation requested"),
            )
        return self.get(scan_id)

    def delete(self, scan_id: str) -> bool:
        with self._session() as session:
            scan = session.get(Scan, scan_id)
            if scan is None:
                return False
            session.delete(scan)
        return True

    def counts_by_status(self) -> dict[str, int]:
        with self._session() as session:
            rows = session.execute(select(Scan.status, func.count()).group_by(Scan.status)).all()
        return {str(status): int(count) for status, count in rows}

    def durations(self) -> list[float]:
        with self._session() as session:
            return [
                float(d or 0.0) for d in session.scalars(select(Scan.duration_s).where(Scan.duration_s.is_not(None)))
            ]

    def live_workers(self, timeout: timedelta) -> int:
        with self._session() as session:
            count = session.scalar(
                select(func.count()).select_from(Worker).where(Worker.heartbeat_at >= utcnow() - timeout)
            )
        return int(count or 0)

    def queued_ids(self, unchanged_for: timedelta) -> list[str]:
        """Queued scans not touched for ``unchanged_for`` (oldest first)."""
        cutoff = utcnow() - unchanged_for
        with self._session() as session:
            return list(
                session.scalars(
                    select(Scan.id)
                    .where(Scan.status == JobStatus.queued, Scan.updated_at < cutoff)
                    .order_by(Scan.created_at)
                )
            )

    # -- worker side ---------------------------------------------------------------------------------

    def claim(self, scan_id: str, worker_id: str) -> bool:
        """queued -> running for exactly one worker; counts the attempt."""
        now = utcnow()
        with self._session() as session:
            claimed = _updated(
                session,
                update(Scan)
                .where(Scan.id == scan_id, Scan.status == JobStatus.queued)
                .values(
                    status=JobStatus.running,
                    attempts=Scan.attempts + 1,
                    worker_id=worker_id,
                    heartbeat_at=now,
                    started_at=now,
                    updated_at=now,
                    progress_fraction=0.0,
                    progress_stage="starting",
                    progress_message="loading the model",
                ),
            )
        return bool(claimed)

    def heartbeat(self, scan_id: str, worker_id: str) -> bool:
        """Returns False when the scan is no longer this worker's (reaped, deleted)."""
        with self._session() as session:
            owned = _updated(
                session,
                update(Scan)
                .where(Scan.id == scan_id, Scan.worker_id == worker_id, Scan.status == JobStatus.running)
                .values(heartbeat_at=utcnow()),
            )
        return bool(owned)

    def report_progress(self, scan_id: str, worker_id: str, fraction: float, stage: str, message: str) -> bool:
        """Store progress; returns whether the scan should stop (cancel requested, or no longer ours)."""
        now = utcnow()
        with self._session() as session:
            owned = _updated(
                session,
                update(Scan)
                .where(Scan.id == scan_id, Scan.worker_id == worker_id, Scan.status == JobStatus.running)
                .values(
                    progress_fraction=max(0.0, min(1.0, fraction)),
                    progress_stage=stage[:64],
                    progress_message=message[:500],
                    heartbeat_at=now,
                    updated_at=now,
                ),
            )
            if not owned:
                return True
            return bool(session.scalar(select(Scan.cancel_requested).where(Scan.id == scan_id)))

    def finish(
        self,
        scan_id: str,
        worker_id: str,
        status: JobStatus,
        *,
        result: dict[str, Any] | None = None,
        verdict: str | None = None,
        error_code: str | None = None,
        error_detail: str | None = None,
    ) -> bool:
        """running -> a final status, only by the worker that owns the scan."""
        now = utcnow()
        with self._session() as session:
            started = session.scalar(select(Scan.started_at).where(Scan.id == scan_id))
            values: dict[str, Any] = {
                **_ended(status, now, error_code, error_detail),
                "heartbeat_at": now,
                "result_json": json.dumps(result) if result is not None else None,
                "verdict": verdict,
                "duration_s": (now - started).total_seconds() if started else None,
            }
            if status is JobStatus.succeeded:
                values["progress_fraction"] = 1.0
            owned = _updated(
                session,
                update(Scan)
                .where(Scan.id == scan_id, Scan.worker_id == worker_id, Scan.status == JobStatus.running)
                .values(**values),
            )
        return bool(owned)

    def record_webhook(self, scan_id: str, *, delivered: bool, error: str | None) -> None:
        with self._session() as session:
            _updated(
                session,
                update(Scan)
                .where(Scan.id == scan_id)
                .values(
                    webhook_attempts=Scan.webhook_attempts + 1,
                    webhook_delivered_at=utcnow() if delivered else None,
                    webhook_error=error,
                ),
            )

    def worker_beat(self, worker_id: str, device: str) -> None:
        now = utcnow()
        with self._session() as session:
            worker = session.get(Worker, worker_id)
            if worker is None:
                session.add(Worker(id=worker_id, device=device, started_at=now, heartbeat_at=now))
            else:
                worker.heartbeat_at = now

    def worker_gone(self, worker_id: str) -> list[str]:
        """A worker stopping on purpose: forget it and put its running scans back in the queue, without
        counting the interrupted attempt. Returns the ids of those scans (to re-enqueue)."""
        now = utcnow()
        with self._session() as session:
            session.execute(delete(Worker).where(Worker.id == worker_id))
            released = list(
                session.scalars(
                    select(Scan.id).where(
                        Scan.status == JobStatus.running, Scan.worker_id.startswith(f"{worker_id}:", autoescape=True)
                    )
                )
            )
            if released:
                _updated(
                    session,
                    update(Scan)
                    .where(Scan.id.in_(released), Scan.status == JobStatus.running)
                    .values(
                        status=JobStatus.queued,
                        worker_id=None,
                        heartbeat_at=None,
                        updated_at=now,
                        attempts=Scan.attempts - 1,
                        progress_fraction=0.0,
                        progress_stage="queued",
                        progress_message="re-queued: its worker was stopped",
                    ),
                )
        return released

    def reap(self, stale_after: timedelta, max_attempts: int) -> tuple[list[str], list[str]]:
        """Running scans whose heartbeat went stale: back to ``queued`` (returned first, to re-enqueue),
        or ``failed`` with ``worker_lost`` once they used up ``max_attempts``."""
        now = utcnow()
        cutoff = now - stale_after
        requeued: list[str] = []
        lost: list[str] = []
        with self._session() as session:
            stale = session.execute(
                select(Scan.id, Scan.attempts, Scan.cancel_requested).where(
                    Scan.status == JobStatus.running, Scan.heartbeat_at < cutoff
                )
            ).all()
        for scan_id, attempts, cancel_requested in stale:
            with self._session() as session:
                base = update(Scan).where(
                    Scan.id == scan_id, Scan.status == JobStatus.running, Scan.heartbeat_at < cutoff
                )
                if cancel_requested:
                    _updated(
                        session,
                        base.values(
                            worker_id=None,
                            **_ended(
                                JobStatus.cancelled, now, "cancelled", "cancelled by request (its worker was lost)"
                            ),
                        ),
                    )
                elif attempts >= max_attempts:
                    detail = f"the worker running this scan was lost {attempts} time(s); giving up"
                    if _updated(
                        session,
                        base.values(worker_id=None, **_ended(JobStatus.failed, now, "worker_lost", detail)),
                    ):
                        lost.append(scan_id)
                elif _updated(
                    session,
                    base.values(
                        status=JobStatus.queued,
                        updated_at=now,
                        worker_id=None,
                        heartbeat_at=None,
                        progress_fraction=0.0,
                        progress_stage="queued",
                        progress_message=f"re-queued after its worker was lost (attempt {attempts} of {max_attempts})",
                    ),
                ):
                    requeued.append(scan_id)
        return requeued, lost
