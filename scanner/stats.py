"""Small robust statistics used by the detectors."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

__all__ = [
    "MAD_CONSISTENCY",
    "GammaFit",
    "NullThresholds",
    "anomaly_index",
    "gamma_fit",
    "largest_p_value",
    "null_thresholds",
    "seeded_subset",
    "small_outliers",
    "smallest_z",
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


def smallest_z(values: Values, reference: Reference = None, tested: Reference = None) -> tuple[int, float]:
    """The smallest tested value's distance below the others, in their standard deviations.

    ``(mean - x) / sd`` with the mean and standard deviation (``ddof=1``) of the reference values other than ``x``:
    a one-sided Grubbs-type statistic with ``x`` left out of its own scale. Where only one class is an outlier it
    uses every other value's distance from the centre, so it separates a lone small trigger far better than the MAD
    index does with few classes (the MAD of 10 values rests on two of them); a second small outlier inflates the
    standard deviation and masks the first, which is why it is paired with the MAD index
    (:func:`null_thresholds`).

    Args:
        values: one value per item, shape ``(K,)``, all finite.
        reference: the items whose mean and standard deviation set the scale (default all); at least two besides
            the smallest.
        tested: the items the smallest is taken from (default all).

    Returns:
        ``(row, z)``: the row of the smallest tested value and its statistic (``inf`` when the others are all equal
        and larger).
    """
    x = _finite_1d(values)
    rows = np.arange(x.size)
    candidates = rows if tested is None else rows[np.asarray(tested)]
    if candidates.size == 0:
        raise ValueError("no tested values")
    row = int(candidates[np.argmin(x[candidates])])
    scale = rows if reference is None else rows[np.asarray(reference)]
    others = x[scale[scale != row]]
    if others.size < 2:
        raise ValueError("the reference needs at least two values besides the smallest")
    spread = float(others.std(ddof=1))
    gap = float(others.mean() - x[row])
    if spread == 0.0:
        return row, math.inf if gap > 0 else 0.0
    return row, gap / spread


@dataclass(frozen=True)
class NullThresholds:
    """Thresholds of the small-side outlier tests over ``count`` values (see :func:`null_thresholds`)."""

    index: float
    z: float | None


@functools.lru_cache(maxsize=64)
def null_thresholds(
    count: int,
    false_positive_rate: float,
    references: int | None = None,
    index_share: float = 1.0,
    simulations: int = 20_000,
    tail_dof: float | None = None,
) -> NullThresholds:
    """Thresholds that ``count`` outlier-free values exceed, together, with probability ``false_positive_rate``.

    A fixed threshold ignores how many classes are tested and how noisy a median and MAD from ``count`` values are:
    for 10 normally distributed values the largest small-side index exceeds the paper's 2 a third of the time.
    This calibrates on that null instead (``count`` standard normal values, seeded Monte-Carlo, deterministic):

    - ``index_share=1``: the MAD anomaly index alone, at its ``1 - false_positive_rate`` quantile;
    - ``index_share < 1``: the MAD index at its ``1 - index_share * false_positive_rate`` quantile, and the
      :func:`smallest_z` threshold that brings the chance of either firing to ``false_positive_rate``.

    With ``references``, only that many values drawn at random set the scale (a screened run): the smallest of all
    ``count`` values is judged against them, as when the screen ranks perfectly (any other screen can only leave
    smaller values out, so the thresholds hold for it too); fewer references estimate the scale less precisely and
    the thresholds grow.

    With ``tail_dof``, the values are Student-t with that many degrees of freedom instead of normal: a heavier
    tail, whose smallest of many values lies further out (measured on real 100-class models, see
    ``NeuralCleanseConfig.many_classes_tail_dof``).

    Args:
        count: values tested together (the classes), at least 3.
        false_positive_rate: family-wise probability of flagging anything when nothing is anomalous.
        references: how many values set the scale, in [3, count]; default all.
        index_share: the part of ``false_positive_rate`` given to the MAD index, in (0, 1].
        simulations: Monte-Carlo draws (capped so that ``simulations * count`` stays below 2e7).
        tail_dof: Student-t degrees of freedom of the null (> 2); default ``None``, the normal null.
    """
    references = count if references is None else references
    if count < 3:
        raise ValueError(f"need at least 3 values to calibrate, got {count}")
    if not 3 <= references <= count:
        raise ValueError(f"need 3 <= references <= count, got {references} of {count}")
    if not 0.0 < false_positive_rate < 1.0:
        raise ValueError(f"false_positive_rate must be in (0, 1), got {false_positive_rate}")
    if not 0.0 < index_share <= 1.0:
        raise ValueError(f"index_share must be in (0, 1], got {index_share}")
    if tail_dof is not None and not tail_dof > 2.0:
        raise ValueError(f"tail_dof must be above 2 (a finite variance), got {tail_dof}")
    draws = max(1000, min(simulations, 20_000_000 // count))
    generator = np.random.default_rng(0)
    if tail_dof is None:
        values = generator.standard_normal((draws, count))
    else:
        values = generator.standard_t(tail_dof, (draws, count))
    sample = values[:, :references]  # i.i.d. columns: the first ones are as random a sample as any
    median = np.median(sample, axis=1)
    mad = MAD_CONSISTENCY * np.median(np.abs(sample - median[:, None]), axis=1)
    smallest = values.min(axis=1)
    index = np.maximum((median - smallest) / mad, 0.0)
    index_threshold = float(np.quantile(index, 1.0 - index_share * false_positive_rate))
    if index_share == 1.0:
        return NullThresholds(index=index_threshold, z=None)
    # the smallest's z against the reference values other than itself
    inside = values.argmin(axis=1) < references
    n = references - inside
    total = sample.sum(axis=1) - np.where(inside, smallest, 0.0)
    squares = (sample**2).sum(axis=1) - np.where(inside, smallest**2, 0.0)
    mean = total / n
    spread = np.sqrt(np.maximum(squares - n * mean**2, 0.0) / (n - 1))
    z = (mean - smallest) / spread
    index_fires = index > index_threshold
    rest = false_positive_rate - float(index_fires.mean())  # what the z test may add
    z_alone = np.where(index_fires, -np.inf, z)
    return NullThresholds(index=index_threshold, z=float(np.quantile(z_alone, 1.0 - rest)))


def seeded_subset(count: int, limit: int, seed: int) -> torch.Tensor | None:
    """Rows ``(limit,)`` of a seeded random subset of ``count`` items, in random order; ``None`` when
    ``count <= limit`` (keep them all). Drawn on the CPU, so the same on every device."""
    if count <= limit:
        return None
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit]


@dataclass(frozen=True)
class GammaFit:
    """A Gamma distribution fitted by maximum likelihood: ``shape`` (k) and ``scale`` (theta)."""

    shape: float
    scale: float

    def survival(self, value: float) -> float:
        """``P(X > value)`` (the regularised upper incomplete gamma function)."""
        if value <= 0:
            return 1.0
        return float(
            torch.special.gammaincc(
                torch.tensor(self.shape, dtype=torch.float64), torch.tensor(value / self.scale, dtype=torch.float64)
            )
        )


def gamma_fit(values: Values, max_shape: float = 1e4) -> GammaFit:
    """Maximum-likelihood Gamma fit of positive values.

    The shape solves ``log(k) - digamma(k) = log(mean) - mean(log x)`` (Newton's method from the closed-form
    approximation of Minka, "Estimating a Gamma distribution", 2002); the scale is ``mean / k``.

    Args:
        values: at least two positive, finite values that are not all equal.
        max_shape: the shape is capped here (values that barely vary give a huge shape: an almost-normal null
            whose width the cap keeps from collapsing to zero).

    Raises:
        ValueError: fewer than two values, a value that is not positive and finite, or no spread.
    """
    x = _finite_1d(values)
    if x.size < 2 or np.any(x <= 0):
        raise ValueError("a Gamma fit needs at least two positive values")
    mean = float(x.mean())
    s = math.log(mean) - float(np.log(x).mean())
    if not s > 1e-12:
        raise ValueError("a Gamma fit needs values that are not all equal")
    shape = (3.0 - s + math.sqrt((s - 3.0) ** 2 + 24.0 * s)) / (12.0 * s)
    for _ in range(50):
        k = torch.tensor(shape, dtype=torch.float64)
        f = math.log(shape) - float(torch.special.digamma(k)) - s
        derivative = 1.0 / shape - float(torch.special.polygamma(1, k))
        step = f / derivative
        shape = max(shape - step, shape / 10.0)
        if abs(step) < 1e-10 * shape:
            break
    shape = min(shape, max_shape)
    return GammaFit(shape=shape, scale=mean / shape)


def largest_p_value(statistic: float, null: GammaFit, count: int) -> float:
    """The order-statistic p-value of the largest of ``count`` values: ``1 - F(statistic) ** count``, where ``F``
    is the null's distribution function; computed from the survival function so that tiny p-values keep their
    precision."""
    tail = null.survival(statistic)
    if tail >= 1.0:
        return 1.0
    return float(-math.expm1(count * math.log1p(-tail)))
