"""``backdoor-scan submit``: the CI gate against a real ``serve`` process, and the client's retries in-process.

Exit codes: 0 no verdict in ``--fail-on`` (default ``backdoored,unsafe_file``), 1 a verdict in ``--fail-on``
(an upload refused with 422 ``unsafe_file`` counts as the verdict ``unsafe_file``), 2 an error.
Two real Neural Cleanse scans run here (the clean and the BadNets model); everything else is quick.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.cli import main
from service.client import ClientError, ProblemError, RetryPolicy, ScanClient
from tests.factories import BadNetsModel
from tests.malicious import EXPECTED_FINDINGS, MALICIOUS_BUILDERS
from tests.scanner.render.test_sarif import validate_sarif
from tests.servers import free_port
from tests.service.conftest import API_KEY, Server

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run_submit(capsys: pytest.CaptureFixture[str]) -> Run:
    """Run ``backdoor-scan submit`` in-process; returns (exit code, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main(["submit", *argv])
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def api_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BDS_API_KEY", API_KEY)


def _scans(server: Server) -> list[dict[str, Any]]:
    with server.client() as client:
        items: list[dict[str, Any]] = client.get("/v1/scans").json()["items"]
    return items


# -- against a real server ----------------------------------------------------------------------


@pytest.mark.usefixtures("api_key_env")
def test_clean_model_exits_0(
    make_server: Callable[..., Server], service_files: dict[str, Path], run_submit: Run
) -> None:
    server = make_server()
    server.start()
    code, out, err = run_submit(
        str(service_files["clean"]),
        *("--arch", "mnist_cnn", "--data", str(service_files["data"]), "--server", server.url),
        *("--wait", "--format", "json", "--timeout", "300"),
    )
    assert code == 0, err
    verdict = json.loads(out)
    assert verdict["verdict"] == "clean"
    assert verdict["detectors"]["neural_cleanse"]["status"] == "ok"
    assert f"submitted: {server.url}/v1/scans/" in err
    assert "succeeded" in err  # plain progress lines (stderr is not a terminal here)


def test_backdoored_model_exits_1_in_every_format(
    make_server: Callable[..., Server],
    service_files: dict[str, Path],
    badnets: BadNetsModel,
    run_submit: Run,
    tmp_path: Path,
) -> None:
    """Three submits of one upload: one scan runs, the 2nd and 3rd get the existing scan back (a feature)."""
    server = make_server()
    server.start()
    common = (str(service_files["badnets"]), "--data", str(service_files["data"]), "--server", server.url)
    target = badnets.target

    code, out, err = run_submit(*common, "--api-key", API_KEY, "--wait")
    assert code == 1, err
    assert f"badnets.pt2: BACKDOORED (flagged classes: {target})" in out
    assert f"class {target}: anomaly index" in out
    assert "submitted: " in err

    code, out, err = run_submit(*common, "--api-key", API_KEY, "--wait", "--format", "json")
    assert code == 1, err
    verdict = json.loads(out)
    assert verdict["verdict"] == "backdoored"
    assert target in verdict["flagged_classes"]
    assert "already submitted: " in err

    sarif_path = tmp_path / "reports" / "backdoor-scan.sarif"
    code, out, err = run_submit(
        *common, "--api-key", API_KEY, "--wait", "--format", "sarif", "--output", str(sarif_path)
    )
    assert code == 1, err
    assert out == ""  # the report went to --output
    assert f"verdict backdoored (flagged classes: {target}); report written to {sarif_path}" in err
    log = json.loads(sarif_path.read_text())
    validate_sarif(log)
    results = log["runs"][0]["results"]
    assert {(r["ruleId"], r["properties"]["class"]) for r in results} >= {("BDS001", target)}
    assert all(r["level"] == "error" for r in results)

    scans = _scans(server)
    assert len(scans) == 1, [scan["id"] for scan in scans]
    assert scans[0]["attempts"] == 1


@pytest.mark.usefixtures("api_key_env")
def test_unsafe_upload_is_a_finding(make_server: Callable[..., Server], tmp_path: Path, run_submit: Run) -> None:
    """The 422 ``unsafe_file`` refusal is the verdict ``unsafe_file``: exit 1, the report names the globals."""
    server = make_server()
    server.start(workers=0)  # the refusal is synchronous: no worker needed
    name = "torch_save_reduce_object"
    path = MALICIOUS_BUILDERS[name](tmp_path, tmp_path / "pwned")
    member, global_name = EXPECTED_FINDINGS[name]
    common = (str(path), "--arch", "mnist_cnn", "--server", server.url)

    code, out, err = run_submit(*common, "--wait")
    assert code == 1, err
    assert out.startswith(f"{path.name}: UNSAFE_FILE")
    assert global_name in out
    assert member in out
    assert "[unsafe_file]" not in err  # a finding, not an error
    assert "refused" in err

    code, out, err = run_submit(*common, "--format", "json")  # the refusal is immediate, --wait or not
    assert code == 1, err
    verdict = json.loads(out)
    assert verdict["verdict"] == "unsafe_file"
    assert verdict["problem"]["code"] == "unsafe_file"
    findings = verdict["detectors"]["model_file"]["findings"]
    assert any(global_name in g for f in findings for g in f["globals"]), findings
    assert len(verdict["model"]["sha256"]) == 64

    code, out, err = run_submit(*common, "--format", "sarif")
    assert code == 1, err
    log = json.loads(out)
    validate_sarif(log)
    assert any(global_name in r["message"]["text"] and r["ruleId"] == "BDS003" for r in log["runs"][0]["results"])

    # unsafe_file left out of --fail-on: reported, exit 0, with a note on stderr
    code, out, err = run_submit(*common, "--fail-on", "backdoored")
    assert code == 0, err
    assert "UNSAFE_FILE" in out
    assert "not in --fail-on (backdoored): exit 0" in err
    assert not (tmp_path / "pwned").exists()
    assert _scans(server) == []


@pytest.mark.usefixtures("api_key_env")
def test_without_wait_prints_the_scan_and_inconclusive_gates_only_when_asked(
    make_server: Callable[..., Server], service_files: dict[str, Path], run_submit: Run
) -> None:
    server = make_server()
    server.start()
    # no data and Neural Cleanse only: quick, and nothing can decide
    common = (
        str(service_files["tiny"]),
        "--arch",
        "mnist_cnn",
        "--detectors",
        "neural_cleanse",
        "--server",
        server.url + "/",
    )

    code, out, err = run_submit(*common)
    assert code == 0, err
    scan = json.loads(out)
    assert scan["status"] in ("queued", "running", "succeeded")
    assert f"{server.url}/v1/scans/{scan['id']}" in err

    code, out, err = run_submit(*common, "--wait", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["verdict"] == "inconclusive"

    code, out, err = run_submit(*common, "--wait", "--fail-on", "inconclusive,backdoored")
    assert code == 1, err
    assert "INCONCLUSIVE" in out


@pytest.mark.usefixtures("api_key_env")
def test_errors_exit_2_with_the_problem_code(
    make_server: Callable[..., Server], service_files: dict[str, Path], run_submit: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = make_server()
    server.start(workers=0)
    tiny = str(service_files["tiny"])
    code, _, err = run_submit(tiny, "--server", server.url, "--wait")  # a state_dict without --arch
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("backdoor-scan: error [unknown_architecture]: ")
    monkeypatch.setenv("BDS_API_KEY", "wrong-key")
    code, _, err = run_submit(tiny, "--arch", "mnist_cnn", "--server", server.url)
    assert code == 2
    assert "backdoor-scan: error [invalid_api_key]: " in err
    code, _, err = run_submit(tiny, "--server", "localhost:8000")
    assert code == 2
    assert "[invalid_option]" in err


def test_server_down_exits_2_after_retries(service_files: dict[str, Path], run_submit: Run) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    code, out, err = run_submit(str(service_files["tiny"]), "--arch", "mnist_cnn", "--server", url, "--retries", "2")
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert sum("retrying in" in line for line in lines) == 2
    assert lines[-1].startswith("backdoor-scan: error [connection_error]: submit: cannot reach ")
    assert lines[-1].endswith("(gave up after 3 attempts)")


# -- the client against httpx.MockTransport --------------------------------------------------------


SCAN = {
    "id": "0123456789abcdef0123456789abcdef",
    "status": "queued",
    "progress": {"fraction": 0.0, "stage": "queued", "message": "waiting for a worker"},
}


class FakeServer:
    """Answers from a script: each request pops the next (status, body, headers) of its method."""

    def __init__(self, script: dict[str, list[tuple[int, dict[str, Any], dict[str, str]] | Exception]]):
        self.script = script
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.bodies.append(request.read())
        step = self.script[request.method].pop(0)
        if isinstance(step, Exception):
            raise step
        status, body, headers = step
        media = "application/problem+json" if status >= 400 else "application/json"
        return httpx.Response(status, json=body, headers={"content-type": media, **headers})


def _problem(status: int, code: str, **extra: Any) -> dict[str, Any]:
    return {"type": f"about:{code}", "title": "x", "status": status, "code": code, "detail": f"{code} detail", **extra}


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def make_client(sleeps: list[float]) -> Iterator[Callable[..., ScanClient]]:
    clients: list[ScanClient] = []

    def make(fake: FakeServer, retries: int = 3) -> ScanClient:
        client = ScanClient(
            "http://scanner.test/prefix",
            "key",
            retry=RetryPolicy(retries=retries, backoff_s=0.5, max_backoff_s=4.0),
            transport=httpx.MockTransport(fake),
            sleep=sleeps.append,
            rng=random.Random(0),
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt2"
    path.write_bytes(b"PK" + bytes(range(256)) * 300)
    return path


def test_503_then_success_is_retried_with_the_same_idempotency_key(
    make_client: Callable[..., ScanClient], model_file: Path, sleeps: list[float]
) -> None:
    fake = FakeServer(
        {
            "POST": [
                (503, _problem(503, "service_unavailable"), {"Retry-After": "2"}),
                httpx.ConnectError("connection refused"),
                (429, _problem(429, "too_many_requests"), {}),
                (202, SCAN, {"Location": f"/v1/scans/{SCAN['id']}"}),
            ]
        }
    )
    submission = make_client(fake).submit(model_file, options={"arch": "mnist_cnn"})
    assert submission.created
    assert submission.url == f"http://scanner.test/prefix/v1/scans/{SCAN['id']}"
    keys = {request.headers["Idempotency-Key"] for request in fake.requests}
    assert keys == {submission.idempotency_key}
    assert len(fake.requests) == 4
    assert all(request.url.path == "/prefix/v1/scans" for request in fake.requests)
    assert all(request.headers["Authorization"] == "Bearer key" for request in fake.requests)
    # every attempt re-sent the whole file from its first byte
    content = model_file.read_bytes()
    assert all(content in body and b'name="arch"' in body for body in fake.bodies)
    # Retry-After is honoured; the others back off exponentially with jitter in [d/2, d]
    assert sleeps[0] == 2.0
    assert 0.5 <= sleeps[1] <= 1.0
    assert 1.0 <= sleeps[2] <= 2.0


def test_retries_are_bounded(make_client: Callable[..., ScanClient], model_file: Path, sleeps: list[float]) -> None:
    fake = FakeServer({"POST": [(503, _problem(503, "service_unavailable"), {"Retry-After": "1000"})] * 3})
    with pytest.raises(ProblemError) as caught:
        make_client(fake, retries=2).submit(model_file)
    assert caught.value.code == "service_unavailable"
    assert "gave up after 3 attempts" in caught.value.detail
    assert sleeps == [120.0, 120.0]  # Retry-After capped


def test_client_errors_are_not_retried(make_client: Callable[..., ScanClient], model_file: Path) -> None:
    fake = FakeServer({"POST": [(422, _problem(422, "unsafe_file", findings=[{"globals": ["os.system"]}]), {})]})
    with pytest.raises(ProblemError) as caught:
        make_client(fake).submit(model_file)
    assert caught.value.code == "unsafe_file"
    assert caught.value.problem["findings"] == [{"globals": ["os.system"]}]
    assert len(fake.requests) == 1


def test_polls_are_retried_and_wait_follows_progress(
    make_client: Callable[..., ScanClient], sleeps: list[float]
) -> None:
    running = {**SCAN, "status": "running", "progress": {"fraction": 0.5, "stage": "neural_cleanse", "message": "x"}}
    done = {**SCAN, "status": "succeeded", "result": {"verdict": "clean"}}
    fake = FakeServer(
        {"GET": [(200, running, {}), httpx.ReadTimeout("slow"), (503, {}, {"Retry-After": "0"}), (200, done, {})]}
    )
    seen: list[str] = []
    scan = make_client(fake).wait(SCAN["id"], poll_interval=0.25, on_update=lambda s: seen.append(s["status"]))
    assert scan["result"] == {"verdict": "clean"}
    assert seen == ["running", "succeeded"]
    assert sleeps[0] == 0.25  # the poll interval, then two retries of the second poll
    assert len(sleeps) == 3


def test_wait_gives_up_at_the_timeout(make_client: Callable[..., ScanClient]) -> None:
    fake = FakeServer({"GET": [(200, SCAN, {})] * 100})
    client = make_client(fake)
    now = [0.0]
    client._clock = lambda: now[0]
    client._sleep = lambda seconds: now.__setitem__(0, now[0] + seconds)
    with pytest.raises(ClientError) as caught:
        client.wait(SCAN["id"], timeout=5, poll_interval=1)
    assert caught.value.code == "timeout"
    assert "still queued after 5 s" in caught.value.detail


@pytest.mark.parametrize(
    ("final", "code"),
    [
        (
            {"status": "failed", "error": {"code": "time_limit_exceeded", "detail": "over 3600 s"}},
            "time_limit_exceeded",
        ),
        ({"status": "cancelled"}, "scan_cancelled"),
    ],
)
def test_failed_or_cancelled_scan_exits_2(
    final: dict[str, Any], code: str, model_file: Path, run_submit: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeServer({"POST": [(202, SCAN, {})], "GET": [(200, SCAN, {}), (200, {**SCAN, **final}, {})]})
    _use_transport(monkeypatch, fake)
    code_, out, err = run_submit(
        str(model_file), "--server", "http://scanner.test", "--wait", "--poll-interval", "0.01"
    )
    assert code_ == 2
    assert out == ""
    assert err.strip().splitlines()[-1].startswith(f"backdoor-scan: error [{code}]: scan http://scanner.test/v1/scans/")
    # plain progress lines when stderr is not a terminal
    assert "backdoor-scan:   0% queued: waiting for a worker" in err


def test_timeout_exits_2(model_file: Path, run_submit: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeServer({"POST": [(202, SCAN, {})], "GET": [(200, SCAN, {})] * 1000})
    _use_transport(monkeypatch, fake)
    argv = (str(model_file), "--server", "http://scanner.test", "--wait", "--timeout", "0.3", "--poll-interval", "0.05")
    code, _, err = run_submit(*argv)
    assert code == 2
    assert "backdoor-scan: error [timeout]: scan http://scanner.test/v1/scans/" in err


def _use_transport(monkeypatch: pytest.MonkeyPatch, fake: FakeServer) -> None:
    """Make the CLI's ScanClient talk to ``fake``."""
    import service.client

    class MockedClient(ScanClient):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, transport=httpx.MockTransport(fake), **kwargs)

    monkeypatch.setattr(service.client, "ScanClient", MockedClient)


def test_local_scan_writes_sarif(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``backdoor-scan scan --format sarif`` uses the same builder (an unsafe file: no model is loaded)."""
    path = MALICIOUS_BUILDERS["os_system"](tmp_path, tmp_path / "pwned")
    try:
        code = main(["scan", str(path), "--arch", "mnist_cnn", "--format", "sarif", "--device", "cpu"])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert code == 1, err
    log = json.loads(out)
    validate_sarif(log)
    (result,) = log["runs"][0]["results"]
    assert result["ruleId"] == "BDS003"
    assert "os.system" in result["message"]["text"]
    assert log["runs"][0]["properties"]["verdict"] == "unsafe_file"
