"""One scan from start to end: check the file, load the model, load the data, run the detectors.

Library code: takes paths, a frozen config and a device; returns a :class:`Verdict`. Detector crashes are
contained (reported as ``error`` in the verdict); bad input raises a :class:`ScannerError` subclass.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch

from scanner import __version__
from scanner.config import ScanConfig
from scanner.data import Samples, check_samples_against_model, load_samples, with_normalization
from scanner.detectors import DETECTORS, Detector, Progress, ScanInputs
from scanner.errors import ScanCancelled, ScannerError, UnsafeFileError
from scanner.formats import load_model
from scanner.model_file import ModelFileReport
from scanner.verdict import BACKDOOR_DETECTORS, DetectorResult, DetectorStatus, ModelInfo, ScannerInfo, Verdict

__all__ = ["file_sha256", "scan"]

logger = logging.getLogger(__name__)


def _no_progress(fraction: float, stage: str, message: str) -> None:
    return None


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _model_file_result(report: ModelFileReport, duration_s: float) -> DetectorResult:
    return DetectorResult(
        status=DetectorStatus.OK,
        findings=tuple(f.to_dict() for f in report.findings),
        details={"format": report.format.value, "pickles_scanned": report.pickles_scanned},
        duration_s=duration_s,
    )


def scan(
    model_path: Path,
    config: ScanConfig,
    device: torch.device,
    *,
    data_path: Path | None = None,
    training_data_path: Path | None = None,
    progress: Progress | None = None,
) -> Verdict:
    """Scan one checkpoint.

    Args:
        model_path: the untrusted checkpoint (any accepted format; detected from its bytes).
        config: model options, seed and data limits.
        device: where the model and detectors run (see :func:`scanner.device.resolve_device`).
        data_path: clean, correctly labelled samples (.npz or ImageFolder .zip) for Neural Cleanse.
        training_data_path: the (possibly poisoned) training set for spectral signatures.
        progress: called with (fraction, stage, message) as the scan advances.

    Returns:
        The verdict. An unsafe file yields ``unsafe_file`` without ever being loaded.

    Raises:
        ScannerError: bad input (unsupported or corrupt file, bad options, data that does not fit the model).
    """
    progress = progress or _no_progress
    scanner_info = ScannerInfo(version=__version__, torch=torch.__version__, device=str(device), seed=config.seed)
    sha256 = file_sha256(model_path)
    size_bytes = model_path.stat().st_size

    progress(0.0, "model_file", "checking the pickles inside the file")
    started = time.perf_counter()
    try:
        loaded = load_model(model_path, config.model, device)
    except UnsafeFileError as exc:
        model_info = ModelInfo(format=exc.report.format.value, sha256=sha256, size_bytes=size_bytes)
        not_loaded = DetectorResult.skipped("the model file is unsafe and was not loaded")
        detectors = {"model_file": _model_file_result(exc.report, time.perf_counter() - started)}
        detectors.update(dict.fromkeys(BACKDOOR_DETECTORS, not_loaded))
        progress(1.0, "done", "unsafe file")
        return Verdict(detectors=detectors, scanner=scanner_info, model=model_info)
    detectors = {"model_file": _model_file_result(loaded.report, time.perf_counter() - started)}

    progress(0.05, "data", "loading samples")
    model = with_normalization(loaded.module, config.model.mean, config.model.std)
    num_classes = loaded.num_classes
    clean = training = None
    if data_path is not None:
        # Neural Cleanse uses at most max_samples clean samples: the others are never decoded
        clean = load_samples(
            data_path,
            input_shape=loaded.input_shape,
            limits=config.data_limits,
            max_samples=config.neural_cleanse.max_samples,
            seed=config.seed,
            progress=lambda fraction: progress(0.05 + 0.025 * fraction, "data", "decoding clean samples"),
        )
        num_classes = check_samples_against_model(model, clean, num_classes=num_classes, device=device)
    if training_data_path is not None:
        training = load_samples(
            training_data_path,
            input_shape=loaded.input_shape,
            limits=config.data_limits,
            progress=lambda fraction: progress(0.075 + 0.025 * fraction, "data", "decoding training data"),
        )
        num_classes = check_samples_against_model(model, training, num_classes=num_classes, device=device)
    input_shape = loaded.input_shape or _shape_of(clean) or _shape_of(training)
    model_info = ModelInfo(
        format=loaded.format.value,
        sha256=sha256,
        size_bytes=size_bytes,
        input_shape=input_shape,
        num_classes=num_classes,
    )

    inputs = ScanInputs(
        model=model,
        num_classes=num_classes or 0,
        input_shape=input_shape,
        clean=clean,
        training=training,
        config=config,
        device=device,
        progress=progress,
    )
    for detector in DETECTORS:
        detectors[detector.name] = _run_detector(detector, inputs)
    progress(1.0, "done", "scan finished")
    return Verdict(detectors=detectors, scanner=scanner_info, model=model_info)


def _shape_of(samples: Samples | None) -> tuple[int, int, int] | None:
    if samples is None:
        return None
    c, h, w = samples.images.shape[1:]
    return (int(c), int(h), int(w))


def _run_detector(detector: Detector, inputs: ScanInputs) -> DetectorResult:
    if detector.name not in inputs.config.detectors:
        return DetectorResult.skipped("not requested (detectors option)")
    reason = detector.needs(inputs)
    if reason is not None:
        return DetectorResult.skipped(reason)
    started = time.perf_counter()
    try:
        return detector.run(inputs)
    except ScanCancelled:
        raise
    except ScannerError as exc:
        return DetectorResult.error(exc.code, exc.detail, time.perf_counter() - started)
    except Exception as exc:  # one broken detector never kills the scan; the others still report
        logger.exception("detector %s crashed", detector.name)
        return DetectorResult.error("detector_crashed", f"{type(exc).__name__}: {exc}", time.perf_counter() - started)
