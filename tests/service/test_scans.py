"""The submit use-case (:class:`service.scans.ScanSubmission`) called directly, without HTTP; and the one way options
become scanner config, shared by the API, the worker and ``backdoor-scan scan``."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest

from scanner.config import ModelOptions, NeuralCleanseConfig, ScanConfig, SpectralConfig
from service.cli import build_parser, main, scan_options
from service.deps import AppState
from service.jobs import FileInfo
from service.main import create_app
from service.models import JobStatus
from service.options import ScanOptions, parse_options, scan_config
from service.problems import ServiceError
from service.scans import ScanSubmission
from service.storage import ParsedUpload
from tests.service.conftest import make_settings


@pytest.fixture
def state(tmp_path: Path) -> AppState:
    """The state of an app (migrated job table, SQLite queue); nothing serves it."""
    app_state: AppState = create_app(make_settings(tmp_path)).state.bds
    return app_state


def stored(submission: ScanSubmission, model: bytes, **fields: str) -> ParsedUpload:
    """An upload as ``parse_upload`` leaves it: the model stored in the submission's directory, and the fields."""
    path = submission.files.upload("model")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model)
    info = FileInfo(filename="model.safetensors", sha256=hashlib.sha256(model).hexdigest(), size_bytes=len(model))
    return ParsedUpload(files={"model": info}, fields=dict(fields))


def submit(state: AppState, model: bytes, key: str | None = None, **fields: str) -> tuple[Any, bool, Path]:
    """Submit as the router does (accept in a threadpool, files removed unless a new scan keeps them)."""
    submission = ScanSubmission(state, key)
    scan, created = asyncio.run(submission.submit(stored(submission, model, **fields)))
    return scan, created, submission.files.root


def test_a_fresh_upload_creates_and_enqueues_a_scan(state: AppState, tiny_model: Path) -> None:
    scan, created, root = submit(state, tiny_model.read_bytes(), arch="mnist_cnn", input_shape="1,28,28")
    assert created
    assert scan.status == JobStatus.queued
    assert scan.model_format == "safetensors"
    assert scan.options == {"arch": "mnist_cnn", "input_shape": [1, 28, 28]}
    stored_scan = state.store.get(scan.id)
    assert stored_scan is not None
    assert stored_scan.model_sha256 == hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    assert scan.id in state.queue.pending_scan_ids()
    assert (root / "model.upload").is_file()  # the new scan keeps its upload


def test_the_same_upload_again_returns_the_existing_scan(state: AppState, tiny_model: Path) -> None:
    model = tiny_model.read_bytes()
    first, created, _ = submit(state, model, arch="mnist_cnn")
    assert created
    again, created, root = submit(state, model, arch="mnist_cnn")
    assert (again.id, created) == (first.id, False)
    assert not root.exists()  # the repeated upload's files are gone
    # the same upload with a new Idempotency-Key is still the same upload
    keyed, created, _ = submit(state, model, "key-1", arch="mnist_cnn")
    assert (keyed.id, created) == (first.id, False)
    # other options are another scan
    other, created, _ = submit(state, model, arch="mnist_cnn", seed="1")
    assert created
    assert other.id != first.id
    assert state.store.list_scans(None, 10, 0)[1] == 2


def test_an_idempotency_key_reused_for_another_upload_is_refused(state: AppState, tiny_model: Path) -> None:
    model = tiny_model.read_bytes()
    first, created, _ = submit(state, model, "key-1", arch="mnist_cnn")
    assert created
    again, created, _ = submit(state, model, "key-1", arch="mnist_cnn")  # a retry: the same scan
    assert (again.id, created) == (first.id, False)
    with pytest.raises(ServiceError) as refused:
        submit(state, model, "key-1", arch="mnist_cnn", seed="7")
    assert (refused.value.status, refused.value.code) == (422, "idempotency_key_reused")
    assert refused.value.extra == {"scan_id": first.id}
    assert state.store.list_scans(None, 10, 0)[1] == 1


def test_accept_refuses_before_it_stores_anything(state: AppState, tiny_model: Path) -> None:
    model = tiny_model.read_bytes()
    with pytest.raises(ServiceError) as bad_key:
        ScanSubmission(state, "")
    assert bad_key.value.code == "invalid_idempotency_key"
    cases: list[tuple[dict[str, str], int, str]] = [
        ({"arch": "mnist_cnn", "mean": "nan", "std": "0.5"}, 422, "invalid_options"),
        ({"arch": "mnist_cnn", "mean": "0.5"}, 422, "invalid_option"),  # the scanner's check: mean without std
        ({"arch": "mnist_cnn", "trust_code": "true"}, 403, "trust_code_not_allowed"),
        ({"arch": "mnist_cnn", "callback_url": "https://example.com/hook"}, 422, "webhooks_not_configured"),
        ({"arch": "mnist_cnn", "num_classes": "7"}, 422, "invalid_option"),  # the weights say 10
    ]
    for fields, status, code in cases:
        submission = ScanSubmission(state)
        with pytest.raises(ServiceError) as refused:
            submission.accept(stored(submission, model, **fields))
        assert (refused.value.status, refused.value.code) == (status, code), fields
    submission = ScanSubmission(state)
    with pytest.raises(ServiceError) as invalid:
        submission.accept(stored(submission, model, arch="mnist_cnn", mean="0.5,nan", std="0.5,1e-320"))
    assert [error["loc"] for error in invalid.value.extra["errors"]] == [["mean"], ["std"]]
    assert state.store.list_scans(None, 10, 0)[1] == 0


# -- options -> ScanConfig: one path for the API, the worker and `backdoor-scan scan` ---------------------------

CLI_FLAGS = [
    *("--arch", "mnist_cnn", "--num-classes", "10", "--input-shape", "1,28,28"),
    *("--mean", "0.1307", "--std", "0.3081", "--seed", "3", "--detectors", "neural_cleanse"),
    *("--nc-restarts", "2", "--nc-confirm-rounds", "0", "--nc-precision", "fp32", "--nc-max-steps", "500"),
    *("--nc-anomaly-threshold", "2.5", "--spectral-threshold", "3"),
]
FORM_FIELDS = {
    "arch": "mnist_cnn",
    "num_classes": "10",
    "input_shape": "1,28,28",
    "mean": "0.1307",
    "std": "0.3081",
    "seed": "3",
    "detectors": "neural_cleanse",
    "nc_restarts": "2",
    "nc_confirm_rounds": "0",
    "nc_precision": "fp32",
    "nc_max_steps": "500",
    "nc_anomaly_threshold": "2.5",
    "spectral_threshold": "3",
}


def test_the_cli_and_the_api_build_the_same_scan_config(state: AppState, tiny_model: Path) -> None:
    cli = scan_config(scan_options(build_parser().parse_args(["scan", str(tiny_model), *CLI_FLAGS])))
    # the API: the form fields accepted and stored, then read back by the worker
    scan, created, _ = submit(state, tiny_model.read_bytes(), **FORM_FIELDS)
    assert created
    worker = scan_config(ScanOptions.model_validate(scan.options))
    assert cli == worker == scan_config(parse_options(FORM_FIELDS))
    assert cli == ScanConfig(
        model=ModelOptions(arch="mnist_cnn", num_classes=10, input_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,)),
        seed=3,
        neural_cleanse=NeuralCleanseConfig(
            restarts=2, confirm_rounds=0, precision="fp32", max_steps=500, anomaly_threshold=2.5
        ),
        spectral=SpectralConfig(threshold=3.0),
        detectors=("neural_cleanse",),
    )


def test_the_cli_defaults_are_the_scanner_defaults(tiny_model: Path) -> None:
    options = scan_options(build_parser().parse_args(["scan", str(tiny_model)]))
    assert scan_config(options) == ScanConfig() == scan_config(parse_options({}))


@pytest.mark.parametrize(
    "flags",
    [
        ["--nc-max-steps", "99"],  # below the floor the API enforces
        ["--seed", "-1"],
        ["--nc-restarts", "9"],
        ["--detectors", "strip"],
        ["--spectral-threshold", "0"],
    ],
)
def test_the_cli_refuses_what_the_api_refuses(
    tiny_model: Path, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["scan", str(tiny_model), "--arch", "mnist_cnn", *flags])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("backdoor-scan: error [invalid_option]: "), err
    assert len(err.strip().splitlines()) == 1
