"""What every detector adapter shares: its inputs, its interface, and small helpers for JSON details.

A detector says whether it can run on the inputs (``needs`` returns a skip reason or ``None``) and turns them into
a :class:`~scanner.verdict.DetectorResult`; it reports progress as a fraction of its own work, and the pipeline
maps that onto the detector's share of the scan's progress bar. The pipeline contains crashes; detectors only
raise for bad input (a :class:`~scanner.errors.ScannerError`, reported as the detector's error).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from scanner.config import ScanConfig
from scanner.loading import Samples
from scanner.verdict import DetectorResult

__all__ = ["Detector", "DetectorProgress", "Progress", "ScanInputs", "npy_bytes", "rounded"]

#: ``progress(fraction, stage, message)`` of a whole scan; fraction in [0, 1]. May raise ScanCancelled to stop it.
Progress = Callable[[float, str, str], None]
#: ``progress(fraction, message)`` of one detector's own work; fraction in [0, 1]. May raise ScanCancelled.
DetectorProgress = Callable[[float, str], None]


@dataclass(frozen=True)
class ScanInputs:
    """What the detectors get: the model in [0, 1] pixel space on ``device`` and the decoded data."""

    model: nn.Module
    num_classes: int
    input_shape: tuple[int, int, int] | None
    clean: Samples | None
    training: Samples | None
    config: ScanConfig
    device: torch.device


@dataclass(frozen=True)
class Detector:
    """One backdoor detector.

    Attributes:
        name: its key in the verdict's ``detectors`` (one of :data:`scanner.verdict.BACKDOOR_DETECTORS`).
        share: its weight in the progress bar, relative to the other detectors that run in the same scan (its
            typical share of their run time).
        needs: the reason it cannot run on these inputs, or ``None``.
        run: the detector itself.
    """

    name: str
    share: float
    needs: Callable[[ScanInputs], str | None]
    run: Callable[[ScanInputs, DetectorProgress], DetectorResult]


def npy_bytes(array: torch.Tensor) -> bytes:
    """``array`` as an ``.npy`` file (for artifacts)."""
    buffer = io.BytesIO()
    np.save(buffer, array.detach().cpu().numpy(), allow_pickle=False)
    return buffer.getvalue()


def rounded(value: float) -> float | None:
    """``value`` rounded for JSON, which has no inf/nan: such values become null."""
    return round(value, 4) if np.isfinite(value) else None
