"""What the job routes share: problem responses for the OpenAPI document, artifact files, cancelling."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi.responses import FileResponse

from service.deps import AppState
from service.models import FINISHED, Scan
from service.problems import PROBLEM_JSON, ServiceError
from service.storage import ScanFiles

__all__ = ["AUTH_RESPONSES", "artifact_response", "cancel_job", "job_or_404", "problem_response"]


def problem_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_JSON: {}}}


AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {401: problem_response("missing or invalid API key")}
MEDIA_TYPES = {
    ".png": "image/png",
    ".npy": "application/octet-stream",
    ".json": "application/json",
    ".pt2": "application/octet-stream",
    ".safetensors": "application/octet-stream",
}


def cancel_job(state: AppState, job: Scan | None, what: str) -> Scan | None:
    """Cancel a job (scan or repair) that has not finished: 409 ``{what}_finished`` when it has."""
    if job is None:
        return None
    if job.status in FINISHED:
        raise ServiceError(HTTPStatus.CONFLICT, f"{what}_finished", f"the {what} already finished ({job.status})")
    return state.store.request_cancel(job.id)


def artifact_response(state: AppState, job_id: str, name: str, what: str) -> FileResponse:
    """A job's artifact by its public name (404 ``artifact_not_found`` when it has none of that name)."""
    path = ScanFiles(state.settings.scans_dir, job_id).artifact(name)
    if path is None or not path.is_file():
        raise ServiceError(HTTPStatus.NOT_FOUND, "artifact_not_found", f"{what} {job_id} has no artifact {name!r}")
    return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"))


def job_or_404(job: Scan | None, job_id: str, what: str) -> Scan:
    """The job, or 404 ``{what}_not_found``."""
    if job is None:
        raise ServiceError(HTTPStatus.NOT_FOUND, f"{what}_not_found", f"no {what} with id {job_id!r}")
    return job
