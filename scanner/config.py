"""Frozen configuration for a scan. Built by callers (CLI, worker); the scanner never reads the environment."""

from __future__ import annotations

from dataclasses import dataclass, field

from scanner.errors import InvalidOptionError

__all__ = ["DataLimits", "ModelOptions", "ScanConfig"]

MAX_CLASSES = 100_000
MAX_SIDE = 4096
MAX_CHANNELS = 16


@dataclass(frozen=True)
class DataLimits:
    """Caps applied while reading untrusted sample archives (.npz, ImageFolder .zip)."""

    max_members: int = 100_000
    max_total_bytes: int = 2 * 1024**3
    max_member_bytes: int = 256 * 1024**2
    max_compression_ratio: float = 200.0
    max_samples: int = 200_000


@dataclass(frozen=True)
class ModelOptions:
    """How to turn a checkpoint into a classifier.

    Attributes:
        arch: allowlisted architecture name; required for state_dicts, ignored for archives.
        num_classes: class count for ``arch``; archives infer it from a forward pass.
        input_shape: ``(C, H, W)`` of one input image; archives may carry it.
        mean, std: per-channel normalisation applied inside the model wrapper, so detectors work
            in [0, 1] pixel space.
        trust_code: allow formats that execute code when loaded (TorchScript).
    """

    arch: str | None = None
    num_classes: int | None = None
    input_shape: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    trust_code: bool = False

    def __post_init__(self) -> None:
        if self.num_classes is not None and not 2 <= self.num_classes <= MAX_CLASSES:
            raise InvalidOptionError(f"num_classes must be in [2, {MAX_CLASSES}], got {self.num_classes}")
        if self.input_shape is not None:
            if len(self.input_shape) != 3:
                raise InvalidOptionError(f"input_shape must be C,H,W (3 integers), got {self.input_shape}")
            c, h, w = self.input_shape
            if not 1 <= c <= MAX_CHANNELS or not 1 <= h <= MAX_SIDE or not 1 <= w <= MAX_SIDE:
                raise InvalidOptionError(
                    f"input_shape {self.input_shape} out of range: C in [1, {MAX_CHANNELS}], H and W in [1, {MAX_SIDE}]"
                )
        if (self.mean is None) != (self.std is None):
            raise InvalidOptionError("mean and std must be given together")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != len(self.std):
                raise InvalidOptionError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
            if any(s <= 0 for s in self.std):
                raise InvalidOptionError(f"std values must be > 0, got {self.std}")
            if self.input_shape is not None and len(self.mean) not in (1, self.input_shape[0]):
                raise InvalidOptionError(
                    f"mean/std have {len(self.mean)} values but input_shape has {self.input_shape[0]} channels"
                )


@dataclass(frozen=True)
class ScanConfig:
    """Everything one scan needs besides file paths and the device."""

    model: ModelOptions = field(default_factory=ModelOptions)
    seed: int = 0
    data_limits: DataLimits = field(default_factory=DataLimits)
