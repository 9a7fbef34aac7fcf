"""The one loader of untrusted checkpoints: detect the format from the bytes, check, load.

Every file goes through :func:`~scanner.loading.archive_check.scan_model_file` first; a file with any
finding is never handed to torch. What each format needs (see DESIGN.md section 2):

- ``pt2``: ``torch.export.load`` once its pickles (nested ones too) and its serialized graph
  (operators, sympy expressions, guards) passed; then ``module(check_guards=False)``
  (:mod:`scanner.loading.exported`).
- ``safetensors``: header validated, then ``safetensors.torch.load_file``; needs ``arch``
  (:mod:`scanner.loading.state_dict`).
- ``torch_zip`` / ``torch_legacy``: ``torch.load(weights_only=True)`` of a state_dict; needs ``arch``.
- ``torchscript``: ``torch.jit.load``, only with ``trust_code`` (it runs the archive's code).
- ``torch_tar``: checked, never loaded (torch cannot read it weights-only).
- ``pickle``: checked, never unpickled.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from scanner.classifier import class_count
from scanner.config import ModelOptions
from scanner.errors import (
    CorruptFileError,
    DeviceUnavailableError,
    ScannerError,
    TrustRequiredError,
    UnsafeFileError,
    UnsupportedFormatError,
)
from scanner.loading.archive_check import scan_model_file
from scanner.loading.exported import load_exported
from scanner.loading.state_dict import STATE_DICT_FORMATS, check_state_dict_file, load_state_dict_model
from scanner.loading.types import HOW_TO_EXPORT, LoadedModel, ModelFileReport, ModelFormat, one_line

__all__ = ["check_model_file", "load_model"]

logger = logging.getLogger(__name__)


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
            "TorchScript archives run their own code when loaded; set trust_code to load this file, or " + HOW_TO_EXPORT
        )
    if file_format is ModelFormat.pickle:
        raise UnsupportedFormatError(f"bare pickles are never unpickled: {HOW_TO_EXPORT}")
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
    if file_format in STATE_DICT_FORMATS:
        check_state_dict_file(path, file_format, options)
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
            module, input_shape = load_exported(path, options, device, report)
        elif file_format is ModelFormat.torchscript:
            module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
            input_shape = options.input_shape
        else:
            module, input_shape = load_state_dict_model(path, file_format, options)
    except ScannerError:
        raise
    except Exception as exc:  # torch and safetensors raise anything from RuntimeError to KeyError
        raise CorruptFileError(f"{file_format} file cannot be loaded: {one_line(exc)}") from exc
    return _finish(module, file_format, input_shape, options, device, report)


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
        raise DeviceUnavailableError(f"cannot move the model to {device}: {one_line(exc)}") from exc
    module.eval()
    for parameter in module.parameters():  # ScriptModules do not support requires_grad_()
        parameter.requires_grad_(False)
    num_classes = options.num_classes
    if input_shape is not None:
        num_classes = class_count(module, torch.zeros((1, *input_shape)), num_classes=num_classes, device=device)
    logger.debug("loaded %s model: input_shape=%s num_classes=%s", file_format, input_shape, num_classes)
    return LoadedModel(
        module=module, format=file_format, input_shape=input_shape, num_classes=num_classes, report=report
    )
