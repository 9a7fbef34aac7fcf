"""``/v1/scans``: submit a checkpoint, follow the scan, read the verdict and its artifacts."""

from __future__ import annotations

from http import HTTPStatus
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse

from scanner.render.html import STYLE_SOURCE, render_html
from service.deps import ApiKeyDep, AppState, StateDep
from service.models import JobKind, JobStatus
from service.problems import ServiceError
from service.routes.common import AUTH_RESPONSES, artifact_response, cancel_job, job_or_404, problem_response
from service.scans import FILE_FIELDS, TEXT_FIELDS, ScanSubmission
from service.schemas import ScanList, ScanPublic, upload_form_schema
from service.storage import ScanFiles, parse_upload

router = APIRouter(prefix="/v1/scans", tags=["scans"], dependencies=[ApiKeyDep])


_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: problem_response("no such scan")}
#: The report needs nothing from anywhere: no script, no request; images are data: URIs and its one <style> is
#: allowed by its hash.
_REPORT_POLICY = f"default-src 'none'; img-src data:; style-src {STYLE_SOURCE}; base-uri 'none'; form-action 'none'"
_REPORT_ARTIFACTS = (".png", ".json")  # what the page shows; the .npy arrays stay out of memory


@router.post(
    "",
    status_code=HTTPStatus.ACCEPTED,
    response_model=ScanPublic,
    openapi_extra={"requestBody": upload_form_schema()},
    responses={
        200: {"description": "the same upload was already submitted: the existing scan", "model": ScanPublic},
        **AUTH_RESPONSES,
        403: problem_response("trust_code asked for, but the server does not allow TorchScript"),
        413: problem_response("a file is larger than BDS_MAX_UPLOAD_MB"),
        415: problem_response("not multipart/form-data, or an unsupported model format"),
        422: problem_response("invalid options, or a model file that is unsafe, corrupt or empty"),
    },
)
async def create_scan(
    request: Request,
    response: Response,
    state: StateDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> ScanPublic:
    """Upload a checkpoint (and optional clean samples / training data) and queue a scan of it."""
    submission = ScanSubmission(state, idempotency_key)
    parsed = await parse_upload(
        request.stream(),
        request.headers.get("content-type"),
        request.headers.get("content-length"),
        submission.files,
        FILE_FIELDS,
        TEXT_FIELDS,
        state.settings.max_upload_bytes,
        on_bytes=state.metrics.upload_bytes.inc,
    )
    scan, created = await submission.submit(parsed)
    if not created:
        response.status_code = HTTPStatus.OK
    response.headers["Location"] = f"/v1/scans/{scan.id}"
    return ScanPublic.of(scan)


@router.get("", response_model=ScanList, responses=AUTH_RESPONSES)
def list_scans(
    state: StateDep,
    status: Annotated[JobStatus | None, Query(description="only scans with this status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> ScanList:
    """List scans, newest first."""
    rows, total = state.store.list_scans(status, limit, offset)
    return ScanList(items=[ScanPublic.of(row) for row in rows], total=total, limit=limit, offset=offset)


@router.get("/{scan_id}", response_model=ScanPublic, responses={**AUTH_RESPONSES, **_NOT_FOUND})
def get_scan(scan_id: str, state: StateDep) -> ScanPublic:
    """A scan: status, progress and, once succeeded, the verdict."""
    return ScanPublic.of(job_or_404(state.store.get_kind(scan_id, JobKind.scan), scan_id, "scan"))


@router.post(
    "/{scan_id}/cancel",
    status_code=HTTPStatus.ACCEPTED,
    response_model=ScanPublic,
    responses={**AUTH_RESPONSES, **_NOT_FOUND, 409: problem_response("the scan already finished")},
)
def cancel_scan(scan_id: str, state: StateDep) -> ScanPublic:
    """Cancel a scan: a queued one at once, a running one at its next progress point."""
    cancelled = job_or_404(cancel_job(state, state.store.get_kind(scan_id, JobKind.scan), "scan"), scan_id, "scan")
    if cancelled.status == JobStatus.cancelled and cancelled.callback_url:
        state.queue.enqueue_webhook(scan_id)
    return ScanPublic.of(cancelled)


@router.delete(
    "/{scan_id}",
    status_code=HTTPStatus.NO_CONTENT,
    response_class=Response,
    responses={**AUTH_RESPONSES, **_NOT_FOUND, 409: problem_response("the scan is running: cancel it first")},
)
def delete_scan(scan_id: str, state: StateDep) -> Response:
    """Delete a scan that is not running, with its uploaded files and artifacts."""
    scan = job_or_404(state.store.get_kind(scan_id, JobKind.scan), scan_id, "scan")
    if scan.status == JobStatus.running:
        raise ServiceError(HTTPStatus.CONFLICT, "scan_running", "the scan is running: cancel it first, then delete it")
    state.store.delete(scan_id)
    ScanFiles(state.settings.scans_dir, scan_id).remove()
    return Response(status_code=HTTPStatus.NO_CONTENT)


@router.get(
    "/{scan_id}/artifacts/{name}",
    response_class=FileResponse,
    responses={
        **AUTH_RESPONSES,
        404: problem_response("no such scan or artifact"),
        200: {"content": {"image/png": {}, "application/octet-stream": {}, "application/json": {}}},
    },
)
def get_artifact(scan_id: str, name: str, state: StateDep) -> FileResponse:
    """A file a detector made: trigger mask/pattern PNG and npy, suspicious-sample lists, verdict.json."""
    job_or_404(state.store.get_kind(scan_id, JobKind.scan), scan_id, "scan")
    return artifact_response(state, scan_id, name, "scan")


@router.get(
    "/{scan_id}/report",
    response_class=HTMLResponse,
    responses={
        **AUTH_RESPONSES,
        **_NOT_FOUND,
        409: problem_response("the scan has not succeeded (queued, running, failed or cancelled)"),
        200: {"description": "a self-contained HTML page", "content": {"text/html": {}}},
    },
)
def get_report(scan_id: str, state: StateDep) -> HTMLResponse:
    """The scan's report for people: verdict, recovered triggers, stamped examples, Grad-CAM, charts (one HTML page);
    with the latest succeeded repair of the scan's model, its before/after numbers."""
    scan = job_or_404(state.store.get_kind(scan_id, JobKind.scan), scan_id, "scan")
    if scan.status != JobStatus.succeeded or scan.result is None:
        raise ServiceError(
            HTTPStatus.CONFLICT, "scan_not_finished", f"the scan is {scan.status}: a report exists once it succeeded"
        )
    artifacts = _report_artifacts(state, scan_id)
    repairs = state.store.repairs_of(scan_id, JobStatus.succeeded)
    repair = {"id": repairs[0].id, **(repairs[0].result or {})} if repairs else None
    settings: dict[str, Any] = {
        "scan id": scan.id,
        "model file": scan.model_filename,
        "clean samples (data)": scan.data_filename,
        "training data": scan.training_data_filename,
        "options": scan.options,
        "submitted": scan.created_at.isoformat(),
        "started": scan.started_at.isoformat() if scan.started_at else None,
        "finished": scan.finished_at.isoformat() if scan.finished_at else None,
        "attempts": scan.attempts,
    }
    if scan.started_at and scan.finished_at:
        settings["scan duration (s)"] = round((scan.finished_at - scan.started_at).total_seconds(), 3)
    page = render_html(
        scan.result,
        artifacts,
        title=scan.model_filename,
        settings=settings,
        repair=repair,
        repair_artifacts=_report_artifacts(state, repairs[0].id) if repairs else None,
    )
    return HTMLResponse(page, headers={"Content-Security-Policy": _REPORT_POLICY, "X-Content-Type-Options": "nosniff"})


def _report_artifacts(state: AppState, job_id: str) -> dict[str, bytes]:
    """What a report page shows of a job's artifacts (images, JSON; the .npy arrays and models stay on disk)."""
    directory = ScanFiles(state.settings.scans_dir, job_id).artifacts
    if not directory.is_dir():
        return {}
    return {path.name: path.read_bytes() for path in directory.iterdir() if path.suffix in _REPORT_ARTIFACTS}
