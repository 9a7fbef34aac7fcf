"""Loading a state_dict (safetensors, or ``torch.save`` read weights-only) into an allowlisted architecture.

A state_dict carries weights, not code, so the operator names the architecture (``arch``) and the
class count is read from its classification layer. A safetensors header is validated here before the
library sees the file (offsets, sizes, dtypes), and everything that can be refused without reading a
tensor is refused by :func:`check_state_dict_file`, which the upload request runs.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

from scanner.config import ModelOptions
from scanner.errors import CorruptFileError, InvalidOptionError, StateDictMismatchError, UnsupportedFormatError
from scanner.loading.architectures import ARCHITECTURES, build_architecture
from scanner.loading.types import HOW_TO_EXPORT, ModelFormat, one_line

__all__ = ["STATE_DICT_FORMATS", "check_state_dict_file", "load_state_dict_model"]

#: The formats that hold a state_dict, loaded into ``options.arch``.
STATE_DICT_FORMATS = frozenset({ModelFormat.safetensors, ModelFormat.torch_zip, ModelFormat.torch_legacy})
_MAX_SAFETENSORS_HEADER = 100 * 1024**2
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model")
_STATE_DICT_PREFIXES = ("module.", "_orig_mod.")
_Value = TypeVar("_Value")


def check_state_dict_file(path: Path, file_format: ModelFormat, options: ModelOptions) -> None:
    """Refuse what :func:`load_state_dict_model` would refuse before reading any tensor.

    Raises:
        UnknownArchitectureError: ``options.arch`` is missing or not allowlisted.
        CorruptFileError: a safetensors header that is malformed or points outside the file.
        InvalidOptionError: ``num_classes`` disagrees with the rows of the safetensors classification layer.
    """
    _arch_name(options)
    if file_format is ModelFormat.safetensors:
        shapes = _without_prefixes(_check_safetensors_header(path))
        head = _head_name(str(options.arch))
        head_shape = shapes.get(f"{head}.weight")
        if head_shape is not None and len(head_shape) == 2:  # any other problem is the loader's to name
            _check_num_classes(options.num_classes, head, head_shape[0])


def load_state_dict_model(
    path: Path, file_format: ModelFormat, options: ModelOptions
) -> tuple[nn.Module, tuple[int, int, int]]:
    """``options.arch`` with the weights at ``path`` (checked by the ``model_file`` check), and its input shape.

    Raises:
        UnknownArchitectureError: ``options.arch`` is missing or not allowlisted.
        UnsupportedFormatError: the file holds something other than a state_dict of tensors.
        StateDictMismatchError: the state_dict does not fit ``arch``.
        InvalidOptionError: ``num_classes`` disagrees with the classification layer.
    """
    arch = _arch_name(options)
    if file_format is ModelFormat.safetensors:
        from safetensors.torch import load_file

        loaded: object = load_file(str(path), device="cpu")
    else:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = _unwrap_state_dict(loaded)
    module = _build_from_state_dict(arch, state_dict, options.num_classes)
    return module, options.input_shape or ARCHITECTURES[arch].default_input_shape


def _arch_name(options: ModelOptions) -> str:
    """``options.arch``, checked before any tensor is read."""
    if options.arch is None or options.arch not in ARCHITECTURES:
        with torch.device("meta"):
            build_architecture(options.arch, 2)  # raises UnknownArchitectureError naming the allowed ones
    return str(options.arch)


def _check_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Validate a safetensors header before the library sees the file; returns each tensor's shape by name.

    Raises:
        CorruptFileError: header length beyond the file or the 100 MB cap, not a JSON object, or
            a tensor entry with an unknown dtype, a bad shape, or data outside the file.
    """
    size = path.stat().st_size
    with path.open("rb") as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            raise CorruptFileError(f"safetensors file is {size} bytes, shorter than its 8-byte header length")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise CorruptFileError(
                f"safetensors header length {header_length} is beyond the file ({size} bytes)"
                f" or the {_MAX_SAFETENSORS_HEADER} byte cap"
            )
        raw_header = stream.read(header_length)
    try:
        header = json.loads(raw_header)
    except ValueError as exc:  # includes UnicodeDecodeError
        raise CorruptFileError(f"safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise CorruptFileError(f"safetensors header is a JSON {type(header).__name__}, not an object")
    data_size = size - 8 - header_length
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(value, str) for value in entry.values()):
                raise CorruptFileError("safetensors __metadata__ must map strings to strings")
            continue
        spans.append(_safetensors_span(name, entry, data_size))
    spans.sort()
    for (_, end, name), (begin, _, next_name) in itertools.pairwise(spans):
        if begin < end:
            raise CorruptFileError(f"safetensors tensors {name!r} and {next_name!r} overlap")
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def _safetensors_span(name: str, entry: object, data_size: int) -> tuple[int, int, str]:
    if not isinstance(entry, dict):
        raise CorruptFileError(f"safetensors tensor {name!r}: entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_ITEMSIZE:
        raise CorruptFileError(f"safetensors tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(size) is int and size >= 0 for size in shape):
        raise CorruptFileError(f"safetensors tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(offset) is int for offset in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise CorruptFileError(
            f"safetensors tensor {name!r}: data_offsets {offsets!r} outside the {data_size} data bytes of the file"
        )
    needed = math.prod(shape) * _SAFETENSORS_ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != needed:
        raise CorruptFileError(
            f"safetensors tensor {name!r}: shape {shape} of {dtype} needs {needed} bytes,"
            f" data_offsets span {offsets[1] - offsets[0]}"
        )
    return offsets[0], offsets[1], name


def _unwrap_state_dict(loaded: object) -> dict[str, Tensor]:
    """The ``name -> tensor`` mapping inside common checkpoint wrappers, without DDP/compile prefixes."""
    if isinstance(loaded, Mapping):
        for key in _STATE_DICT_WRAPPERS:
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not loaded:
        raise UnsupportedFormatError(
            f"expected a state_dict (a mapping of parameter names to tensors), found {type(loaded).__name__}"
            f"{' (empty)' if isinstance(loaded, Mapping) else ''}; {HOW_TO_EXPORT}"
        )
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise UnsupportedFormatError(
                f"expected a state_dict of tensors, but entry {key!r} is a {type(value).__name__}; {HOW_TO_EXPORT}"
            )
    return _without_prefixes(dict(loaded))


def _without_prefixes(entries: dict[str, _Value]) -> dict[str, _Value]:
    """``entries`` with the DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes shared by every key
    removed, as often as they occur."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _STATE_DICT_PREFIXES:
            if entries and all(key.startswith(prefix) for key in entries):
                entries = {key.removeprefix(prefix): value for key, value in entries.items()}
                stripped = True
    return entries


def _head_name(arch: str) -> str:
    """The name of ``arch``'s classification layer (its last ``nn.Linear``), whose weight has one row per class."""
    with torch.device("meta"):
        probe = build_architecture(arch, 2)
    heads: list[str] = [name for name, layer in probe.named_modules() if isinstance(layer, nn.Linear)]
    return heads[-1]


def _check_num_classes(num_classes: int | None, head: str, rows: int) -> None:
    """The ``num_classes`` option must agree with the classification layer's rows.

    Raises:
        InvalidOptionError: it does not.
    """
    if num_classes is not None and num_classes != rows:
        raise InvalidOptionError(f"num_classes is {num_classes} but the state_dict's {head}.weight has {rows} rows")


def _build_from_state_dict(arch: str, state_dict: dict[str, Tensor], num_classes: int | None) -> nn.Module:
    """Build ``arch`` with the class count the state_dict's last Linear layer says, and load it.

    Raises:
        StateDictMismatchError: naming missing keys, unexpected keys and shape mismatches.
        InvalidOptionError: ``num_classes`` disagrees with the classification layer.
    """
    head = _head_name(arch)
    head_weight = state_dict.get(f"{head}.weight")
    if head_weight is None or head_weight.dim() != 2:
        found = "missing" if head_weight is None else f"of shape {tuple(head_weight.shape)}"
        raise StateDictMismatchError(
            f"{arch} needs the classifier weight {head}.weight (num_classes x features), but it is {found}"
        )
    inferred = int(head_weight.shape[0])
    _check_num_classes(num_classes, head, inferred)
    if inferred < 2:
        raise StateDictMismatchError(f"the state_dict's {head}.weight has {inferred} rows; a classifier needs >= 2")
    with torch.device("meta"):
        expected = {
            name: tuple(tensor.shape) for name, tensor in build_architecture(arch, inferred).state_dict().items()
        }
    # BatchNorm fills in num_batches_tracked for checkpoints from before it existed.
    missing = sorted(key for key in expected.keys() - state_dict.keys() if not key.endswith(".num_batches_tracked"))
    unexpected = sorted(state_dict.keys() - expected.keys())
    mismatched = [
        f"{name}: expected {expected[name]}, got {tuple(state_dict[name].shape)}"
        for name in sorted(expected.keys() & state_dict.keys())
        if tuple(state_dict[name].shape) != expected[name]
    ]
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:10])}{', ...' if len(items) > 10 else ''}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if items
    ]
    if problems:
        raise StateDictMismatchError(f"state_dict does not fit {arch}: " + "; ".join(problems))
    module = build_architecture(arch, inferred)
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise StateDictMismatchError(f"state_dict does not fit {arch}: {one_line(exc)}") from exc
    return module
