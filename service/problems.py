"""Errors inside a request, answered as RFC 9457 ``application/problem+json`` with a stable ``code``.

A scan that fails later in the worker is not a problem response: it is a scan resource with ``status: failed``.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from scanner.errors import ScannerError, UnsafeFileError

__all__ = [
    "PROBLEM_JSON",
    "Problem",
    "ServiceError",
    "document_problems",
    "install_problem_handlers",
    "problem_response",
]

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"

#: HTTP status of each scanner error code raised while a request waits (the synchronous file check).
_SCANNER_STATUS = {
    "unsupported_format": HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    "trust_required": HTTPStatus.FORBIDDEN,
}


class Problem(BaseModel):
    """RFC 9457 problem details, with our stable ``code`` (and extra members for some codes)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="a URI naming the problem type (ends with the code)")
    title: str
    status: int
    code: str = Field(description="stable machine-readable error code")
    detail: str
    instance: str | None = None
    request_id: str | None = None


def document_problems(schema: dict[str, Any]) -> dict[str, Any]:
    """Make every 4xx/5xx response of an OpenAPI document ``application/problem+json`` with :class:`Problem`."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                framework_default = "HTTPValidationError" in json.dumps(content)
                if status[:1] in ("4", "5") and (not content or PROBLEM_JSON in content or framework_default):
                    response["content"] = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    return schema


class ServiceError(Exception):
    """A failure of one request: HTTP status, stable ``code``, human ``detail`` and optional extra members."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


def problem_response(
    status: int,
    code: str,
    detail: str,
    request: Request | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"https://backdoor-scan.dev/problems/{code}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "code": code,
        "detail": detail,
    }
    if request is not None:
        body["instance"] = request.url.path
        request_id = getattr(request.state, "request_id", None)
        if request_id:
            body["request_id"] = request_id
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def scanner_problem(exc: ScannerError, names: tuple[str, str] | None = None) -> ServiceError:
    """A scanner error raised inside a request (the synchronous ``model_file`` check) as a problem.

    ``names`` is ``(stored name, client's name)``: the client reads about the file it sent, not our copy.
    """

    def shown(text: str) -> str:
        return text.replace(names[0], names[1]) if names else text

    extra: dict[str, Any] = {}
    if isinstance(exc, UnsafeFileError):
        findings = [finding.to_dict() for finding in exc.report.findings]
        for finding in findings:
            if isinstance(finding.get("member"), str):
                finding["member"] = shown(finding["member"])
        extra["findings"] = findings
        extra["format"] = exc.report.format.value
    status = _SCANNER_STATUS.get(exc.code, HTTPStatus.UNPROCESSABLE_ENTITY)
    return ServiceError(status, exc.code, shown(exc.detail), **extra)


def install_problem_handlers(app: FastAPI) -> None:
    """Every error a client can see becomes problem+json; nothing leaks a traceback."""

    async def service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return problem_response(exc.status, exc.code, exc.detail, request, exc.headers, **exc.extra)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {
                "loc": [str(part) for part in error.get("loc", ())],
                "msg": str(error.get("msg", "")),
                "type": error.get("type"),
            }
            for error in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(e['loc'][1:] or e['loc'])}: {e['msg']}" for e in errors) or "invalid request"
        return problem_response(HTTPStatus.UNPROCESSABLE_ENTITY, "invalid_request", detail, request, errors=errors)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return problem_response(exc.status_code, code, detail, request, dict(exc.headers or {}))

    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return problem_response(
            HTTPStatus.INTERNAL_SERVER_ERROR, "internal_error", "internal error; it has been logged", request
        )

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
