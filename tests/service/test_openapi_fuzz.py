"""schemathesis against ``/openapi.json``: generated requests (valid and invalid) never get a 500.

Runs in-process on the ASGI app with a valid API key, scans stay queued (no worker), and every response
must also match the documented status codes and content types.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from service.config import Settings
from service.main import create_app
from tests.service.conftest import API_KEY


def _schema() -> schemathesis.BaseSchema:
    # built at collection: schemathesis parametrizes the test from the operations of the schema
    data_dir = Path(tempfile.mkdtemp(prefix="bds-fuzz-")) / "data"
    app_settings = Settings.model_validate(
        {"data_dir": data_dir, "api_keys": (API_KEY,), "max_upload_mb": 1, "log_json": False}
    )
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(app_settings))


schema = _schema()


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    schema.app.state.bds.store.worker_beat("fuzz:1", "cpu")  # a beating worker, so /readyz answers 200
    case.call_and_validate(
        headers={"Authorization": f"Bearer {API_KEY}"},
        checks=[not_a_server_error, status_code_conformance, content_type_conformance],
    )
