"""The web page for people at ``/``: one HTML page, a script and a stylesheet shipped in the package (no CDN).

The page and its two assets need no key: they hold no data. Everything the page shows comes from the ``/v1`` API,
fetched with the key the page asks for once and keeps in the tab's ``sessionStorage``. The policy allows scripts and
styles from this origin only; the one exception is the report's own stylesheet, allowed by its hash, because the
page shows the report in an ``iframe srcdoc``, which inherits this policy.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from scanner.render.html import STYLE_SOURCE
from service.deps import StateDep

router = APIRouter(include_in_schema=False)

PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; "
    f"style-src 'self' {STYLE_SOURCE}; "
    "img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


@cache
def _asset(name: str) -> bytes:
    return (resources.files("service") / "ui" / name).read_bytes()


@router.get("/")
def page(state: StateDep) -> Response:
    """The page: scans with live progress, the submit form, reports, try an image."""
    auth = "disabled" if state.settings.auth_disabled else "required"  # whether the page asks for a key
    content = _asset("index.html").replace(b'data-auth="{auth}"', f'data-auth="{auth}"'.encode())
    headers = {**_HEADERS, "Content-Security-Policy": PAGE_POLICY, "X-Frame-Options": "DENY"}
    return Response(content, media_type="text/html; charset=utf-8", headers=headers)


@router.get("/ui/app.js")
def script() -> Response:
    return Response(_asset("app.js"), media_type="text/javascript; charset=utf-8", headers=_HEADERS)


@router.get("/ui/app.css")
def stylesheet() -> Response:
    return Response(_asset("app.css"), media_type="text/css; charset=utf-8", headers=_HEADERS)
