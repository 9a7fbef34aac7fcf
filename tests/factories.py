"""Builders of sample files and trained models, made at test time (nothing is stored in the repository).

Sample files: :func:`write_npz` and :func:`write_imagefolder_zip` write the two accepted upload
formats; :func:`write_zip` and :func:`write_zip_claiming_size` write hostile archives (symlinks,
odd names, lying size fields) for the security tests.

Models: :func:`trained_mnist_cnn` trains (or reloads from a cache directory) an ``mnist_cnn`` with
the shared recipe in :func:`scanner.testing.training.train_mnist_cnn`; benchmarks call that recipe and
:class:`scanner.testing.attacks.BadNetsRecipe` directly, without importing the tests.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import scanner
from scanner.loading.architectures import build_architecture
from scanner.testing.attacks import PoisonedDataset
from scanner.trigger import Trigger

__all__ = [
    "BadNetsModel",
    "encode_image",
    "one_intraop_thread",
    "to_uint8",
    "trained_mnist_cnn",
    "write_imagefolder_zip",
    "write_npz",
    "write_zip",
    "write_zip_claiming_size",
]

ArrayLike = np.ndarray | torch.Tensor | Sequence[int]

# The files whose code decides what a cached model is; editing any of them retrains.
_RECIPE_SOURCES = (
    *(
        Path(scanner.__file__).parent / name
        for name in (
            "loading/architectures.py",
            "testing/attacks.py",
            "testing/mnist.py",
            "testing/training.py",
            "trigger.py",
            "classifier.py",
        )
    ),
    Path(__file__),
    Path(__file__).with_name("conftest.py"),
)


#: The source-specific backdoor of the ``source_specific`` fixture flips only this class (to 7).
SOURCE_CLASS = 3


@dataclass(frozen=True, eq=False)  # holds tensors: compare by identity
class BadNetsModel:
    """A model trained on a BadNets-poisoned set, with everything needed to check the backdoor.

    Attributes:
        model: the backdoored ``mnist_cnn``, in eval mode on the CPU.
        trigger: the patch trigger used for poisoning.
        target: the class the backdoor maps to.
        poisoned: the poisoned training set and its poisoned row indices.
    """

    model: nn.Module
    trigger: Trigger
    target: int
    poisoned: PoisonedDataset


def _numpy(values: ArrayLike) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def to_uint8(images: ArrayLike) -> np.ndarray:
    """Images as uint8: uint8 input is returned as is, floats in [0, 1] are scaled by 255 and rounded."""
    array = _numpy(images)
    if array.dtype == np.uint8:
        return array
    return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)


def write_npz(path: Path, images: ArrayLike, labels: ArrayLike, *, compressed: bool = False) -> Path:
    """Write ``x`` and ``y`` as an ``.npz`` at exactly ``path`` (numpy would otherwise append ``.npz``).

    Args:
        path: target file.
        images: ``(N, H, W)`` or ``(N, C, H, W)``, any dtype (written unchanged).
        labels: ``(N,)``.
        compressed: deflate the members.
    """
    x, y = _numpy(images), _numpy(labels)
    save = np.savez_compressed if compressed else np.savez
    with path.open("wb") as handle:
        save(handle, x=x, y=y)
    return path


def encode_image(image: np.ndarray, image_format: str = "PNG") -> bytes:
    """Encode one uint8 image, ``(H, W)``, ``(1, H, W)`` or ``(3, H, W)``, to file bytes."""
    if image.ndim == 3:
        image = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format=image_format)
    return buffer.getvalue()


def write_imagefolder_zip(
    path: Path,
    images: ArrayLike,
    labels: ArrayLike,
    class_names: Sequence[str] | None = None,
    *,
    top_level: str | None = None,
    image_format: str = "PNG",
) -> Path:
    """Write an ImageFolder ``.zip``: ``[top_level/]<class>/<index>.png``.

    Args:
        path: target file.
        images: ``(N, H, W)`` or ``(N, C, H, W)`` with C in (1, 3); uint8, or floats in [0, 1].
        labels: ``(N,)`` class indices.
        class_names: folder name of each class index; without it the folder is the index itself.
        top_level: optional folder that holds all class folders.
        image_format: Pillow format name of the members.
    """
    pixels = to_uint8(images)
    targets = _numpy(labels).tolist()
    prefix = f"{top_level}/" if top_level else ""
    extension = image_format.lower()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for index, (image, label) in enumerate(zip(pixels, targets, strict=True)):
            folder = class_names[label] if class_names is not None else str(label)
            archive.writestr(f"{prefix}{folder}/{index:05d}.{extension}", encode_image(image, image_format))
    return path


def write_zip(path: Path, members: Mapping[str, bytes], *, symlinks: Mapping[str, str] | None = None) -> Path:
    """Write a zip with the given members (name -> bytes) and symbolic-link members (name -> target)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # Unix, so that the mode bits in external_attr are meaningful
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return path


def write_zip_claiming_size(path: Path, name: str, payload: bytes, claimed_size: int) -> Path:
    """Write a one-member deflated zip whose headers claim ``claimed_size`` uncompressed bytes.

    The stored CRC and compressed data are those of ``payload``; only the two uncompressed-size
    fields (local header and central directory) are rewritten, as a zip bomb or a lying archive would.
    """
    if not 0 <= claimed_size < 0xFFFFFFFF:
        raise ValueError("claimed_size must fit a 32-bit size field (no zip64)")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, payload)
    data = bytearray(buffer.getvalue())
    central = data.rfind(b"PK\x01\x02")
    if not data.startswith(b"PK\x03\x04") or central < 0:
        raise AssertionError("unexpected zip layout")
    struct.pack_into("<I", data, 22, claimed_size)  # local file header: uncompressed size
    struct.pack_into("<I", data, central + 24, claimed_size)  # central directory: uncompressed size
    path.write_bytes(bytes(data))
    return path


@contextmanager
def one_intraop_thread() -> Iterator[None]:
    """Run the block with one torch intra-op thread, then restore the previous count.

    For training these small models: on a busy two-core machine, two OpenMP threads measured
    up to 25x slower per step than one (1.2 s vs 0.05 s for two 64-image steps; 3.7-5.3 s vs
    0.95 s per 4,000-image epoch), and one thread is never much slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _recipe_digest(name: str, settings: str) -> str:
    digest = hashlib.sha256(f"{name}\0{settings}\0{torch.__version__}".encode())
    for source in _RECIPE_SOURCES:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def trained_mnist_cnn(cache_dir: Path, name: str, settings: str, train: Callable[[], nn.Module]) -> nn.Module:
    """An ``mnist_cnn`` from ``train()``, or its weights from ``cache_dir`` when an identical one was trained before.

    ``train`` runs under :func:`one_intraop_thread`.

    The cache key covers ``name``, ``settings`` (describe every argument of ``train`` here), the
    torch version and the source of the scanner modules that define the recipe, of this file and
    of ``tests/conftest.py``, so a change to any of them retrains. Writes are atomic, so
    concurrent test sessions are safe.

    Returns:
        The model in eval mode on the CPU.
    """
    path = cache_dir / f"{name}-{_recipe_digest(name, settings)}.pt"
    if path.is_file():
        model = build_architecture("mnist_cnn", 10)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    with one_intraop_thread():
        model = train().cpu().eval()
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save(model.state_dict(), partial)
    os.replace(partial, path)
    for stale in cache_dir.glob(f"{name}-*.pt"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return model
