"""The Standard Webhooks signature scheme (https://www.standardwebhooks.com/), for senders and receivers alike.

A message is signed with ``webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`` under the
secret, ``whsec_`` followed by base64 (``BDS_WEBHOOK_SECRET``); :func:`verify` is a receiver's check. Standard
library only: the settings validate a secret with :func:`secret_key`, and a receiver imports nothing else of the
service.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping

__all__ = ["SECRET_PREFIX", "WebhookVerificationError", "new_secret", "secret_key", "sign", "verify"]

SECRET_PREFIX = "whsec_"


class WebhookVerificationError(Exception):
    """The signature, id or timestamp of a received webhook is missing, stale or wrong."""


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
