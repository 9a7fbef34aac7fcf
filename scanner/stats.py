"""Small robust statistics used by the detectors."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["MAD_CONSISTENCY", "anomaly_index", "null_max_index_quantile", "seeded_subset", "small_outliers"]

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


@functools.lru_cache(maxsize=64)
def null_max_index_quantile(count: int, false_positive_rate: float, simulations: int = 20_000) -> float:
    """The small-side anomaly index that ``count`` outlier-free values exceed with probability ``false_positive_rate``.

    A fixed threshold ignores how many classes are tested and how noisy a median/MAD from ``count`` values is:
    for 10 normally distributed values, the largest small-side index exceeds 2 a third of the time. This
    calibrates the threshold on that null instead: the ``1 - false_positive_rate`` quantile of the largest
    small-side index of ``count`` standard normal values, by a seeded Monte-Carlo (deterministic).

    Args:
        count: number of values tested together (the classes), at least 3.
        false_positive_rate: family-wise probability of flagging anything when nothing is anomalous.
        simulations: Monte-Carlo draws (capped so that ``simulations * count`` stays below 2e7).

    Returns:
        The threshold for :func:`small_outliers`.
    """
    if count < 3:
        raise ValueError(f"need at least 3 values to calibrate, got {count}")
    if not 0.0 < false_positive_rate < 1.0:
        raise ValueError(f"false_positive_rate must be in (0, 1), got {false_positive_rate}")
    draws = max(1000, min(simulations, 20_000_000 // count))
    rng = np.random.default_rng(0)
    values = rng.standard_normal((draws, count))
    median = np.median(values, axis=1, keepdims=True)
    mad = MAD_CONSISTENCY * np.median(np.abs(values - median), axis=1, keepdims=True)
    largest = np.where(values < median, (median - values) / mad, 0.0).max(axis=1)
    return float(np.quantile(largest, 1.0 - false_positive_rate))


def seeded_subset(count: int, limit: int, seed: int) -> torch.Tensor | None:
    """Rows ``(limit,)`` of a seeded random subset of ``count`` items, in random order; ``None`` when
    ``count <= limit`` (keep them all). Drawn on the CPU, so the same on every device."""
    if count <= limit:
        return None
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit]
