"""The vocabulary of the loading modules: formats, findings, reports, scan limits, the loaded model, and
the constants and message helper that more than one of them needs.

A leaf: it imports nothing from the scanner (and torch only for type checking), so :mod:`scanner.errors`
and every loading module can name these types without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "HOW_TO_EXPORT",
    "LEGACY_MAGIC_NUMBER",
    "ZIP_MAGIC",
    "FindingKind",
    "LoadedModel",
    "ModelFileReport",
    "ModelFormat",
    "PickleFinding",
    "ScanLimits",
    "one_line",
]

#: First bytes of a zip archive (``torch.save``, ``torch.export`` ``.pt2``, TorchScript, ImageFolder sets).
ZIP_MAGIC = b"PK\x03\x04"
#: First pickle of a legacy (non-zip) ``torch.save`` file.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
#: How to save a model that the scanner loads; ends the messages that refuse a file.
HOW_TO_EXPORT = (
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


class FindingKind(StrEnum):
    """Why a member of the file was flagged."""

    unsafe_global = "unsafe_global"
    malformed_pickle = "malformed_pickle"
    unsafe_member = "unsafe_member"
    native_code = "native_code"
    unsafe_program = "unsafe_program"
    limit_exceeded = "limit_exceeded"


@dataclass(frozen=True)
class PickleFinding:
    """One flagged member of a checkpoint.

    Attributes:
        member: where in the file: the zip/tar member name (``outer!/inner`` inside nested
            zips), or the file's own name when it is not an archive.
        globals: the imports outside the allowlist, as ``module.name`` (``<...>`` when the
            target cannot be known statically); empty for findings that are not about imports.
        message: what is wrong and what to do about it.
        kind: the category, for machines.
    """

    member: str
    globals: tuple[str, ...]
    message: str
    kind: FindingKind

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"member": self.member, "kind": str(self.kind), "globals": list(self.globals), "message": self.message}


@dataclass(frozen=True)
class ModelFileReport:
    """Result of the ``model_file`` check, :func:`scanner.loading.archive_check.scan_model_file`.

    Attributes:
        format: the container format detected from the file's bytes.
        pickles_scanned: how many pickles that a loader would read were walked (the lenient
            walks of other members are not counted).
        findings: everything flagged; empty when the file passed.
    """

    format: ModelFormat
    pickles_scanned: int
    findings: tuple[PickleFinding, ...]

    @property
    def safe(self) -> bool:
        """True when nothing was flagged."""
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "format": str(self.format),
            "pickles_scanned": self.pickles_scanned,
            "findings": [finding.to_dict() for finding in self.findings],
        }


@dataclass(frozen=True)
class ScanLimits:
    """Caps on the work one scan may do, so hostile files (zip bombs, endless pickles) stay cheap.

    Sizes are uncompressed bytes as the archive declares them; members are streamed, never read
    whole except nested archives (up to ``max_nested_bytes``) and the JSON members the check parses
    (up to ``max_json_bytes``, enforced again while reading, and ``max_json_values``). Zip
    directories are read only when they hold at most ``max_members`` members.
    """

    max_members: int = 65_536
    max_member_bytes: int = 4 * 1024**3
    max_total_bytes: int = 16 * 1024**3
    max_compression_ratio: float = 200.0
    max_pickle_bytes: int = 64 * 1024**2
    max_pickle_stack: int = 1_000_000
    max_nested_bytes: int = 512 * 1024**2
    max_depth: int = 3
    # A pt2 program (models/*) and its payload configurations are parsed whole while the upload request
    # waits. torch.export.save writes 0.17 MB of program for resnet18, 1.3 MB for densenet121 and 4.6 MB
    # with 293,000 values for swin_v2_b (dynamic batch), the largest torchvision classifier: both caps
    # leave 3.4x. Parsed, a real program takes ~6x its bytes but a bomb of empty objects 27x (16 MiB:
    # 450 MB), hence the cap on values (json.loads builds at most one object per value). The worst
    # documents under both caps measured ~170 MB at peak; swin_v2_b's program 23 MB.
    max_json_bytes: int = 16 * 1024**2
    max_json_values: int = 1_000_000


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


def one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception from torch or safetensors, for an error's detail."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")
