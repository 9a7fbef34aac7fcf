"""The one loader of untrusted checkpoints: detect the format from the bytes, check, load.

Every file goes through :func:`scanner.model_file.scan_model_file` first; a file with any
finding is never handed to torch. What each format needs (see DESIGN.md section 2):

- ``pt2``: ``torch.export.load`` once its pickles (nested ones too) and its serialized graph
  (operators, sympy expressions, guards) passed; then ``module(check_guards=False)``.
- ``safetensors``: header validated here, then ``safetensors.torch.load_file``; needs ``arch``.
- ``torch_zip`` / ``torch_legacy``: ``torch.load(weights_only=True)`` of a state_dict; needs ``arch``.
- ``torchscript``: ``torch.jit.load``, only with ``trust_code`` (it runs the archive's code).
- ``torch_tar``: checked, never loaded (torch cannot read it weights-only).
- ``pickle``: checked, never unpickled.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import math
import pickletools
import struct
import tarfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Self, TypeVar

import torch
from torch import Tensor, nn

from scanner.architectures import ARCHITECTURES, build_architecture
from scanner.config import ModelOptions
from scanner.errors import (
    CorruptFileError,
    DataModelMismatchError,
    DeviceUnavailableError,
    EmptyFileError,
    InvalidOptionError,
    ScannerError,
    StateDictMismatchError,
    TrustRequiredError,
    UnsafeFileError,
    UnsupportedFormatError,
)
from scanner.model_file import (
    LEGACY_MAGIC_NUMBER,
    FindingKind,
    ModelFileReport,
    PickleFinding,
    ScanLimits,
    allowed_graph_callable,
    scan_model_file,
    zip_member_count,
)

__all__ = ["ExportedClassifier", "LoadedModel", "ModelFormat", "check_model_file", "detect_format", "load_model"]

logger = logging.getLogger(__name__)

_ZIP_MAGIC = b"PK\x03\x04"
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
_RANDOM_OPS = frozenset(
    {
        "bernoulli", "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "normal",
        "uniform", "multinomial", "exponential", "geometric", "cauchy", "log_normal", "random", "poisson",
        "rrelu", "rrelu_with_noise",
    }
)  # fmt: skip
_STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model")
_STATE_DICT_PREFIXES = ("module.", "_orig_mod.")
_Value = TypeVar("_Value")
_HOW_TO_EXPORT = (
    "export the model with torch.export.save(torch.export.export(model.eval(), (example_input,)), 'model.pt2'),"
    " or save model.state_dict() with safetensors.torch.save_file and pass arch"
)


class ModelFormat(StrEnum):
    """Checkpoint formats, as told by the file's bytes (never its name)."""

    pt2 = "pt2"
    safetensors = "safetensors"
    torch_zip = "torch_zip"
    torch_legacy = "torch_legacy"
    torch_tar = "torch_tar"
    torchscript = "torchscript"
    pickle = "pickle"
    unknown = "unknown"


_STATE_DICT_FORMATS = frozenset({ModelFormat.safetensors, ModelFormat.torch_zip, ModelFormat.torch_legacy})


@dataclass
class LoadedModel:
    """A checked, loaded classifier ready for the detectors.

    Attributes:
        module: maps images ``(N, C, H, W)`` on ``device`` to logits ``(N, num_classes)``; in
            inference mode, parameters frozen.
        format: the detected file format.
        input_shape: ``(C, H, W)`` one image; ``None`` when neither the file nor the options say.
        num_classes: logits per image, measured by a forward pass when ``input_shape`` is known.
        report: the ``model_file`` check of the file (no findings, or it would not be loaded).
    """

    module: nn.Module
    format: ModelFormat
    input_shape: tuple[int, int, int] | None
    num_classes: int | None
    report: ModelFileReport


class ExportedClassifier(nn.Module):
    """An ``nn.Module`` around the graph module of a ``torch.export`` program.

    Exported graphs bake in the batch sizes they were exported for; this wrapper splits larger
    batches and zero-pads smaller ones so callers can use any batch size. The graph is always
    in inference mode (:func:`load_model` rewrites it), so ``train()``/``eval()`` only set the
    flag; torch 2.14.1's exported modules raise on ``eval()``.

    Attributes:
        graph_module: the ``torch.fx.GraphModule`` of the program (for graph surgery, e.g.
            penultimate features).
        min_batch, max_batch: batch sizes the graph accepts (``max_batch`` None: unbounded).
    """

    def __init__(self, graph_module: torch.fx.GraphModule, min_batch: int, max_batch: int | None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.min_batch = min_batch
        self.max_batch = max_batch

    def train(self, mode: bool = True) -> Self:
        """Set the flag only: the exported graph's mode is fixed (inference)."""
        self.training = mode
        return self

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(N, K)`` for images ``(N, C, H, W)``, any ``N``."""
        count = images.shape[0]
        if count == 0 or (self.min_batch <= count and (self.max_batch is None or count <= self.max_batch)):
            result: Tensor = self.graph_module(images)
            return result
        step = self.max_batch if self.max_batch is not None else count
        outputs = []
        for start in range(0, count, step):
            chunk = images[start : start + step]
            real = chunk.shape[0]
            if real < self.min_batch:
                chunk = torch.cat([chunk, chunk.new_zeros((self.min_batch - real, *chunk.shape[1:]))])
            outputs.append(self.graph_module(chunk)[:real])
        return torch.cat(outputs)


def detect_format(path: Path) -> ModelFormat:
    """Tell the checkpoint format from the file's bytes, in the order ``torch.load`` decides.

    zip (``PK\\x03\\x04`` at offset 0; then members: ``archive_format``/``models/*.json`` for
    pt2, ``constants.pkl`` for TorchScript, ``data.pkl`` for ``torch.save``; a zip with more members
    than the scan accepts is ``unknown``, its directory unread), tar (a first member that Python's
    tarfile reads, as ``torch.load`` tries; blocks of zeros are not one), safetensors (8-byte length,
    then ``{``), legacy ``torch.save`` (a pickle of the magic number), bare pickle (``\\x80`` +
    protocol 2-5).

    Raises:
        EmptyFileError: the file has no bytes.
        CorruptFileError: it starts like a zip archive that cannot be read.
    """
    if path.stat().st_size == 0:
        raise EmptyFileError(f"{path.name} is empty (0 bytes)")
    with path.open("rb") as stream:
        head = stream.read(64)
    if head.startswith(_ZIP_MAGIC):
        return _zip_format(path)
    if _is_tar(path):
        return ModelFormat.torch_tar
    if head[8:9] == b"{":
        return ModelFormat.safetensors
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return ModelFormat.torch_legacy if _is_legacy_magic(head) else ModelFormat.pickle
    return ModelFormat.unknown


def _zip_format(path: Path) -> ModelFormat:
    limit = ScanLimits().max_members
    try:
        with path.open("rb") as stream:
            if zip_member_count(stream, limit) > limit:
                return ModelFormat.unknown  # the model_file check refuses it
            with zipfile.ZipFile(stream) as archive:
                members = {name.split("/", 1)[-1]: name for name in archive.namelist()}
                format_member = members.get("archive_format")
                if format_member is not None and archive.getinfo(format_member).file_size <= 16:
                    with archive.open(format_member) as content:
                        if content.read(17).strip() == b"pt2":
                            return ModelFormat.pt2
    except Exception as exc:  # BadZipFile, zlib.error, NotImplementedError (compression method), ...
        raise CorruptFileError(f"zip archive is truncated or corrupt: {exc}") from exc
    if any(name.startswith("models/") and name.endswith(".json") for name in members):
        return ModelFormat.pt2
    if "constants.pkl" in members:
        return ModelFormat.torchscript
    if "data.pkl" in members:
        return ModelFormat.torch_zip
    return ModelFormat.unknown


def _is_tar(path: Path) -> bool:
    """Does Python's tarfile read a first member? (It opens blocks of zeros as an empty archive.)"""
    try:
        with tarfile.open(path, mode="r:") as archive:
            return archive.next() is not None
    except (tarfile.TarError, OSError, ValueError, EOFError):
        return False


def _is_legacy_magic(head: bytes) -> bool:
    """Is the first pickle exactly the legacy ``torch.save`` magic number?"""
    try:
        values = [
            arg
            for opcode, arg, _ in pickletools.genops(io.BytesIO(head))
            if opcode.name not in ("PROTO", "FRAME", "STOP", "MEMOIZE", "BINPUT")
        ]
    except (ValueError, EOFError):
        return False
    return values == [LEGACY_MAGIC_NUMBER]


def check_model_file(path: Path, options: ModelOptions) -> ModelFileReport:
    """Everything about an untrusted checkpoint that can be decided without loading it.

    Runs the ``model_file`` check and refuses what :func:`load_model` would refuse before loading: cheap
    enough to run while an upload request waits, so an unsafe file is reported at once.

    Returns:
        The ``model_file`` report of a file that :func:`load_model` may go on to load.

    Raises:
        EmptyFileError, CorruptFileError: the file is empty or its container is broken.
        UnsafeFileError: the ``model_file`` check flagged something (``exc.report``).
        UnsupportedFormatError: bare pickles, legacy tar files, unknown formats.
        TrustRequiredError: TorchScript without ``options.trust_code``.
    """
    report = scan_model_file(path)
    if report.findings:
        shown = "; ".join(f"{finding.member}: {finding.message}" for finding in report.findings[:3])
        more = f" (+{len(report.findings) - 3} more)" if len(report.findings) > 3 else ""
        raise UnsafeFileError(f"{path.name} failed the model_file check: {shown}{more}", report=report)

    file_format = report.format
    if file_format is ModelFormat.torchscript and not options.trust_code:
        raise TrustRequiredError(
            "TorchScript archives run their own code when loaded; set trust_code to load this file, or "
            + _HOW_TO_EXPORT
        )
    if file_format is ModelFormat.pickle:
        raise UnsupportedFormatError(f"bare pickles are never unpickled: {_HOW_TO_EXPORT}")
    if file_format is ModelFormat.torch_tar:
        raise UnsupportedFormatError(
            "the legacy tar checkpoint format (PyTorch 0.1.x) cannot be loaded weights-only: load it somewhere"
            " trusted and save model.state_dict() with safetensors.torch.save_file"
        )
    if file_format is ModelFormat.unknown:
        raise UnsupportedFormatError(
            "not a supported model format; accepted: torch.export archive (.pt2), safetensors state_dict,"
            " torch.save state_dict (.pt/.pth), TorchScript (with trust_code)"
        )
    if file_format in _STATE_DICT_FORMATS:
        _arch_name(options)
    if file_format is ModelFormat.safetensors:
        shapes = _without_prefixes(_check_safetensors_header(path))
        head = _head_name(str(options.arch))
        head_shape = shapes.get(f"{head}.weight")
        if head_shape is not None and len(head_shape) == 2:  # any other problem is the loader's to name
            _check_num_classes(options.num_classes, head, head_shape[0])
    return report


def load_model(path: Path, options: ModelOptions, device: torch.device) -> LoadedModel:
    """Check and load an untrusted checkpoint as a classifier on ``device``.

    Args:
        path: the checkpoint.
        options: ``arch``/``num_classes`` for state_dicts, ``input_shape``, ``trust_code``.
        device: where the module should live.

    Returns:
        The module in inference mode with frozen parameters, its input shape and class count
        (checked with one forward pass on zeros ``(1, C, H, W)`` when the input shape is known).

    Raises:
        EmptyFileError, CorruptFileError: the file is empty, truncated or inconsistent.
        UnsafeFileError: the ``model_file`` check flagged something (``exc.report``).
        UnsupportedFormatError: bare pickles, legacy tar files, unknown formats, non-tensor data.
        TrustRequiredError: TorchScript without ``options.trust_code``.
        UnknownArchitectureError: a state_dict without an allowlisted ``arch``.
        StateDictMismatchError: the state_dict does not fit ``arch``.
        DataModelMismatchError: the model rejects ``input_shape`` or does not output ``(1, K)``.
        InvalidOptionError: ``num_classes`` disagrees with the model's output.
        DeviceUnavailableError: the model cannot be moved to ``device``.
    """
    report = check_model_file(path, options)
    file_format = report.format
    try:
        if file_format is ModelFormat.pt2:
            module, input_shape = _load_exported(path, options, device, report)
        elif file_format is ModelFormat.torchscript:
            module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
            input_shape = options.input_shape
        else:
            module, input_shape = _load_state_dict_model(path, file_format, options)
    except ScannerError:
        raise
    except Exception as exc:  # torch and safetensors raise anything from RuntimeError to KeyError
        raise CorruptFileError(f"{file_format} file cannot be loaded: {_one_line(exc)}") from exc
    return _finish(module, file_format, input_shape, options, device, report)


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


# ------------------------------------------------------------------------------------------
# torch.export archives


def _load_exported(
    path: Path, options: ModelOptions, device: torch.device, report: ModelFileReport
) -> tuple[nn.Module, tuple[int, int, int] | None]:
    from torch.export.passes import move_to_device_pass

    with path.open("rb") as stream:  # a stream: torch warns about paths whose name does not end in .pt2
        program = torch.export.load(stream)
    _check_graph_targets(program, report)
    program = move_to_device_pass(program, device)
    exported_shape, min_batch, max_batch = _exported_input(program)
    if options.input_shape is not None and exported_shape is not None and options.input_shape != exported_shape:
        raise DataModelMismatchError(
            f"the archive was exported for images of shape {exported_shape} but input_shape is {options.input_shape}"
        )
    graph_module = program.module(check_guards=False)  # True would exec() the archive's guard code
    _switch_to_inference(graph_module)
    _refuse_random_ops(graph_module)
    return ExportedClassifier(graph_module, min_batch, max_batch), options.input_shape or exported_shape


def _check_graph_targets(program: torch.export.ExportedProgram, report: ModelFileReport) -> None:
    """Defence in depth after the static check: every node calls an allowed operator.

    Raises:
        UnsafeFileError: a node calls anything else (its report names the target).
    """
    for graph_module in program.graph_module.modules():
        if not isinstance(graph_module, torch.fx.GraphModule):
            continue
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and not allowed_graph_callable(node.target):
                name = getattr(node.target, "__qualname__", repr(node.target))
                finding = PickleFinding(
                    member="models/model.json",
                    globals=(f"{getattr(node.target, '__module__', '?')}.{name}",),
                    message=f"the exported program calls {name}, which is not an ATen operator",
                    kind=FindingKind.unsafe_program,
                )
                raise UnsafeFileError(
                    f"{finding.message}; the model was not run", report=dataclasses.replace(report, findings=(finding,))
                )


def _exported_input(program: torch.export.ExportedProgram) -> tuple[tuple[int, int, int] | None, int, int | None]:
    """``(C, H, W)`` (None when dynamic) and the batch range of the program's single image input."""
    from torch.export.graph_signature import InputKind

    user_inputs = [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT]
    if len(user_inputs) != 1:
        raise UnsupportedFormatError(f"the exported program takes {len(user_inputs)} inputs; a classifier takes one")
    placeholder = next(node for node in program.graph.nodes if node.op == "placeholder" and node.name == user_inputs[0])
    example = placeholder.meta.get("val")
    if not isinstance(example, Tensor) or example.dim() != 4:
        shape = tuple(example.shape) if isinstance(example, Tensor) else type(example).__name__
        raise UnsupportedFormatError(f"the exported program's input is {shape}, not an image batch (N, C, H, W)")
    batch, *image = example.shape
    image_shape = (image[0], image[1], image[2]) if all(type(size) is int for size in image) else None
    if not isinstance(batch, torch.SymInt):
        return image_shape, int(batch), int(batch)
    bounds = program.range_constraints.get(batch.node.expr)
    if bounds is None:
        return image_shape, 1, None
    lower = max(1, int(bounds.lower)) if bounds.lower.is_Integer else 1
    upper = int(bounds.upper) if bounds.upper.is_Integer else None
    return image_shape, lower, upper


def _switch_to_inference(graph_module: torch.fx.GraphModule) -> None:
    """Put an exported graph in inference mode by rewriting its ops' ``training``/``train`` flags.

    Exported graphs record the mode the model was exported in (``aten.batch_norm(...,
    training=True)``, ``aten.dropout(..., train=True)``) and torch 2.14.1 has no public way to
    switch it (``eval()`` raises ``NotImplementedError``). Dropout decomposed into random ops
    by ``run_decompositions`` cannot be recognised this way.
    """
    for module in graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        changed = False
        for node in module.graph.nodes:
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            for index, argument in enumerate(node.target._schema.arguments):
                if argument.name not in ("training", "train"):
                    continue
                if index < len(node.args) and node.args[index] is True:
                    node.update_arg(index, False)
                    changed = True
                elif node.kwargs.get(argument.name) is True:
                    node.update_kwarg(argument.name, False)
                    changed = True
        if changed:
            module.recompile()


def _refuse_random_ops(graph_module: torch.fx.GraphModule) -> None:
    """Refuse graphs that still draw random numbers after :func:`_switch_to_inference`.

    Training-only randomness behind a Python ``if self.training`` (stochastic depth, noise
    layers) is traced into plain random ops that no flag switches off.

    Raises:
        UnsupportedFormatError: naming the random operators.
    """
    random_ops = sorted(
        {
            str(node.target)
            for module in graph_module.modules()
            if isinstance(module, torch.fx.GraphModule)
            for node in module.graph.nodes
            if isinstance(node.target, torch._ops.OpOverload)
            and node.target.overloadpacket.__name__.rstrip("_") in _RANDOM_OPS
        }
    )
    if random_ops:
        raise UnsupportedFormatError(
            f"the exported program draws random numbers ({', '.join(random_ops)}), so its outputs are not"
            " reproducible; it was probably exported in training mode: call model.eval() before torch.export.export"
        )


# ------------------------------------------------------------------------------------------
# state_dicts


def _load_state_dict_model(
    path: Path, file_format: ModelFormat, options: ModelOptions
) -> tuple[nn.Module, tuple[int, int, int]]:
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
            f"{' (empty)' if isinstance(loaded, Mapping) else ''}; {_HOW_TO_EXPORT}"
        )
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise UnsupportedFormatError(
                f"expected a state_dict of tensors, but entry {key!r} is a {type(value).__name__}; {_HOW_TO_EXPORT}"
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
        raise StateDictMismatchError(f"state_dict does not fit {arch}: {_one_line(exc)}") from exc
    return module


# ------------------------------------------------------------------------------------------
# every format


def _finish(
    module: nn.Module,
    file_format: ModelFormat,
    input_shape: tuple[int, int, int] | None,
    options: ModelOptions,
    device: torch.device,
    report: ModelFileReport,
) -> LoadedModel:
    """Move to ``device``, freeze, switch to inference, and measure the class count."""
    try:
        module = module.to(device)
    except Exception as exc:
        raise DeviceUnavailableError(f"cannot move the model to {device}: {_one_line(exc)}") from exc
    module.eval()
    for parameter in module.parameters():  # ScriptModules do not support requires_grad_()
        parameter.requires_grad_(False)
    num_classes = options.num_classes
    if input_shape is not None:
        try:
            with torch.no_grad():
                logits: Any = module(torch.zeros((1, *input_shape), device=device))
        except Exception as exc:
            raise DataModelMismatchError(f"model does not accept input_shape {input_shape}: {_one_line(exc)}") from exc
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != 1 or logits.shape[1] < 2:
            raise DataModelMismatchError(
                f"for one image of shape {input_shape} the model returned {shape};"
                " a classifier returns (1, num_classes)"
            )
        if num_classes is not None and logits.shape[1] != num_classes:
            raise InvalidOptionError(f"num_classes is {num_classes} but the model outputs {logits.shape[1]} logits")
        num_classes = int(logits.shape[1])
    logger.debug("loaded %s model: input_shape=%s num_classes=%s", file_format, input_shape, num_classes)
    return LoadedModel(
        module=module, format=file_format, input_shape=input_shape, num_classes=num_classes, report=report
    )
