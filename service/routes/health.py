"""Liveness, readiness and metrics: no API key needed."""

from __future__ import annotations

from datetime import timedelta
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import StateDep

router = APIRouter(tags=["operations"])


@router.get("/livez")
def livez() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={503: {"description": "a dependency is not ready (same body)", "content": {"application/json": {}}}},
)
async def readyz(state: StateDep) -> JSONResponse:
    """Ready to take scans: the job table and the queue answer, and at least one worker is beating."""
    checks: dict[str, Any] = {}

    def check() -> None:
        try:
            state.store.ping()
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
        try:
            checks["queue"] = "ok"
            checks["queue_depth"] = state.queue.pending_count()
        except Exception as exc:
            checks["queue"] = f"error: {type(exc).__name__}"
        try:
            workers = state.store.live_workers(timedelta(seconds=state.settings.heartbeat_timeout_s))
            checks["workers"] = workers
            checks["worker_heartbeat"] = "ok" if workers else "error: no worker has beaten recently"
        except Exception as exc:
            checks["worker_heartbeat"] = f"error: {type(exc).__name__}"

    await run_in_threadpool(check)
    ready = all(checks.get(name) == "ok" for name in ("database", "queue", "worker_heartbeat"))
    status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
    return JSONResponse({"status": "ok" if ready else "unavailable", "checks": checks}, status_code=status)


@router.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    """Prometheus metrics (text exposition format)."""
    body = await run_in_threadpool(generate_latest, state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
