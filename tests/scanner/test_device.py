from __future__ import annotations

import pytest
import torch

from scanner.device import resolve_device
from scanner.errors import DeviceUnavailableError, InvalidOptionError


def test_resolve_device_auto_and_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "", "cpu:0 ", "tpu"])
def test_resolve_device_rejects_unknown_names(name: str) -> None:
    with pytest.raises(InvalidOptionError) as info:
        resolve_device(name)
    assert info.value.code == "invalid_option"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_cuda_unavailable() -> None:
    with pytest.raises(DeviceUnavailableError) as info:
        resolve_device("cuda")
    assert info.value.code == "device_unavailable"
