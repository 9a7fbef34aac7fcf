"""Spectral signatures: find the backdoor target class and the poisoned samples in a training set.

Tran, Li, Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018: in the class a backdoor
maps to, the poisoned samples shift the penultimate-layer representation along one direction, so
they stand out along the top singular vector of the class's centred features (the paper's outlier
score is the squared projection on it; the paper removes the top 1.5 ε of every class, with ε, the
poisoned fraction, given by the user).

What this module adds, and why (measured on BadNets ``mnist_cnn`` models, see ``bench/spectral.py``):

1. **Reference whitening.** Clean classes have a few directions of large natural variation; at 1%
   poisoning the poison direction was only the 3rd-5th singular direction of the raw features, and
   the paper's score reached AUROCs of 0.44-0.66 in the target class (four of five bench seeds).
   Each class's features are therefore whitened with the pooled within-class covariance of the
   *other* classes (leave one out, so that a class's own poison cannot hide its direction), plus a
   ridge. A trigger adds a direction along which clean samples hardly vary; whitening makes it a
   dominant one.
2. **Both sides of the direction.** When half of a class is poison (10% overall, all-to-one, 10
   classes), the mean sits between two clusters and the squared projection scores both alike. A
   two-component Gaussian mixture with a shared covariance is fitted instead (EM), in the span of
   the top ``directions`` right-singular vectors of the whitened, centred class features. The
   shared covariance keeps the fit from explaining a tail with a wide component around the same
   mean; fits whose smaller component is under 1% of the class (or 5 samples) are discarded, so a
   few outliers are not a sub-population.
3. **A class verdict.** The separation of a class is the Mahalanobis distance between the means of
   its two components (Ashman's D in one dimension): a few units for a class that is one cluster,
   far more for two clusters. Its score is its separation over the median separation of the
   classes, a robust cross-class statistic that does not depend on the feature scale, the number
   of directions or the class size; a class is flagged when its score exceeds ``threshold``.
   Nothing is flagged just for being the largest, so a clean model flags nothing. (A MAD-based
   anomaly index was tried first: with ten classes the MAD is too noisy, and clean classes reached
   indices above those of some target classes.)
4. **Which side is the poison.** The smaller component is the prior guess (the paper assumes
   ε < 1/2), which is a coin flip near one half. For flagged classes the model decides instead,
   with STRIP's observation (Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural
   Networks", ACSAC 2019): blended with images of other classes, an input that carries a trigger
   keeps its label much more often than a clean one. The component whose members keep the class
   more often under blending is the poison.
5. **No ε.** Suspicious samples are the members of the poison component (posterior > 1/2); their
   share of the class is the estimated poisoned fraction.
6. **A split is not yet a target.** A source-specific backdoor with cover samples (the trigger flips
   only one source class; stamped images of the other classes keep their label) leaves a real
   trigger-bearing sub-population in classes the backdoor does not map to, and the split alone flagged
   them (measured in ``bench/coverage.py``: classes 1, 4 and 9 for a 3 -> 7 backdoor, never 7 alone).
   Those members carry the trigger but it does not pull them to their class, so under blending they lose
   it nearly as often as the rest, where the members of a real target's poison hardly lose it. With
   :func:`persistence_gain` ``(p_suspected - p_rest) / (1 - p_rest)`` (relative, as classes differ in how
   well they survive blending): 0.00-0.13 on cover classes, 0.23-0.93 on real targets (128 probes; see
   :class:`~scanner.config.SpectralConfig`). A class over the threshold is flagged only when the gain
   reaches ``min_persistence_gain``; otherwise it is *unconfirmed*, and a run whose only outliers are
   unconfirmed cannot decide (the detector reports ``undecidable``, never ``clean``).

Limits: a sub-population needs at least 5 samples and 1% of its class; a class whose clean samples
are naturally two far-apart clusters looks like a poisoned one (the side test's persistence values,
reported with each flagged class, then show no clear difference); triggers that do not survive
blending (STRIP's known blind spots) leave the side decision to chance at one half.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from scanner.config import SpectralConfig
from scanner.features import penultimate_features
from scanner.stats import seeded_subset

__all__ = [
    "ClassSplit",
    "SpectralConfig",
    "SpectralReport",
    "class_splits",
    "detect_poisoned_samples",
    "persistence_gain",
    "trigger_persistence",
]

#: Classes need at least this many training samples to be analysed.
MIN_CLASS_SAMPLES = 10
#: The cross-class comparison needs at least this many analysed classes.
MIN_CLASSES = 3
#: Mixture fits start from hard splits at these quantiles of each direction (small tails to halves).
_INIT_QUANTILES = (0.02, 0.1, 0.5, 0.9, 0.98)
_EM_STEPS = 60
_EM_STEPS_PER_PROGRESS = 10
#: samples of one class that its mixture is fitted on, and padded rows fitted together (bounds the EM's memory:
#: its largest tensors are inits x 2 x rows x directions float64, 20 x 2 x 20,480 x 4 x 8 B = 26 MB)
_MAX_FIT_SAMPLES = 2048
_FIT_ROWS = 20_480
#: Ridge added to the components' covariance, relative to the class's mean variance per direction.
_COMPONENT_RIDGE = 1e-3
#: Fits whose smaller component holds less than this share of the class (or this many samples) are discarded.
_MIN_COMPONENT_FRACTION = 0.01
_MIN_COMPONENT_SAMPLES = 5
#: STRIP blends half of the input with half of another image.
_BLEND_WEIGHT = 0.5


@dataclass(frozen=True, eq=False)  # holds tensors: compare by identity
class ClassSplit:
    """One class cut into two mixture components, one of them taken as the suspected poison.

    Attributes:
        label: the class.
        indices: int64 ``(n,)``, CPU: the class's rows in the training set, in order.
        separation: Mahalanobis distance between the two component means.
        score: ``separation`` over the median separation of the analysed classes (NaN when not compared).
        flagged: ``score > threshold`` (and, after :func:`detect_poisoned_samples`, the side test confirmed it).
        posterior: float64 ``(n,)``, CPU: probability that each sample belongs to the suspected component.
        poison_score: float64 ``(n,)``, CPU: position along the discriminant between the components,
            0 at the other component's mean, 1 at the suspected component's mean.
    """

    label: int
    indices: torch.Tensor
    separation: float
    score: float
    flagged: bool
    posterior: torch.Tensor
    poison_score: torch.Tensor
    unconfirmed: bool = False  # over the threshold, but the side test did not confirm a trigger of this class

    @property
    def suspicious(self) -> torch.Tensor:
        """Boolean ``(n,)``: members of the suspected component (posterior above one half)."""
        return self.posterior > 0.5

    @property
    def poisoned_fraction(self) -> float:
        """Share of the class in the suspected component."""
        return float(self.suspicious.double().mean())

    def swapped(self) -> ClassSplit:
        """The same split with the other component taken as the suspected one."""
        return replace(self, posterior=1.0 - self.posterior, poison_score=1.0 - self.poison_score)


@dataclass(frozen=True, eq=False)
class SpectralReport:
    """Result of :func:`detect_poisoned_samples`.

    Attributes:
        classes: the analysed classes (at least ``MIN_CLASS_SAMPLES`` samples), by label.
        persistence: for each class over the threshold (flagged or unconfirmed), STRIP persistence
            ``(suspected, other)``: how often blended members of each component kept the class.
        threshold: the score threshold used.
        duration_s: wall time, features included.
    """

    classes: tuple[ClassSplit, ...]
    persistence: dict[int, tuple[float, float]]
    threshold: float
    duration_s: float

    @property
    def flagged_classes(self) -> tuple[int, ...]:
        return tuple(split.label for split in self.classes if split.flagged)

    @property
    def unconfirmed_classes(self) -> tuple[int, ...]:
        """Classes over the threshold whose suspected members did not keep the class under blending."""
        return tuple(split.label for split in self.classes if split.unconfirmed)


def class_splits(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    config: SpectralConfig = SpectralConfig(),
    progress: Callable[[float], None] | None = None,
) -> list[ClassSplit]:
    """Split every class in two along its spectral signature and flag the classes whose split is an outlier.

    The suspected component of each class is the smaller one (see the module docstring for the
    model-based choice that :func:`detect_poisoned_samples` makes for flagged classes).

    Args:
        features: penultimate features ``(N, D)`` of the training samples, any float dtype and device.
        labels: int64 ``(N,)`` training labels, same device.
        config: hyper-parameters (``directions``, ``shrinkage``, ``threshold``, ``max_features``).
        progress: called with the fraction of the mixture fits done, every few EM steps (it may raise to stop).

    Returns:
        One split per class with at least ``MIN_CLASS_SAMPLES`` samples, by label. With fewer than
        ``MIN_CLASSES`` such classes nothing is compared: scores are NaN and nothing is flagged.

    Raises:
        ValueError: shapes do not match.
    """
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(
            f"expected features (N, D) and labels (N,), got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    centred = features.detach().to(torch.float64, copy=True)  # one float64 copy, centred in place below
    present, counts = torch.unique(labels, return_counts=True)
    analysed = [int(k) for k, n in zip(present.tolist(), counts.tolist(), strict=True) if n >= MIN_CLASS_SAMPLES]
    if not analysed:
        return []
    members = [torch.nonzero(labels == k).squeeze(1) for k in analysed]
    for rows in members:
        centred[rows] -= centred[rows].mean(0)
    projections = _whitened_top_directions(centred, members, config)
    fits = _fit_two_gaussians(projections, progress or (lambda fraction: None))

    separations = np.array([fit.separation for fit in fits])
    median = float(np.median(separations))
    compared = len(analysed) >= MIN_CLASSES and median > 0
    scores = separations / median if compared else np.full(len(analysed), np.nan)
    flagged = scores > config.threshold  # NaN compares False
    splits = []
    for label, rows, fit, score, flag in zip(analysed, members, fits, scores, flagged, strict=True):
        split = ClassSplit(
            label=label,
            indices=rows.cpu(),
            separation=fit.separation,
            score=float(score),
            flagged=bool(flag),
            posterior=fit.posterior.cpu(),
            poison_score=fit.poison_score.cpu(),
        )
        splits.append(split if fit.posterior.sum() <= len(rows) / 2 else split.swapped())
    return splits


def _whitened_top_directions(
    centred: torch.Tensor, members: list[torch.Tensor], config: SpectralConfig
) -> list[torch.Tensor]:
    """Per class: features whitened by the other classes' pooled covariance, on their top singular directions.

    Features wider than ``config.max_features`` are first projected, class by class, on the class's own
    leading principal directions: the paper's signal is variance that the poison adds to its class, so it
    lives there (and a class with fewer samples than that loses nothing). The other classes' covariance
    is then taken in the same subspace.

    Args:
        centred: ``(N, D)`` features, each class centred on its own mean.
        members: row indices of each analysed class.
        config: ``directions``, ``shrinkage`` and ``max_features``.

    Returns:
        One ``(n_k, directions)`` tensor per class (fewer columns when the class has fewer samples).
    """
    rows_all = torch.cat(members)
    total_scatter = centred[rows_all].mT @ centred[rows_all]
    out = []
    for rows in members:
        own = centred[rows]
        scatter = own.mT @ own
        others = len(rows_all) - len(rows)
        # With a single class the "other classes" are empty: fall back to the class itself.
        reference = (total_scatter - scatter) / others if others > 0 else scatter / len(rows)
        if own.shape[1] > config.max_features:
            basis = torch.linalg.svd(own, full_matrices=False).Vh[: config.max_features].mT  # (D, r)
            own, reference = own @ basis, basis.mT @ reference @ basis
        eigenvalues, eigenvectors = torch.linalg.eigh(reference)
        eigenvalues = eigenvalues.clamp_min(0)
        ridge = config.shrinkage * eigenvalues.mean().clamp_min(torch.finfo(centred.dtype).tiny)
        whitened = own @ (eigenvectors / (eigenvalues + ridge).sqrt())
        _, _, vh = torch.linalg.svd(whitened, full_matrices=False)
        out.append(whitened @ vh[: config.directions].mT)
    return out


@dataclass(frozen=True, eq=False)
class _MixtureFit:
    separation: float
    posterior: torch.Tensor  # (n,) posterior of component 1
    poison_score: torch.Tensor  # (n,) 0 at the mean of component 0, 1 at the mean of component 1


def _fit_two_gaussians(projections: list[torch.Tensor], progress: Callable[[float], None]) -> list[_MixtureFit]:
    """Fit a two-component Gaussian mixture with a shared covariance (EM) to each class's projections.

    The mixture of a class is fitted on at most ``_MAX_FIT_SAMPLES`` of its samples (a seeded subset: the fit's
    memory and time stay bounded however large the training set is; a few thousand samples pin down two means and a
    small covariance), ``_FIT_ROWS`` padded rows of classes at a time; every sample's posterior and poison score
    then come from the fitted mixture.
    """
    kept = [seeded_subset(len(p), _MAX_FIT_SAMPLES, seed=k) for k, p in enumerate(projections)]
    subsets = [p if rows is None else p[rows.to(p.device)] for p, rows in zip(projections, kept, strict=True)]
    per_chunk = max(1, _FIT_ROWS // max(len(p) for p in subsets))
    dims = max(p.shape[1] for p in projections)
    fits: list[_MixtureFit] = []
    for start in range(0, len(projections), per_chunk):
        share = len(subsets[start : start + per_chunk]) / len(projections)

        def on_step(fraction: float, start: int = start, share: float = share) -> None:
            progress(start / len(projections) + share * fraction)

        mixtures = _fit_mixtures(subsets[start : start + per_chunk], dims, on_step)
        fits.extend(
            _evaluate(mixture, projection, dims)
            for mixture, projection in zip(mixtures, projections[start : start + per_chunk], strict=True)
        )
    return fits


@dataclass(frozen=True, eq=False)
class _Mixture:
    """A fitted two-component mixture with a shared covariance; ``valid``: both components reached the minimum
    size (otherwise it is the best invalid fit, whose discriminant still orders the samples)."""

    means: torch.Tensor  # (2, d)
    cov: torch.Tensor  # (d, d)
    log_prior: torch.Tensor  # (2,)
    valid: bool


def _fit_mixtures(projections: list[torch.Tensor], dims: int, progress: Callable[[float], None]) -> list[_Mixture]:
    """EM for every class at once, from several hard initial splits (quantiles of each direction); among the fits
    whose components both reach the minimum size, the one with the highest likelihood is kept. Classes are padded to
    a common length with zero weights and to ``dims`` columns with zeros."""
    device, dtype = projections[0].device, projections[0].dtype
    longest = max(p.shape[0] for p in projections)
    classes = len(projections)
    z = torch.zeros(classes, longest, dims, dtype=dtype, device=device)
    weight = torch.zeros(classes, longest, dtype=dtype, device=device)
    for k, p in enumerate(projections):
        z[k, : len(p), : p.shape[1]] = p
        weight[k, : len(p)] = 1.0
    counts = weight.sum(1)
    mean = (z * weight[..., None]).sum(1) / counts[:, None]
    variance = (((z - mean[:, None]) ** 2) * weight[..., None]).sum(1) / counts[:, None]
    scale = variance.mean(1).clamp_min(torch.finfo(dtype).tiny)
    ridge = _COMPONENT_RIDGE * scale[:, None, None, None, None] * torch.eye(dims, dtype=dtype, device=device)

    # Initial responsibilities of component 1, shape (classes, inits, longest).
    initial = []
    for d in range(dims):
        column = z[..., d].masked_fill(weight == 0, float("nan"))
        cut = torch.nanquantile(column, torch.tensor(_INIT_QUANTILES, dtype=dtype, device=device), dim=1)
        initial.append((z[None, :, :, d] > cut[:, :, None]).to(dtype))
    resp = torch.cat(initial).transpose(0, 1)
    for step in range(_EM_STEPS):
        if step % _EM_STEPS_PER_PROGRESS == 0:
            progress(step / _EM_STEPS)
        both = torch.stack([1.0 - resp, resp], dim=2) * weight[:, None, None, :]  # (K, I, 2, n)
        mass = both.sum(-1).clamp_min(1e-9)  # (K, I, 2)
        means = torch.einsum("kicn,knd->kicd", both, z) / mass[..., None]
        diff = z[:, None, None] - means[..., None, :]  # (K, I, 2, n, d)
        pooled = torch.einsum("kicn,kicnd,kicne->kide", both, diff, diff) / counts[:, None, None, None]
        cov = (pooled + ridge[:, :, 0])[:, :, None].expand(-1, -1, 2, -1, -1)
        log_prior = torch.log(mass / counts[:, None, None])
        log_joint = _log_joint(diff, cov, log_prior)
        log_likelihood = torch.logsumexp(log_joint, dim=2)  # (K, I, n)
        resp = torch.exp(log_joint[:, :, 1] - log_likelihood)
    # A component below the minimum size is an outlier or two, not a sub-population: such fits do not count.
    minimum = (_MIN_COMPONENT_FRACTION * counts).clamp_min(_MIN_COMPONENT_SAMPLES)
    valid = mass.min(-1).values >= minimum[:, None]  # (K, I)
    total = (log_likelihood * weight[:, None]).sum(-1).masked_fill(~valid, -math.inf)
    best = total.argmax(1)  # (K,)
    pick = torch.arange(classes, device=device)
    means, cov, log_prior = means[pick, best], cov[pick, best, 0], log_prior[pick, best]
    split = valid.any(1)
    return [_Mixture(means=means[k], cov=cov[k], log_prior=log_prior[k], valid=bool(split[k])) for k in range(classes)]


def _log_joint(diff: torch.Tensor, cov: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """``log p(component) + log N(x | mean, cov)`` from ``diff = x - mean`` (``(..., 2, n, d)``), ``cov``
    (``(..., 2, d, d)``) and ``log_prior`` (``(..., 2)``); shape ``(..., 2, n)``."""
    dims = diff.shape[-1]
    chol = torch.linalg.cholesky(cov)
    solved = torch.linalg.solve_triangular(chol, diff.transpose(-1, -2), upper=False)
    distance = (solved**2).sum(-2)
    log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    log_joint: torch.Tensor = log_prior[..., None] - 0.5 * (
        distance + log_det[..., None] + dims * math.log(2 * math.pi)
    )
    return log_joint


def _evaluate(mixture: _Mixture, projection: torch.Tensor, dims: int) -> _MixtureFit:
    """Every sample's posterior of component 1 and its poison score under a class's fitted mixture."""
    z = torch.nn.functional.pad(projection, (0, dims - projection.shape[1]))  # (n, d)
    means = mixture.means
    gap = means[1] - means[0]
    direction = torch.linalg.solve(mixture.cov, gap)  # the discriminant
    separation = torch.sqrt((gap * direction).sum()).clamp_min(torch.finfo(z.dtype).tiny)
    poison_score = (z - means[0]) @ direction / separation**2
    if not mixture.valid:  # no valid split: separation 0, nobody suspected
        return _MixtureFit(separation=0.0, posterior=torch.zeros_like(poison_score), poison_score=poison_score)
    log_joint = _log_joint(z[None] - means[:, None], mixture.cov.expand(2, -1, -1), mixture.log_prior)  # (2, n)
    posterior = torch.exp(log_joint[1] - torch.logsumexp(log_joint, dim=0))
    return _MixtureFit(separation=float(separation), posterior=posterior, poison_score=poison_score)


def persistence_gain(suspected: float, rest: float) -> float:
    """How much less often suspected members lose their class under blending than the rest: ``1 - (1 - suspected)
    / (1 - rest)``, i.e. ``(suspected - rest) / (1 - rest)``; 0 when the rest never loses it (nothing to gain)."""
    return (suspected - rest) / (1.0 - rest) if rest < 1.0 else 0.0


@torch.no_grad()
def trigger_persistence(
    model: nn.Module,
    probes: torch.Tensor,
    partners: torch.Tensor,
    label: int,
    *,
    device: torch.device,
    batch_size: int = 512,
) -> float:
    """How often the model keeps ``label`` for probes blended half-and-half with images of other classes.

    STRIP (Gao et al., ACSAC 2019): a trigger survives superimposition, the content of a clean
    image does not, so inputs that carry a trigger keep their (target) label more often.

    Args:
        model: classifier in eval mode on ``device``, taking ``(N, C, H, W)`` in [0, 1].
        probes: ``(P, C, H, W)`` images of class ``label``, any device.
        partners: ``(P, B, C, H, W)`` images of other classes, ``B`` for each probe, same device as ``probes``.
        label: the class the probes are labelled with.
        device: where the model runs.
        batch_size: images per forward pass.

    Returns:
        Fraction of the ``P * B`` blended images classified as ``label``.

    Raises:
        ValueError: the shapes do not fit together, or there are no probes.
    """
    if (
        partners.ndim != probes.ndim + 1
        or partners.shape[0] != probes.shape[0]
        or partners.shape[2:] != probes.shape[1:]
    ):
        raise ValueError(f"partners must be (P, B, *image) for probes (P, *image), got {tuple(partners.shape)}")
    if partners.shape[0] * partners.shape[1] == 0:
        raise ValueError("trigger_persistence needs at least one probe and one partner")
    mixed = ((1 - _BLEND_WEIGHT) * probes[:, None] + _BLEND_WEIGHT * partners).flatten(0, 1)
    kept = sum(int((model(batch.to(device)).argmax(1) == label).sum()) for batch in torch.split(mixed, batch_size))
    return kept / len(mixed)


def detect_poisoned_samples(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    config: SpectralConfig = SpectralConfig(),
    device: torch.device,
    seed: int = 0,
    progress: Callable[[float, str], None] | None = None,
) -> SpectralReport:
    """Find the backdoor target classes of a training set and the poisoned samples in them.

    Args:
        model: the classifier trained on this data, in eval mode on ``device``, taking ``(N, C, H, W)``
            in [0, 1]; its last layer must be linear (see :func:`scanner.features.penultimate_features`).
        images: float ``(N, C, H, W)`` training images in [0, 1], any device.
        labels: int64 ``(N,)`` training labels (as trained on, i.e. poisoned labels included).
        config: hyper-parameters.
        device: where the model runs.
        seed: seeds the STRIP blend partners.
        progress: called with ``(fraction, message)``.

    Returns:
        Per-class splits (suspected component = poison for flagged classes) and the side-test evidence.

    Raises:
        FeatureExtractionError: the model has no linear head.
        ValueError: shapes do not match.
    """
    started = time.perf_counter()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    report = progress or (lambda fraction, message: None)
    report(0.0, "penultimate features")
    features = penultimate_features(
        model,
        images,
        device=device,
        batch_size=config.batch_size,
        progress=lambda fraction: report(0.6 * fraction, "penultimate features"),
    )
    report(0.6, "spectral splits")
    splits = class_splits(
        features,
        labels.to(features.device),
        config=config,
        progress=lambda fraction: report(0.6 + 0.2 * fraction, "spectral splits"),
    )
    report(0.8, "side test")
    generator = torch.Generator().manual_seed(seed)
    labels_cpu = labels.cpu()
    persistence: dict[int, tuple[float, float]] = {}
    for position, split in enumerate(splits):
        if not split.flagged:
            continue
        report(0.8 + 0.2 * position / len(splits), "side test")
        other_rows = torch.nonzero(labels_cpu != split.label).squeeze(1)
        scores = []
        for posterior in (split.posterior, 1.0 - split.posterior):
            candidates = torch.nonzero(posterior > 0.5).squeeze(1)
            chosen = candidates[torch.randperm(len(candidates), generator=generator)[: config.probe_samples]]
            picks = other_rows[torch.randint(len(other_rows), (len(chosen), config.probe_blends), generator=generator)]
            probes = images[split.indices[chosen].to(images.device)]
            partners = images[picks.to(images.device)]
            scores.append(
                trigger_persistence(model, probes, partners, split.label, device=device, batch_size=config.batch_size)
                if len(chosen)
                else 0.0
            )
        suspected, other = scores
        if other > suspected:
            split = splits[position] = split.swapped()
            suspected, other = other, suspected
        persistence[split.label] = (suspected, other)
        if persistence_gain(suspected, other) < config.min_persistence_gain:
            splits[position] = replace(split, flagged=False, unconfirmed=True)
    report(1.0, "done")
    return SpectralReport(
        classes=tuple(splits),
        persistence=persistence,
        threshold=config.threshold,
        duration_s=time.perf_counter() - started,
    )
