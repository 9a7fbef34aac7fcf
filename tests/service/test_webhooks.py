"""Signed completion webhooks (Standard Webhooks): signing, the receiver's check, and a real delivery."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fastapi.testclient import TestClient

from service.signing import WebhookVerificationError, new_secret, secret_key, sign, verify
from service.webhooks import check_callback_url
from tests.servers import wait_for
from tests.service.conftest import Server, assert_problem, post_scan, submit

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the example secret of the Standard Webhooks spec


def headers_for(body: bytes, message_id: str = "msg_1", timestamp: int | None = None) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(SECRET, message_id, timestamp, body),
    }


def test_signature_matches_the_spec_example() -> None:
    # the worked example of the Standard Webhooks specification
    body = b'{"test": 2432232314}'
    signature = sign(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_verify_accepts_a_good_message_and_rejects_tampering() -> None:
    body = b'{"type":"scan.succeeded"}'
    headers = headers_for(body)
    verify(SECRET, headers, body)
    verify(
        SECRET, {"Webhook-Id": headers["webhook-id"], **{k: v for k, v in headers.items() if k != "webhook-id"}}, body
    )
    with pytest.raises(WebhookVerificationError, match="no signature"):
        verify(SECRET, headers, body + b" ")
    with pytest.raises(WebhookVerificationError, match="no signature"):
        verify(new_secret(), headers, body)
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify(SECRET, headers_for(body, timestamp=int(time.time()) - 3600), body)
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify(SECRET, {"webhook-id": "x"}, body)


def test_secrets_are_checked() -> None:
    assert len(secret_key(new_secret())) == 32
    for bad in ("whsec_not base64!", "whsec_c2hvcnQ="):
        with pytest.raises(ValueError, match="secret"):
            secret_key(bad)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://ci.example.com/hooks/scan", True),
        ("http://127.0.0.1:9000/cb", True),
        ("file:///etc/passwd", False),
        ("ftp://example.com/x", False),
        ("javascript:alert(1)", False),
        ("https:///no-host", False),
        ("https://user:pass@example.com/", False),
        ("https://example.com/" + "a" * 3000, False),
        ("https://example.com/a\x00b", False),  # issue 13: NUL is refused by PostgreSQL (a 500 on insert)
        ("https://example.com/\u202etxt.exe", False),
        ("https://example.com/a b", False),
        ("https://example.com/a%00b", True),
    ],
)
def test_callback_urls(url: str, ok: bool) -> None:
    assert (check_callback_url(url) is None) is ok


def test_callback_needs_a_configured_secret(make_client: Callable[..., TestClient], tiny_model: Path) -> None:
    client = make_client()
    response = post_scan(client, tiny_model, arch="mnist_cnn", callback_url="https://example.com/hook")
    assert_problem(response, 422, "webhooks_not_configured")
    client = make_client(webhook_secret=SECRET)
    response = post_scan(client, tiny_model, arch="mnist_cnn", callback_url="file:///etc/passwd")
    assert_problem(response, 422, "invalid_callback_url")
    accepted = post_scan(client, tiny_model, arch="mnist_cnn", callback_url="https://example.com/hook")
    assert accepted.status_code == 202
    assert accepted.json()["webhook"] == {
        "callback_url": "https://example.com/hook",
        "attempts": 0,
        "delivered_at": None,
        "last_error": None,
    }


class _Receiver(BaseHTTPRequestHandler):
    """Records every POST; answers 500 to the first one so the service has to retry."""

    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(500 if len(self.received) == 1 else 204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []
    handler = type("Receiver", (_Receiver,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/scan", received
    server.shutdown()


def test_completion_webhook_is_signed_and_retried(
    make_server: Callable[..., Server],
    service_files: dict[str, Path],
    receiver: tuple[str, list[tuple[dict[str, str], bytes]]],
) -> None:
    url, received = receiver
    server = make_server(webhook_secret=SECRET, webhook_retry_delay_s="0.5")
    server.start()
    with server.client() as client:
        scan = submit(
            client, {"model": service_files["tiny"]}, arch="mnist_cnn", callback_url=url, detectors="neural_cleanse"
        ).json()
        finished = wait_for(client, scan["id"])
        deadline = time.monotonic() + 60
        while len(received) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(received) == 2, server.log()  # a 500, then the retry
        deadline = time.monotonic() + 10
        while (state := client.get(f"/v1/scans/{scan['id']}").json())["webhook"]["delivered_at"] is None:
            assert time.monotonic() < deadline, state
            time.sleep(0.1)
    assert state["webhook"]["attempts"] == 2
    (first_headers, _), (headers, body) = received
    assert first_headers["webhook-id"] == headers["webhook-id"] == f"{scan['id']}.succeeded"
    verify(SECRET, headers, body)
    payload = json.loads(body)
    assert payload["type"] == "scan.succeeded"
    assert payload["data"]["id"] == scan["id"]
    assert payload["data"]["verdict"] == finished["verdict"] == "inconclusive"
