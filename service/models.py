"""The job table's schema: the scan states and the ORM models (the Alembic revisions in ``migrations/`` build the
same tables; :mod:`service.jobs` reads and writes them).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Boolean, DateTime, Dialect, Float, Index, Integer, String, Text, TypeDecorator, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["FINISHED", "REUSABLE", "Base", "JobKind", "JobStatus", "Scan", "UTCDateTime", "Worker"]


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class JobKind(StrEnum):
    scan = "scan"
    #: a repair of a succeeded scan's model (:mod:`service.repairs`); its row copies the scan's model fields
    repair = "repair"


FINISHED = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)
#: A scan in these states answers a repeated upload (one that failed or was cancelled does not).
REUSABLE = (JobStatus.queued, JobStatus.running, JobStatus.succeeded)
#: The rows of the unique index over ``dedup_key`` (migration 0003): at most one reusable scan per upload.
_ONE_PER_UPLOAD = text("status IN ('queued', 'running', 'succeeded') AND duplicate_of IS NULL")


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
    """One job (a scan, or a repair of a scan's model: ``kind``) and everything known about it."""

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
    #: no Python-side default: an insert that names no kind (as code written before repairs does) gets the server's
    kind: Mapped[str] = mapped_column(String(16), index=True, server_default=JobKind.scan.value)
    #: a repair's scan
    parent_id: Mapped[str | None] = mapped_column(String(32), index=True)
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
