"""The huey queue: carries scan ids only (never payloads); the job table stays the source of truth."""

from __future__ import annotations

import logging
from collections.abc import Callable

from huey import Huey, RedisHuey, SqliteHuey

from service.config import Settings

__all__ = ["ScanQueue", "build_huey"]

logger = logging.getLogger(__name__)

TASK_NAME = "backdoor_scan.run_scan"
WEBHOOK_TASK_NAME = "backdoor_scan.deliver_webhook"
#: Longer than the 1 s BRPOP huey's consumer blocks in.
REDIS_SOCKET_TIMEOUT_S = 10.0


def build_huey(settings: Settings, *, immediate: bool = False) -> Huey:
    """``sqlite:///FILE`` (the embedded default) or ``redis://HOST:PORT/DB``."""
    url = settings.resolved_queue_url
    if url.startswith("sqlite:///"):
        filename = url.removeprefix("sqlite:///")
        return SqliteHuey(name="backdoor-scan", filename=filename, results=False, immediate=immediate)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from redis import ConnectionPool

        # bounded waits on every socket (older redis-py waits forever by default): a worker blocked in BRPOP
        # on a Redis that hangs or vanished gets a timeout instead, and huey's consumer retries with backoff
        # until the server is back. Reconnecting after a restart needs nothing more: the pool replaces
        # connections the server closed. Whatever the queue lost, the reaper re-enqueues from the job table.
        pool = ConnectionPool.from_url(url, socket_timeout=REDIS_SOCKET_TIMEOUT_S, socket_connect_timeout=5)
        return RedisHuey(name="backdoor-scan", connection_pool=pool, results=False, immediate=immediate)
    raise ValueError(f"BDS_QUEUE_URL must start with sqlite:/// or redis://, got {url!r}")


class ScanQueue:
    """Enqueue scan ids (and webhook deliveries); in a worker, ``runner`` and ``notifier`` execute them."""

    def __init__(
        self,
        settings: Settings,
        runner: Callable[[str], None] | None = None,
        notifier: Callable[[str], None] | None = None,
        *,
        immediate: bool = False,
    ):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.huey = build_huey(settings, immediate=immediate)
        self._runner = runner
        self._notifier = notifier
        self._task = self.huey.task(name=TASK_NAME)(self._run)
        # huey retries a failed delivery with exponential backoff: delay, 2 x delay, 4 x delay, ...
        self._webhook = self.huey.task(
            name=WEBHOOK_TASK_NAME,
            retries=settings.webhook_max_attempts - 1,
            retry_delay=settings.webhook_retry_delay_s,
            retry_backoff=2,
        )(self._notify)

    def _run(self, scan_id: str) -> None:
        if self._runner is None:
            raise RuntimeError("this process only enqueues scans; run `backdoor-scan worker` to execute them")
        self._runner(scan_id)

    def _notify(self, scan_id: str) -> None:
        if self._notifier is None:
            raise RuntimeError("this process only enqueues webhooks")
        self._notifier(scan_id)

    def enqueue(self, scan_id: str) -> None:
        self._task(scan_id)

    def enqueue_new(self, job_id: str) -> None:
        """Enqueue a job just inserted; a queue that fails is logged, not raised: the row is the truth, and a
        worker's reaper enqueues queued jobs the queue does not hold."""
        try:
            self.enqueue(job_id)
        except Exception:
            logger.exception("enqueue failed; the reaper will enqueue the job", extra={"scan_id": job_id})

    def enqueue_webhook(self, scan_id: str) -> None:
        self._webhook(scan_id)

    def pending_count(self) -> int:
        """Messages waiting in the queue (also a cheap liveness check of the queue backend)."""
        return int(self.huey.pending_count())

    def pending_scan_ids(self) -> set[str]:
        ids: set[str] = set()
        for task in self.huey.pending():
            if task.name == TASK_NAME and task.args:
                ids.add(str(task.args[0]))
        return ids
