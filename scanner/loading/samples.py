"""Sample sets for the detectors: ``.npz`` or ImageFolder ``.zip`` -> tensors, under caps, without extracting.

Both accepted formats are zip archives and both are untrusted, so they are read the same careful
way: the central directory is checked against :class:`~scanner.config.DataLimits` (member count,
declared sizes, compression ratio, names, symlinks) before a single member is decompressed;
members are read into memory one at a time (never extracted to disk); Python's ``zipfile``
never returns more bytes than a member declares, so the declared sizes that were checked are
the sizes that get read.

- ``.npz`` (a zip of ``x.npy`` and ``y.npy``): each ``.npy`` header is parsed and checked
  (dtype, shape, byte count) before the array is built; object arrays are refused, never
  unpickled.
- ImageFolder ``.zip``: ``<class>/<image>``, optionally under one top-level folder. Images are
  decoded from memory by Pillow, restricted to common raster formats, after their header size
  has been checked.

Whether the samples fit the model is checked by :func:`scanner.classifier.check_samples`.
"""

from __future__ import annotations

import functools
import io
import lzma
import math
import re
import stat
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scanner.config import MAX_SIDE, DataLimits
from scanner.errors import DataModelMismatchError, InvalidDataError, InvalidOptionError
from scanner.loading.sniff import zip_member_count
from scanner.stats import seeded_subset

__all__ = [
    "Samples",
    "load_samples",
]

# Members smaller than this are exempt from the compression-ratio check: a tiny file that
# compresses well (a blank PNG, a small label array) is no bomb, and its bytes are capped anyway.
_RATIO_CHECK_MIN_BYTES = 1024**2
# Pillow plugins that may decode uploaded images; the others (EPS runs Ghostscript, and many
# rarely used parsers) are never reached.
_IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
_GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La"})
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_CHANNEL_MODES = {1: "L", 3: "RGB"}
_NUMERIC_FOLDER = re.compile(r"[0-9]{1,9}")
_DRIVE_PREFIX = re.compile(r"[A-Za-z]:")
_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
_READ_CHUNK = 1 << 20
_NPY_HEADER_MAX = 1 << 20  # numeric arrays need a few hundred bytes of header; a longer one does not parse
_PROGRESS_EVERY = 256  # images decoded between progress calls (a cancel is honoured between them)
_FLOAT32_BYTES = 4


@dataclass(frozen=True, eq=False)  # holds tensors: compare by identity
class Samples:
    """A labelled sample set in model-ready form.

    Attributes:
        images: float32 ``(N, C, H, W)`` in [0, 1], on the CPU.
        labels: int64 ``(N,)``, non-negative class indices.
        class_names: for an ImageFolder zip with named folders, the folder name of each class
            index (sorted names -> 0..K-1); ``None`` when the folders are class indices or the
            samples came from an ``.npz``.
        paths: for an ImageFolder zip, the archive member of each sample, so that an index
            reported by a detector can be traced back to a file; ``None`` for an ``.npz``
            (indices refer to rows of ``x``).
        rows: when only a subset of the upload was kept (``load_samples(max_samples=...)``), the
            position of each kept sample in the upload (rows of ``x``, or the class-then-path
            order of an ImageFolder zip), int64 ``(N,)``; ``None`` when every sample was kept.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...] | None = None
    paths: tuple[str, ...] | None = None
    rows: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.float32:
            raise ValueError(f"images must be float32 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be int64 ({self.images.shape[0]},), got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if self.paths is not None and len(self.paths) != self.images.shape[0]:
            raise ValueError(f"paths must name {self.images.shape[0]} samples, got {len(self.paths)}")
        if self.rows is not None and self.rows.shape != (self.images.shape[0],):
            raise ValueError(f"rows must number {self.images.shape[0]} samples, got {tuple(self.rows.shape)}")

    def upload_row(self, index: int) -> int:
        """The position in the uploaded file of sample ``index`` (they differ when a subset was kept)."""
        return index if self.rows is None else int(self.rows[index])

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        channels, height, width = self.images.shape[1:]
        return channels, height, width


#: ``progress(fraction)`` of a sample file's decoding, in [0, 1]; may raise to stop it.
LoadProgress = Callable[[float], None]


def load_samples(
    path: Path,
    *,
    input_shape: tuple[int, int, int] | None = None,
    limits: DataLimits = DataLimits(),
    max_samples: int | None = None,
    seed: int = 0,
    progress: LoadProgress | None = None,
) -> Samples:
    """Read a sample set from an ``.npz`` or an ImageFolder ``.zip``; the format is detected from the bytes.

    A zip whose members are all top-level ``*.npy`` files is an ``.npz``; any other zip is an
    ImageFolder archive.

    ``.npz``: ``x`` is uint8 ``(N, H, W)`` or ``(N, C, H, W)`` (divided by 255), or float32 /
    float64 already in [0, 1]; ``y`` is a 1-D array of N non-negative integers. Other members
    are ignored.

    ImageFolder ``.zip``: one folder per class, optionally all under one top-level folder. When
    every class folder name is a non-negative integer it is the class index; otherwise the sorted
    folder names become classes 0..K-1 (recorded in ``class_names``). Images are converted to
    grayscale or RGB according to ``input_shape`` (or, without it, the first image), must all
    have the same size, and come back ordered by class index then member path. ``__MACOSX/``
    and dot-files are skipped.

    The decoded float32 tensor may not exceed ``limits.max_total_bytes`` either. With
    ``max_samples``, a larger set is cut to a seeded random subset of that many samples before
    any pixel is converted (an ImageFolder's other images are never decoded), so memory and time
    follow ``max_samples``, not the upload; ``rows`` then says where each kept sample was.

    Args:
        path: the uploaded file.
        input_shape: ``(C, H, W)`` the model expects; when given, every sample must have it.
        limits: caps for untrusted archives.
        max_samples: keep at most this many samples (``None``: all).
        seed: picks the subset.
        progress: called while images are decoded (at least every 256 images).

    Returns:
        The samples, float32 ``(N, C, H, W)`` in [0, 1] and int64 labels ``(N,)``, on the CPU.

    Raises:
        InvalidDataError: the file is not a zip, breaks a limit, or holds malformed or unsafe
            content; the message says what was expected and what was found.
        DataModelMismatchError: the samples do not have the shape ``input_shape`` asks for.
        InvalidOptionError: ``input_shape`` asks an ImageFolder for a channel count other than 1 or 3.
    """
    try:
        with path.open("rb") as stream:  # zipfile reads the whole directory: count its members first
            count = zip_member_count(stream, limits.max_members)
        if count > limits.max_members:
            raise InvalidDataError(
                f"the archive has more than {limits.max_members} members; at most {limits.max_members} are allowed"
            )
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, NotImplementedError, EOFError, ValueError, OSError) as error:
        raise InvalidDataError(
            f"{path.name}: expected an .npz or an ImageFolder .zip, but the file is not a zip archive ({error})"
        ) from error
    with archive:
        members = _checked_members(archive, limits)
        keep = functools.partial(_kept_rows, max_samples=max_samples, seed=seed)
        if members and all(_is_npy_member(info) for info in members):
            return _load_npz(archive, members, input_shape=input_shape, limits=limits, keep=keep)
        return _load_image_folder(
            archive, members, input_shape=input_shape, limits=limits, keep=keep, progress=progress
        )


def _kept_rows(count: int, max_samples: int | None, seed: int) -> torch.Tensor | None:
    """The rows of an upload to keep, in upload order: a seeded random subset of ``max_samples`` (``None``: all)."""
    rows = None if max_samples is None else seeded_subset(count, max_samples, seed)
    return None if rows is None else rows.sort().values


# --- archive checks ---------------------------------------------------------------------------


def _checked_members(archive: zipfile.ZipFile, limits: DataLimits) -> list[zipfile.ZipInfo]:
    """Check the central directory against the limits, before anything is decompressed."""
    members = archive.infolist()
    if len(members) > limits.max_members:
        raise InvalidDataError(f"the archive has {len(members)} members; at most {limits.max_members} are allowed")
    names: set[str] = set()
    total = 0
    for info in members:
        name = info.filename
        _member_parts(name)
        if name in names:
            raise InvalidDataError(f"{name!r}: the archive holds this member name twice")
        names.add(name)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InvalidDataError(f"{name!r}: symbolic links are not allowed in sample archives")
        if info.flag_bits & 0x1:
            raise InvalidDataError(f"{name!r}: encrypted members are not supported")
        if info.file_size > limits.max_member_bytes:
            raise InvalidDataError(
                f"{name!r}: declares {info.file_size} bytes uncompressed; at most {limits.max_member_bytes} per member"
            )
        total += info.file_size
        if total > limits.max_total_bytes:
            raise InvalidDataError(
                f"the archive declares more than {limits.max_total_bytes} bytes uncompressed (at {name!r})"
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > _RATIO_CHECK_MIN_BYTES and ratio > limits.max_compression_ratio:
            raise InvalidDataError(
                f"{name!r}: compression ratio {ratio:.0f} exceeds {limits.max_compression_ratio:g} (possible zip bomb)"
            )
    return members


def _member_parts(name: str) -> tuple[str, ...]:
    """Path components of a member name; refuses names that could escape a directory."""
    if "\\" in name:
        raise InvalidDataError(f"{name!r}: backslashes are not allowed in member names")
    if name.startswith("/") or _DRIVE_PREFIX.match(name):
        raise InvalidDataError(f"{name!r}: absolute paths are not allowed in member names")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise InvalidDataError(f"{name!r}: '..' is not allowed in member names")
    return parts


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytearray:
    """The member's bytes, read in chunks into one buffer of its declared size (``ZipFile.read`` joins the chunks
    of a deflated member at the end, which holds the member twice)."""
    buffer = bytearray(info.file_size)
    view = memoryview(buffer)
    try:
        with archive.open(info) as member:
            filled = 0
            while filled < info.file_size:
                chunk = member.read(min(_READ_CHUNK, info.file_size - filled))
                if not chunk:
                    raise EOFError(f"the member ends after {filled} of its {info.file_size} bytes")
                view[filled : filled + len(chunk)] = chunk
                filled += len(chunk)
            if member.read(1):
                raise zipfile.BadZipFile("the member holds more bytes than it declares")
        return buffer
    except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, NotImplementedError, EOFError, OSError) as error:
        raise InvalidDataError(f"{info.filename!r}: cannot be decompressed ({error})") from error


# --- .npz -------------------------------------------------------------------------------------


def _is_npy_member(info: zipfile.ZipInfo) -> bool:
    return info.filename.endswith(".npy") and "/" not in info.filename


def _read_npy(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """Parse one ``.npy`` member; the header is validated before any array is built."""
    key = info.filename.removesuffix(".npy")
    data = _read_member(archive, info)
    stream = io.BytesIO(bytes(memoryview(data)[:_NPY_HEADER_MAX]))  # the header only: the array is not copied
    try:
        version = np.lib.format.read_magic(stream)
        if version not in _NPY_HEADER_READERS:
            raise ValueError(f"format version {version} is not supported (use numpy.savez)")
        shape, fortran_order, dtype = _NPY_HEADER_READERS[version](stream)
    except Exception as error:  # numpy's header parser raises many exception types on malformed input.
        raise InvalidDataError(f"{key!r}: not a valid .npy array ({error})") from error
    if dtype.hasobject:
        raise InvalidDataError(
            f"{key!r}: holds Python objects (dtype {dtype}); object arrays are refused because loading them "
            "would unpickle arbitrary code. Save plain numeric arrays."
        )
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise InvalidDataError(f"{key!r}: dtype {dtype} is not a numeric array type")
    count = math.prod(shape)
    available = len(data) - stream.tell()
    if count * dtype.itemsize != available:
        raise InvalidDataError(
            f"{key!r}: header declares shape {shape} of {dtype} ({count * dtype.itemsize} bytes) "
            f"but the member holds {available} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    array = array.reshape(shape, order="F" if fortran_order else "C")
    return np.ascontiguousarray(array, dtype=dtype.newbyteorder("="))


def _load_npz(
    archive: zipfile.ZipFile,
    members: list[zipfile.ZipInfo],
    *,
    input_shape: tuple[int, int, int] | None,
    limits: DataLimits,
    keep: Callable[[int], torch.Tensor | None],
) -> Samples:
    by_key = {info.filename.removesuffix(".npy"): info for info in members}
    missing = [key for key in ("x", "y") if key not in by_key]
    if missing:
        raise InvalidDataError(
            f"the .npz must hold arrays 'x' (images) and 'y' (labels); missing {', '.join(map(repr, missing))} "
            f"(found {', '.join(map(repr, sorted(by_key))) or 'nothing'})"
        )
    x = _read_npy(archive, by_key["x"])
    y = _read_npy(archive, by_key["y"])

    if x.ndim not in (3, 4):
        raise InvalidDataError(f"'x' must be (N, H, W) or (N, C, H, W); got shape {x.shape}")
    count = x.shape[0]
    sample_shape = (1, x.shape[1], x.shape[2]) if x.ndim == 3 else (x.shape[1], x.shape[2], x.shape[3])
    _check_count(count, limits)
    if min(sample_shape) < 1:
        raise InvalidDataError(f"'x' has empty images: shape {x.shape}")
    if input_shape is not None and sample_shape != tuple(input_shape):
        hint = " (arrays must be channels-first: N, C, H, W)" if x.ndim == 4 and x.shape[-1] == input_shape[0] else ""
        raise DataModelMismatchError(
            f"input_shape is {tuple(input_shape)} but the samples in 'x' are {sample_shape}{hint}"
        )
    _check_decoded_size(count, sample_shape, limits)

    if y.ndim != 1 or y.shape[0] != count:
        raise InvalidDataError(f"'y' must be 1-D with one label per image ({count},); got shape {y.shape}")
    if y.dtype.kind not in "iu":
        raise InvalidDataError(f"'y' must hold integer class indices; got dtype {y.dtype}")
    if y.min() < 0:
        raise InvalidDataError(f"'y' labels must be non-negative; found {y.min()}")
    if y.max() > np.iinfo(np.int64).max:
        raise InvalidDataError(f"'y' labels must fit in int64; found {y.max()}")

    rows = keep(count)
    if rows is not None:
        x, y, count = x[rows.numpy()], y[rows.numpy()], len(rows)
    if x.dtype == np.uint8:
        images = torch.from_numpy(x.astype(np.float32)).div_(255.0)
    elif x.dtype in (np.float32, np.float64):
        nonfinite = int(np.count_nonzero(~np.isfinite(x)))
        if nonfinite:
            raise InvalidDataError(f"'x' holds {nonfinite} NaN or infinite values; expected floats in [0, 1]")
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > 1.0:
            raise InvalidDataError(
                f"float 'x' must be in [0, 1]; observed min {low:.6g}, max {high:.6g} "
                "(store 0..255 pixels as uint8, and do not normalise: mean/std are options)"
            )
        images = torch.from_numpy(x.astype(np.float32))
    else:
        raise InvalidDataError(f"'x' must be uint8, or float32/float64 in [0, 1]; got dtype {x.dtype}")
    return Samples(images=images.reshape(count, *sample_shape), labels=torch.from_numpy(y.astype(np.int64)), rows=rows)


def _check_count(count: int, limits: DataLimits) -> None:
    if count == 0:
        raise InvalidDataError("the sample set is empty (N = 0)")
    if count > limits.max_samples:
        raise InvalidDataError(f"the sample set has {count} samples; at most {limits.max_samples} are allowed")


def _check_decoded_size(count: int, sample_shape: tuple[int, int, int], limits: DataLimits) -> None:
    decoded = count * math.prod(sample_shape) * _FLOAT32_BYTES
    if decoded > limits.max_total_bytes:
        raise InvalidDataError(
            f"{count} samples of shape {sample_shape} need {decoded} bytes as float32; "
            f"at most {limits.max_total_bytes} are allowed"
        )


# --- ImageFolder .zip -------------------------------------------------------------------------


def _load_image_folder(
    archive: zipfile.ZipFile,
    members: list[zipfile.ZipInfo],
    *,
    input_shape: tuple[int, int, int] | None,
    limits: DataLimits,
    keep: Callable[[int], torch.Tensor | None],
    progress: LoadProgress | None,
) -> Samples:
    files = _image_files(members)
    _check_count(len(files), limits)
    labels, class_names = _class_indices([folder for folder, _ in files])
    members_of_files = (info for _, info in files)
    entries = sorted(zip(labels, members_of_files, strict=True), key=lambda entry: (entry[0], entry[1].filename))
    rows = keep(len(entries))
    if rows is not None:
        entries = [entries[row] for row in rows.tolist()]

    mode: str | None = None
    size: tuple[int, int] | None = None
    if input_shape is not None:
        channels, height, width = input_shape
        if channels not in _CHANNEL_MODES:
            raise InvalidOptionError(
                f"input_shape asks for {channels} channels; ImageFolder images decode to 1 (grayscale) or 3 (RGB)"
            )
        mode, size = _CHANNEL_MODES[channels], (width, height)

    images: torch.Tensor | None = None  # float32 (N, C, H, W), filled image by image: no second full-size copy
    for row, (_, info) in enumerate(entries):
        if progress is not None and row % _PROGRESS_EVERY == 0:
            progress(row / len(entries))
        image = _open_image(archive, info)
        if size is None:
            size = image.size
        elif image.size != size:
            expected = f"input_shape {tuple(input_shape)} needs" if input_shape is not None else "the first image is"
            error_type = DataModelMismatchError if input_shape is not None else InvalidDataError
            raise error_type(
                f"{info.filename!r} is {image.size[0]}x{image.size[1]} (WxH) but {expected} "
                f"{size[0]}x{size[1]}; all images must have the same size"
            )
        if mode is None:
            mode = "L" if image.mode in _GRAYSCALE_MODES else "RGB"
        if images is None:
            channels = 1 if mode == "L" else 3
            if max(size) > MAX_SIDE:
                raise InvalidDataError(f"{info.filename!r} is {size[0]}x{size[1]}; at most {MAX_SIDE} per side")
            _check_decoded_size(len(entries), (channels, size[1], size[0]), limits)
            images = torch.empty((len(entries), channels, size[1], size[0]), dtype=torch.float32)
        pixels = _decode(image, mode, info.filename).reshape(size[1], size[0], -1)
        images[row] = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)

    assert images is not None  # _check_count guarantees at least one image
    return Samples(
        images=images,
        labels=torch.tensor([label for label, _ in entries], dtype=torch.int64),
        class_names=class_names,
        paths=tuple(info.filename for _, info in entries),
        rows=rows,
    )


def _image_files(members: list[zipfile.ZipInfo]) -> list[tuple[str, zipfile.ZipInfo]]:
    """``(class folder, member)`` for every image file, after skipping junk and one top-level folder."""
    files: list[tuple[tuple[str, ...], zipfile.ZipInfo]] = []
    for info in members:
        parts = _member_parts(info.filename)
        if info.is_dir() or not parts or parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts):
            continue
        files.append((parts, info))
    if not files:
        raise InvalidDataError("the zip holds no image files; expected <class>/<image> entries (ImageFolder layout)")
    if all(len(parts) >= 3 for parts, _ in files) and len({parts[0] for parts, _ in files}) == 1:
        files = [(parts[1:], info) for parts, info in files]
    for parts, info in files:
        if len(parts) != 2:
            raise InvalidDataError(
                f"{info.filename!r}: expected <class>/<image>, "
                "optionally under one top-level folder (ImageFolder layout)"
            )
    return [(parts[0], info) for parts, info in files]


def _class_indices(folders: list[str]) -> tuple[list[int], tuple[str, ...] | None]:
    """Class index of each folder: the folder name when all names are integers, else its sorted rank."""
    names = sorted(set(folders))
    if all(_NUMERIC_FOLDER.fullmatch(name) for name in names):
        by_index: dict[int, str] = {}
        for name in names:
            if int(name) in by_index:
                raise InvalidDataError(
                    f"class folders {by_index[int(name)]!r} and {name!r} both mean class {int(name)}"
                )
            by_index[int(name)] = name
        return [int(folder) for folder in folders], None
    rank = {name: index for index, name in enumerate(names)}
    return [rank[folder] for folder in folders], tuple(names)


def _open_image(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Image.Image:
    """Parse an image header (no pixel decoding yet)."""
    data = _read_member(archive, info)
    try:
        return Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS)
    except Exception as error:  # Pillow raises many exception types on malformed untrusted input.
        raise InvalidDataError(
            f"{info.filename!r}: not a readable image ({', '.join(_IMAGE_FORMATS)}): {error}"
        ) from error


def _decode(image: Image.Image, mode: str, name: str) -> np.ndarray:
    """Decode pixels as uint8 ``(H, W)`` or ``(H, W, 3)``; the caller has checked the size."""
    if image.mode in _HIGH_DEPTH_MODES:
        raise InvalidDataError(f"{name!r}: {image.mode} images (16-bit or float) are not supported; use 8-bit images")
    try:
        image.load()
        return np.asarray(image.convert(mode), dtype=np.uint8)
    except Exception as error:  # Pillow raises many exception types on malformed untrusted input.
        raise InvalidDataError(f"{name!r}: the image cannot be decoded: {error}") from error
