"""The backdoor detectors a scan runs: one adapter per detector (algorithm result -> ``DetectorResult``), and the
registry :data:`DETECTORS` that :func:`scanner.pipeline.scan` iterates in order.

The model-file check is not in the registry: it runs before the model is loaded, and an unsafe file stops the
scan there (:mod:`scanner.detectors.model_file`). A new detector is a module here with a
:class:`~scanner.detectors.base.Detector`, an entry in :data:`DETECTORS`, and its name in
:data:`scanner.verdict.BACKDOOR_DETECTORS` (the options and the verdict rules read that list).
"""

from scanner.detectors.base import Detector, DetectorProgress, Progress, ScanInputs
from scanner.detectors.max_margin import MAX_MARGIN
from scanner.detectors.neural_cleanse import NEURAL_CLEANSE
from scanner.detectors.spectral import SPECTRAL_SIGNATURES

__all__ = ["DETECTORS", "Detector", "DetectorProgress", "Progress", "ScanInputs"]

DETECTORS: tuple[Detector, ...] = (NEURAL_CLEANSE, SPECTRAL_SIGNATURES, MAX_MARGIN)
