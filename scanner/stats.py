"""Small robust statistics used by the detectors."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

__all__ = [
    "MAD_CONSISTENCY",
    "anomaly_index",
    "null_max_index_quantile",
    "null_reference_index_quantile",
    "seeded_subset",
    "small_outliers",
]

#: Makes the median absolute deviation a consistent estimator of the standard deviation for normal data.
MAD_CONSISTENCY = 1.4826


Values = Sequence[float] | npt.NDArray[np.float64]
#: Which values form the reference population (median and MAD): a boolean mask or row numbers; ``None`` is all.
Reference = Sequence[int] | npt.NDArray[np.bool_] | npt.NDArray[np.int64] | None


def _center_and_scale(x: npt.NDArray[np.float64], reference: Reference) -> tuple[float, float]:
    """The median and ``1.4826 * MAD`` of ``x[reference]`` (of all of ``x`` without a reference)."""
    population = x if reference is None else x[np.asarray(reference)]
    if population.size == 0:
        raise ValueError("the reference population is empty")
    median = float(np.median(population))
    return median, MAD_CONSISTENCY * float(np.median(np.abs(population - median)))


def _finite_1d(values: Values) -> npt.NDArray[np.float64]:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"expected a non-empty 1-D sequence, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("values must be finite")
    return x


def anomaly_index(values: Values, reference: Reference = None) -> npt.NDArray[np.float64]:
    """Anomaly index of each value: ``|x - median| / (1.4826 * MAD)``.

    This is the outlier statistic of Neural Cleanse (Wang et al., IEEE S&P 2019, section IV-B), applied to
    the per-class L1 norms of the reversed triggers.

    Args:
        values: one value per item, shape ``(K,)``; at least one, all finite.
        reference: the items whose median and MAD define the scale (a random sample of the population when
            only some items were measured precisely); default all.

    Returns:
        Indices, shape ``(K,)``. When the MAD is zero, values equal to the median get 0 and the others +inf.

    Raises:
        ValueError: empty input or reference, or non-finite values.
    """
    x = _finite_1d(values)
    median, mad = _center_and_scale(x, reference)
    deviation = np.abs(x - median)
    if mad == 0.0:
        return np.where(deviation == 0.0, 0.0, np.inf)
    return deviation / mad


def small_outliers(values: Values, threshold: float = 2.0, reference: Reference = None) -> npt.NDArray[np.bool_]:
    """Which values are outliers on the small side: below the median with an anomaly index above ``threshold``.

    Neural Cleanse flags only the small side: a backdoor target needs a much smaller trigger than the other
    classes, while an unusually large trigger means nothing. ``reference`` as in :func:`anomaly_index`.
    """
    x = _finite_1d(values)
    median, _ = _center_and_scale(x, reference)
    return (x < median) & (anomaly_index(x, reference) > threshold)


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


@functools.lru_cache(maxsize=64)
def null_reference_index_quantile(
    count: int, references: int, false_positive_rate: float, simulations: int = 20_000
) -> float:
    """Like :func:`null_max_index_quantile` when only a random sample of the values sets the median and MAD.

    A screened Neural Cleanse run measures precisely only the smallest candidates and ``references`` classes drawn
    at random from all ``count``; the candidates are judged against the references' median and MAD. Under the null
    (``count`` standard normal values) the largest small-side index is then at most that of the overall smallest
    value against the median and MAD of ``references`` random ones, reached when the screen ranks perfectly (any
    other screen can only leave smaller values out); this returns its ``1 - false_positive_rate`` quantile
    (seeded Monte-Carlo, deterministic). Fewer references estimate the scale less precisely: the threshold grows.

    Args:
        count: all values (the classes), at least 3.
        references: how many of them form the reference sample, in [3, count].
        false_positive_rate: family-wise probability of flagging anything when nothing is anomalous.
        simulations: Monte-Carlo draws (capped so that ``simulations * count`` stays below 2e7).
    """
    if not 3 <= references <= count:
        raise ValueError(f"need 3 <= references <= count, got {references} of {count}")
    if not 0.0 < false_positive_rate < 1.0:
        raise ValueError(f"false_positive_rate must be in (0, 1), got {false_positive_rate}")
    draws = max(1000, min(simulations, 20_000_000 // count))
    rng = np.random.default_rng(0)
    values = rng.standard_normal((draws, count))
    sample = values[:, :references]  # i.i.d. columns: the first ones are as random a sample as any
    median = np.median(sample, axis=1)
    mad = MAD_CONSISTENCY * np.median(np.abs(sample - median[:, None]), axis=1)
    largest = np.maximum((median - values.min(axis=1)) / mad, 0.0)
    return float(np.quantile(largest, 1.0 - false_positive_rate))


def seeded_subset(count: int, limit: int, seed: int) -> torch.Tensor | None:
    """Rows ``(limit,)`` of a seeded random subset of ``count`` items, in random order; ``None`` when
    ``count <= limit`` (keep them all). Drawn on the CPU, so the same on every device."""
    if count <= limit:
        return None
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit]
