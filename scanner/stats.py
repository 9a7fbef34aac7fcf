"""Small robust statistics used by the detectors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["MAD_CONSISTENCY", "anomaly_index", "small_outliers"]

#: Makes the median absolute deviation a consistent estimator of the standard deviation for normal data.
MAD_CONSISTENCY = 1.4826


def anomaly_index(values: Sequence[float] | npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Anomaly index of each value: ``|x - median| / (1.4826 * MAD)``.

    This is the outlier statistic of Neural Cleanse (Wang et al., IEEE S&P 2019, section IV-B), applied to
    the per-class L1 norms of the reversed triggers.

    Args:
        values: one value per item, shape ``(K,)``; at least one, all finite.

    Returns:
        Indices, shape ``(K,)``. When the MAD is zero, values equal to the median get 0 and the others +inf.

    Raises:
        ValueError: empty input or non-finite values.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"expected a non-empty 1-D sequence, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("values must be finite")
    deviation = np.abs(x - np.median(x))
    mad = MAD_CONSISTENCY * float(np.median(deviation))
    if mad == 0.0:
        return np.where(deviation == 0.0, 0.0, np.inf)
    return deviation / mad


def small_outliers(values: Sequence[float] | npt.NDArray[np.float64], threshold: float = 2.0) -> npt.NDArray[np.bool_]:
    """Which values are outliers on the small side: below the median with an anomaly index above ``threshold``.

    Neural Cleanse flags only the small side: a backdoor target needs a much smaller trigger than the other
    classes, while an unusually large trigger means nothing.
    """
    x = np.asarray(values, dtype=np.float64)
    return (x < np.median(x)) & (anomaly_index(x) > threshold)
