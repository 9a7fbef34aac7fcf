"""Try an image on a scanned model (``POST /v1/scans/{id}/try``): the model's prediction, confidence and Grad-CAM on
the image as it is and with each flagged class's recovered trigger stamped on.

Everything heavy runs in one worker thread (an :class:`anyio.CapacityLimiter` of 1), never on the event loop: loading
the scan's model with the one safe loader (:func:`scanner.loading.load_model`, on the CPU; kept for the last few
scans), decoding the image, the forward passes and Grad-CAM. At most :data:`MAX_PENDING` requests are admitted at a
time (uploading, waiting or running); the next one gets 429 ``too_many_requests``.

The image is untrusted like every upload: streamed to disk under a byte cap, then decoded in memory only after its
header said it has exactly the model's input size (so a PNG that declares 20000x20000 pixels is refused before a
pixel is decoded, and an ``.npy`` header is checked before its array is built).
"""

from __future__ import annotations

import base64
import functools
import io
import logging
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal

import anyio.to_thread
import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from pydantic import BaseModel, Field
from torch import nn

from scanner.classifier import with_normalization
from scanner.errors import ScannerError
from scanner.evidence import Tried, TriedImage, try_image
from scanner.loading import Samples, load_model, load_samples
from scanner.repair import RepairUnsupportedError, read_triggers
from scanner.trigger import Trigger
from service.models import JobStatus, Scan
from service.options import ScanOptions, scan_config
from service.problems import ServiceError
from service.repairs import flagged_triggers
from service.storage import ParsedUpload, ScanFiles

__all__ = [
    "FILE_FIELDS",
    "MAX_IMAGE_BYTES",
    "MAX_PENDING",
    "TEXT_FIELDS",
    "ImageTrials",
    "TryRequest",
    "TryResult",
    "check_triable",
    "decode_image",
    "read_npy",
    "try_form_schema",
    "try_request",
]

logger = logging.getLogger(__name__)

#: The file part of ``POST /v1/scans/{id}/try`` and its text field.
FILE_FIELDS = ("image",)
TEXT_FIELDS = frozenset({"sample"})
#: Cap on the uploaded image file.
MAX_IMAGE_BYTES = 4 * 1024**2
#: Requests admitted at a time (one runs, the others wait for it); more are refused with 429.
MAX_PENDING = 4
#: Scans whose loaded model (and samples) are kept.
CACHED_SCANS = 2
#: Decoded clean samples up to this size stay with their scan's model; larger sets are decoded for each request.
CACHED_SAMPLES_BYTES = 64 * 1024**2
#: Triggers stamped per request at most (a scan that flags more classes shows the first ones).
MAX_STAMPED = 10
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
_PNG_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA"})
_NPY_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32), np.dtype(np.float64))
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
_SAMPLE_DIGITS = 9


def try_form_schema() -> dict[str, Any]:
    """The multipart request body of ``POST /v1/scans/{id}/try`` for the OpenAPI document."""
    properties = {
        "image": {
            "type": "string",
            "format": "binary",
            "description": "a PNG, or an .npy array (uint8, or float in [0, 1]; H,W or C,H,W), of the model's input "
            f"size; at most {MAX_IMAGE_BYTES // 2**20} MiB",
        },
        "sample": {
            "type": "integer",
            "minimum": 0,
            "description": "instead of an image: this one of the scan's clean samples (0-based)",
        },
    }
    return {
        "required": True,
        "content": {"multipart/form-data": {"schema": {"type": "object", "properties": properties}}},
    }


# --- the answer ------------------------------------------------------------------------------------------------


class TriedPublic(BaseModel):
    prediction: int = Field(description="the predicted class")
    confidence: float = Field(description="softmax probability of the predicted class")
    image_png: str = Field(description="the image the model saw, as a data: URL (PNG)")
    gradcam_png: str | None = Field(description="Grad-CAM of the prediction over the image (data: URL), if it ran")


class StampedPublic(TriedPublic):
    trigger_class: int = Field(description="the flagged class whose recovered trigger is stamped on")


class NotStampedPublic(BaseModel):
    trigger_class: int
    reason: str


class TryInputPublic(BaseModel):
    kind: Literal["image", "sample"]
    filename: str | None = Field(default=None, description="the uploaded image's name")
    sample: int | None = Field(default=None, description="the clean sample's index")
    row: int | None = Field(default=None, description="the sample's row in the uploaded data file")
    label: int | None = Field(default=None, description="the sample's label")


class GradCamPublic(BaseModel):
    status: Literal["ok", "skipped", "error"]
    layer: str | None = None
    detail: str | None = None


class TryResult(BaseModel):
    """One image on a scanned model, as it is and with each flagged class's recovered trigger."""

    scan_id: str
    input: TryInputPublic
    input_shape: list[int] = Field(description="C, H, W the model takes")
    clean: TriedPublic
    stamped: list[StampedPublic] = Field(description="one per flagged class with a Neural Cleanse trigger")
    not_stamped: list[NotStampedPublic] = Field(description="flagged classes without a trigger to stamp")
    gradcam: GradCamPublic


# --- decoding the image ----------------------------------------------------------------------------------------


def _invalid(detail: str) -> ServiceError:
    return ServiceError(HTTPStatus.UNPROCESSABLE_ENTITY, "invalid_image", detail)


def _shape_mismatch(found: str, shape: tuple[int, int, int]) -> ServiceError:
    channels, height, width = shape
    return ServiceError(
        HTTPStatus.UNPROCESSABLE_ENTITY,
        "image_shape_mismatch",
        f"the image is {found}; the model takes {width}x{height} pixels with {channels} channel(s)"
        f" (C,H,W {channels},{height},{width}); images are not resized",
        expected=list(shape),
    )


def decode_image(content: bytes, shape: tuple[int, int, int]) -> torch.Tensor:
    """An uploaded PNG or ``.npy`` as a float32 ``(C, H, W)`` tensor in [0, 1] of exactly ``shape``.

    A PNG's size is read from its header and compared first; it is converted to grayscale or RGB to fit ``C`` (1 or
    3). An ``.npy`` must be uint8 (divided by 255), or float32/float64 in [0, 1] without NaN or infinity, shaped
    ``(H, W)`` (one channel), ``(C, H, W)`` or ``(1, C, H, W)``; its header is checked before the array is built.

    Raises:
        ServiceError: 415 ``unsupported_image`` (neither PNG nor ``.npy``), 422 ``image_shape_mismatch`` or
            ``invalid_image``.
    """
    if content.startswith(PNG_MAGIC):
        return _decode_png(content, shape)
    if content.startswith(NPY_MAGIC):
        return torch.from_numpy(_decode_npy(content, shape))
    raise ServiceError(
        HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "unsupported_image", "send the image as a PNG or as an .npy array"
    )


def _decode_png(content: bytes, shape: tuple[int, int, int]) -> torch.Tensor:
    channels, height, width = shape
    if channels not in (1, 3):
        raise ServiceError(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            "image_shape_mismatch",
            f"the model takes {channels} channels, which a PNG cannot carry here (grayscale or RGB): send an .npy",
            expected=list(shape),
        )
    try:
        with Image.open(io.BytesIO(content), formats=["PNG"]) as picture:
            if picture.size != (width, height):
                raise _shape_mismatch(f"{picture.width}x{picture.height} pixels", shape)
            if picture.mode not in _PNG_MODES:
                raise _invalid(f"PNG mode {picture.mode!r} is not supported; send 8 bits per channel")
            pixels = np.asarray(picture.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255
    except ServiceError:
        raise
    except (OSError, SyntaxError, ValueError, zlib.error, Image.DecompressionBombError) as exc:
        raise _invalid(f"the PNG cannot be decoded: {exc}") from None
    array = pixels[None] if channels == 1 else np.transpose(pixels, (2, 0, 1))
    return torch.from_numpy(np.ascontiguousarray(array))


def read_npy(content: bytes, shapes: tuple[tuple[int, ...], ...], what: str) -> npt.NDArray[np.float32]:
    """An ``.npy`` of one of ``shapes`` as float32 in [0, 1]: uint8 is divided by 255, float32/float64 must hold no
    NaN or infinity and stay in [0, 1]. The header is checked before the array is built.

    Raises:
        ServiceError: 422 ``invalid_image`` (the format, the dtype, the byte count, the values) or
            ``image_shape_mismatch`` (not one of ``shapes``; the first is named as expected).
    """
    stream = io.BytesIO(content)
    try:
        version = np.lib.format.read_magic(stream)
        reader = _NPY_HEADERS.get(version)
        if reader is None:
            raise ValueError(f"unsupported .npy version {version}")
        array_shape, fortran_order, dtype = reader(stream)
    except ValueError as exc:
        raise _invalid(f"{what} is not a valid .npy file: {exc}") from None
    if dtype.newbyteorder("=") not in _NPY_DTYPES:
        raise _invalid(f"{what} has dtype {dtype}; expected uint8, float32 or float64")
    if tuple(array_shape) not in shapes:
        raise ServiceError(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            "image_shape_mismatch",
            f"{what} has shape {tuple(array_shape)}; expected {' or '.join(str(s) for s in shapes)}",
            expected=list(shapes[0]),
        )
    body = content[stream.tell() :]
    expected_bytes = int(np.prod(array_shape)) * dtype.itemsize
    if len(body) != expected_bytes:
        raise _invalid(f"{what} holds {len(body)} bytes of data; its header says {expected_bytes}")
    array = np.frombuffer(body, dtype=dtype).reshape(array_shape, order="F" if fortran_order else "C")
    values = np.array(array, dtype=np.float32)  # a writable copy: the upload's bytes stay untouched
    if dtype == np.uint8:
        values /= 255
        return values
    if not np.isfinite(values).all():
        raise _invalid(f"{what} holds NaN or infinite values")
    if values.size and (values.min() < 0 or values.max() > 1):
        raise _invalid(f"{what}'s values must be in [0, 1], got [{values.min():.4g}, {values.max():.4g}]")
    return values


def _decode_npy(content: bytes, shape: tuple[int, int, int]) -> npt.NDArray[np.float32]:
    channels, height, width = shape
    shapes = (shape, (1, *shape)) + (((height, width),) if channels == 1 else ())
    return read_npy(content, shapes, "the image").reshape(shape)


# --- the request -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TryRequest:
    """What to try: an uploaded image (its bytes and name) or a clean sample's index."""

    image: bytes | None = None
    filename: str | None = None
    sample: int | None = None


def try_request(upload: ParsedUpload, files: ScanFiles) -> TryRequest:
    """The image or the sample index of a parsed upload.

    Raises:
        ServiceError: 422 ``missing_image`` (neither), ``image_and_sample`` (both), ``invalid_sample``.
    """
    image = upload.files.get("image")
    sample_text = upload.fields.get("sample", "").strip()
    if image is not None and sample_text:
        raise ServiceError(
            HTTPStatus.UNPROCESSABLE_ENTITY, "image_and_sample", "send either an 'image' file or a 'sample' index"
        )
    if image is not None:
        if image.size_bytes == 0:
            raise ServiceError(HTTPStatus.UNPROCESSABLE_ENTITY, "empty_file", "the 'image' file is empty")
        return TryRequest(image=files.upload("image").read_bytes(), filename=image.filename)
    if not sample_text:
        raise ServiceError(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            "missing_image",
            "send an 'image' file part (PNG or .npy) or a 'sample' field (an index into the scan's clean samples)",
        )
    if not sample_text.isascii() or not sample_text.isdigit() or len(sample_text) > _SAMPLE_DIGITS:
        raise ServiceError(HTTPStatus.UNPROCESSABLE_ENTITY, "invalid_sample", "'sample' must be a non-negative integer")
    return TryRequest(sample=int(sample_text))


def check_triable(scan: Scan) -> None:
    """Refuse a scan whose model cannot be tried.

    Raises:
        ServiceError: 409 ``scan_not_finished`` (not succeeded), ``unsafe_model`` (the model file failed its check,
            so it is never loaded), ``model_runs_code`` (TorchScript: only workers load it).
    """
    if scan.status != JobStatus.succeeded or scan.result is None:
        raise ServiceError(
            HTTPStatus.CONFLICT,
            "scan_not_finished",
            f"the scan is {scan.status}: images can be tried once it succeeded",
        )
    if scan.verdict == "unsafe_file":
        raise ServiceError(
            HTTPStatus.CONFLICT, "unsafe_model", "the model file failed its safety check: it is never loaded"
        )
    if scan.options.get("trust_code"):
        raise ServiceError(
            HTTPStatus.CONFLICT,
            "model_runs_code",
            "a TorchScript model runs code when loaded: only the workers load it, not the API",
        )


# --- the loaded scan -------------------------------------------------------------------------------------------


@dataclass
class _LoadedScan:
    model: nn.Module
    input_shape: tuple[int, int, int]
    data_path: Path | None
    options: ScanOptions
    samples: Samples | None = None
    triggers: dict[int, Trigger | str] = field(default_factory=dict)  # a trigger, or why there is none


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _public(tried: TriedImage) -> dict[str, Any]:
    return {
        "prediction": tried.prediction,
        "confidence": round(tried.confidence, 6),
        "image_png": _data_url(tried.image_png),
        "gradcam_png": _data_url(tried.gradcam_png) if tried.gradcam_png is not None else None,
    }


class ImageTrials:
    """The state of ``POST /v1/scans/{id}/try`` in one API process: admission, the thread, the model cache."""

    def __init__(self, scans_dir: Path, *, max_pending: int = MAX_PENDING, cached_scans: int = CACHED_SCANS):
        self.scans_dir = scans_dir
        self.max_pending = max_pending
        self.cached_scans = cached_scans
        self._pending = 0
        self._limiter: anyio.CapacityLimiter | None = None
        self._loaded: OrderedDict[str, _LoadedScan] = OrderedDict()  # touched only in the limiter's one thread

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """Hold one of the ``max_pending`` places for the whole request (upload, wait, run).

        Raises:
            ServiceError: 429 ``too_many_requests`` when every place is taken.
        """
        if self._pending >= self.max_pending:  # no await between the test and the increment: one event loop
            raise ServiceError(
                HTTPStatus.TOO_MANY_REQUESTS,
                "too_many_requests",
                f"{self.max_pending} images are being tried already; try again in a moment",
                headers={"Retry-After": "1"},
            )
        self._pending += 1
        try:
            yield
        finally:
            self._pending -= 1

    async def run(self, scan: Scan, request: TryRequest) -> TryResult:
        """:meth:`try_on` in the one worker thread."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(functools.partial(self.try_on, scan, request), limiter=self._limiter)

    def try_on(self, scan: Scan, request: TryRequest) -> TryResult:
        """Load (or reuse) the scan's model, decode the image or pick the sample, stamp and explain. Blocking.

        Raises:
            ServiceError: 409 ``model_not_loadable``, ``input_shape_unknown``, ``no_samples``; 422
                ``sample_out_of_range`` and the image's codes (:func:`decode_image`).
        """
        loaded = self._load(scan)
        source: dict[str, Any]
        if request.image is not None:
            image = decode_image(request.image, loaded.input_shape)
            source = {"kind": "image", "filename": request.filename}
        else:
            assert request.sample is not None
            samples = self._samples(loaded)
            count = len(samples.labels)
            if request.sample >= count:
                raise ServiceError(
                    HTTPStatus.UNPROCESSABLE_ENTITY,
                    "sample_out_of_range",
                    f"sample {request.sample} does not exist: the scan has {count} clean samples (0 to {count - 1})",
                    samples=count,
                )
            image = samples.images[request.sample]
            source = {
                "kind": "sample",
                "sample": request.sample,
                "row": samples.upload_row(request.sample),
                "label": int(samples.labels[request.sample]),
            }
        triggers, not_stamped = self._triggers(scan, loaded)
        tried = try_image(loaded.model, image, triggers)
        return TryResult.model_validate(
            {
                "scan_id": scan.id,
                "input": source,
                "input_shape": list(loaded.input_shape),
                "clean": _public(tried.clean),
                "stamped": [{**_public(one), "trigger_class": k} for k, one in tried.stamped.items()],
                "not_stamped": [{"trigger_class": k, "reason": reason} for k, reason in not_stamped],
                "gradcam": _gradcam(tried),
            }
        )

    def _load(self, scan: Scan) -> _LoadedScan:
        cached = self._loaded.get(scan.id)
        if cached is not None:
            self._loaded.move_to_end(scan.id)
            return cached
        files = ScanFiles(self.scans_dir, scan.id)
        options = ScanOptions.model_validate(scan.options)
        config = scan_config(options)
        try:
            model = load_model(files.upload("model"), config.model, torch.device("cpu"))
        except ScannerError as exc:
            raise ServiceError(
                HTTPStatus.CONFLICT, "model_not_loadable", f"the scan's model cannot be loaded: {exc.detail}"
            ) from None
        except OSError:  # deleted since the scan was read
            raise ServiceError(HTTPStatus.CONFLICT, "model_not_loadable", "the scan's model file is gone") from None
        input_shape = model.input_shape or _result_shape(scan.result)
        if input_shape is None:
            raise ServiceError(
                HTTPStatus.CONFLICT,
                "input_shape_unknown",
                "the scan does not say which input size the model takes (scan it with input_shape or with data)",
            )
        data = files.upload("data")
        loaded = _LoadedScan(
            model=with_normalization(model.module, config.model.mean, config.model.std),
            input_shape=input_shape,
            data_path=data if data.is_file() else None,
            options=options,
        )
        self._loaded[scan.id] = loaded
        while len(self._loaded) > self.cached_scans:
            self._loaded.popitem(last=False)
        return loaded

    def _samples(self, loaded: _LoadedScan) -> Samples:
        """The clean samples the scan used (the same seeded subset when the upload was larger), kept with the model
        when they are small (:data:`CACHED_SAMPLES_BYTES`)."""
        if loaded.samples is not None:
            return loaded.samples
        if loaded.data_path is None:
            raise ServiceError(HTTPStatus.CONFLICT, "no_samples", "the scan has no clean samples; upload an image")
        config = scan_config(loaded.options)
        try:
            samples = load_samples(
                loaded.data_path,
                input_shape=loaded.input_shape,
                limits=config.data_limits,
                max_samples=config.neural_cleanse.max_samples,
                seed=config.seed,
            )
        except ScannerError as exc:
            raise ServiceError(
                HTTPStatus.CONFLICT, "no_samples", f"the scan's clean samples cannot be read: {exc.detail}"
            ) from None
        if samples.images.numel() * samples.images.element_size() <= CACHED_SAMPLES_BYTES:
            loaded.samples = samples
        return samples

    def _triggers(self, scan: Scan, loaded: _LoadedScan) -> tuple[dict[int, Trigger], list[tuple[int, str]]]:
        """The recovered trigger of each flagged class, and the flagged classes without one (with the reason)."""
        result = scan.result or {}
        flagged = sorted({int(k) for k in result.get("flagged_classes") or [] if isinstance(k, int)})
        reversed_classes = set(flagged_triggers(scan))
        triggers: dict[int, Trigger] = {}
        missing: list[tuple[int, str]] = []
        for k in flagged:
            if k not in reversed_classes:
                missing.append((k, "flagged by another detector: Neural Cleanse recovered no trigger for it"))
                continue
            if len(triggers) >= MAX_STAMPED:
                missing.append((k, f"only the first {MAX_STAMPED} flagged classes are stamped"))
                continue
            if k not in loaded.triggers:
                loaded.triggers[k] = self._read_trigger(scan.id, k, loaded.input_shape)
            found = loaded.triggers[k]
            if isinstance(found, Trigger):
                triggers[k] = found
            else:
                missing.append((k, found))
        return triggers, missing

    def _read_trigger(self, scan_id: str, k: int, shape: tuple[int, int, int]) -> Trigger | str:
        files = ScanFiles(self.scans_dir, scan_id)
        try:
            trigger = read_triggers([k], lambda name: _artifact(files, name))[k]
            if trigger.image_shape != shape:
                raise RepairUnsupportedError(f"the trigger is {trigger.image_shape}, the model takes {shape}")
        except RepairUnsupportedError as exc:
            logger.warning("trigger of class %d unusable: %s", k, exc, extra={"scan_id": scan_id})
            return "the recovered trigger's files are missing or invalid"
        return trigger


def _artifact(files: ScanFiles, name: str) -> bytes:
    path = files.artifact(name)
    if path is None:
        raise OSError(f"not an artifact name: {name}")
    return path.read_bytes()


def _result_shape(result: dict[str, Any] | None) -> tuple[int, int, int] | None:
    shape = ((result or {}).get("model") or {}).get("input_shape")
    if isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) and n > 0 for n in shape):
        return shape[0], shape[1], shape[2]
    return None


def _gradcam(tried: Tried) -> dict[str, Any]:
    if tried.gradcam_problem is None:
        return {"status": "ok", "layer": tried.gradcam_layer}
    status, detail = tried.gradcam_problem
    return {"status": status, "detail": detail}
