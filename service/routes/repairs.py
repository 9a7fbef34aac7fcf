"""Repairs: ``POST /v1/scans/{id}/repair`` asks for one; ``/v1/repairs/{id}`` follows it, cancels it and serves the
repaired model (``repaired.pt2``, and ``repaired.safetensors`` for a state_dict upload) with the re-scan's files."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse

from service.deps import ApiKeyDep, AppState, StateDep
from service.models import JobKind
from service.problems import ServiceError
from service.repairs import REPAIR_FILE_FIELDS, REPAIR_TEXT_FIELDS, RepairRequest
from service.routes.common import AUTH_RESPONSES, artifact_response, cancel_job, job_or_404, problem_response
from service.schemas import RepairPublic, repair_form_schema
from service.storage import MAX_FIELD_BYTES, ParsedUpload, parse_upload

router = APIRouter(tags=["repairs"], dependencies=[ApiKeyDep])

_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: problem_response("no such repair")}


@router.post(
    "/v1/scans/{scan_id}/repair",
    status_code=HTTPStatus.ACCEPTED,
    response_model=RepairPublic,
    openapi_extra={"requestBody": repair_form_schema()},
    responses={
        200: {"description": "the same repair was already asked for: the existing one", "model": RepairPublic},
        **AUTH_RESPONSES,
        404: problem_response("no such scan"),
        409: problem_response("the scan has not succeeded, or Neural Cleanse flagged no class (nothing to unlearn)"),
        413: problem_response("the data file is larger than BDS_MAX_UPLOAD_MB"),
        415: problem_response("a body that is neither multipart/form-data nor a URL-encoded form"),
        422: problem_response(
            "invalid options, no clean samples, or a model the repair cannot give back (TorchScript)"
        ),
    },
)
async def create_repair(scan_id: str, request: Request, response: Response, state: StateDep) -> RepairPublic:
    """Remove the backdoor a scan found: fine-tune its model on clean samples with the reversed triggers stamped
    on (unlearning), measure it on held-out samples, and scan the result again. Without a ``data`` file the scan's
    clean samples are used; more samples cost less accuracy."""
    request_ = RepairRequest(state, scan_id)
    parsed = await _repair_body(request, request_, state)
    repair, created = await request_.submit(parsed)
    if not created:
        response.status_code = HTTPStatus.OK
    response.headers["Location"] = f"/v1/repairs/{repair.id}"
    return RepairPublic.of(repair)


async def _repair_body(request: Request, request_: RepairRequest, state: AppState) -> ParsedUpload:
    """The request's fields and optional data file: multipart/form-data (streamed to disk), a URL-encoded form
    (fields only), or no body at all."""
    content_type = request.headers.get("content-type")
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        return await parse_upload(
            request.stream(),
            content_type,
            request.headers.get("content-length"),
            request_.files,
            REPAIR_FILE_FIELDS,
            REPAIR_TEXT_FIELDS,
            state.settings.max_upload_bytes,
            on_bytes=state.metrics.upload_bytes.inc,
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FIELD_BYTES:
            raise ServiceError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "upload_too_large", f"a form is at most {MAX_FIELD_BYTES} bytes"
            )
    if media_type == "application/x-www-form-urlencoded":
        try:
            return ParsedUpload(fields=dict(parse_qsl(body.decode("utf-8"), strict_parsing=bool(body))))
        except (UnicodeDecodeError, ValueError):
            raise ServiceError(HTTPStatus.BAD_REQUEST, "malformed_form", "the form cannot be parsed") from None
    if body or media_type:
        raise ServiceError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the repair's options as multipart/form-data (with an optional 'data' file) or as a URL-encoded"
            " form, or send no body",
        )
    return ParsedUpload()


@router.get("/v1/scans/{scan_id}/repairs", response_model=list[RepairPublic], responses={**AUTH_RESPONSES})
def list_repairs(scan_id: str, state: StateDep) -> list[RepairPublic]:
    """The repairs of a scan, newest first (empty for an unknown scan)."""
    return [RepairPublic.of(repair) for repair in state.store.repairs_of(scan_id)]


@router.get("/v1/repairs/{repair_id}", response_model=RepairPublic, responses={**AUTH_RESPONSES, **_NOT_FOUND})
def get_repair(repair_id: str, state: StateDep) -> RepairPublic:
    """A repair: status, progress and, once succeeded, the before/after numbers and the re-scan."""
    return RepairPublic.of(job_or_404(state.store.get_kind(repair_id, JobKind.repair), repair_id, "repair"))


@router.post(
    "/v1/repairs/{repair_id}/cancel",
    status_code=HTTPStatus.ACCEPTED,
    response_model=RepairPublic,
    responses={**AUTH_RESPONSES, **_NOT_FOUND, 409: problem_response("the repair already finished")},
)
def cancel_repair(repair_id: str, state: StateDep) -> RepairPublic:
    """Cancel a repair: a queued one at once, a running one at its next progress point."""
    repair = cancel_job(state, state.store.get_kind(repair_id, JobKind.repair), "repair")
    return RepairPublic.of(job_or_404(repair, repair_id, "repair"))


@router.get(
    "/v1/repairs/{repair_id}/artifacts/{name}",
    response_class=FileResponse,
    responses={
        **AUTH_RESPONSES,
        404: problem_response("no such repair or artifact"),
        200: {"content": {"application/octet-stream": {}, "image/png": {}, "application/json": {}}},
    },
)
def get_repair_artifact(repair_id: str, name: str, state: StateDep) -> FileResponse:
    """The repaired model (``repaired.pt2``, ``repaired.safetensors``) or a file of the re-scan."""
    job_or_404(state.store.get_kind(repair_id, JobKind.repair), repair_id, "repair")
    return artifact_response(state, repair_id, name, "repair")
