"""What routes depend on: the app's state and the API-key check, as ``Annotated`` aliases."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.config import Settings
from service.jobs import JobStore
from service.metrics import Metrics
from service.problems import ServiceError
from service.queue import ScanQueue

__all__ = ["ApiKeyDep", "AppState", "StateDep", "hash_key"]


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass
class AppState:
    settings: Settings
    store: JobStore
    queue: ScanQueue
    metrics: Metrics
    key_hashes: tuple[bytes, ...]


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.bds
    return state


StateDep = Annotated[AppState, Depends(get_state)]

_bearer = HTTPBearer(auto_error=False, description="an API key from BDS_API_KEYS")


def require_api_key(
    state: StateDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Every ``/v1`` route: ``Authorization: Bearer KEY``, compared by SHA-256 digest in constant time."""
    if state.settings.auth_disabled:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ServiceError(
            HTTPStatus.UNAUTHORIZED, "missing_api_key", "send 'Authorization: Bearer <API key>'", headers=challenge
        )
    presented = hash_key(credentials.credentials)
    matched = False
    for expected in state.key_hashes:  # no early exit: the time does not tell which key came close
        matched |= hmac.compare_digest(presented, expected)
    if not matched:
        raise ServiceError(HTTPStatus.UNAUTHORIZED, "invalid_api_key", "the API key is not valid", headers=challenge)


ApiKeyDep = Depends(require_api_key)
