"""Neural Cleanse: reverse-engineer a minimal trigger per class, then look for a class whose trigger is tiny.

Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019.

For every class ``k`` we look for the smallest mask ``m`` (H, W), shared across channels and kept in [0, 1]
through ``tanh``, and a pattern ``p`` (C, H, W) in [0, 1] such that ``(1 - m) * x + m * p`` is classified as
``k`` for at least ``attack_success_threshold`` of the clean samples. The loss is cross-entropy plus
``cost * |m|_1``, optimised with Adam; ``cost`` follows the paper's schedule (0 until the attack succeeds for
``patience`` steps, then ``init_cost``, then x``cost_multiplier`` up / ÷``cost_multiplier**1.5`` down), the best
(smallest-L1) mask that met the threshold is kept as float, and a class stops early once its best mask stopped
improving. A backdoor target needs a much smaller trigger than the other classes: the MAD anomaly index of the
masks' L1 norms (:mod:`scanner.stats`) finds it.

Unlike the published implementations, which optimise one class at a time, all classes of a chunk are optimised
in the same forward/backward pass, each with its own mask, pattern, cost schedule and early stop; a finished
class leaves the batch. Adam is element-wise, so optimising a chunk of classes with one optimizer is the same
algorithm as optimising each class alone; ``chunk_size=1`` is the sequential original, run by the same code.
"""

from __future__ import annotations

import base64
import copy
import functools
import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from scanner.config import NeuralCleanseConfig
from scanner.errors import TooFewClassesError
from scanner.stats import anomaly_index, null_thresholds, seeded_subset, small_outliers, smallest_z
from scanner.trigger import Trigger, attack_success_rate

__all__ = [
    "ClassTrigger",
    "NeuralCleanseConfig",
    "NeuralCleanseResult",
    "decision_thresholds",
    "mask_png",
    "neural_cleanse",
    "reverse_engineer_triggers",
]

logger = logging.getLogger(__name__)

_MIN_L1 = 1e-3  # a mask of (almost) no pixels: keeps log(L1) finite
_EPSILON = 1e-7  # keeps tanh-space parameters finite when a mask value starts at exactly 0 or 1
#: stamped images per pass on the CPU (bench/nc_passes.py, mnist_cnn, 2 threads, 32 MiB L3): 96-101 us per image
#: in passes of 128-192 images, 167 us in one 320-image pass of 10 classes, 138 us in the sequential 32-image pass
_CPU_IMAGES_PER_PASS = 128
_CONFIRM_ROUND_WIDTH = 0.25  # of one round, on the progress bar
_REVERSING = 0.99  # of the progress bar: the trigger searches; the attack success rates take the rest
_RESTART_SEED_STEP = 7919  # restart r runs with seed + r * this: another start and another sample order
_TYPICAL_STEPS = 180  # schedule steps of one class's full search (bench: 140-300), for the progress bar

#: ``progress(fraction, message)`` with fraction in [0, 1] of the whole reverse-engineering.
StepProgress = Callable[[float, str], None]


@dataclass(frozen=True)
class ClassTrigger:
    """The reversed trigger of one class, and how its search went.

    Attributes:
        target: the class.
        trigger: the best mask and pattern that met the threshold, or the last ones (float32, on the CPU).
        mask_l1: ``mask.sum()``; the statistic the outlier test uses.
        reached_threshold: whether any step met the attack-success threshold.
        steps: schedule steps run for this class.
        converged: whether the class met the threshold and stopped by its early stop (its cost schedule went both
            up and down, then the best mask stopped shrinking), not at ``max_steps``: only then is ``mask_l1`` a
            near-minimal trigger size that the outlier test may use.
        images: stamped images this class's search sent through the model (forward and backward): its work.
        screened_out: the class stopped after the screen (see ``NeuralCleanseConfig.screen_above``): its mask was
            not among the smallest and it was not drawn as a reference, so ``mask_l1`` is only an upper bound and
            the outlier test leaves the class out.
    """

    target: int
    trigger: Trigger
    mask_l1: float
    reached_threshold: bool
    steps: int
    converged: bool = False
    screened_out: bool = False
    images: int = 0

    @property
    def mask(self) -> Tensor:
        """(H, W) float32 in [0, 1]."""
        return self.trigger.mask

    @property
    def pattern(self) -> Tensor:
        """(C, H, W) float32 in [0, 1]."""
        return self.trigger.pattern


@dataclass
class _Schedule:
    """The per-class cost schedule and early stop of the original algorithm."""

    config: NeuralCleanseConfig
    cost: float = 0.0
    best_l1: float = math.inf
    early_stop_best: float = math.inf
    set_counter: int = 0
    up_counter: int = 0
    down_counter: int = 0
    early_stop_counter: int = 0
    went_up: bool = False
    went_down: bool = False
    steps: int = 0
    converged: bool = False

    def update(self, success: float, l1: float) -> tuple[bool, bool]:
        """Record one step; returns (this step's mask is the new best, the class should stop)."""
        cfg = self.config
        self.steps += 1
        improved = success >= cfg.attack_success_threshold and l1 < self.best_l1
        if improved:
            self.best_l1 = l1
        if self.best_l1 < math.inf:
            # the original resets on any improvement (min_delta 0); a relative min_delta ignores slow drift
            if self.best_l1 < (1 - cfg.early_stop_min_delta) * self.early_stop_best:
                self.early_stop_counter = 0
                self.early_stop_best = self.best_l1
            else:
                self.early_stop_counter += 1
        stop = self.went_up and self.went_down and self.early_stop_counter >= cfg.early_stop_patience
        self.converged = stop and self.best_l1 < math.inf

        if self.cost == 0.0 and success >= cfg.attack_success_threshold:
            self.set_counter += 1
            if self.set_counter >= cfg.patience:
                self.cost = cfg.init_cost
                self.up_counter = self.down_counter = 0
                self.went_up = self.went_down = False
        else:
            self.set_counter = 0
        if success >= cfg.attack_success_threshold:
            self.up_counter += 1
            self.down_counter = 0
        else:
            self.up_counter = 0
            self.down_counter += 1
        if self.up_counter >= cfg.patience:
            self.up_counter = 0
            self.cost *= cfg.cost_multiplier
            self.went_up = True
        elif self.down_counter >= cfg.patience:
            self.down_counter = 0
            self.cost /= cfg.cost_multiplier**1.5
            self.went_down = True
        return improved, stop or self.steps >= cfg.max_steps


@dataclass(frozen=True)
class _Screen:
    """After ``steps`` schedule steps, only the ``candidates`` classes with the smallest masks so far and the classes
    in ``keep`` (the references) go on; the others stop, screened out."""

    steps: int
    candidates: int
    keep: frozenset[int]
    batch_size: int = 8

    @property
    def share(self) -> float:
        """A screened-out class's part of a full search, on the progress bar."""
        return min(0.5, self.steps / _TYPICAL_STEPS)

    def survivors(self, targets: Sequence[int], best_l1: Sequence[float], l1_now: Sequence[float]) -> set[int]:
        """Rows of ``targets`` that go on. A class that has not met the threshold yet ranks after every one that has
        (by its current mask), so a hard class is never preferred to an easy one."""
        ranked = sorted(range(len(targets)), key=lambda row: (best_l1[row] == math.inf, best_l1[row], l1_now[row]))
        return set(ranked[: self.candidates]) | {row for row, target in enumerate(targets) if target in self.keep}


def _to_unit(raw: Tensor) -> Tensor:
    # the authors' map; dividing by (2 - eps) overshoots [0, 1] by ~3e-8 where tanh saturates, so clamp: a mask
    # pixel driven to 0 once came out as -6e-8 and failed the trigger's range check
    return (torch.tanh(raw) / (2 - _EPSILON) + 0.5).clamp(0.0, 1.0)


def _from_unit(values: Tensor) -> Tensor:
    return torch.atanh((values - 0.5) * (2 - _EPSILON))


def _initial_parameters(targets: Sequence[int], shape: tuple[int, int, int], seed: int) -> tuple[Tensor, Tensor]:
    """Random start (uniform in [0, 1], as the authors' code) per class, independent of the chunking."""
    channels, height, width = shape
    masks, patterns = [], []
    for target in targets:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + target)
        masks.append(torch.rand((1, height, width), generator=generator))
        patterns.append(torch.rand((channels, height, width), generator=generator))
    return _from_unit(torch.stack(masks)), _from_unit(torch.stack(patterns))


def _optimise_chunk(
    model: nn.Module,
    images: Tensor,
    targets: list[int],
    num_classes: int,
    config: NeuralCleanseConfig,
    seed: int,
    on_step: Callable[[list[float]], None],
    screen: _Screen | None = None,
) -> list[ClassTrigger]:
    """Reverse-engineer the triggers of ``targets`` together. ``images``: (N, C, H, W) in [0, 1] on the device.
    With ``screen``, the classes it does not keep stop after its steps."""
    device = images.device
    count, channels, height, width = images.shape
    mask_raw, pattern_raw = _initial_parameters(targets, (channels, height, width), seed)
    mask_raw = mask_raw.to(device).requires_grad_(True)  # (B, 1, H, W)
    pattern_raw = pattern_raw.to(device).requires_grad_(True)  # (B, C, H, W)
    optimizer = torch.optim.Adam([mask_raw, pattern_raw], lr=config.lr, betas=config.betas)
    target_ids = torch.tensor(targets, device=device)
    schedules = [_Schedule(config) for _ in targets]
    best_masks = _to_unit(mask_raw.detach()).clone()
    best_patterns = _to_unit(pattern_raw.detach()).clone()
    costs = torch.zeros(len(targets), device=device)
    batch_size = min(config.batch_size, count)
    batches = config.batches_per_step or math.ceil(count / batch_size)
    order_generator = torch.Generator().manual_seed(seed)  # the same sample order for every chunk
    memory_format = _memory_format(model)
    order = torch.empty(0, dtype=torch.long)
    active = list(range(len(targets)))
    window = config.success_window or batches
    history = torch.zeros(len(targets), window)  # success rate of each class's last `window` mini-batches
    seen = 0
    screened_out: set[int] = set()
    rows_all = range(len(targets))
    images_seen = np.zeros(len(targets), dtype=np.int64)

    low_precision = _autocast_dtype(config, device)

    while active:
        rows = torch.tensor(active, device=device)
        # the screen ranks the classes on fewer samples per mini-batch: every class is still in it, and it only
        # has to find the small masks, not size them
        screening = screen is not None and schedules[active[0]].steps < screen.steps
        size = min(screen.batch_size, batch_size) if screen is not None and screening else batch_size
        per_pass = _classes_per_pass(config, size, device)
        for _ in range(batches):
            if order.numel() < size:
                order = torch.cat([order, torch.randperm(count, generator=order_generator)])
            batch, order = images[order[:size].to(device)], order[size:]
            optimizer.zero_grad(set_to_none=True)
            hits: list[Tensor] = []
            # each class's loss depends on its own mask and pattern only: passes over groups of classes add up to
            # the gradient of one pass over all of them
            for group in torch.split(rows, per_pass):
                mask = _to_unit(mask_raw[group])  # (G, 1, H, W)
                pattern = _to_unit(pattern_raw[group])  # (G, C, H, W)
                # stamped: (G, n, C, H, W)
                stamped = (1 - mask).unsqueeze(1) * batch.unsqueeze(0) + (mask * pattern).unsqueeze(1)
                inputs = stamped.flatten(0, 1).contiguous(memory_format=memory_format)
                with torch.autocast(device.type, dtype=low_precision or torch.float32, enabled=bool(low_precision)):
                    logits = model(inputs)
                logits = logits.float().view(len(group), size, num_classes)
                wanted = target_ids[group]
                cross_entropy = F.cross_entropy(
                    logits.flatten(0, 1), wanted.repeat_interleave(size), reduction="none"
                ).view(len(group), size)
                l1 = mask.sum(dim=(1, 2, 3))
                loss = (cross_entropy.mean(dim=1) + costs[group] * l1).sum()
                torch.autograd.backward(loss)
                hits.append((logits.detach().argmax(dim=2) == wanted.unsqueeze(1)).float().mean(dim=1))
            optimizer.step()
            history[torch.tensor(active), seen % window] = torch.cat(hits).cpu()
            images_seen[active] += size
            seen += 1

        with torch.no_grad():
            masks_now = _to_unit(mask_raw[rows])
            patterns_now = _to_unit(pattern_raw[rows])
            l1_now = masks_now.sum(dim=(1, 2, 3)).tolist()
        success = history[active, : min(seen, window)].mean(dim=1).tolist()
        still_active = []
        for slot, row in enumerate(active):
            improved, stop = schedules[row].update(success[slot], l1_now[slot])
            if improved:
                best_masks[row] = masks_now[slot]
                best_patterns[row] = patterns_now[slot]
            costs[row] = schedules[row].cost
            if not stop:
                still_active.append(row)
        if screen is not None and schedules[active[0]].steps == screen.steps:  # active classes step together
            going_on = screen.survivors(
                [targets[row] for row in active], [schedules[row].best_l1 for row in active], l1_now
            )
            screened_out = {row for slot, row in enumerate(active) if slot not in going_on}
            still_active = [row for row in still_active if row not in screened_out]
        on_step([_class_progress(schedules[row], row in still_active, row in screened_out, screen) for row in rows_all])
        if len(still_active) < len(active):  # finished classes leave the batch
            active = still_active

    triggers = []
    for row, target in enumerate(targets):
        schedule = schedules[row]
        mask = best_masks[row, 0].detach().float().cpu()
        if schedule.best_l1 == math.inf:  # never met the threshold: report where the optimisation ended
            mask = _to_unit(mask_raw[row, 0]).detach().float().cpu()
            pattern = _to_unit(pattern_raw[row]).detach().float().cpu()
        else:
            pattern = best_patterns[row].detach().float().cpu()
        triggers.append(
            ClassTrigger(
                target=target,
                trigger=Trigger(mask=mask, pattern=pattern),
                mask_l1=float(mask.sum()),
                reached_threshold=schedule.best_l1 < math.inf,
                steps=schedule.steps,
                images=int(images_seen[row]),
                converged=schedule.converged,
                screened_out=row in screened_out,
            )
        )
    return triggers


def _class_progress(schedule: _Schedule, active: bool, screened_out: bool, screen: _Screen | None) -> float:
    """One class's part done, in [0, 1], never going back: a class is done when it stops; until then
    ``s / (s + early_stop_patience)`` grows towards 1 (``s`` the steps after the screen, which takes ``screen.share``).
    """
    if screened_out:
        return screen.share if screen is not None else 1.0
    if not active:
        return 1.0
    patience = schedule.config.early_stop_patience
    if screen is None:
        return schedule.steps / (schedule.steps + patience)
    if schedule.steps <= screen.steps:
        return screen.share * schedule.steps / screen.steps
    after = schedule.steps - screen.steps
    return screen.share + (1 - screen.share) * after / (after + patience)


def _classes_per_pass(config: NeuralCleanseConfig, batch_size: int, device: torch.device) -> int:
    """Classes whose stamped mini-batches go through the model together (see ``images_per_pass``)."""
    images = config.images_per_pass
    if images is None:
        images = _CPU_IMAGES_PER_PASS if device.type == "cpu" else config.max_images_per_forward
    return max(1, images // batch_size)


def _autocast_dtype(config: NeuralCleanseConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the model's passes (``config.precision``), or None for float32."""
    if config.precision == "fp32":
        return None
    if config.precision == "bf16" or (device.type == "cpu" and _cpu_has_native_bf16()):
        return torch.bfloat16
    return None


@functools.cache
def _cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (Linux CPU flags); elsewhere bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _smallest(runs: list[ClassTrigger]) -> ClassTrigger:
    """Of one class's restarts, the smallest mask that met the threshold (or the smallest at all); steps add up, and
    the class converged when any run did (the smallest valid mask is then no larger than a converged run's)."""
    valid = [t for t in runs if t.reached_threshold] or runs
    best = min(valid, key=lambda t: t.mask_l1)
    return replace(
        best,
        steps=sum(t.steps for t in runs),
        images=sum(t.images for t in runs),
        converged=any(t.converged for t in runs),
    )


def reverse_engineer_triggers(
    model: nn.Module,
    images: Tensor,
    num_classes: int,
    config: NeuralCleanseConfig = NeuralCleanseConfig(),
    *,
    seed: int = 0,
    classes: Sequence[int] | None = None,
    progress: StepProgress | None = None,
    screen_references: Sequence[int] | None = None,
) -> list[ClassTrigger]:
    """Find the minimal trigger of each class, ``chunk_size`` classes per forward/backward pass.

    With ``config.restarts > 1`` every class is optimised that many times from different starts, and the
    smallest valid mask is kept (less variance in each class's L1, so a steadier outlier test).

    With ``screen_references``, the first run screens (see ``NeuralCleanseConfig.screen_above``): after
    ``config.screen_steps`` steps only the ``config.screen_candidates`` smallest masks (shared out over the chunks)
    and these classes go on; the screened-out classes come back with ``screened_out`` set, and further restarts run
    only the others.

    Args:
        model: classifier taking (N, C, H, W) images in [0, 1]; eval mode. Runs on the device of ``images``.
        images: clean samples (N, C, H, W) in [0, 1].
        num_classes: K, the model's output size.
        config: hyper-parameters.
        seed: makes the run deterministic on the CPU (initial masks, sample order).
        classes: which classes to reverse (default all K).
        progress: called after every step with an estimate of the fraction done.
        screen_references: screen first, always refining these classes.

    Returns:
        One :class:`ClassTrigger` per class, in the order of ``classes``.
    """
    targets = list(range(num_classes)) if classes is None else list(classes)
    was_training = model.training
    model.eval()
    # only the masks and patterns learn: gradients for the weights would cost a third more per step (measured
    # 103 vs 67 ms per batched step on mnist_cnn, one thread) and would pile up in the caller's model
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        working = _channels_last_copy(model) if config.channels_last and images.dim() == 4 else model
        return _reverse_all(working, images, targets, num_classes, config, seed, progress, screen_references)
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
        model.train(was_training)


def _memory_format(model: nn.Module) -> torch.memory_format:
    """Channels-last when the model's convolutions were converted to it (see :func:`_channels_last_copy`)."""
    four_d = [p for p in model.parameters() if p.dim() == 4]
    if four_d and all(p.is_contiguous(memory_format=torch.channels_last) for p in four_d):
        return torch.channels_last
    return torch.contiguous_format


def _channels_last_copy(model: nn.Module) -> nn.Module:
    """A channels-last copy of a convolutional model: pooling and convolution kernels run faster on it (a batched
    step of mnist_cnn measured 67 -> 50 ms on one thread). The caller's model is left as it is."""
    if not any(p.dim() == 4 for p in model.parameters()):
        return model
    try:
        return copy.deepcopy(model).to(memory_format=torch.channels_last)
    except Exception:  # a model that cannot be copied or converted still runs, in its own format
        logger.debug("channels-last copy failed; using the model as it is", exc_info=True)
        return model


def _reverse_all(
    model: nn.Module,
    images: Tensor,
    targets: list[int],
    num_classes: int,
    config: NeuralCleanseConfig,
    seed: int,
    progress: StepProgress | None,
    screen_references: Sequence[int] | None,
) -> list[ClassTrigger]:
    keep = seeded_subset(images.shape[0], config.max_samples, seed)
    if keep is not None:
        images = images[keep.to(images.device)]
    chunk = config.classes_per_chunk()
    chunks = [targets[start : start + chunk] for start in range(0, len(targets), chunk)]
    total = float(config.restarts * len(targets))  # class-runs, on the progress bar
    if screen_references is not None:  # the first run's screened-out classes count a screen's share
        refined = min(len(targets), config.screen_candidates + len(screen_references))
        share = _Screen(config.screen_steps, 0, frozenset()).share
        total = (len(targets) - refined) * share + config.restarts * refined
    found: list[ClassTrigger] = []
    finished = 0.0  # class-runs done so far

    def run(restart: int, chunk_targets: list[int], screen: _Screen | None, label: str) -> None:
        nonlocal finished

        def on_step(class_progress: list[float], start: float = finished) -> None:
            if progress is not None:
                progress(min(1.0, (start + sum(class_progress)) / total), f"reversing triggers ({label})")

        with torch.enable_grad():
            run_seed = seed + restart * _RESTART_SEED_STEP
            done = _optimise_chunk(model, images, chunk_targets, num_classes, config, run_seed, on_step, screen)
        found.extend(done)
        finished += sum(screen.share if screen is not None and t.screened_out else 1.0 for t in done)

    first_restart = 0
    if screen_references is not None:  # restart 0 screens every class; later restarts refine the survivors
        keep_classes = frozenset(screen_references)
        for number, chunk_targets in enumerate(chunks, start=1):
            candidates = math.ceil(config.screen_candidates * len(chunk_targets) / len(targets))
            screen = _Screen(config.screen_steps, candidates, keep_classes, config.screen_batch_size)
            run(0, chunk_targets, screen, f"screen {number}/{len(chunks)}")
        survivors = [t.target for t in found if not t.screened_out]
        chunks = [survivors[start : start + chunk] for start in range(0, len(survivors), chunk)]
        first_restart = 1
    rounds = [(restart, chunk_targets) for restart in range(first_restart, config.restarts) for chunk_targets in chunks]
    for number, (restart, chunk_targets) in enumerate(rounds, start=1):
        run(restart, chunk_targets, None, f"{number}/{len(rounds)}")
    by_class: dict[int, list[ClassTrigger]] = {}
    for trigger in found:
        by_class.setdefault(trigger.target, []).append(trigger)
    return [_smallest(by_class[target]) for target in targets]


@dataclass(frozen=True)
class NeuralCleanseResult:
    """Per-class triggers and the outlier test over their L1 norms.

    ``anomaly_indices`` are the ones flags are decided on (on ``config.anomaly_scale``); ``anomaly_indices_l1``
    are the paper's, on raw L1 norms, reported for comparison. Both are NaN for screened-out classes, which are not
    tested; ``reference_classes`` lists the classes whose median and MAD set the scale when the run screened
    (``None``: all classes). ``smallest_class`` is the tested class with the smallest mask and ``smallest_z`` its
    distance below the others (:func:`scanner.stats.smallest_z`), flagged above ``z_threshold`` (``None``: the MAD
    test alone, ``threshold``).
    """

    triggers: list[ClassTrigger]
    anomaly_indices: list[float]
    anomaly_indices_l1: list[float]
    flagged: list[bool]
    attack_success_rates: list[float]
    threshold: float
    duration_s: float
    steps_total: int = field(default=0)
    images_total: int = field(default=0)
    rounds: int = field(default=1)
    reference_classes: list[int] | None = field(default=None)
    smallest_class: int | None = field(default=None)
    smallest_z: float = field(default=math.nan)
    z_threshold: float | None = field(default=None)

    @property
    def flagged_classes(self) -> list[int]:
        return [t.target for t, flag in zip(self.triggers, self.flagged, strict=True) if flag]

    @property
    def unconverged_classes(self) -> list[int]:
        """Classes whose trigger search did not converge (see :attr:`ClassTrigger.converged`). The outlier test
        needs every class's near-minimal trigger size: while any class is listed here, the flags decide nothing
        (a class stopped early is an upper bound that can hide a target or make a clean class look small)."""
        return [t.target for t in self.triggers if not t.converged and not t.screened_out]


def _attack_success_rates(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    triggers: Sequence[ClassTrigger],
    progress: StepProgress | None,
) -> list[float]:
    """For each reversed trigger: the fraction of other classes' samples that it sends to its class (nan: none, or a
    screened-out class, whose trigger is not tested: 78 of 100 classes in a screened scan)."""
    device = images.device
    rates = []
    for number, trigger in enumerate(triggers):
        if progress is not None:
            progress(_REVERSING + (1 - _REVERSING) * number / len(triggers), f"attack success rates ({number})")
        if trigger.screened_out or not bool((labels != trigger.target).any()):
            rates.append(float("nan"))
            continue
        rates.append(
            attack_success_rate(model, images, labels.to(device), trigger.trigger, trigger.target, device=device)
        )
    return rates


def neural_cleanse(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    config: NeuralCleanseConfig = NeuralCleanseConfig(),
    *,
    seed: int = 0,
    progress: StepProgress | None = None,
) -> NeuralCleanseResult:
    """Run Neural Cleanse on a classifier.

    Every class is reversed ``config.restarts`` times; while the decision is close (see
    ``NeuralCleanseConfig.confirm_rounds``) up to ``config.confirm_rounds`` more rounds follow, and each class
    keeps its smallest valid mask over all of them.

    Args:
        model: classifier taking (N, C, H, W) images in [0, 1]; eval mode; on the device of ``images``.
        images: clean, correctly labelled samples (N, C, H, W) in [0, 1].
        labels: (N,) int64 labels of ``images``.
        num_classes: K.
        config: hyper-parameters.
        seed: determinism on the CPU.
        progress: ``progress(fraction, message)``.

    Returns:
        The triggers, anomaly indices, flags and the attack success rate of each reversed trigger. The flags decide
        something only when every class converged (:attr:`NeuralCleanseResult.unconverged_classes` is empty).

    Raises:
        TooFewClassesError: ``num_classes < 3``: the median and MAD of two trigger sizes never flag either class.
    """
    if num_classes < 3:
        raise TooFewClassesError(
            f"Neural Cleanse needs at least 3 classes for its outlier test; the model has {num_classes} (the median "
            "and MAD of two trigger sizes put both at the same distance, so it could never flag a class)"
        )
    started = time.perf_counter()
    # one seeded subset of at most max_samples serves the trigger search and the attack success rates, so the
    # memory and time of the whole detector are bounded whatever the number of uploaded samples
    keep = seeded_subset(images.shape[0], config.max_samples, seed)
    if keep is not None:
        images, labels = images[keep.to(images.device)], labels[keep.to(labels.device)]
    most_rounds = config.restarts + config.confirm_rounds

    # the progress bar gives each confirmation round a quarter of a round's width: most scans never run one
    # (about a fifth of clean models and the weak backdoors do), and the bar must not sit at half-way for them
    bar = config.restarts + _CONFIRM_ROUND_WIDTH * config.confirm_rounds

    def share(first: int, count: int) -> StepProgress | None:
        """Progress of rounds ``first .. first + count`` on the bar."""
        if progress is None:
            return None
        if first < config.restarts:
            return lambda fraction, message: progress(_REVERSING * (first + count * fraction) / bar, message)
        start = config.restarts + _CONFIRM_ROUND_WIDTH * (first - config.restarts)
        prefix = f"close call, confirmation round {first + 1}: "
        return lambda fraction, message: progress(
            _REVERSING * (start + _CONFIRM_ROUND_WIDTH * count * fraction) / bar, prefix + message
        )

    references = _reference_classes(num_classes, config, seed)
    triggers = reverse_engineer_triggers(
        model,
        images,
        num_classes,
        config,
        seed=seed,
        progress=share(0, config.restarts),
        screen_references=references,
    )
    rounds = config.restarts
    test = _OutlierTest.of(triggers, config, references)
    while rounds < most_rounds and test.close_call(config.confirm_margin):
        refined = test.confirmed_classes(triggers)
        if not refined:  # screened, and only references lie on the small side: they keep their one run
            break
        logger.debug("Neural Cleanse: close call (threshold %.2f), confirmation round %d", test.threshold, rounds + 1)
        again = reverse_engineer_triggers(
            model,
            images,
            num_classes,
            replace(config, restarts=1),
            seed=seed + rounds * _RESTART_SEED_STEP,  # the same run as restart number `rounds` would be
            classes=refined,
            progress=share(rounds, 1),
        )
        rerun = {t.target: t for t in again}
        triggers = [_smallest([t, rerun[t.target]]) if t.target in rerun else t for t in triggers]
        rounds += 1
        test = _OutlierTest.of(triggers, config, references)
    rates = _attack_success_rates(model, images, labels, triggers, progress)
    if progress is not None:
        progress(1.0, "outlier test")
    smallest_row, z = test.smallest()
    return NeuralCleanseResult(
        triggers=triggers,
        anomaly_indices=[float(i) for i in test.indices()],
        anomaly_indices_l1=[float(i) for i in test.on_scale(_l1_norms(triggers)).indices()],
        flagged=[bool(f) for f in test.flagged()],
        attack_success_rates=rates,
        threshold=test.threshold,
        duration_s=time.perf_counter() - started,
        steps_total=sum(t.steps for t in triggers),
        images_total=sum(t.images for t in triggers),
        rounds=rounds,
        reference_classes=references,
        smallest_class=triggers[smallest_row].target,
        smallest_z=z,
        z_threshold=test.z_threshold,
    )


def _l1_norms(triggers: Sequence[ClassTrigger]) -> npt.NDArray[np.float64]:
    return np.array([max(t.mask_l1, _MIN_L1) for t in triggers], dtype=np.float64)


def _reference_classes(num_classes: int, config: NeuralCleanseConfig, seed: int) -> list[int] | None:
    """The classes a screened run refines whatever their size (a seeded random sample), or ``None`` when the run
    does not screen (see ``NeuralCleanseConfig.screen_above``)."""
    if not config.screens(num_classes):
        return None
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_classes, generator=generator)[: config.screen_references].tolist())


_INDEX_SHARE = 0.2  # of the false-positive rate, for the MAD index when the z test runs beside it
_MANY_CLASSES = 32  # above this: the MAD index alone (the z test was measured on 10 classes) on a heavy-tailed null


@dataclass(frozen=True)
class _OutlierTest:
    """The outlier tests over the classes' trigger sizes: on ``statistic`` (one value per class), tested on the
    classes in ``tested`` (all but the screened-out ones), against ``reference`` (all tested classes, or a screened
    run's references): the MAD index of every class against ``threshold``, and the smallest class's z against
    ``z_threshold`` (``None``: the MAD test alone)."""

    statistic: npt.NDArray[np.float64]
    tested: npt.NDArray[np.bool_]
    reference: npt.NDArray[np.bool_]
    threshold: float
    z_threshold: float | None = None
    close_threshold: float | None = None  # where a close call starts (default: (1 - margin) x threshold)
    close_z_threshold: float | None = None

    @classmethod
    def of(
        cls, triggers: Sequence[ClassTrigger], config: NeuralCleanseConfig, references: Sequence[int] | None
    ) -> _OutlierTest:
        l1 = _l1_norms(triggers)
        tested = np.array([not t.screened_out for t in triggers])
        reference = tested if references is None else np.isin([t.target for t in triggers], references)
        count = None if references is None else len(references)
        threshold, z_threshold = decision_thresholds(config, len(triggers), count)
        close, close_z = close_call_thresholds(config, len(triggers), count)
        statistic = np.log(l1) if config.anomaly_scale == "log" else l1
        return cls(statistic, tested, reference, threshold, z_threshold, close, close_z)

    def on_scale(self, values: npt.NDArray[np.float64]) -> _OutlierTest:
        """The same test on other values (the paper's raw L1 norms, for comparison)."""
        return replace(self, statistic=values)

    def indices(self) -> npt.NDArray[np.float64]:
        """Anomaly index of every tested class; NaN for the others."""
        return np.where(self.tested, anomaly_index(self.statistic, self.reference), np.nan)

    def smallest(self) -> tuple[int, float]:
        """The row of the smallest tested class and its z (see :func:`scanner.stats.smallest_z`)."""
        return smallest_z(self.statistic, self.reference, self.tested)

    def flagged(self) -> npt.NDArray[np.bool_]:
        flags = self.tested & small_outliers(self.statistic, self.threshold, self.reference)
        if self.z_threshold is not None:
            row, z = self.smallest()
            flags[row] |= z > self.z_threshold
        return flags

    def confirmed_classes(self, triggers: Sequence[ClassTrigger]) -> list[int]:
        """The classes a confirmation round reverses again: every tested class, or in a screened run only the
        candidates below the references' median (the small side, where a flag can be). The references keep their
        one run, so the median and MAD stay as they are and a candidate's index can only rise: the shortcut never
        hides a flag, and the confirmation of a 100-class scan re-runs a few classes instead of two dozen."""
        return [t.target for t, row in zip(triggers, self.confirmed_rows(), strict=True) if row]

    def confirmed_rows(self) -> npt.NDArray[np.bool_]:
        """:meth:`confirmed_classes` as a mask over the rows."""
        if np.array_equal(self.reference, self.tested):
            return self.tested.copy()
        below = self.statistic < np.median(self.statistic[self.reference])
        return self.tested & ~self.reference & below

    def close_call(self, margin: float) -> bool:
        """Whether a statistic lies in its close band while none is clearly above its threshold (more than
        ``margin``, relative): the largest small-side index of the tested classes, and the smallest class's z. A
        band starts at ``close_threshold`` / ``close_z_threshold`` (``(1 - margin)`` times the threshold when not
        given)."""
        small_side = self.tested & (self.statistic < np.median(self.statistic[self.reference]))
        bands = []  # (value, band start, threshold)
        if small_side.any():
            largest = float(anomaly_index(self.statistic, self.reference)[small_side].max())
            bands.append((largest, self.close_threshold, self.threshold))
        if self.z_threshold is not None:
            bands.append((self.smallest()[1], self.close_z_threshold, self.z_threshold))
        if any(value > threshold * (1 + margin) for value, _, threshold in bands):
            return False  # flagged whatever another round finds
        return any(value >= (threshold * (1 - margin) if start is None else start) for value, start, threshold in bands)


def close_call_thresholds(
    config: NeuralCleanseConfig, num_classes: int, references: int | None = None
) -> tuple[float | None, float | None]:
    """Where the close-call bands of the MAD index and of the smallest class's z start: calibrated like the decision
    thresholds but at ``config.confirm_rate`` (the share of outlier-free models that get a second round); ``None``
    (``(1 - confirm_margin)`` times the threshold) with a fixed threshold."""
    if config.anomaly_threshold is not None or num_classes < 3:
        return None, None
    share = _index_share(config, num_classes, references)
    thresholds = null_thresholds(
        num_classes, config.confirm_rate, references, share, tail_dof=_tail_dof(config, num_classes)
    )
    return thresholds.index, thresholds.z


def decision_thresholds(
    config: NeuralCleanseConfig, num_classes: int, references: int | None = None
) -> tuple[float, float | None]:
    """The thresholds of the MAD anomaly index and of the smallest class's z (``None``: not tested): fixed (the
    index alone), or calibrated to ``num_classes`` (and to a screened run's ``references``)."""
    if config.anomaly_threshold is not None:
        return config.anomaly_threshold, None
    if num_classes < 3:  # a median and MAD of two values say nothing: fall back to the paper's threshold
        return 2.0, None
    share = _index_share(config, num_classes, references)
    thresholds = null_thresholds(
        num_classes, config.false_positive_rate, references, share, tail_dof=_tail_dof(config, num_classes)
    )
    return thresholds.index, thresholds.z


def _tail_dof(config: NeuralCleanseConfig, num_classes: int) -> float | None:
    """The null's Student-t degrees of freedom (``None``: normal): heavy-tailed above ``_MANY_CLASSES`` classes (see
    ``NeuralCleanseConfig.many_classes_tail_dof``)."""
    return config.many_classes_tail_dof if num_classes > _MANY_CLASSES else None


def _index_share(config: NeuralCleanseConfig, num_classes: int, references: int | None) -> float:
    """The MAD index's part of the false-positive rate: all of it without the z test, in a screened run and above
    ``_MANY_CLASSES`` classes.

    The z test was measured on 10-class models only. On the clean 100-class bench model the smallest of 100 clean
    classes lies further out than the normal null assumes (z flagged a class on one of two screened seeds), and a
    mean and standard deviation are not robust to that tail: many classes keep the MAD test alone, on a
    heavy-tailed null (``NeuralCleanseConfig.many_classes_tail_dof``)."""
    if not config.z_test or references is not None or num_classes > _MANY_CLASSES:
        return 1.0
    return _INDEX_SHARE


def mask_png(values: Tensor) -> bytes:
    """Encode a (H, W) mask or a (C, H, W) pattern in [0, 1] as an 8-bit PNG (for people, not statistics)."""
    array = (values.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    if array.ndim == 3:
        array = array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png_base64(values: Tensor) -> str:
    return base64.b64encode(mask_png(values)).decode("ascii")
