"""A data-free backdoor statistic: the largest logit margin each class can reach on any input.

After the maximum-margin statistic of MM-BD (Wang, Mahmood, Miller, Kesidis, "MM-BD: Post-Training Detection of
Backdoor Attacks with Arbitrary Backdoor Pattern Types Using a Maximum Margin Statistic", IEEE S&P 2024). A backdoor
teaches the model a feature (the trigger) that overrides every other class whatever the rest of the image shows; for
its target class the network can therefore be driven to a far larger margin ``logit_k - max_{j != k} logit_j`` than
for the others. No samples are needed: for every class we start from random images in [0, 1] pixel space (before the
model's normalisation), ascend the margin with Adam, keep the images in [0, 1], and take the largest margin reached.

The classes other than the largest form the null: a Gamma distribution is fitted to their statistics, and the largest
gets the order-statistic p-value ``1 - F(max) ** K`` (``K`` classes). It is flagged when that is below
``significance``. All classes of a chunk are optimised in one batched loop, each image with its own target.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from scanner.config import MaxMarginConfig
from scanner.errors import UndecidableError
from scanner.stats import GammaFit, gamma_fit, largest_p_value

__all__ = ["MIN_CLASSES", "MaxMarginResult", "margins", "max_margin"]

#: The null is fitted to the K - 1 non-maximal classes: fewer than 4 of them say too little about its shape.
MIN_CLASSES = 5

#: Input values optimised at once (with Adam's two moments and the best inputs: about 16 bytes each): 16M values
#: keep a chunk near 256 MiB whatever the image size, so a 3 x 1024 x 1024 model runs a few images at a time.
_MAX_VALUES_PER_CHUNK = 16 * 2**20
#: The optimised inputs kept for the report: those of the classes with the largest margins (the flagged class is
#: the largest). All of them would be ``K * C * H * W`` floats, unbounded for many classes of large images.
KEPT_INPUTS = 16

#: A class's optimisation counts as having moved its margin when it rose by this (relative) above the random starts'.
_MOVED = 1e-3

#: ``progress(fraction, message)`` with fraction in [0, 1] of the whole optimisation; may raise to cancel.
StepProgress = Callable[[float, str], None]


@dataclass(frozen=True, eq=False)  # holds tensors
class MaxMarginResult:
    """What :func:`max_margin` measured and decided.

    Attributes:
        statistics: per class, the largest margin reached (logit units).
        p_values: per class, ``1 - F(statistic) ** K`` under the null fitted to the non-maximal classes.
        largest_class: the class with the largest statistic.
        null: the fitted Gamma null.
        flagged_classes: ``[largest_class]`` when its p-value is below the significance, else empty.
        inputs: class -> ``(C, H, W)`` in [0, 1], the input that reached its statistic, for the
            :data:`KEPT_INPUTS` classes with the largest statistics.
        significance: the level the p-value was compared with.
        images_total: images sent through the model forward and backward.
        duration_s: wall time.
    """

    statistics: tuple[float, ...]
    p_values: tuple[float, ...]
    largest_class: int
    null: GammaFit
    flagged_classes: tuple[int, ...]
    inputs: dict[int, Tensor]
    significance: float
    images_total: int
    duration_s: float


def margins(logits: Tensor, targets: Tensor) -> Tensor:
    """``logit_target - max over the other classes`` for each row."""
    own = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], -math.inf)
    return own - others.amax(dim=1)


def _optimise_chunk(
    model: nn.Module,
    classes: list[int],
    input_shape: tuple[int, int, int],
    config: MaxMarginConfig,
    device: torch.device,
    generator: torch.Generator,
    on_step: Callable[[], None],
) -> tuple[Tensor, Tensor, Tensor]:
    """Ascend the margin of ``config.starts`` random inputs per class; return each class's best margin ``(n,)``, the
    input that reached it ``(n, C, H, W)`` and whether the optimisation raised it above the random starts' ``(n,)``,
    all on the CPU."""
    starts = config.starts
    targets = torch.tensor(classes, device=device).repeat_interleave(starts)
    images = torch.rand((len(targets), *input_shape), generator=generator).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([images], lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps, eta_min=config.lr / 100)
    best = torch.full((len(targets),), -math.inf, device=device)
    best_images = images.detach().clone()
    history: list[Tensor] = []  # each class's largest margin after every step
    for _ in range(config.steps):
        margin = margins(model(images), targets)
        with torch.no_grad():
            if not bool(torch.isfinite(margin).all()):
                raise UndecidableError(
                    "the model's logits became non-finite on inputs in [0, 1], so the maximum-margin statistic "
                    "cannot be measured"
                )
            improved = margin > best
            best = torch.where(improved, margin, best)
            best_images[improved] = images[improved]
        (gradient,) = torch.autograd.grad(-margin.sum(), images)
        images.grad = gradient
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            images.clamp_(0.0, 1.0)
        on_step()
        history.append(best.view(len(classes), starts).amax(dim=1))
        if len(history) > config.patience:
            before, now = history[-1 - config.patience], history[-1]
            if bool((now <= before + config.min_delta * before.abs()).all()):
                break
    per_start = best.view(len(classes), starts)
    top, which = per_start.max(dim=1)
    rows = torch.arange(len(classes), device=device) * starts + which
    start = history[0]  # the random starts' margins (before any update)
    moved = top > start + _MOVED * (1.0 + start.abs())
    return top.cpu(), best_images[rows].cpu(), moved.cpu()


def max_margin(
    model: nn.Module,
    num_classes: int,
    input_shape: tuple[int, int, int],
    config: MaxMarginConfig,
    *,
    device: torch.device,
    seed: int = 0,
    progress: StepProgress | None = None,
) -> MaxMarginResult:
    """Measure every class's maximum margin and test the largest against the others.

    Args:
        model: the classifier in [0, 1] pixel space (normalisation inside), on ``device``.
        num_classes: K, at least :data:`MIN_CLASSES`.
        input_shape: ``(C, H, W)`` of one input.
        config: see :class:`~scanner.config.MaxMarginConfig`.
        device: where the optimisation runs.
        seed: seeds the random starts (drawn on the CPU: the same on every device).
        progress: called after every step; may raise (cancel, time limit).

    Raises:
        UndecidableError: non-finite logits, or non-maximal statistics that leave no null to fit.
        ValueError: fewer than :data:`MIN_CLASSES` classes.
    """
    if num_classes < MIN_CLASSES:
        raise ValueError(f"the maximum-margin test needs at least {MIN_CLASSES} classes, got {num_classes}")
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    numel = input_shape[0] * input_shape[1] * input_shape[2]
    per_chunk = max(1, min(config.classes_per_chunk(), _MAX_VALUES_PER_CHUNK // (numel * config.starts)))
    chunks = [list(range(first, min(first + per_chunk, num_classes))) for first in range(0, num_classes, per_chunk)]
    total_steps = len(chunks) * config.steps
    done = 0
    images_total = 0

    def on_step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done / total_steps, f"maximising class margins: step {done} of at most {total_steps}")

    statistics: list[Tensor] = []
    moved: list[Tensor] = []
    inputs: dict[int, Tensor] = {}
    if progress is not None:
        progress(0.0, f"maximising class margins: {num_classes} classes x {config.starts} random starts")
    try:
        for chunk in chunks:
            first = done
            top, best_inputs, chunk_moved = _optimise_chunk(
                model, chunk, input_shape, config, device, generator, on_step
            )
            moved.append(chunk_moved)
            images_total += (done - first) * len(chunk) * config.starts
            done = first + config.steps  # an early stop skips the rest of the chunk's share
            statistics.append(top)
            inputs.update(zip(chunk, best_inputs, strict=True))
            if len(inputs) > KEPT_INPUTS:  # keep those of the largest statistics so far
                so_far = torch.cat(statistics)
                kept = sorted(inputs, key=lambda k: float(so_far[k]), reverse=True)[:KEPT_INPUTS]
                inputs = {k: inputs[k] for k in kept}
    finally:
        model.train(was_training)
    stuck = int((~torch.cat(moved)).sum())
    if 2 * stuck > num_classes:
        # zero or masked gradients (a model that quantises its input, say): the statistics are those of random images,
        # which would make any model look clean
        raise UndecidableError(
            f"the margins of {stuck} of {num_classes} classes did not respond to optimising the input (zero or "
            "masked gradients), so the maximum-margin statistic cannot be measured"
        )
    values = torch.cat(statistics).double().numpy()
    largest = int(np.argmax(values))
    null = _fit_null(np.delete(values, largest))
    p_values = tuple(largest_p_value(float(v), null, num_classes) for v in values)
    flagged = (largest,) if p_values[largest] < config.significance else ()
    return MaxMarginResult(
        statistics=tuple(float(v) for v in values),
        p_values=p_values,
        largest_class=largest,
        null=null,
        flagged_classes=flagged,
        inputs=inputs,
        significance=config.significance,
        images_total=images_total,
        duration_s=time.perf_counter() - started,
    )


def _fit_null(others: np.ndarray) -> GammaFit:
    """The Gamma null of the non-maximal statistics. A class that cannot even be made the top class (margin <= 0)
    is left out of the fit: a Gamma lives on positive values, and dropping the smallest ones only widens the null
    towards larger values (a conservative test)."""
    positive = others[others > 0]
    if positive.size < MIN_CLASSES - 1:
        raise UndecidableError(
            f"only {positive.size} of the {others.size} non-maximal classes can be made the top class on any input "
            "found, too few to fit the null of the maximum-margin test"
        )
    try:
        return gamma_fit(positive)
    except ValueError as exc:
        raise UndecidableError(f"the maximum-margin null cannot be fitted: {exc}") from exc
