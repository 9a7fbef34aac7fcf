"""The one function that decides which device a scan runs on."""

from __future__ import annotations

import re

import torch

from scanner.errors import DeviceUnavailableError, InvalidOptionError

__all__ = ["resolve_device"]

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(name: str) -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a ``torch.device`` that exists here.

    Raises:
        InvalidOptionError: the name is none of the accepted forms.
        DeviceUnavailableError: CUDA was asked for and is not available, or the index is out of range.
    """
    if not _DEVICE.match(name):
        raise InvalidOptionError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"device {name!r} requested but CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceUnavailableError(f"device {name!r} requested but only {count} CUDA device(s) exist")
    return device
