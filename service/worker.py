"""The worker: the one place where scan exceptions become stored failures.

A worker process runs huey's consumer (scan ids from the queue), a heartbeat per running scan, and the
reaper, which re-queues scans whose worker stopped beating (bounded attempts, then ``worker_lost``) and
re-enqueues queued scans that the queue does not hold (an API that died between its insert and its enqueue).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from scanner.errors import ScanCancelled, ScannerError
from service.config import Settings
from service.db import create_db_engine, migrate
from service.jobs import JobStore
from service.models import JobKind, JobStatus, Scan
from service.options import RepairOptions, ScanOptions, scan_config
from service.queue import ScanQueue
from service.repairs import TRIGGERS_DIR
from service.storage import ScanFiles
from service.webhooks import WebhookSender

if TYPE_CHECKING:
    import torch

    from scanner.detectors import Progress

__all__ = ["ScanExecutor", "TimeLimitExceeded", "run_worker"]

logger = logging.getLogger(__name__)

#: Progress is written at most this often (the cancel flag is read with it).
PROGRESS_INTERVAL_S = 0.5
#: How long a stopping worker waits for its running scans to reach a progress point (``serve`` waits 30 s).
STOP_TIMEOUT_S = 20.0


class TimeLimitExceeded(ScanCancelled):
    code = "time_limit_exceeded"


class WorkerStopping(ScanCancelled):
    """Raised at a progress point when the worker process is stopping: the scan unwinds and is given back."""

    code = "worker_stopping"


def artifact_urls(value: Any, base: str) -> Any:
    """Replace artifact file names under every ``artifacts`` mapping of a verdict dict by their URLs."""
    if isinstance(value, dict):
        return {
            key: (
                {name: f"{base}/{file}" for name, file in item.items()}
                if key == "artifacts" and isinstance(item, dict)
                else artifact_urls(item, base)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [artifact_urls(item, base) for item in value]
    return value


def _client_names(detail: str, scan: Scan, files: ScanFiles) -> str:
    """``detail`` with the stored upload names (``data.upload``) replaced by the names the client sent."""
    for field_name, client_name in (
        ("model", scan.model_filename),
        ("data", scan.data_filename),
        ("training_data", scan.training_data_filename),
    ):
        if client_name:
            detail = detail.replace(files.upload(field_name).name, client_name)
    return detail


class ScanExecutor:
    """Runs one scan by id: claim, scan with heartbeat/progress/cancel/time limit, store the outcome."""

    def __init__(self, settings: Settings, store: JobStore):
        self.settings = settings
        self.store = store
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        #: called with the id of a finished scan that has a callback URL (enqueues the webhook)
        self.notify: Callable[[str], None] | None = None
        self._stopping = threading.Event()
        self._idle = threading.Condition()
        self._running = 0

    def stop(self, timeout_s: float) -> bool:
        """Make running scans stop at their next progress point (they are given back, not finished) and wait up to
        ``timeout_s`` for them to return; True when none is left. A process that exits while a scan thread is inside
        torch aborts (``terminate called without an active exception``), so the worker waits for them first."""
        self._stopping.set()
        with self._idle:
            return self._idle.wait_for(lambda: self._running == 0, timeout_s)

    @contextmanager
    def _heartbeat(self, scan_id: str, worker_id: str) -> Iterator[None]:
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.settings.heartbeat_interval_s):
                try:
                    self.store.heartbeat(scan_id, worker_id)
                except Exception:  # a database hiccup must not kill the scan; the next beat retries
                    logger.warning("heartbeat failed", exc_info=True, extra={"scan_id": scan_id})

        thread = threading.Thread(target=beat, name=f"heartbeat-{scan_id[:8]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def run(self, scan_id: str) -> None:
        with self._idle:
            self._running += 1
        try:
            self._run(scan_id)
        finally:
            with self._idle:
                self._running -= 1
                self._idle.notify_all()

    def _run(self, scan_id: str) -> None:
        worker_id = f"{self.worker_id}:{threading.get_ident()}"
        if self._stopping.is_set():  # it stays queued: the reaper of a live worker enqueues it again
            logger.info("scan not started: the worker is stopping", extra={"scan_id": scan_id})
            return
        if not self.store.claim(scan_id, worker_id):
            logger.info("scan not claimable (already taken, cancelled or deleted)", extra={"scan_id": scan_id})
            return
        scan = self.store.get(scan_id)
        if scan is None:
            return
        log = {"scan_id": scan_id, "sha256": scan.model_sha256}
        logger.info("scan started (attempt %d)", scan.attempts, extra=log)
        try:
            with self._heartbeat(scan_id, worker_id):
                status, fields = self._execute(scan, worker_id, log)
        except WorkerStopping:  # the row stays this worker's: run_worker gives it back once every scan returned
            logger.info("scan interrupted: the worker is stopping", extra=log)
            return
        if fields.get("error_detail"):  # the client reads about the files it sent, not our stored copies
            files = ScanFiles(self.settings.scans_dir, scan_id)
            fields["error_detail"] = _client_names(fields["error_detail"], scan, files)
        if self.store.finish(scan_id, worker_id, status, **fields):
            logger.info("scan %s %s", status, fields.get("verdict") or fields.get("error_code") or "", extra=log)
            if scan.callback_url and self.notify is not None:
                self.notify(scan_id)
        else:
            logger.warning("scan outcome dropped: the scan is no longer this worker's", extra=log)

    def _execute(self, job: Scan, worker_id: str, log: dict[str, str]) -> tuple[JobStatus, dict[str, Any]]:
        from scanner.device import resolve_device

        scan_id = job.id
        files = ScanFiles(self.settings.scans_dir, scan_id)
        deadline = time.monotonic() + self.settings.scan_time_limit_s
        last_write = 0.0

        def progress(fraction: float, stage: str, message: str) -> None:
            nonlocal last_write
            if self._stopping.is_set():
                raise WorkerStopping("the worker is stopping")
            now = time.monotonic()
            if now > deadline:
                raise TimeLimitExceeded(
                    f"the {job.kind} ran past its time limit of {self.settings.scan_time_limit_s:g} s"
                )
            if now - last_write < PROGRESS_INTERVAL_S and fraction < 1.0:
                return
            last_write = now
            if self.store.report_progress(scan_id, worker_id, fraction, stage, message):
                raise ScanCancelled("cancelled by request")

        try:
            device = resolve_device(self.settings.device)
            if job.kind == JobKind.repair:
                return _repair(job, files, device, progress)
            return _scan(job, files, device, progress)
        except WorkerStopping:
            raise
        except TimeLimitExceeded as exc:
            return JobStatus.failed, {"error_code": exc.code, "error_detail": exc.detail}
        except ScanCancelled as exc:
            return JobStatus.cancelled, {"error_code": exc.code, "error_detail": exc.detail}
        except ScannerError as exc:
            return JobStatus.failed, {"error_code": exc.code, "error_detail": exc.detail}
        except Exception:
            logger.exception("scan crashed", extra=log)
            return JobStatus.failed, {
                "error_code": "internal_error",
                "error_detail": "the scan hit an internal error; it has been logged",
            }


def _scan(job: Scan, files: ScanFiles, device: torch.device, progress: Progress) -> tuple[JobStatus, dict[str, Any]]:
    from scanner.pipeline import scan
    from scanner.render.text import write_artifacts

    config = scan_config(ScanOptions.model_validate(job.options))
    data = files.upload("data")
    training = files.upload("training_data")
    verdict = scan(
        files.upload("model"),
        config,
        device,
        data_path=data if data.exists() else None,
        training_data_path=training if training.exists() else None,
        progress=progress,
    )
    result = artifact_urls(verdict.to_dict(), f"/v1/scans/{job.id}/artifacts")
    names = [path.name for path in write_artifacts(verdict, files.artifacts)]
    result["artifacts"] = {name: f"/v1/scans/{job.id}/artifacts/{name}" for name in names}
    return JobStatus.succeeded, {"result": result, "verdict": verdict.label.value}


def _repair(job: Scan, files: ScanFiles, device: torch.device, progress: Progress) -> tuple[JobStatus, dict[str, Any]]:
    """Repair the scan's flagged classes with their reversed triggers (``service.repairs`` linked them into the
    repair's directory; the repair reverses those the scan did not); the
    repaired files and the re-scan's artifacts become the repair's artifacts."""
    from scanner.render.text import write_artifacts
    from scanner.repair import read_triggers, repair_checkpoint

    options = job.options
    config = scan_config(ScanOptions.model_validate(options["scan"]))
    repair_config = RepairOptions.model_validate(options["repair"]).config()
    # "triggers": the flagged classes whose reversed trigger the scan gave (a repair queued before it existed: all)
    with_trigger = options.get("triggers", options["classes"])
    triggers = read_triggers(with_trigger, lambda name: (files.root / TRIGGERS_DIR / name).read_bytes())
    report = repair_checkpoint(
        files.upload("model"),
        files.upload("data"),
        triggers,
        files.artifacts,
        classes=options["classes"],
        scan_config=config,
        config=repair_config,
        device=device,
        progress=progress,
    )
    base = f"/v1/repairs/{job.id}/artifacts"
    result = report.to_dict()
    result["rescan"] = artifact_urls(result["rescan"], base)
    names = [path.name for path in write_artifacts(report.rescan, files.artifacts)]
    result["artifacts"] = {name: f"{base}/{name}" for name in (*report.files, *names)}
    return JobStatus.succeeded, {"result": result, "verdict": report.rescan.label.value}


class Reaper:
    """Beats for this worker process; re-queues scans whose worker went silent (``failed`` with
    ``worker_lost`` after ``max_attempts``)."""

    def __init__(self, settings: Settings, store: JobStore, queue: ScanQueue, worker_id: str):
        self.settings = settings
        self.store = store
        self.queue = queue
        self.worker_id = worker_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reap_once(self) -> tuple[list[str], list[str]]:
        requeued, lost = self.store.reap(
            timedelta(seconds=self.settings.heartbeat_timeout_s), self.settings.max_attempts
        )
        for scan_id in requeued:
            logger.warning("re-queued a scan whose worker was lost", extra={"scan_id": scan_id})
            self.queue.enqueue(scan_id)
        for scan_id in lost:
            logger.error("scan failed: its worker was lost too many times", extra={"scan_id": scan_id})
            scan = self.store.get(scan_id)
            if scan is not None and scan.callback_url:
                self.queue.enqueue_webhook(scan_id)
        # queued scans the queue does not hold (an API that stopped between its insert and its enqueue, a
        # queue that lost its messages); a second delivery is harmless, since only one worker can claim a scan
        settled = timedelta(seconds=max(self.settings.reaper_interval_s, 5.0))
        pending = self.queue.pending_scan_ids()
        orphans = [scan_id for scan_id in self.store.queued_ids(settled) if scan_id not in pending]
        for scan_id in orphans:
            logger.warning("enqueued a queued scan the queue did not hold", extra={"scan_id": scan_id})
            self.queue.enqueue(scan_id)
        return requeued + orphans, lost

    def _loop(self) -> None:
        last_reap = 0.0
        while True:
            try:
                self.store.worker_beat(self.worker_id, self.settings.device)
                if time.monotonic() - last_reap >= self.settings.reaper_interval_s:
                    last_reap = time.monotonic()
                    self.reap_once()
            except Exception:
                logger.exception("reaper pass failed")
            if self._stop.wait(min(self.settings.heartbeat_interval_s, self.settings.reaper_interval_s)):
                return

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def run_worker(settings: Settings) -> None:
    """Run a worker process until SIGINT/SIGTERM: huey consumer + reaper.

    One worker process per GPU: ``--device cuda:N`` (or ``CUDA_VISIBLE_DEVICES=N`` with ``cuda``). CUDA is
    first touched here, in the worker's own process, never in a parent that forks.
    """
    import torch

    from scanner.device import resolve_device

    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # kernels and allocations that use the current device stay on this GPU
    engine = create_db_engine(settings.resolved_database_url)
    migrate(engine)
    store = JobStore(engine)
    executor = ScanExecutor(settings, store)
    sender = None
    if settings.webhook_secret is not None:
        sender = WebhookSender(store, settings.webhook_secret.get_secret_value())
    queue = ScanQueue(settings, runner=executor.run, notifier=sender.deliver if sender else None)
    executor.notify = queue.enqueue_webhook
    reaper = Reaper(settings, store, queue, executor.worker_id)
    logger.info("worker %s started (device %s, %d thread(s))", executor.worker_id, device, settings.worker_threads)
    reaper.start()
    consumer = queue.huey.create_consumer(workers=settings.worker_threads, worker_type="thread", periodic=False)
    try:
        consumer.run()
    finally:
        if not executor.stop(timeout_s=STOP_TIMEOUT_S):
            logger.warning("a scan did not reach a progress point within %g s of the stop", STOP_TIMEOUT_S)
        reaper.stop()
        for scan_id in store.worker_gone(executor.worker_id):
            logger.info("re-queued the scan this worker was running", extra={"scan_id": scan_id})
            queue.enqueue(scan_id)
        logger.info("worker %s stopped", executor.worker_id)
