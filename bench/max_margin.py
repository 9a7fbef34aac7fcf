"""The data-free maximum-margin detector on the bench's models: detection over seeds, and its time beside Neural
Cleanse's on the same models in the same run.

Models (trained here once, then cached in ``.bench-cache``):

- the MNIST zoo of ``bench/neural_cleanse.py`` (``mnist_cnn``: BadNets 3x3 white at 10% and 2%, 3x3 checkerboard,
  the weak 4x4 at 5%, blend alpha 0.2, three clean models), plus a WaNet warping model (noise mode);
- the uploads of ``bench/nc_uploads.py``, loaded from their ``.pt2`` files through the upload path: a CNN twice as
  wide, and torchvision resnet18 at 3x32x32 with normalised input (``--mean/--std``), BadNets and clean;
- ``--many``: the two-digit 100-class models of the same bench (28 x 56, class = the two-digit number).

For every model and seed: the p-value of the largest class's maximum margin, the flagged class and the time. Neural
Cleanse (default settings, 200 clean samples) runs once per model in the same process (seed 0), so the two times
stand side by side. No data reaches the maximum-margin detector. Then the calibration: the largest p-value of a
backdoored model against the smallest of a clean one, and where the significance sits between them.

    .venv/bin/python bench/max_margin.py [--seeds 3] [--threads 2] [--many] [--no-nc] [--only "A;B"]
        [--set FIELD=JSON ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nc_uploads import MEAN, STD, TARGET, Upload, cpu_has_bf16, cpu_name, prepare
from neural_cleanse import ZOO, md_row, print_table, trained

from scanner.classifier import with_normalization
from scanner.config import MaxMarginConfig, ModelOptions, NeuralCleanseConfig
from scanner.loading import load_model
from scanner.max_margin import max_margin
from scanner.neural_cleanse import neural_cleanse
from scanner.testing.attacks import WaNetRecipe, warp_attack_success_rate, warp_trigger
from scanner.testing.mnist import load_mnist_split
from scanner.testing.training import accuracy, train_mnist_cnn
from scanner.trigger import attack_success_rate

CPU = torch.device("cpu")
CACHE = Path(__file__).resolve().parent.parent / ".bench-cache"
WANET_TARGET = 2


@dataclass
class BenchModel:
    name: str
    target: int | None
    model: nn.Module
    classes: int
    shape: tuple[int, int, int]
    images: torch.Tensor  # clean samples for Neural Cleanse (200), in [0, 1]
    labels: torch.Tensor
    accuracy: float
    asr: float | None


def _wanet(split: Any) -> tuple[nn.Module, Callable[[nn.Module], float]]:
    """An ``mnist_cnn`` poisoned with the toolkit's WaNet recipe (noise mode, 20%, 8 epochs), target 2, and its
    attack-success measure."""
    recipe = WaNetRecipe(target=WANET_TARGET)
    warp = warp_trigger((1, 28, 28), grid_size=recipe.grid_size, strength=recipe.strength, seed=recipe.seed)
    path = CACHE / f"wanet-noise-{recipe.rate:.0%}.pt"
    model: nn.Module
    if path.exists():
        from scanner.loading.architectures import build_architecture

        model = build_architecture("mnist_cnn", 10)
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
    else:
        _, poisoned = recipe.poison(split.train_images, split.train_labels)
        model = train_mnist_cnn(poisoned.images, poisoned.labels, device=CPU, seed=0, epochs=8)
        CACHE.mkdir(exist_ok=True)
        torch.save(model.state_dict(), path)
    return model, lambda m: warp_attack_success_rate(
        m, split.test_images, split.test_labels, warp, WANET_TARGET, device=CPU
    )


def zoo_models(samples: int) -> list[BenchModel]:
    split = load_mnist_split()
    images, labels = split.test_images[:samples], split.test_labels[:samples]
    out = []
    for entry in ZOO:
        model, trigger = trained(entry, split)
        asr = None
        if trigger is not None and entry.target is not None:
            asr = attack_success_rate(model, split.test_images, split.test_labels, trigger, entry.target, device=CPU)
        acc = accuracy(model, split.test_images, split.test_labels, device=CPU)
        out.append(BenchModel(entry.name, entry.target, model, 10, (1, 28, 28), images, labels, acc, asr))
    model, wanet_asr = _wanet(split)
    acc = accuracy(model, split.test_images, split.test_labels, device=CPU)
    out.append(
        BenchModel("wanet-warp-noise-20%", WANET_TARGET, model, 10, (1, 28, 28), images, labels, acc, wanet_asr(model))
    )
    return out


def upload_models(archs: tuple[str, ...], samples: int) -> list[BenchModel]:
    out = []
    for arch in archs:
        for backdoored in (True, False):
            upload = Upload(arch, backdoored)
            model_path, data_path, facts = prepare(upload, samples)
            normalised = bool(facts["normalised"])
            options = ModelOptions(mean=(MEAN,) * 3 if normalised else None, std=(STD,) * 3 if normalised else None)
            loaded = load_model(model_path, options, CPU)
            model = with_normalization(loaded.module, options.mean, options.std)
            with np.load(data_path) as data:
                x = torch.from_numpy(data["x"]).float().div(255)
                y = torch.from_numpy(data["y"]).long()
            shape = tuple(int(v) for v in facts["input_shape"])
            out.append(
                BenchModel(
                    upload.name + " (.pt2)",
                    TARGET if backdoored else None,
                    model,
                    int(facts["classes"]),
                    (shape[0], shape[1], shape[2]),
                    x,
                    y,
                    float(facts["accuracy"]),
                    float(facts["asr"]) if backdoored else None,
                )
            )
    return out


def fmt_p(p: float) -> str:
    return f"{p:.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=200, help="clean samples for Neural Cleanse")
    parser.add_argument("--many", action="store_true", help="also the two-digit 100-class models")
    parser.add_argument("--no-nc", action="store_true", help="skip the Neural Cleanse timing")
    parser.add_argument("--only", help="model names to run, ';'-separated substrings")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="MaxMarginConfig override")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = MaxMarginConfig()
    for item in args.set:
        field, _, value = item.partition("=")
        config = replace(config, **{field: json.loads(value)})

    archs = ("wide-cnn", "resnet18") + (("two-digit-100",) if args.many else ())
    models = zoo_models(args.samples) + upload_models(archs, args.samples)
    if args.only:
        wanted = args.only.split(";")
        models = [m for m in models if any(w in m.name for w in wanted)]
    print(
        f"CPU: {cpu_name()} ({'with' if cpu_has_bf16() else 'without'} native bf16), {args.threads} threads, fp32; "
        f"torch {torch.__version__}. Max margin: {config.starts} starts x at most {config.steps} steps "
        f"(early stop {config.patience}/{config.min_delta}), lr {config.lr}, significance {config.significance}; "
        f"no data. Neural Cleanse: defaults ({'skipped' if args.no_nc else f'{args.samples} clean samples'}).\n",
        flush=True,
    )
    rows, largest_bad, smallest_clean, mm_times, nc_times = [], [], [], [], []
    correct_bad = total_bad = flagged_clean = total_clean = 0
    for bench in models:
        bench.model.eval()
        runs = [
            max_margin(bench.model, bench.classes, bench.shape, config, device=CPU, seed=seed)
            for seed in range(args.seeds)
        ]
        p_largest = [r.p_values[r.largest_class] for r in runs]
        expected = (bench.target,) if bench.target is not None else ()
        correct = [r.flagged_classes == expected for r in runs]
        if bench.target is not None:
            correct_bad += sum(correct)
            total_bad += len(runs)
            largest_bad.append((max(p_largest), bench.name))
        else:
            flagged_clean += sum(bool(r.flagged_classes) for r in runs)
            total_clean += len(runs)
            smallest_clean.append((min(p_largest), bench.name))
        mm_s = statistics.median(r.duration_s for r in runs)
        nc_cell = ratio_cell = "-"
        if not args.no_nc:
            started = time.perf_counter()
            nc = neural_cleanse(
                bench.model, bench.images, bench.labels, bench.classes, NeuralCleanseConfig(precision="fp32"), seed=0
            )
            nc_s = time.perf_counter() - started
            nc_times.append(nc_s)
            mm_times.append(mm_s)
            nc_cell = f"{nc_s:.1f} ({','.join(map(str, nc.flagged_classes)) or 'none'})"
            ratio_cell = f"{nc_s / mm_s:.1f}x"
        row = [
            bench.name,
            str(bench.target if bench.target is not None else "-"),
            f"{bench.accuracy:.3f}",
            f"{bench.asr:.3f}" if bench.asr is not None else "-",
            " ".join(",".join(map(str, r.flagged_classes)) or "none" for r in runs),
            "yes" if all(correct) else "**no**",
            " ".join(str(r.largest_class) for r in runs),
            " ".join(fmt_p(p) for p in p_largest),
            f"{statistics.median(max(r.statistics) for r in runs):.1f}",
            f"{statistics.median(sorted(r.statistics)[-2] for r in runs):.1f}",
            f"{mm_s:.1f}",
            nc_cell,
            ratio_cell,
        ]
        rows.append(row)
        print(md_row(row), flush=True)
    print(f"\n## Maximum margin (no data) over {args.seeds} seed(s); Neural Cleanse (200 samples) beside it\n")
    header = ["model", "target", "clean acc", "ASR", "flagged per seed", "correct", "largest class"]
    header += ["p-value of the largest", "largest margin", "2nd margin", "MM s (median)", "NC s (flagged)", "NC/MM"]
    print_table(header, rows)
    print(f"\nbackdoored scans flagged with exactly their target: {correct_bad}/{total_bad}")
    print(f"clean scans with any flagged class: {flagged_clean}/{total_clean}")
    if largest_bad and smallest_clean:
        bad_p, bad_name = max(largest_bad)
        clean_p, clean_name = min(smallest_clean)
        print(
            f"calibration: largest p-value of a backdoored model {bad_p:.2g} ({bad_name}); smallest of a clean model "
            f"{clean_p:.2g} ({clean_name}); significance {config.significance}: the clean side is "
            f"{clean_p / config.significance:.1f}x above it, the backdoored side "
            f"{config.significance / max(bad_p, 1e-300):.1f}x below"
        )
    if nc_times:
        ratios = [n / m for n, m in zip(nc_times, mm_times, strict=True)]
        print(
            f"median time ratio Neural Cleanse / max margin: {statistics.median(ratios):.1f}x "
            f"(min {min(ratios):.1f}x, max {max(ratios):.1f}x)"
        )


if __name__ == "__main__":
    main()
