"""Helpers for tests and ``bench/`` that drive a real server over HTTP: a free port, and polling a scan."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx

__all__ = ["FINAL", "free_port", "wait_for"]

#: The states a scan does not leave.
FINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    """A loopback port that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(
    client: httpx.Client, scan_id: str, timeout: float = 240, until: tuple[str, ...] = (), poll_s: float = 0.25
) -> dict[str, Any]:
    """Poll a scan until it finishes (or reaches one of ``until``); ``TimeoutError`` after ``timeout`` seconds."""
    final = until or FINAL
    deadline = time.monotonic() + timeout
    scan: dict[str, Any] = {}
    while time.monotonic() < deadline:
        scan = client.get(f"/v1/scans/{scan_id}").json()
        if scan["status"] in final:
            return scan
        time.sleep(poll_s)
    raise TimeoutError(f"scan {scan_id} still {scan.get('status')} after {timeout} s: {scan.get('progress')}")
