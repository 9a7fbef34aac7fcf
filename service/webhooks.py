"""Completion webhooks, signed per the Standard Webhooks scheme (https://www.standardwebhooks.com/).

Each delivery is a POST of ``{"type": "scan.<status>", "timestamp": ..., "data": <scan resource>}`` with

- ``webhook-id``: the same for every retry of one message (``<scan id>.<status>``), so receivers can dedupe;
- ``webhook-timestamp``: Unix seconds;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>" under the secret>``.

The secret is ``whsec_`` followed by base64 (``BDS_WEBHOOK_SECRET``); :func:`verify` shows a receiver's check.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx

from service.jobs import JobStore

__all__ = [
    "WebhookDeliveryError",
    "WebhookSender",
    "WebhookVerificationError",
    "check_callback_url",
    "new_secret",
    "secret_key",
    "sign",
    "verify",
]

logger = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"


class WebhookVerificationError(Exception):
    """The signature, id or timestamp of a received webhook is missing, stale or wrong."""


class WebhookDeliveryError(Exception):
    """One delivery attempt failed (huey retries the task with backoff)."""


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret.

    Raises:
        ValueError: the secret is not ``whsec_`` + base64 of at least 16 bytes.
    """
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret is 'whsec_' followed by base64") from None
    if len(key) < 16:
        raise ValueError("a webhook secret needs at least 16 random bytes")
    return key


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one message."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: Mapping[str, str], body: bytes, tolerance_s: int = 300) -> None:
    """What a receiver does: check the signature and that the timestamp is recent (replay protection).

    Raises:
        WebhookVerificationError: anything does not match.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    try:
        message_id = lowered["webhook-id"]
        timestamp = int(lowered["webhook-timestamp"])
        signatures = lowered["webhook-signature"].split()
    except (KeyError, ValueError):
        raise WebhookVerificationError("missing or malformed webhook headers") from None
    if abs(time.time() - timestamp) > tolerance_s:
        raise WebhookVerificationError("the webhook timestamp is outside the tolerance")
    expected = sign(secret, message_id, timestamp, body)
    if not any(hmac.compare_digest(expected, candidate) for candidate in signatures):
        raise WebhookVerificationError("no signature matches")


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
        from service.schemas import ScanPublic

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
