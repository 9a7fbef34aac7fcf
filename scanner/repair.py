"""Repair: remove a found backdoor by unlearning its reversed trigger and holding down its margin.

Neural Cleanse's mitigation (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
Networks", IEEE S&P 2019, section VI): fine-tune the model on clean samples of which a fraction carries the trigger
that the scan reversed, each kept at its true label, so the model learns that the trigger means nothing. A
distillation term keeps the unstamped samples' outputs where the original model had them. A margin term (after the
mitigation of MM-BD, Wang et al., IEEE S&P 2024) holds the largest logit margin each repaired class can reach on
any input under the other classes' median: a trigger that works anywhere (random position, blend, a sinusoid) keeps
a margin that stamping at one place does not remove, and the data-free test would still flag it.

Measured on the coverage bench's models (``bench/repair.py``): with 500 clean samples the real trigger's success
fell below 10% (0.000-0.077) on all 18 backdoored models, at 1.8 points of clean accuracy at most, and the re-scan
of every repaired file flagged nothing; with 200 samples the removal cost 2-8 points (first increment). Give as many
clean samples as you can.

The clean samples are split first (seeded): the fine-tuning sees only the training part, and the held-out part
measures, before and after, the clean accuracy and the attack success rate of each reversed trigger.
:func:`unlearn` leaves the judgement to its caller; :func:`repair_checkpoint` (the CLI's and the service's) holds it
to ``max_accuracy_drop``, saves the model and scans the saved file again.
"""

from __future__ import annotations

import copy
import io
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from scanner.classifier import NormalizedClassifier, check_samples, predict, with_normalization
from scanner.config import ModelOptions, RepairConfig, ScanConfig
from scanner.detectors import Progress
from scanner.detectors.base import rounded
from scanner.errors import InvalidDataError, ScannerError, UndecidableError
from scanner.loading import load_model, load_samples
from scanner.loading.exported import ExportedClassifier
from scanner.loading.state_dict import STATE_DICT_FORMATS
from scanner.loading.types import ModelFormat, one_line
from scanner.max_margin import MIN_CLASSES as MARGIN_MIN_CLASSES
from scanner.max_margin import margins, max_margin
from scanner.neural_cleanse import reverse_engineer_triggers
from scanner.pipeline import scan
from scanner.trigger import Trigger, attack_success_rate
from scanner.verdict import Verdict

__all__ = [
    "MIN_SAMPLES",
    "REPAIRED_PT2",
    "REPAIRED_SAFETENSORS",
    "RESCAN_DETECTORS",
    "RepairConfig",
    "RepairRefusedError",
    "RepairReport",
    "RepairResult",
    "RepairUnsupportedError",
    "export_classifier",
    "read_triggers",
    "repair_checkpoint",
    "unlearn",
]


@dataclass(frozen=True, eq=False)  # holds a model: compare by identity
class RepairResult:
    """A repaired model and what the repair did, measured on held-out clean samples.

    Attributes:
        model: the fine-tuned copy (eval mode, parameters frozen again); the input model is untouched.
        accuracy_before, accuracy_after: held-out clean accuracy.
        trigger_asr_before, trigger_asr_after: per reversed trigger (by target class), the share of held-out
            samples of other classes that the stamped trigger sends to the target.
        train_samples, held_out_samples: the split of the clean samples.
        duration_s: wall time.
    """

    model: nn.Module
    accuracy_before: float
    accuracy_after: float
    trigger_asr_before: dict[int, float]
    trigger_asr_after: dict[int, float]
    train_samples: int
    held_out_samples: int
    duration_s: float

    @property
    def accuracy_drop(self) -> float:
        return self.accuracy_before - self.accuracy_after


def _measure(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, triggers: Mapping[int, Trigger], device: torch.device
) -> tuple[float, dict[int, float]]:
    accuracy = (predict(model, images, device=device).cpu() == labels.cpu()).double().mean().item()
    rates = {
        target: attack_success_rate(model, images, labels, trigger, target, device=device)
        if bool((labels != target).any())
        else float("nan")  # every held-out sample is of the target class: nothing to flip
        for target, trigger in triggers.items()
    }
    return accuracy, rates


def _stamp_shifted(trigger: Trigger, images: torch.Tensor, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Stamp ``trigger`` on ``images``; with ``shift`` > 0, half the rows get it moved by a random offset of up to
    ``shift`` of the image side (cyclically), so that unlearning also covers a trigger that works anywhere."""
    stamped = trigger.stamp(images)
    height, width = trigger.mask.shape
    reach = (round(shift * height), round(shift * width))
    if shift <= 0 or max(reach) == 0:
        return stamped
    moved = torch.nonzero(torch.rand(len(images), generator=generator) < 0.5).squeeze(1).tolist()
    for row in moved:
        dy = int(torch.randint(-reach[0], reach[0] + 1, (1,), generator=generator))
        dx = int(torch.randint(-reach[1], reach[1] + 1, (1,), generator=generator))
        mask = torch.roll(trigger.mask, (dy, dx), dims=(0, 1)).to(images.device)
        pattern = torch.roll(trigger.pattern, (dy, dx), dims=(1, 2)).to(images.device)
        stamped[row] = (1 - mask) * images[row] + mask * pattern
    return stamped


def unlearn(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    triggers: Mapping[int, Trigger],
    config: RepairConfig = RepairConfig(),
    *,
    device: torch.device,
    seed: int = 0,
    extra: Sequence[Trigger] = (),
    margin_caps: Mapping[int, float] | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> RepairResult:
    """Fine-tune a copy of ``model`` so that the reversed ``triggers`` no longer change its predictions.

    Args:
        model: the classifier the scan flagged, taking ``(N, C, H, W)`` in [0, 1], on ``device``; not modified.
        images: clean, correctly labelled samples ``(N, C, H, W)`` in [0, 1].
        labels: int64 ``(N,)``.
        triggers: the reversed trigger of each flagged class, by class (at least one).
        config: hyper-parameters.
        device: where the model runs.
        seed: seeds the split, the batch order and the stamped rows (CPU generators).
        extra: more triggers to stamp (a re-scan of a repaired model reversed them), not measured.
        margin_caps: class -> the largest logit margin it should reach on any input in [0, 1]; with
            ``config.margin_weight`` > 0 the margin term (see :class:`~scanner.config.RepairConfig`) holds each
            of these classes under its cap. None: no margin term.
        progress: called with ``(fraction, message)`` before every batch (it may raise to stop).

    Returns:
        The repaired copy and the before/after numbers on the held-out samples.

    Raises:
        ValueError: no trigger, or too few samples to split (at least 2 in each part).
    """
    started = time.perf_counter()
    if not triggers:
        raise ValueError("unlearning needs at least one reversed trigger")
    held_out = round(config.held_out_fraction * len(labels))
    if held_out < 2 or len(labels) - held_out < 2:
        raise ValueError(f"{len(labels)} clean samples cannot be split {1 - config.held_out_fraction:.0%} / held out")
    report = progress or (lambda fraction, message: None)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    test_rows, train_rows = order[:held_out], order[held_out:]
    test_images, test_labels = images[test_rows.to(images.device)], labels[test_rows.to(labels.device)]
    train_images, train_labels = images[train_rows.to(images.device)], labels[train_rows.to(labels.device)]
    accuracy_before, asr_before = _measure(model, test_images, test_labels, triggers, device)

    repaired = copy.deepcopy(model)
    parameters = [p for p in repaired.parameters() if p.is_floating_point()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimiser = torch.optim.SGD(parameters, lr=config.lr, momentum=0.9)
    stamps = [*triggers.values(), *extra]
    pool = (
        _MarginPool(margin_caps, images.shape[1:], config, device, generator)
        if margin_caps and config.margin_weight > 0
        else None
    )
    for epoch in range(config.epochs):
        report(epoch / config.epochs, f"unlearning: epoch {epoch + 1} of {config.epochs}")
        if pool is not None and epoch > 0:
            pool.refresh(generator)
        shuffled = torch.randperm(len(train_labels), generator=generator)
        stamped_rows = torch.rand(len(train_labels), generator=generator) < config.stamp_fraction
        which = torch.randint(len(stamps), (len(train_labels),), generator=generator)
        batch_images = train_images.clone()
        for index, trigger in enumerate(stamps):
            rows = torch.nonzero(stamped_rows & (which == index)).squeeze(1)
            if len(rows):
                batch_images[rows.to(batch_images.device)] = _stamp_shifted(
                    trigger, batch_images[rows.to(batch_images.device)], config.stamp_shift, generator
                )
        for start in range(0, len(shuffled), config.batch_size):
            report((epoch + start / len(shuffled)) / config.epochs, f"unlearning: epoch {epoch + 1} of {config.epochs}")
            rows = shuffled[start : start + config.batch_size]
            x = batch_images[rows.to(batch_images.device)].to(device)
            y = train_labels[rows.to(train_labels.device)].to(device)
            clean = ~stamped_rows[rows].to(device)
            optimiser.zero_grad(set_to_none=True)
            logits = repaired(x)
            loss = F.cross_entropy(logits, y)
            if config.distill > 0 and bool(clean.any()):
                with torch.no_grad():
                    reference = F.log_softmax(model(x[clean]), dim=1)
                kept = F.kl_div(F.log_softmax(logits[clean], dim=1), reference, log_target=True, reduction="batchmean")
                loss = loss + config.distill * kept
            if pool is not None:
                pool.ascend(repaired)
                loss = loss + config.margin_weight * pool.excess(repaired)
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
    for parameter in parameters:
        parameter.requires_grad_(False)
    repaired.eval()
    accuracy_after, asr_after = _measure(repaired, test_images, test_labels, triggers, device)
    report(1.0, "unlearning: done")
    return RepairResult(
        model=repaired,
        accuracy_before=accuracy_before,
        accuracy_after=accuracy_after,
        trigger_asr_before=asr_before,
        trigger_asr_after=asr_after,
        train_samples=len(train_rows),
        held_out_samples=held_out,
        duration_s=time.perf_counter() - started,
    )


class _MarginPool:
    """Inputs that keep searching, on the model being fine-tuned, for the largest margin of each capped class: the
    maximum-margin statistic's search (Adam ascent from random images in [0, 1]) run alongside the fine-tuning, so
    the penalty acts where the margin is largest now, not where it was on the original model."""

    def __init__(
        self,
        caps: Mapping[int, float],
        shape: Sequence[int],
        config: RepairConfig,
        device: torch.device,
        generator: torch.Generator,
    ):
        classes = sorted(caps)
        self.targets = torch.tensor(classes, device=device).repeat_interleave(config.margin_pool)
        self.caps = torch.tensor([caps[k] for k in classes], device=device).repeat_interleave(config.margin_pool)
        self.shape = tuple(int(d) for d in shape)
        self.steps = config.margin_steps
        self.pool = config.margin_pool
        self.device = device
        self.images = torch.rand((len(self.targets), *self.shape), generator=generator).to(device)
        self.images.requires_grad_(True)
        self.optimiser = torch.optim.Adam([self.images], lr=_POOL_LR)
        self.last = torch.full((len(self.targets),), -float("inf"), device=device)

    def refresh(self, generator: torch.Generator) -> None:
        """Restart the half of each class's pool that reached the smaller margins from new random images (the
        search keeps exploring; the other half keeps climbing)."""
        pool = self.pool
        if pool < 2:
            return
        margins_now = self.last.view(-1, pool)
        low = (
            margins_now.argsort(dim=1)[:, : pool // 2]
            + torch.arange(0, len(self.targets), pool, device=self.device)[:, None]
        )
        rows = low.flatten()
        with torch.no_grad():
            self.images[rows] = torch.rand((len(rows), *self.shape), generator=generator).to(self.device)
        self.optimiser = torch.optim.Adam([self.images], lr=_POOL_LR)

    def ascend(self, model: nn.Module) -> None:
        """``steps`` Adam steps up each input's margin on ``model`` (its parameters get no gradient)."""
        for _ in range(self.steps):
            margin = margins(model(self.images), self.targets)
            (gradient,) = torch.autograd.grad(-margin.sum(), self.images)
            self.images.grad = gradient
            self.optimiser.step()
            with torch.no_grad():
                self.images.clamp_(0.0, 1.0)

    def excess(self, model: nn.Module) -> torch.Tensor:
        """The mean margin above the caps (differentiable in the model's parameters)."""
        margin = margins(model(self.images.detach()), self.targets)
        self.last = margin.detach()
        return F.relu(margin - self.caps).mean()


#: The pool's Adam step, the maximum-margin search's (``MaxMarginConfig.lr``).
_POOL_LR = 0.05


# -- a checkpoint in, a repaired checkpoint out ------------------------------------------------------------------


class RepairRefusedError(ScannerError):
    """The repair cost more held-out clean accuracy than the bound allows: no model is given back."""

    code = "repair_accuracy_drop"


class RepairUnsupportedError(ScannerError):
    """The model cannot be repaired: no trigger to unlearn, or a format the repair cannot give back."""

    code = "repair_unsupported"


#: Fewer clean samples cannot be split into a fine-tuning part and a held-out part that measures anything.
MIN_SAMPLES = 50
#: The share of a repair's progress before the first round: the original's margins, and the triggers of classes
#: flagged without one.
_BEFORE = 0.05
#: The files a repair writes into its output directory.
REPAIRED_PT2 = "repaired.pt2"
REPAIRED_SAFETENSORS = "repaired.safetensors"
#: Detectors of the re-scan: those that judge a model. Spectral signatures judge a training set through the model,
#: and the repair does not change the training set.
RESCAN_DETECTORS = ("neural_cleanse", "max_margin")


def read_triggers(classes: Sequence[int], read: Callable[[str], bytes]) -> dict[int, Trigger]:
    """The Neural Cleanse triggers of ``classes`` from a scan's artifacts (``nc-class-K-mask.npy`` and
    ``-pattern.npy``, read by name with ``read``).

    Raises:
        RepairUnsupportedError: an artifact is missing, or not a finite float array of a trigger's shape in [0, 1].
    """
    triggers: dict[int, Trigger] = {}
    for target in classes:
        try:
            arrays = [
                np.load(io.BytesIO(read(f"nc-class-{target}-{kind}.npy")), allow_pickle=False)
                for kind in ("mask", "pattern")
            ]
            mask, pattern = (torch.from_numpy(np.asarray(a, dtype=np.float32).copy()) for a in arrays)
            if not (bool(torch.isfinite(mask).all()) and bool(torch.isfinite(pattern).all())):
                raise ValueError("not finite")
            triggers[target] = Trigger(mask=mask, pattern=pattern)
        except (OSError, ValueError, KeyError) as exc:
            raise RepairUnsupportedError(f"the reversed trigger of class {target} cannot be read: {exc}") from exc
    return triggers


def export_classifier(module: nn.Module, input_shape: tuple[int, int, int], path: Path) -> None:
    """Save a classifier (taking the inputs the user's model takes: normalisation is not added) as a
    ``torch.export`` archive with a dynamic batch size, or the batch size its graph was exported for.

    Raises:
        RepairUnsupportedError: the module cannot be exported (TorchScript, data-dependent control flow).
    """
    target: nn.Module = module.graph_module if isinstance(module, ExportedClassifier) else module
    batch = module.min_batch if isinstance(module, ExportedClassifier) else 2
    example = torch.zeros((max(batch, 2), *input_shape), device=next(iter(module.parameters())).device)
    try:
        try:
            program = torch.export.export(target, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        except Exception:  # a graph with its batch size baked in: keep that batch size (the loader pads to it)
            program = torch.export.export(target, (example[:batch],))
        torch.export.save(program, path)
    except Exception as exc:
        raise RepairUnsupportedError(f"the repaired model cannot be saved with torch.export: {one_line(exc)}") from exc


def save_state_dict(module: nn.Module, path: Path) -> None:
    """The repaired weights as a safetensors state_dict (for a state_dict upload with ``arch``)."""
    from safetensors.torch import save_file

    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()}, str(path))


@dataclass(frozen=True)
class RepairReport:
    """What :func:`repair_checkpoint` did, JSON-ready with :meth:`to_dict`.

    Attributes:
        result: the last unlearning round (its ``model`` is the repaired one).
        rounds: the unlearning round whose model this is; a round after the first unlearns, besides the scan's
            triggers, the ones the re-scan of the previous round's model still reversed. A later round that would
            cost more accuracy than the bound is dropped: the previous round's model stays the answer.
        rescan: the verdict of the re-scan of the saved ``.pt2`` (the last round's), through the upload path.
        files: the names written into the output directory.
        max_accuracy_drop: the bound the repair was held to.
        margin_caps: class -> the largest logit margin the fine-tuning held it under (None: no margin term).
        margin_weight: the margin term's weight in this round (lower than configured when the configured one cost
            more accuracy than the bound; 0: unlearning alone).
    """

    result: RepairResult
    rounds: int
    rescan: Verdict
    files: tuple[str, ...]
    max_accuracy_drop: float
    margin_caps: Mapping[int, float] | None = None
    margin_weight: float = 0.0

    @property
    def repaired(self) -> bool:
        """The re-scan flags nothing."""
        return not self.rescan.flagged_classes

    def to_dict(self) -> dict[str, Any]:
        result = self.result
        return {
            "method": "unlearning",
            "repaired": self.repaired,
            "classes": sorted(result.trigger_asr_before),
            "rounds": self.rounds,
            "clean_accuracy": {
                "before": round(result.accuracy_before, 4),
                "after": round(result.accuracy_after, 4),
                "drop": round(result.accuracy_drop, 4),
                "max_drop": self.max_accuracy_drop,
            },
            "trigger_attack_success_rate": {
                str(target): {
                    "before": rounded(result.trigger_asr_before[target]),
                    "after": rounded(result.trigger_asr_after[target]),
                }
                for target in sorted(result.trigger_asr_before)
            },
            "margin_weight": self.margin_weight,
            "margin_caps": None
            if self.margin_caps is None
            else {str(k): rounded(v) for k, v in sorted(self.margin_caps.items())},
            "samples": {"fine_tuning": result.train_samples, "held_out": result.held_out_samples},
            "rescan": self.rescan.to_dict(),
            "files": list(self.files),
            "duration_s": round(result.duration_s, 3),
        }


def repair_checkpoint(
    model_path: Path,
    data_path: Path,
    triggers: Mapping[int, Trigger],
    output_dir: Path,
    *,
    classes: Sequence[int] = (),
    scan_config: ScanConfig,
    config: RepairConfig = RepairConfig(),
    device: torch.device,
    progress: Progress | None = None,
) -> RepairReport:
    """Repair the checkpoint a scan flagged: unlearn the flagged classes' reversed triggers on the clean samples at
    ``data_path`` with their margins capped, hold the result to ``config.max_accuracy_drop`` (retrying with a
    gentler margin term before refusing), save it, and scan the saved file again.

    While the re-scan flags something new (a trigger reversed again, a class the data-free test flags that was not
    capped; at most ``config.rounds`` rounds), the original model is unlearned once more with those too.
    ``output_dir`` gets ``repaired.pt2`` (any input) and, for a state_dict input, ``repaired.safetensors``.

    Args:
        model_path: the checkpoint as uploaded (checked and loaded like a scan's, with ``scan_config.model``).
        data_path: clean, correctly labelled samples (at most ``config.max_samples`` are used).
        triggers: the reversed trigger of flagged classes (:func:`read_triggers`).
        output_dir: where the repaired files go (created).
        classes: more flagged classes (by any detector); those without a trigger get one reversed here by Neural
            Cleanse on the clean samples. A class the data-free test flags on the model is repaired too.
        scan_config: the scan's options (model options, seed, data limits, Neural Cleanse settings).
        config: the repair's settings.
        device: where it runs.
        progress: called with ``(fraction, stage, message)``; it may raise to stop.

    Raises:
        RepairRefusedError: the held-out clean accuracy dropped more than ``config.max_accuracy_drop``.
        RepairUnsupportedError: no class to repair, a class the model does not have, TorchScript, or a model
            torch.export cannot save.
        ScannerError: the model or the samples cannot be loaded (as in a scan).
    """
    report = progress or (lambda fraction, stage, message: None)
    targets = sorted({*triggers, *classes})
    if not targets:
        raise RepairUnsupportedError("the scan flagged no class: there is nothing to unlearn")
    report(0.0, "loading", "loading the model and the clean samples")
    loaded = load_model(model_path, scan_config.model, device)
    if loaded.format is ModelFormat.torchscript:
        raise RepairUnsupportedError("TorchScript models cannot be given back as .pt2: upload a torch.export archive")
    model = with_normalization(loaded.module, scan_config.model.mean, scan_config.model.std)
    samples = load_samples(
        data_path,
        input_shape=loaded.input_shape,
        limits=scan_config.data_limits,
        max_samples=config.max_samples,
        seed=scan_config.seed,
    )
    if len(samples.labels) < MIN_SAMPLES:
        raise InvalidDataError(
            f"a repair needs at least {MIN_SAMPLES} clean samples (500 or more is better), got {len(samples.labels)}"
        )
    num_classes = check_samples(model, samples.images, samples.labels, num_classes=loaded.num_classes, device=device)
    input_shape = loaded.input_shape or _image_shape(samples.images)
    images, labels = samples.images.to(device), samples.labels.to(device)
    if any(not 0 <= k < num_classes for k in targets):
        raise RepairUnsupportedError(
            f"the classes to repair {targets} are not all classes of a {num_classes}-class model"
        )
    # the data-free test on the original: the other classes' margins set the cap of the repaired ones, and a class
    # it flags is repaired too
    statistics: Sequence[float] = ()
    if num_classes >= MARGIN_MIN_CLASSES:
        try:
            original_margins = max_margin(
                model, num_classes, input_shape, scan_config.max_margin, device=device, seed=scan_config.seed,
                progress=lambda fraction, message: report(0.02 * fraction, "margins", message),
            )  # fmt: skip
        except UndecidableError:  # no margins to hold the repaired classes to: unlearning alone
            pass
        else:
            statistics = original_margins.statistics
            targets = sorted({*targets, *original_margins.flagged_classes})
    triggers = dict(triggers)
    missing = [k for k in targets if k not in triggers]
    if missing:  # flagged by another detector: unlearn the smallest trigger Neural Cleanse finds for the class
        reversed_ = reverse_engineer_triggers(
            model, images, num_classes, scan_config.neural_cleanse, seed=scan_config.seed, classes=missing,
            progress=lambda fraction, message: report(0.02 + 0.03 * fraction, "reversing", message),
        )  # fmt: skip
        triggers.update({k: Trigger(mask=t.mask, pattern=t.pattern) for k, t in zip(missing, reversed_, strict=True)})
    caps = _margin_caps(statistics, targets)
    output_dir.mkdir(parents=True, exist_ok=True)
    rescan_config = replace(scan_config, detectors=RESCAN_DETECTORS, model=_exported_options(scan_config.model))
    extra: list[Trigger] = []
    share = (1.0 - _BEFORE) / config.rounds
    kept: RepairReport | None = None
    for round_index in range(config.rounds):
        label, start = f"round {round_index + 1}", _BEFORE + round_index * share
        # the margin term at full weight, then gentler while it costs more accuracy than the bound allows (a trigger
        # that works anywhere can tie the margin to clean features), and at last unlearning alone
        weights = _gentler(config.margin_weight) if caps else (0.0,)
        result: RepairResult | None = None
        for attempt, weight in enumerate(weights):
            tried = unlearn(
                model,
                images,
                labels,
                triggers,
                replace(config, margin_weight=weight),
                device=device,
                seed=scan_config.seed,
                extra=extra,
                margin_caps=caps,
                progress=_within(
                    report, start + 0.3 * share * attempt / len(weights), 0.3 * share / len(weights), label
                ),
            )
            if tried.accuracy_drop <= config.max_accuracy_drop + 1e-9:  # 3 of 150 samples is 2.0%, within a 2% bound
                result = tried
                break
        if result is None:
            if kept is not None:  # the previous round's model (saved, re-scanned) stays the answer
                break
            raise RepairRefusedError(
                f"the repair cost {tried.accuracy_drop:.1%} of held-out clean accuracy "
                f"({tried.accuracy_before:.1%} -> {tried.accuracy_after:.1%} on {tried.held_out_samples} samples),"
                f" more than the bound of {config.max_accuracy_drop:.1%}; no model is given back. More clean"
                " samples usually cost less accuracy."
            )
        files = _save(result.model, loaded.format, input_shape, output_dir)
        rescan = scan(
            output_dir / REPAIRED_PT2,
            rescan_config,
            device,
            data_path=data_path,
            progress=_scoped(report, start + 0.3 * share, 0.7 * share, label),
        )
        kept = RepairReport(
            result=result,
            rounds=round_index + 1,
            rescan=rescan,
            files=files,
            max_accuracy_drop=config.max_accuracy_drop,
            margin_caps=caps if weight > 0 else None,
            margin_weight=weight,
        )
        reversed_again = rescan.detectors["neural_cleanse"].flagged_classes
        margin = rescan.detectors.get("max_margin")
        margin_again = [k for k in (margin.flagged_classes if margin else ()) if k not in (caps or {})]
        if not (reversed_again or (margin_again and statistics)):
            break  # nothing new to unlearn: another round would repeat this one
        extra += read_triggers(reversed_again, rescan.detectors["neural_cleanse"].artifacts.__getitem__).values()
        caps = _margin_caps(statistics, [*(caps or {}), *margin_again, *reversed_again])
    assert kept is not None  # the first round either raised or kept its result
    report(1.0, "done", "repair finished")
    return kept


def _gentler(weight: float) -> tuple[float, ...]:
    """The margin weights a round tries in turn: the configured one, a half, a quarter, none."""
    return (weight, weight / 2, weight / 4, 0.0) if weight > 0 else (0.0,)


def _margin_caps(statistics: Sequence[float], classes: Sequence[int]) -> dict[int, float] | None:
    """The margin each repaired class is held under: the median maximum margin of the other classes on the original
    model (what a class without a backdoor reaches there). None without statistics (fewer than 5 classes, or the
    test could not measure them)."""
    if not statistics:
        return None
    others = [value for k, value in enumerate(statistics) if k not in set(classes)]
    cap = float(np.median(others or statistics))
    return dict.fromkeys(sorted(set(classes)), cap)


def _save(
    model: nn.Module, file_format: ModelFormat, input_shape: tuple[int, int, int], output_dir: Path
) -> tuple[str, ...]:
    """Write the repaired model (without the normalisation wrapper: it takes what the upload took)."""
    repaired = model.model if isinstance(model, NormalizedClassifier) else model
    export_classifier(repaired, input_shape, output_dir / REPAIRED_PT2)
    if file_format not in STATE_DICT_FORMATS:
        return (REPAIRED_PT2,)
    save_state_dict(repaired, output_dir / REPAIRED_SAFETENSORS)
    return REPAIRED_PT2, REPAIRED_SAFETENSORS


def _scoped(report: Progress, start: float, width: float, label: str) -> Progress:
    """A scan's progress as a part ``[start, start + width]`` of the repair's."""
    return lambda fraction, stage, message: report(start + width * fraction, "rescan", f"{label}: {stage}: {message}")


def _within(report: Progress, start: float, width: float, label: str) -> Callable[[float, str], None]:
    """:func:`unlearn`'s progress as a part ``[start, start + width]`` of the repair's."""
    return lambda fraction, message: report(start + width * fraction, "unlearning", f"{label}: {message}")


def _image_shape(images: torch.Tensor) -> tuple[int, int, int]:
    channels, height, width = images.shape[1:]
    return int(channels), int(height), int(width)


def _exported_options(options: ModelOptions) -> ModelOptions:
    """The options the saved ``.pt2`` is scanned with: its normalisation, not the state_dict's ``arch``."""
    return ModelOptions(mean=options.mean, std=options.std)
