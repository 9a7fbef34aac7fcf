"""``POST /v1/scans/{id}/try``: an image on a scanned model, as it is and with the recovered triggers stamped on."""

from __future__ import annotations

import secrets
from http import HTTPStatus
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool

from service.deps import ApiKeyDep, StateDep
from service.models import JobKind
from service.problems import ServiceError
from service.routes.common import AUTH_RESPONSES, job_or_404, problem_response
from service.storage import ScanFiles, multipart_boundary, parse_upload
from service.tryout import (
    FILE_FIELDS,
    MAX_IMAGE_BYTES,
    TEXT_FIELDS,
    ImageTrials,
    TryResult,
    check_triable,
    try_form_schema,
    try_request,
)

router = APIRouter(prefix="/v1/scans", tags=["scans"], dependencies=[ApiKeyDep])


def get_trials(request: Request) -> ImageTrials:
    trials: ImageTrials = request.app.state.image_trials
    return trials


TrialsDep = Annotated[ImageTrials, Depends(get_trials)]


@router.post(
    "/{scan_id}/try",
    response_model=TryResult,
    openapi_extra={"requestBody": try_form_schema()},
    responses={
        **AUTH_RESPONSES,
        404: problem_response("no such scan"),
        409: problem_response(
            "the scan has not succeeded, its model is unsafe, runs code or cannot be loaded, its input size is "
            "unknown, or it has no clean samples to pick from"
        ),
        413: problem_response(f"the image is larger than {MAX_IMAGE_BYTES // 2**20} MiB"),
        415: problem_response("not multipart/form-data, or the image is neither PNG nor .npy"),
        422: problem_response(
            "no image or sample, or both; an invalid image, a size the model does not take, a bad sample"
        ),
        429: problem_response("too many images are being tried at once: retry after Retry-After seconds"),
    },
)
async def try_an_image(scan_id: str, request: Request, state: StateDep, trials: TrialsDep) -> TryResult:
    """Try an image (PNG or .npy upload, or one of the scan's clean samples) on a succeeded scan's model: the
    prediction, confidence and Grad-CAM as it is and with each flagged class's recovered trigger stamped on."""
    found = await run_in_threadpool(state.store.get_kind, scan_id, JobKind.scan)  # a repair's id is no scan
    scan = job_or_404(found, scan_id, "scan")
    check_triable(scan)
    content_type = request.headers.get("content-type")
    try:
        multipart_boundary(content_type)
    except ServiceError:
        raise ServiceError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send multipart/form-data: an 'image' file part, or a 'sample' field",
        ) from None
    async with trials.admitted():
        files = ScanFiles(state.settings.data_dir / "tries", secrets.token_hex(8))
        try:
            upload = await parse_upload(
                request.stream(),
                content_type,
                request.headers.get("content-length"),
                files,
                FILE_FIELDS,
                TEXT_FIELDS,
                MAX_IMAGE_BYTES,
            )
            wanted = try_request(upload, files)
        finally:
            files.remove()
        return await trials.run(scan, wanted)
