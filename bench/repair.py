"""Repair by unlearning the reversed trigger: before/after numbers on the coverage bench's backdoored models.

For every backdoored model of ``bench/coverage.py`` (trained there and cached in ``.bench-cache/coverage``; run it
first) whose trigger Neural Cleanse reverses: Neural Cleanse (default settings) on the 200 clean samples of the
scan, then :func:`scanner.repair.unlearn` with ``--samples`` clean samples (500: 350 fine-tune, 150 held out). The
bench knows the real trigger (the repair does not): clean accuracy and the real trigger's attack success rate are
measured before and after on the test images the repair never saw (the other 500 of the 1,000). The repaired model
is exported to ``.pt2`` and scanned again through the upload path with Neural Cleanse and the data-free test.

    .venv/bin/python bench/repair.py [--seeds 3] [--only "A;B"] [--samples 500] [--epochs 20] [--lr 0.003]
        [--distill 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from coverage import ATTACKS, CACHE, SAMPLES, prepare
from neural_cleanse import md_row, print_table

from scanner.config import ModelOptions, NeuralCleanseConfig, ScanConfig
from scanner.loading import load_model
from scanner.loading.exported import ExportedClassifier
from scanner.neural_cleanse import neural_cleanse
from scanner.pipeline import scan
from scanner.repair import RepairConfig, unlearn
from scanner.testing.attacks import mapped_success_rate
from scanner.testing.mnist import load_mnist_split
from scanner.testing.training import accuracy

CPU = torch.device("cpu")
REPAIRED = (
    "badnets-3x3-10%",
    "badnets-3x3-1%",
    "badnets-8x8-checker-10%",
    "blend-noise-a0.2-10%",
    "random-position-4x4-10%",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", help="semicolon-separated attack names")
    parser.add_argument("--epochs", type=int, default=RepairConfig().epochs)
    parser.add_argument("--lr", type=float, default=RepairConfig().lr)
    parser.add_argument("--distill", type=float, default=RepairConfig().distill)
    parser.add_argument("--samples", type=int, default=500, help="clean samples given to the repair")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = RepairConfig(epochs=args.epochs, lr=args.lr, distill=args.distill)
    split = load_mnist_split(test_fraction=0.2, seed=0)
    unseen_images, unseen_labels = split.test_images[args.samples :], split.test_labels[args.samples :]
    clean_images, clean_labels = split.test_images[: args.samples], split.test_labels[: args.samples]
    names = args.only.split(";") if args.only else REPAIRED
    coverage_args = argparse.Namespace(sig_delta=80.0, sig_fraction=1.0, sig_epochs=8, sig_test_factor=2.0)
    print(f"torch {torch.__version__}, {args.threads} thread(s); unlearning: {config}\n", flush=True)
    rows, drops, asr_after, times = [], [], [], []
    for attack in [a for a in ATTACKS if a.name in names]:
        for seed in range(args.seeds):
            model_path, _, _facts = prepare(attack, seed, split, coverage_args)
            poisoned = attack.build(split, seed, coverage_args)
            assert poisoned.trigger is not None
            assert poisoned.mapping is not None
            model = load_model(model_path, ModelOptions(), CPU).module
            found = neural_cleanse(
                model, clean_images[:SAMPLES], clean_labels[:SAMPLES], 10, NeuralCleanseConfig(), seed=seed
            )
            triggers = {k: found.triggers[k].trigger for k in found.flagged_classes}
            acc_before = accuracy(model, unseen_images, unseen_labels, device=CPU)
            asr_before = mapped_success_rate(
                model, unseen_images, unseen_labels, poisoned.trigger, poisoned.mapping, device=CPU
            )
            row = [attack.name, str(seed), ",".join(map(str, found.flagged_classes)) or "none"]
            if not triggers:
                rows.append([*row, f"{acc_before:.3f}", "-", f"{asr_before:.3f}", "-", "no trigger reversed", "-", "-"])
                print(md_row(rows[-1]), flush=True)
                continue
            result = unlearn(model, clean_images, clean_labels, triggers, config, device=CPU, seed=seed)
            acc_after = accuracy(result.model, unseen_images, unseen_labels, device=CPU)
            asr = mapped_success_rate(
                result.model, unseen_images, unseen_labels, poisoned.trigger, poisoned.mapping, device=CPU
            )
            assert isinstance(result.model, ExportedClassifier)
            program = torch.export.export(
                result.model.graph_module, (clean_images[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},)
            )
            with tempfile.TemporaryDirectory() as tmp:
                repaired_path = Path(tmp) / "repaired.pt2"
                torch.export.save(program, repaired_path)
                verdict = scan(
                    repaired_path,
                    ScanConfig(seed=seed, detectors=("neural_cleanse", "max_margin")),
                    CPU,
                    data_path=CACHE / f"clean-{SAMPLES}.npz",
                )
            rescan = f"{verdict.label.value} ({','.join(map(str, verdict.flagged_classes)) or 'none'})"
            drops.append(acc_before - acc_after)
            asr_after.append(asr)
            times.append(result.duration_s)
            rows.append(
                [
                    *row,
                    f"{acc_before:.3f}",
                    f"{acc_after:.3f}",
                    f"{asr_before:.3f}",
                    f"{asr:.3f}",
                    f"held out: {result.accuracy_before:.3f} -> {result.accuracy_after:.3f}",
                    rescan,
                    f"{result.duration_s:.1f}",
                ]
            )
            print(md_row(rows[-1]), flush=True)
    print()
    header = ["attack", "seed", "NC reversed", "clean acc before", "after", "real-trigger ASR before", "after"]
    header += ["the repair's own check", "re-scan (NC + MM)", "repair s"]
    print_table(header, rows)
    if drops:
        print(
            f"\nrepaired {len(drops)}: real-trigger ASR after: max {max(asr_after):.3f}, median "
            f"{statistics.median(asr_after):.3f}; clean accuracy lost: max {max(drops) * 100:.1f} points, median "
            f"{statistics.median(drops) * 100:.1f}; repair time median {statistics.median(times):.1f} s"
        )


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - started:.0f} s")
