"""Frozen configuration for a scan. Built by callers (CLI, worker); the scanner never reads the environment."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from scanner.errors import InvalidOptionError
from scanner.verdict import BACKDOOR_DETECTORS

__all__ = [
    "DataLimits",
    "MaxMarginConfig",
    "ModelOptions",
    "NeuralCleanseConfig",
    "RepairConfig",
    "ScanConfig",
    "SpectralConfig",
    "check_mean",
    "check_normalization",
    "check_std",
]


def refuse_invalid(checks: dict[str, bool], subject: str) -> None:
    """Raise :class:`InvalidOptionError` naming every option whose check failed (NaN fails every comparison).

    Args:
        checks: option name -> whether its value is valid.
        subject: what the options configure, for the message (``"Neural Cleanse"``).
    """
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise InvalidOptionError(f"invalid {subject} option(s): {', '.join(bad)}")


MAX_CLASSES = 100_000
MAX_SIDE = 4096
MAX_CHANNELS = 16
#: Bounds of the normalisation options, in [0, 1] pixel units. Real models use a mean in [0, 1] and a std in
#: (0, 1]; the bounds leave room for inputs scaled otherwise (a model fed 0..255 is ``mean=0, std=1/255``) but
#: refuse what float32 cannot normalise with: NaN, infinities, denormals and values whose quotient overflows.
MAX_ABS_MEAN = 1e3
MIN_STD = 1e-6
MAX_STD = 1e3


def check_mean(mean: Sequence[float]) -> None:
    """Every mean finite and within ``MAX_ABS_MEAN``. Raises InvalidOptionError."""
    if not all(math.isfinite(m) and abs(m) <= MAX_ABS_MEAN for m in mean):
        raise InvalidOptionError(f"mean values must be finite and within +-{MAX_ABS_MEAN:g}, got {tuple(mean)}")


def check_std(std: Sequence[float]) -> None:
    """Every std finite and in ``[MIN_STD, MAX_STD]``. Raises InvalidOptionError."""
    if not all(math.isfinite(s) and MIN_STD <= s <= MAX_STD for s in std):
        raise InvalidOptionError(f"std values must be finite and in [{MIN_STD:g}, {MAX_STD:g}], got {tuple(std)}")


def check_normalization(mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    """The one check of the normalisation options (API, CLI and the model wrapper all rely on it).

    Both or neither; the same non-zero length; :func:`check_mean` and :func:`check_std`.

    Raises:
        InvalidOptionError: any of these fails.
    """
    if (mean is None) != (std is None):
        raise InvalidOptionError("mean and std must be given together")
    if mean is None or std is None:
        return
    if len(mean) != len(std):
        raise InvalidOptionError(f"mean has {len(mean)} values but std has {len(std)}")
    if not mean:
        raise InvalidOptionError("mean and std need at least one value")
    check_mean(mean)
    check_std(std)


@dataclass(frozen=True)
class DataLimits:
    """Caps applied while reading untrusted sample archives (.npz, ImageFolder .zip)."""

    max_members: int = 100_000
    max_total_bytes: int = 2 * 1024**3
    max_member_bytes: int = 256 * 1024**2
    max_compression_ratio: float = 200.0
    max_samples: int = 200_000


@dataclass(frozen=True)
class ModelOptions:
    """How to turn a checkpoint into a classifier.

    Attributes:
        arch: allowlisted architecture name; required for state_dicts, ignored for archives.
        num_classes: class count for ``arch``; archives infer it from a forward pass.
        input_shape: ``(C, H, W)`` of one input image; archives may carry it.
        mean, std: per-channel normalisation applied inside the model wrapper, so detectors work
            in [0, 1] pixel space.
        trust_code: allow formats that execute code when loaded (TorchScript).
    """

    arch: str | None = None
    num_classes: int | None = None
    input_shape: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    trust_code: bool = False

    def __post_init__(self) -> None:
        if self.num_classes is not None and not 2 <= self.num_classes <= MAX_CLASSES:
            raise InvalidOptionError(f"num_classes must be in [2, {MAX_CLASSES}], got {self.num_classes}")
        if self.input_shape is not None:
            if len(self.input_shape) != 3:
                raise InvalidOptionError(f"input_shape must be C,H,W (3 integers), got {self.input_shape}")
            c, h, w = self.input_shape
            if not 1 <= c <= MAX_CHANNELS or not 1 <= h <= MAX_SIDE or not 1 <= w <= MAX_SIDE:
                raise InvalidOptionError(
                    f"input_shape {self.input_shape} out of range: C in [1, {MAX_CHANNELS}], H and W in [1, {MAX_SIDE}]"
                )
        check_normalization(self.mean, self.std)
        if self.mean is not None and self.input_shape is not None and len(self.mean) not in (1, self.input_shape[0]):
            raise InvalidOptionError(
                f"mean/std have {len(self.mean)} values but input_shape has {self.input_shape[0]} channels"
            )


@dataclass(frozen=True)
class NeuralCleanseConfig:
    """Hyper-parameters of Neural Cleanse.

    The optimisation (Adam settings, loss, cost schedule, best-mask rule) is the paper's and the authors'
    code's. Five things differ by default, all measured in ``bench/neural_cleanse.py``:

    - the schedule steps every mini-batch and decides on the success rate of the last ``success_window``
      mini-batches, and a class stops once its best mask shrank by less than ``early_stop_min_delta`` over
      ``early_stop_patience`` steps; the original steps once per pass over the samples and stops only after
      ``early_stop_patience`` passes without any improvement (:meth:`original_schedule` restores it);
    - classes are flagged on the anomaly index of ``log(L1)`` (``anomaly_scale="log"``): the minimal trigger
      sizes of clean classes spread multiplicatively (on small MNIST models from ~25 to ~120 pixels), which
      inflates the MAD of raw L1 norms enough to hide a 3x3 trigger; ``"linear"`` is the paper's rule;
    - the threshold is calibrated to the number of classes (``anomaly_threshold=None``): the paper's fixed 2
      is exceeded by the smallest of 10 normally distributed values a third of the time, so it flags clean
      models depending on the seed; :func:`scanner.stats.null_thresholds` gives the thresholds that
      ``false_positive_rate`` of outlier-free models exceed, and a second statistic of the smallest class
      (``z_test``) shares that rate. ``anomaly_threshold=2.0`` is the paper's rule;
    - a close call gets a second opinion (``confirm_rounds``): one run's L1 norms vary with the start (the target
      of a weak 4x4 BadNets model measured 14 to 22 pixels over seeds), so when the largest small-side index
      lands near the threshold every class is reversed again and the smallest valid masks decide.
      ``confirm_rounds=0`` is the single run of the paper;
    - on a CPU with native bfloat16 the model's passes run in bf16 (``precision="auto"``); ``"fp32"`` is the
      original's arithmetic.

    Attributes:
        attack_success_threshold: fraction of stamped samples that must land in the target class.
        init_cost: the L1 weight once the attack first succeeded for ``patience`` steps.
        cost_multiplier: cost is multiplied by this after ``patience`` successful steps and divided by its
            1.5th power after ``patience`` failed ones.
        patience: steps of success (or failure) before the cost changes.
        early_stop_patience: steps without a smaller valid mask before a class stops (once its cost went
            both up and down).
        early_stop_min_delta: a best mask counts as smaller only when its L1 is below ``(1 - delta)`` times
            the last reference; 0 is the original (any improvement resets the count).
        success_window: mini-batches whose success rate is averaged for the schedule's decisions; ``None``
            averages over the step's own mini-batches (the original: one pass over the samples).
        max_steps: hard step limit per class.
        lr, betas: Adam.
        batch_size: clean samples per mini-batch and class.
        batches_per_step: mini-batches per schedule step; ``None`` is one pass over the samples (the original).
        max_samples: at most this many clean samples are used (a seeded random subset).
        chunk_size: classes optimised together; ``None`` sizes chunks by ``max_images_per_forward``;
            1 is the sequential original.
        max_images_per_forward: memory budget: stamped images of one chunk's step (sets the classes per chunk).
        images_per_pass: a chunk's step runs its classes through the model this many stamped images at a time,
            adding up the gradients before the one optimizer step (the same update); ``None`` picks by device:
            128 on the CPU, where a pass that fits the cache cost 1.4-1.7x less per image than one 320-image pass
            of 10 classes, and the whole chunk at once on an accelerator.
        channels_last: run the optimisation on a channels-last copy of a convolutional model (faster kernels).
        precision: ``"fp32"``, ``"bf16"`` (the model's forward and backward under bfloat16 autocast; masks,
            patterns, the loss and the optimizer stay float32) or ``"auto"``: bf16 on a CPU with native bfloat16
            instructions (AVX512-BF16 or AMX), where it measured ~2x per image with the same verdicts on the
            bench zoo, fp32 everywhere else (CUDA included: not measured yet).
        restarts: optimise every class this many times from different starts; keep the smallest valid mask.
        confirm_rounds: up to this many more rounds of every tested class, from new starts, run only while the
            decision is close: the largest small-side anomaly index or the smallest class's z in its close band
            and neither clearly above its threshold. Each class keeps its smallest valid mask over all rounds, so a
            close call is decided on steadier L1 norms while clear ones cost a single round.
        confirm_margin: a statistic more than this (relative) above its threshold is clearly flagged: no second
            round. With a fixed ``anomaly_threshold`` the close band starts this much below the threshold.
        confirm_rate: with calibrated thresholds, the close bands start at the values that this share of
            outlier-free models reach (calibrated like the thresholds), so about this share of clean models pays
            for a second round whatever the class count. A band relative to the threshold would not do: with 100
            screened classes the smallest class's z sits near 0.7x its threshold on most clean models.
        anomaly_threshold: flag classes below the median with an anomaly index above this; ``None``
            calibrates it to the class count and ``false_positive_rate``.
        false_positive_rate: with ``anomaly_threshold=None``, the chance of flagging a model whose trigger
            sizes hold no outlier (normal on the chosen scale).
        anomaly_scale: ``"log"`` (default) or ``"linear"`` (the paper): the scale of the L1 norms for the MAD test.
        z_test: with a calibrated threshold, also flag the smallest class when its :func:`scanner.stats.smallest_z`
            (its distance below the other classes in their standard deviations) is an outlier; the false-positive
            rate is shared, a fifth to the MAD index and the rest to the z test
            (:func:`scanner.stats.null_thresholds`). With 10 classes the MAD rests on two values and is noisy: the
            z test separated the bench's backdoored and clean models where the index alone missed a weak 4x4
            trigger on one seed and a two-digit model whose clean classes spread widely. ``False`` (or a fixed
            ``anomaly_threshold``, a screened run, or more than 32 classes, where it was not measured and the clean
            100-class bench model's smallest classes lay further out than its null says) is the MAD test alone.
        screen_above: with more classes than this, screen first (default 32; ``None``: never). Every class runs the
            schedule for ``screen_steps`` steps; then only the ``screen_candidates`` classes with the smallest masks
            so far and ``screen_references`` classes drawn at random (seeded) run on to convergence. The candidates
            are where a target can be; the references are an unbiased sample of the classes, whose median and MAD
            replace those of all classes in the outlier test (the MAD index alone), with a threshold calibrated for
            that sample (:func:`scanner.stats.null_thresholds`). The other classes stop after the screen and are
            not tested, and a close call re-runs only the candidates on the small side. Time then grows with
            ``screen_steps`` per class, not with each class's full search: a 100-class scan of the bench's
            two-digit CNN reverses about 22 classes to convergence instead of 100. The screen is a heuristic: a
            target whose mask stays large for the first ``screen_steps`` steps (an adaptive attack on the screen)
            would be screened out and not tested.
        screen_steps, screen_candidates, screen_references: see ``screen_above``.
        screen_batch_size: clean samples per mini-batch and class during the screen (``batch_size`` after it): the
            screen only ranks the classes, and at a quarter of the samples it costs a quarter as much.
        many_classes_tail_dof: above 32 classes the thresholds are calibrated on a Student-t null with this many
            degrees of freedom instead of a normal one (``None``: normal). The smallest of many classes samples the
            tail of the trigger sizes, and on real many-class models that tail is heavy: on a clean 100-class
            two-digit MNIST model, 5 classes lay beyond index 2.7 on the small side where a normal null expects
            0.5 (Student-t with 4 degrees of freedom: 2.2), and its smallest class reached index 4.0 against the
            normal null's 5% threshold of 3.5; with this null the 100-class thresholds are 8.0 (all classes) and
            10.05 (16 screened references), and a BadNets target lies at 11-21. Not measured above 100 classes: on
            this null the threshold grows with the class count (18.2 for 1,000 screened classes).
    """

    attack_success_threshold: float = 0.99
    init_cost: float = 1e-3
    cost_multiplier: float = 1.5
    patience: int = 5
    early_stop_patience: int = 30
    early_stop_min_delta: float = 0.02
    success_window: int | None = 10
    max_steps: int = 1000
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    batch_size: int = 32
    batches_per_step: int | None = 1
    max_samples: int = 1000
    chunk_size: int | None = None
    max_images_per_forward: int = 4096
    images_per_pass: int | None = None
    channels_last: bool = True
    precision: str = "auto"
    restarts: int = 1
    confirm_rounds: int = 1
    confirm_margin: float = 0.3
    confirm_rate: float = 0.15
    anomaly_threshold: float | None = None
    false_positive_rate: float = 0.05
    anomaly_scale: str = "log"
    z_test: bool = True
    screen_above: int | None = 32
    screen_steps: int = 30
    screen_candidates: int = 6
    screen_references: int = 16
    screen_batch_size: int = 8
    many_classes_tail_dof: float | None = 4.0

    @classmethod
    def original_schedule(cls, **overrides: object) -> NeuralCleanseConfig:
        """The authors' schedule and precision: one step per pass over the samples, early stop after 25 steps
        without gain, float32."""
        settings: dict[str, object] = {
            "batches_per_step": None,
            "success_window": None,
            "early_stop_patience": 25,
            "early_stop_min_delta": 0.0,
            "precision": "fp32",
        }
        settings.update(overrides)
        return cls(**settings)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        checks = {
            "attack_success_threshold": 0.0 < self.attack_success_threshold <= 1.0,
            "init_cost": self.init_cost > 0,
            "cost_multiplier": self.cost_multiplier > 1.0,
            "patience": self.patience >= 1,
            "early_stop_patience": self.early_stop_patience >= 1,
            "early_stop_min_delta": 0.0 <= self.early_stop_min_delta < 1.0,
            "success_window": self.success_window is None or self.success_window >= 1,
            "max_steps": self.max_steps >= 1,
            "lr": self.lr > 0,
            "batch_size": self.batch_size >= 1,
            "batches_per_step": self.batches_per_step is None or self.batches_per_step >= 1,
            "max_samples": self.max_samples >= 1,
            "chunk_size": self.chunk_size is None or self.chunk_size >= 1,
            "max_images_per_forward": self.max_images_per_forward >= 1,
            "images_per_pass": self.images_per_pass is None or self.images_per_pass >= 1,
            "restarts": self.restarts >= 1,
            "confirm_rounds": self.confirm_rounds >= 0,
            "confirm_margin": 0.0 <= self.confirm_margin < 1.0,
            "confirm_rate": self.false_positive_rate < self.confirm_rate < 1.0,
            "anomaly_threshold": self.anomaly_threshold is None or self.anomaly_threshold > 0,
            "false_positive_rate": 0.0 < self.false_positive_rate < 1.0,
            "anomaly_scale": self.anomaly_scale in ("log", "linear"),
            "precision": self.precision in ("auto", "fp32", "bf16"),
            "screen_above": self.screen_above is None or self.screen_above >= 3,
            "screen_steps": self.screen_steps >= 1,
            "screen_candidates": self.screen_candidates >= 1,
            "screen_references": self.screen_references >= 5,
            "screen_batch_size": self.screen_batch_size >= 1,
            "many_classes_tail_dof": self.many_classes_tail_dof is None or 2.0 < self.many_classes_tail_dof <= 1000.0,
        }
        refuse_invalid(checks, "Neural Cleanse")

    def screens(self, num_classes: int) -> bool:
        """Whether a model with ``num_classes`` classes is screened first (see ``screen_above``)."""
        return (
            self.screen_above is not None
            and num_classes > self.screen_above
            and num_classes > self.screen_candidates + self.screen_references
        )

    def classes_per_chunk(self) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        return max(1, self.max_images_per_forward // self.batch_size)


@dataclass(frozen=True)
class SpectralConfig:
    """Hyper-parameters of :func:`scanner.spectral.detect_poisoned_samples`.

    Attributes:
        directions: top right-singular directions of each class's whitened features in which the
            two-component mixture is fitted. The paper uses one; at 1% poisoning the poison direction
            was mixed into the top 3-4 whitened directions by the class's own variation.
        shrinkage: ridge added to the reference covariance before whitening, as a fraction of its
            mean eigenvalue (larger is closer to no whitening).
        threshold: a class is flagged when its separation exceeds this multiple of the median
            separation of the classes. Calibrated on BadNets ``mnist_cnn`` zoos (36 models, 8 of them
            clean, 332 clean classes in all): the largest score of a clean class was 1.82, the smallest
            of a target class 2.17.
        max_features: features wider than this are projected, class by class, on the class's own
            leading principal directions first, to bound the per-class eigendecompositions.
        min_persistence_gain: a class over the threshold is flagged only when the side test confirms it:
            blended with other classes' images, its suspected members must lose the class at most
            ``1 - min_persistence_gain`` times as often as the rest (the gain is
            ``(p_suspected - p_rest) / (1 - p_rest)`` for persistences ``p``; a relative measure, because
            some classes keep their label under blending far more often than others: clean 0s 0.73, clean
            1s 0.12); otherwise the class is unconfirmed. Measured with 128 probes: 0.00-0.13 on the
            cover-sample classes of source-specific backdoors (``bench/coverage.py``'s wide CNN, 3 seeds, and
            6 test-size ``mnist_cnn`` models), 0.23-0.93 on every real target that the split found (BadNets 3x3
            at 10% and 1%, 8x8, blend and all-to-all in ``bench/coverage.py``; the 1% sets of
            ``bench/spectral.py``, 0.50-0.85).
        probe_samples: members of each component that the STRIP side test blends.
        probe_blends: other-class images each probe is blended with.
        max_listed: suspicious samples listed per class in the JSON verdict (all are in the artifact).
        batch_size: images per forward pass.
    """

    directions: int = 4
    shrinkage: float = 0.03
    threshold: float = 2.0
    max_features: int = 256
    min_persistence_gain: float = 0.18
    probe_samples: int = 128
    probe_blends: int = 8
    max_listed: int = 100
    batch_size: int = 512

    def __post_init__(self) -> None:
        checks = {
            "directions": 1 <= self.directions <= 8,
            "shrinkage": self.shrinkage > 0,
            "threshold": self.threshold > 0,
            "max_features": self.max_features >= self.directions,
            "min_persistence_gain": 0 <= self.min_persistence_gain < 1,
            "probe_samples": self.probe_samples >= 1,
            "probe_blends": self.probe_blends >= 1,
            "max_listed": self.max_listed >= 0,
            "batch_size": self.batch_size >= 1,
        }
        refuse_invalid(checks, "spectral signatures")


@dataclass(frozen=True)
class MaxMarginConfig:
    """Hyper-parameters of the data-free detector :func:`scanner.max_margin.max_margin`.

    Attributes:
        starts: random inputs optimised per class; a class's statistic is the largest margin any of them reached.
        steps: at most this many gradient-ascent steps per input (Adam, learning rate decayed to 1% on a cosine).
        patience, min_delta: a chunk of classes stops early once no class's largest margin grew by more than
            ``min_delta`` (relative) over the last ``patience`` steps. On the bench's MNIST models the statistics
            after 150 steps were within 2% of those after 600.
        lr: Adam's initial learning rate, in [0, 1] pixel units.
        significance: the largest class is flagged when its order-statistic p-value is below this.
        max_images_per_forward: inputs optimised together (classes per chunk = this // ``starts``); a chunk stops
            early on its own, and its activations for the backward pass scale with it (a resnet18 keeps megabytes per
            3x32x32 image), so many-class models run in chunks of 32 classes.
    """

    starts: int = 8
    steps: int = 300
    patience: int = 30
    min_delta: float = 0.005
    lr: float = 0.05
    significance: float = 0.01
    max_images_per_forward: int = 256

    def __post_init__(self) -> None:
        checks = {
            "starts": 1 <= self.starts <= 256,
            "steps": 1 <= self.steps <= 100_000,
            "patience": self.patience >= 1,
            "min_delta": 0.0 <= self.min_delta < 1.0,
            "lr": 0.0 < self.lr <= 1.0,
            "significance": 0.0 < self.significance < 1.0,
            "max_images_per_forward": self.max_images_per_forward >= 1,
        }
        refuse_invalid(checks, "max-margin")

    def classes_per_chunk(self) -> int:
        return max(1, self.max_images_per_forward // self.starts)


@dataclass(frozen=True)
class ScanConfig:
    """Everything one scan needs besides file paths and the device.

    ``detectors`` names the backdoor detectors to run (default: all that can run); the others are
    reported as skipped. The ``model_file`` check always runs.
    """

    model: ModelOptions = field(default_factory=ModelOptions)
    seed: int = 0
    neural_cleanse: NeuralCleanseConfig = field(default_factory=NeuralCleanseConfig)
    spectral: SpectralConfig = field(default_factory=SpectralConfig)
    max_margin: MaxMarginConfig = field(default_factory=MaxMarginConfig)
    data_limits: DataLimits = field(default_factory=DataLimits)
    detectors: tuple[str, ...] = BACKDOOR_DETECTORS

    def __post_init__(self) -> None:
        unknown = sorted(set(self.detectors) - set(BACKDOOR_DETECTORS))
        if unknown:
            raise InvalidOptionError(
                f"unknown detector(s) {', '.join(unknown)}; choose from {', '.join(BACKDOOR_DETECTORS)}"
            )


@dataclass(frozen=True)
class RepairConfig:
    """Hyper-parameters of :func:`scanner.repair.unlearn` and :func:`scanner.repair.repair_checkpoint`.

    Attributes:
        epochs: passes over the training part of the clean samples.
        lr: SGD learning rate (momentum 0.9, constant). SGD, not Adam: its steps follow the gradients, large on
            the stamped samples and small on the clean ones the model already fits; Adam's sign-like steps moved
            every weight and cost 3-4 points of clean accuracy on the bench at any rate that removed the backdoor.
        batch_size: samples per step.
        stamp_fraction: share of each batch stamped with a reversed trigger (label kept), redrawn every epoch. 0.4
            left a real-trigger success of 8% at most on the bench where 0.2 left 13%, at the same accuracy.
        held_out_fraction: share of the clean samples kept out of the fine-tuning to measure it.
        max_accuracy_drop: the largest loss of held-out clean accuracy (absolute, 0..1) a repair may cost.
        distill: weight of a distillation term that keeps the repaired model's outputs on the unstamped samples
            close to the original's (KL divergence; the original is right on clean inputs): it halved the
            clean-accuracy loss on the bench (``bench/repair.py``). 0 turns it off.
        stamp_shift: half the stamped samples get the trigger moved by a random offset of up to this share of the
            image side (0 keeps it where it was reversed).
        rounds: at most this many unlearning rounds in :func:`scanner.repair.repair_checkpoint`: while the re-scan
            of the repaired model reverses a trigger again, the original is unlearned once more with it too.
        max_samples: clean samples read from the data file at most.
        margin_weight: weight of the margin term (0 turns it off): for each repaired class, a pool of inputs is
            kept ascending the class's logit margin on the model being fine-tuned (the maximum-margin statistic's
            own search), and the margin they reach above the class's cap is penalised. This is MM-BD's mitigation
            idea (Wang et al., IEEE S&P 2024: lower the margin a class can reach on any input) applied to the weights.
        margin_pool: inputs per repaired class in that pool.
        margin_steps: Adam steps the pool takes on the current model before every fine-tuning batch.
    """

    epochs: int = 20
    lr: float = 0.003
    batch_size: int = 32
    stamp_fraction: float = 0.4
    held_out_fraction: float = 0.3
    max_accuracy_drop: float = 0.02
    distill: float = 5.0
    stamp_shift: float = 0.0
    rounds: int = 3
    max_samples: int = 10_000
    margin_weight: float = 1.0
    margin_pool: int = 8
    margin_steps: int = 3

    def __post_init__(self) -> None:
        checks = {
            "epochs": 1 <= self.epochs <= 1000,
            "lr": 0 < self.lr <= 1,
            "batch_size": self.batch_size >= 1,
            "stamp_fraction": 0 < self.stamp_fraction < 1,
            "held_out_fraction": 0 < self.held_out_fraction < 1,
            "max_accuracy_drop": 0 <= self.max_accuracy_drop <= 1,
            "distill": 0 <= self.distill <= 100,
            "stamp_shift": 0 <= self.stamp_shift <= 0.5,
            "rounds": 1 <= self.rounds <= 10,
            "max_samples": 4 <= self.max_samples <= 1_000_000,
            "margin_weight": 0 <= self.margin_weight <= 100,
            "margin_pool": 1 <= self.margin_pool <= 256,
            "margin_steps": 1 <= self.margin_steps <= 100,
        }
        refuse_invalid(checks, "repair")
