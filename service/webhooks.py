"""Completion webhooks, signed per the Standard Webhooks scheme (https://www.standardwebhooks.com/).

Each delivery is a POST of ``{"type": "scan.<status>", "timestamp": ..., "data": <scan resource>}`` with

- ``webhook-id``: the same for every retry of one message (``<scan id>.<status>``), so receivers can dedupe;
- ``webhook-timestamp``: Unix seconds;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>" under the secret>``.

The secret is ``whsec_`` followed by base64 (``BDS_WEBHOOK_SECRET``); the scheme, and :func:`~service.signing.verify`
that shows a receiver's check, are in :mod:`service.signing`.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx

from service.jobs import JobStore
from service.schemas import ScanPublic
from service.signing import sign

__all__ = ["WebhookDeliveryError", "WebhookSender", "check_callback_url"]

logger = logging.getLogger(__name__)


class WebhookDeliveryError(Exception):
    """One delivery attempt failed (huey retries the task with backoff)."""


def check_callback_url(url: str) -> str | None:
    """Why ``url`` cannot be a callback (``None`` when it can): http(s) with a host, nothing else."""
    if len(url) > 2048:
        return "callback_url is longer than 2048 characters"
    if not url.isascii() or not url.isprintable() or " " in url:
        return "callback_url must be printable ASCII without spaces (percent-encode anything else)"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return "callback_url must be an http:// or https:// URL"
    if not parts.hostname:
        return "callback_url needs a host"
    if parts.username or parts.password:
        return "callback_url must not carry credentials"
    return None


class WebhookSender:
    """Delivers the completion webhook of one scan; raises :class:`WebhookDeliveryError` to be retried."""

    def __init__(self, store: JobStore, secret: str, timeout_s: float = 10.0):
        self.store = store
        self.secret = secret
        self.timeout_s = timeout_s

    def deliver(self, scan_id: str) -> None:
        scan = self.store.get(scan_id)
        if scan is None or not scan.callback_url:
            return
        if check_callback_url(scan.callback_url) is not None:  # validated on submit; never send elsewhere
            return
        resource = ScanPublic.of(scan).model_dump(mode="json")
        payload = {"type": f"scan.{scan.status}", "timestamp": datetime.now(UTC).isoformat(), "data": resource}
        body = json.dumps(payload, separators=(",", ":")).encode()
        message_id = f"{scan.id}.{scan.status}"
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "backdoor-scan-webhook",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.secret, message_id, timestamp, body),
        }
        try:
            response = httpx.post(scan.callback_url, content=body, headers=headers, timeout=self.timeout_s)
            outcome = None if response.is_success else f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        self.store.record_webhook(scan_id, delivered=outcome is None, error=outcome)
        if outcome is not None:
            logger.warning("webhook delivery failed: %s", outcome, extra={"scan_id": scan_id})
            raise WebhookDeliveryError(outcome)
        logger.info("webhook delivered", extra={"scan_id": scan_id})
