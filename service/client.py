"""A client of the backdoor-scan HTTP API, for ``backdoor-scan submit``: upload, follow, read the verdict.

Uploads stream from the files (httpx reads file objects in chunks; nothing is read whole into memory). Every
request is retried with exponential backoff and jitter on connection errors and on 429/502/503/504 (honouring
``Retry-After``), within a bounded number of retries; a submit sends one ``Idempotency-Key`` for all its
retries, and re-opens the files for each attempt, so a retried upload never starts a second scan.
"""

from __future__ import annotations

import email.utils
import json
import random
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import httpx

__all__ = [
    "FINAL_STATUSES",
    "RETRY_STATUSES",
    "ClientError",
    "ProblemError",
    "ProgressPrinter",
    "RetryPolicy",
    "ScanClient",
    "Submission",
]

#: Responses worth retrying: overloaded or restarting servers and gateways in front of them.
RETRY_STATUSES = frozenset({HTTPStatus.TOO_MANY_REQUESTS, 502, 503, 504})
#: Scan statuses after which nothing changes any more.
FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class ClientError(Exception):
    """A request that did not get the answer it needed: a stable ``code`` and a one-line ``detail``."""

    def __init__(self, code: str, detail: str, status: int | None = None):
        super().__init__(f"[{code}] {detail}")
        self.code = code
        self.detail = detail
        self.status = status


class ProblemError(ClientError):
    """The server answered with an ``application/problem+json`` error; ``problem`` is its body."""

    def __init__(self, status: int, problem: Mapping[str, Any]):
        code = str(problem.get("code") or f"http_{status}")
        detail = str(problem.get("detail") or problem.get("title") or HTTPStatus(status).phrase)
        super().__init__(code, detail, status)
        self.problem = dict(problem)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter.

    Attempt ``n`` (0-based) waits a random time in ``[d/2, d]`` with ``d = min(max_backoff_s, backoff_s * 2**n)``;
    a ``Retry-After`` from the server replaces that, capped at ``max_retry_after_s``.
    """

    retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 120.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_retry_after_s))
        ceiling = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return rng.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class Submission:
    """The answer to a submit: the scan resource, whether this request created it, and its URL."""

    scan: dict[str, Any]
    created: bool
    url: str
    idempotency_key: str


def _retry_after(value: str | None, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; ``None`` when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now()).total_seconds())


def _error_of(response: httpx.Response) -> ClientError:
    """The error of a non-2xx response: its problem+json ``code`` when it has one."""
    status = response.status_code
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("code"), str):
        return ProblemError(status, body)
    phrase = response.reason_phrase or "error"
    return ClientError(
        f"http_{status}", f"HTTP {status} {phrase} from {response.request.method} {response.url}", status
    )


class ScanClient:
    """The scans API of one server.

    Args:
        server: base URL (``https://scanner.example.com``, or with a path prefix behind a proxy).
        api_key: sent as ``Authorization: Bearer KEY`` (none: no header, for servers with auth disabled).
        retry: the retry policy of every request.
        transport: an httpx transport (tests pass ``httpx.MockTransport``).
        sleep, clock, rng: injectable for tests.
        on_retry: told ``(what went wrong, seconds until the next try)`` before each retry.
    """

    def __init__(
        self,
        server: str,
        api_key: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: httpx.Timeout | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_retry: Callable[[ClientError, float], None] | None = None,
    ):
        from scanner._version import __version__

        self.server = server.rstrip("/")
        headers = {"User-Agent": f"backdoor-scan/{__version__}", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._on_retry = on_retry
        # reads wait for the server's synchronous file check after an upload: allow minutes, not seconds
        self._http = httpx.Client(
            base_url=self.server,
            headers=headers,
            transport=transport,
            timeout=timeout or httpx.Timeout(300.0, connect=15.0),
            follow_redirects=False,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ScanClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def scan_url(self, scan_id: str) -> str:
        return f"{self.server}/v1/scans/{scan_id}"

    def _send(self, what: str, request: Callable[[], httpx.Response], deadline: float | None = None) -> httpx.Response:
        """Send with retries; returns a 2xx response, raises :class:`ClientError` for anything else."""
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                response = request()
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                reason = str(exc) or type(exc).__name__
                error = ClientError("connection_error", f"{what}: cannot reach {self.server}: {reason}")
            else:
                if response.is_success:
                    return response
                error = _error_of(response)
                if response.status_code not in RETRY_STATUSES:
                    raise error
                retry_after = _retry_after(response.headers.get("Retry-After"))
            if attempt >= self.retry.retries:
                if self.retry.retries:
                    error.detail += f" (gave up after {attempt + 1} attempts)"
                raise error
            delay = self.retry.delay(attempt, retry_after, self._rng)
            if deadline is not None and self._clock() + delay > deadline:
                raise error
            if self._on_retry is not None:
                self._on_retry(error, delay)
            self._sleep(delay)
            attempt += 1

    def submit(
        self,
        model: Path,
        *,
        data: Path | None = None,
        training_data: Path | None = None,
        options: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Submission:
        """Upload a model (and sample files) with scan options; the same key goes with every retry.

        Raises:
            ProblemError: the server refused the upload (``unsafe_file`` with its ``findings``, ``invalid_options``,
                ``upload_too_large``, ...).
            ClientError: the server could not be reached, or kept answering 429/503 past the retries.
        """
        key = idempotency_key or str(uuid.uuid4())
        paths = {"model": model, "data": data, "training_data": training_data}
        fields = dict(options or {})

        def request() -> httpx.Response:
            with ExitStack() as stack:  # fresh file objects for every attempt: a retry re-sends from byte 0
                files = {
                    name: (path.name, stack.enter_context(path.open("rb")), "application/octet-stream")
                    for name, path in paths.items()
                    if path is not None
                }
                return self._http.post("/v1/scans", files=files, data=fields, headers={"Idempotency-Key": key})

        response = self._send("submit", request)
        scan = self._scan_body(response)
        return Submission(
            scan=scan, created=response.status_code == 202, url=self.scan_url(scan["id"]), idempotency_key=key
        )

    def get(self, scan_id: str, deadline: float | None = None) -> dict[str, Any]:
        """One scan resource (with retries)."""
        response = self._send("poll", lambda: self._http.get(f"/v1/scans/{scan_id}"), deadline)
        return self._scan_body(response)

    def wait(
        self,
        scan_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = 1.0,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll a scan until it is succeeded, failed or cancelled.

        Raises:
            ClientError: ``timeout`` after ``timeout`` seconds (the scan goes on on the server), or a request failed.
        """
        deadline = None if timeout is None else self._clock() + timeout
        while True:
            scan = self.get(scan_id, deadline)
            if on_update is not None:
                on_update(scan)
            if scan.get("status") in FINAL_STATUSES:
                return scan
            if deadline is not None:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise ClientError(
                        "timeout",
                        f"scan {self.scan_url(scan_id)} still {scan.get('status')} after {timeout:g} s"
                        " (it goes on on the server)",
                    )
                self._sleep(min(poll_interval, remaining))
            else:
                self._sleep(poll_interval)

    @staticmethod
    def _scan_body(response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("id"), str) or "status" not in body:
            raise ClientError(
                "invalid_response",
                f"{response.request.method} {response.url} answered {response.status_code} without a scan resource",
            )
        return body


# -- progress ------------------------------------------------------------------------------


@dataclass
class ProgressPrinter:
    """Shows a scan's progress on ``stream``: a redrawn bar on a terminal, else one plain line per change."""

    stream: TextIO
    tty: bool
    width: int = 28
    _last: tuple[object, ...] | None = field(default=None, init=False)
    _drawn: int = field(default=0, init=False)

    def update(self, scan: Mapping[str, Any]) -> None:
        status = str(scan.get("status"))
        progress = scan.get("progress") or {}
        fraction = progress.get("fraction") or 0.0
        fraction = min(1.0, max(0.0, float(fraction))) if isinstance(fraction, (int, float)) else 0.0
        stage, message = str(progress.get("stage") or ""), str(progress.get("message") or "")
        what = " ".join(part for part in (status, "" if stage == status else stage) if part)
        what += f": {message}" if message else ""
        if self.tty:
            filled = round(self.width * fraction)
            line = f"[{'#' * filled}{'-' * (self.width - filled)}] {100 * fraction:3.0f}% {what}"
            line = line[: max(20, shutil.get_terminal_size().columns - 1)]  # a wrapped line cannot be redrawn
            self.stream.write("\r" + line + " " * max(0, self._drawn - len(line)))
            self._drawn = len(line)
            self.stream.flush()
            return
        key = (status, stage, message)
        if key != self._last:
            self._last = key
            print(f"backdoor-scan: {100 * fraction:3.0f}% {what}", file=self.stream, flush=True)

    def done(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0
