"""``create_app(settings)``: the FastAPI application, with Swagger UI served from local files."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from scanner._version import __version__
from service.config import Settings, get_settings
from service.db import create_db_engine, migrate
from service.deps import AppState, hash_key
from service.jobs import JobStore
from service.logs import request_id_var
from service.metrics import Metrics
from service.problems import document_problems, install_problem_handlers
from service.queue import ScanQueue
from service.routes import health, repairs, scans, tryout, ui
from service.tryout import ImageTrials

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Scan image-classifier checkpoints for backdoors before you deploy them.

1. **Authorize** with an API key (`Authorization: Bearer <key>`).
2. `POST /v1/scans` with the checkpoint as `model` (`.pt2`, safetensors or `torch.save` state_dict; state_dicts
   need `arch`), optional clean samples as `data` (Neural Cleanse) and the training set as `training_data`
   (spectral signatures). The data-free maximum-margin test runs on every scan, so a checkpoint alone gets a
   verdict. Unsafe or corrupt files are refused at once.
3. Poll `GET /v1/scans/{id}` until `status` is `succeeded`, `failed` or `cancelled`; `result.verdict` is
   `clean`, `backdoored`, `unsafe_file` or `inconclusive`. Trigger masks are under
   `GET /v1/scans/{id}/artifacts/{name}`.
4. `GET /v1/scans/{id}/report` (linked as `links.report`) is the scan's report for people: one self-contained HTML
   page with the verdict, the recovered triggers, stamped examples, Grad-CAM heatmaps and charts.
5. `POST /v1/scans/{id}/try` runs one image (or one of the scan's clean samples) through a succeeded scan's model, as
   it is and with each flagged class's recovered trigger stamped on, with Grad-CAM. The page at `/` does all of this
   in a browser.

Errors are RFC 9457 `application/problem+json` with a stable `code`.
"""


def _swagger_assets() -> Path:
    """Swagger UI's JS and CSS, shipped inside the installed ``fastapi-swagger`` wheel (no CDN)."""
    return Path(str(resources.files("fastapi_swagger") / "resources"))


def create_app(settings: Settings | None = None, *, queue: ScanQueue | None = None) -> FastAPI:
    """Build the API: migrate the job table, connect the queue, mount the routes.

    Args:
        settings: defaults to the process's environment (``BDS_*``).
        queue: a queue to use instead of one built from ``settings`` (tests pass an immediate one).
    """
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_db_engine(settings.resolved_database_url)
    migrate(engine)
    store = JobStore(engine)
    queue = queue or ScanQueue(settings)
    if not settings.api_keys and not settings.auth_disabled:
        logger.warning("no API keys configured (BDS_API_KEYS) and auth is on: every /v1 request will be refused")

    app = FastAPI(
        title="backdoor-scan",
        version=__version__,
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
    )
    app.state.bds = AppState(
        settings=settings,
        store=store,
        queue=queue,
        metrics=Metrics(store, queue),
        key_hashes=tuple(hash_key(key) for key in settings.api_keys),
    )
    install_problem_handlers(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_problems(
                get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.include_router(scans.router)
    app.include_router(repairs.router)
    app.include_router(tryout.router)
    app.include_router(health.router)
    app.include_router(ui.router)
    app.state.image_trials = ImageTrials(settings.scans_dir)

    app.mount("/docs-assets", StaticFiles(directory=_swagger_assets()), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="backdoor-scan API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
            swagger_ui_parameters={"persistAuthorization": True, "tryItOutEnabled": True},
        )

    @app.middleware("http")
    async def request_context(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        incoming = request.headers.get("x-request-id", "")
        request_id = incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else secrets.token_hex(8)
        request.state.request_id = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        try:
            response = await call_next(request)
        finally:
            request_id_var.reset(token)
        response.headers["X-Request-ID"] = request_id
        app.state.bds.metrics.requests.labels(request.method, str(response.status_code)).inc()
        logger.info(
            "%s %s %d",
            request.method,
            request.url.path,
            response.status_code,
            extra={
                "request_id": request_id,
                "method": request.method,
                "path": request.url.path,
                "status": response.status_code,
                "duration_ms": round(1000 * (time.perf_counter() - started), 1),
            },
        )
        return response

    return app
