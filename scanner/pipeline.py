"""One scan from start to end: check the file, load the model, load the data, run the detectors.

Library code: takes paths, a frozen config and a device; returns a :class:`Verdict`. Detector crashes are
contained (reported as ``error`` in the verdict); bad input raises a :class:`ScannerError` subclass.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from scanner._version import __version__
from scanner.classifier import check_samples, with_normalization
from scanner.config import ScanConfig
from scanner.detectors import DETECTORS, Detector, DetectorProgress, Progress, ScanInputs
from scanner.detectors.model_file import model_file_result
from scanner.digest import file_digest
from scanner.errors import ScanCancelled, ScannerError, UnsafeFileError
from scanner.loading import Samples, load_model, load_samples
from scanner.verdict import BACKDOOR_DETECTORS, DetectorResult, ModelInfo, ScannerInfo, Verdict

__all__ = ["run_detector", "scan"]

logger = logging.getLogger(__name__)

# The scan's progress bar: the model check and loading up to _DATA_START, the sample sets up to _DETECTORS_START
# (clean, then training data, half each), then the detectors that run, by their share.
_DATA_START = 0.05
_DETECTORS_START = 0.1


def _no_progress(fraction: float, stage: str, message: str) -> None:
    return None


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
    sha256, size_bytes = file_digest(model_path)

    progress(0.0, "model_file", "checking the pickles inside the file")
    started = time.perf_counter()
    try:
        loaded = load_model(model_path, config.model, device)
    except UnsafeFileError as exc:
        model_info = ModelInfo(format=exc.report.format.value, sha256=sha256, size_bytes=size_bytes)
        not_loaded = DetectorResult.skipped("the model file is unsafe and was not loaded")
        detectors = {"model_file": model_file_result(exc.report, time.perf_counter() - started)}
        detectors.update(dict.fromkeys(BACKDOOR_DETECTORS, not_loaded))
        progress(1.0, "done", "unsafe file")
        return Verdict(detectors=detectors, scanner=scanner_info, model=model_info)
    detectors = {"model_file": model_file_result(loaded.report, time.perf_counter() - started)}

    progress(_DATA_START, "data", "loading samples")
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
            progress=lambda fraction: _data_progress(progress, 0, fraction, "decoding clean samples"),
        )
        num_classes = check_samples(model, clean.images, clean.labels, num_classes=num_classes, device=device)
    if training_data_path is not None:
        training = load_samples(
            training_data_path,
            input_shape=loaded.input_shape,
            limits=config.data_limits,
            progress=lambda fraction: _data_progress(progress, 1, fraction, "decoding training data"),
        )
        num_classes = check_samples(model, training.images, training.labels, num_classes=num_classes, device=device)
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
    )
    detectors.update(_run_detectors(inputs, progress))
    progress(1.0, "done", "scan finished")
    return Verdict(detectors=detectors, scanner=scanner_info, model=model_info)


def _shape_of(samples: Samples | None) -> tuple[int, int, int] | None:
    if samples is None:
        return None
    c, h, w = samples.images.shape[1:]
    return (int(c), int(h), int(w))


def _data_progress(progress: Progress, part: int, fraction: float, message: str) -> None:
    half = (_DETECTORS_START - _DATA_START) / 2
    progress(_DATA_START + half * (part + fraction), "data", message)


def _run_detectors(inputs: ScanInputs, progress: Progress) -> dict[str, DetectorResult]:
    """Run the registry in order; the detectors that can run share the progress bar after loading
    (``_DETECTORS_START`` to 1) by their :attr:`Detector.share`."""
    results: dict[str, DetectorResult] = {}
    runnable: list[Detector] = []
    for detector in DETECTORS:
        reason = _skip_reason(detector, inputs)
        if reason is None:
            runnable.append(detector)
        else:
            results[detector.name] = DetectorResult.skipped(reason)
    total = sum(detector.share for detector in runnable)
    start = _DETECTORS_START
    for detector in runnable:
        width = (1.0 - _DETECTORS_START) * detector.share / total
        results[detector.name] = run_detector(detector, inputs, _scoped(progress, detector.name, start, width))
        start += width
    return {detector.name: results[detector.name] for detector in DETECTORS}


def _skip_reason(detector: Detector, inputs: ScanInputs) -> str | None:
    if detector.name not in inputs.config.detectors:
        return "not requested (detectors option)"
    return detector.needs(inputs)


def _scoped(progress: Progress, stage: str, start: float, width: float) -> DetectorProgress:
    def report(fraction: float, message: str) -> None:
        progress(start + width * min(max(fraction, 0.0), 1.0), stage, message)

    return report


def run_detector(detector: Detector, inputs: ScanInputs, progress: DetectorProgress) -> DetectorResult:
    """Run one detector that can run; crashes become its error, never the scan's."""
    started = time.perf_counter()
    try:
        return detector.run(inputs, progress)
    except ScanCancelled:
        raise
    except ScannerError as exc:
        return DetectorResult.error(exc.code, exc.detail, time.perf_counter() - started)
    except Exception as exc:  # one broken detector never kills the scan; the others still report
        logger.exception("detector %s crashed", detector.name)
        return DetectorResult.error("detector_crashed", f"{type(exc).__name__}: {exc}", time.perf_counter() - started)
