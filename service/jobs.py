"""The job store: every read and write of the job table, the source of truth for every scan (the queue only carries
scan ids).

Workers move a scan through ``queued -> running -> succeeded|failed|cancelled`` with single conditional
UPDATE statements, so two workers (or a worker and the reaper) can never both own one scan. The tables are in
:mod:`service.models`, the engine and the migrations in :mod:`service.db`.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Update, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.models import REUSABLE, JobKind, JobStatus, Scan, Worker

__all__ = ["FileInfo", "JobStore", "NewScan", "new_scan_id", "utcnow"]

logger = logging.getLogger(__name__)

_INSERT_TRIES = 3


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_scan_id() -> str:
    return secrets.token_hex(16)


@dataclass(frozen=True)
class FileInfo:
    """An uploaded file as stored: the client's name (for display only), its digest and size."""

    filename: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class NewScan:
    """A scan to insert (:meth:`JobStore.create`): its stored files, accepted options and the keys that dedupe it."""

    id: str
    model: FileInfo
    model_format: str
    data: FileInfo | None
    training_data: FileInfo | None
    options: dict[str, Any]
    dedup_key: str
    idempotency_key: str | None
    callback_url: str | None = None
    kind: JobKind = JobKind.scan
    parent_id: str | None = None


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
            kind=new.kind,
            parent_id=new.parent_id,
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

    def get_kind(self, job_id: str, kind: JobKind) -> Scan | None:
        """The job with this id if it is of this kind (a scan id is not a repair id, and the other way round)."""
        job = self.get(job_id)
        return job if job is not None and job.kind == kind else None

    def repairs_of(self, scan_id: str, status: JobStatus | None = None) -> Sequence[Scan]:
        """The repairs of a scan, newest first."""
        with self._session() as session:
            query = select(Scan).where(Scan.kind == JobKind.repair, Scan.parent_id == scan_id)
            if status is not None:
                query = query.where(Scan.status == status)
            return session.scalars(query.order_by(Scan.created_at.desc(), Scan.id)).all()

    def list_scans(self, status: JobStatus | None, limit: int, offset: int) -> tuple[Sequence[Scan], int]:
        """Scans (not repairs), newest first."""
        with self._session() as session:
            query = select(Scan).where(Scan.kind == JobKind.scan)
            count = select(func.count()).select_from(Scan).where(Scan.kind == JobKind.scan)
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
            rows = session.execute(
                select(Scan.status, func.count()).where(Scan.kind == JobKind.scan).group_by(Scan.status)
            ).all()
        return {str(status): int(count) for status, count in rows}

    def durations(self) -> list[float]:
        with self._session() as session:
            return [
                float(d or 0.0)
                for d in session.scalars(
                    select(Scan.duration_s).where(Scan.duration_s.is_not(None), Scan.kind == JobKind.scan)
                )
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
