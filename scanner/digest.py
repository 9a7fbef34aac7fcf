"""The SHA-256 of a file on disk: one helper for the scan's ``model.sha256`` and the client's upload check.

A leaf without torch, so that ``backdoor-scan submit`` hashes its upload without loading the scanner.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["file_digest"]

_CHUNK = 1 << 20


def file_digest(path: Path) -> tuple[str, int]:
    """SHA-256 (hex) and size in bytes of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
