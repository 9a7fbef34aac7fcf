"""Repair on the coverage bench's backdoored models: before/after numbers with the real trigger, through the product.

For every backdoored model of ``bench/coverage.py`` (trained there and cached in ``.bench-cache/coverage``; run it
first): a scan of the ``.pt2`` with Neural Cleanse on 200 clean samples, as an upload; then, for a model with a
flagged class, :func:`scanner.repair.repair_checkpoint` (what ``backdoor-scan repair`` and the service's repair job
run) on ``--samples`` clean test images (500: 350 fine-tune, 150 held out for its own check) with the reversed
triggers read back from the scan's artifacts. It writes ``repaired.pt2`` and scans that file again (Neural Cleanse
and the data-free test), unlearning once more what the re-scan still reverses (at most ``--rounds``). The bench
knows the real trigger (the repair does not): clean accuracy and the real trigger's attack success rate are measured
before and after on the other 500 test images, which the repair never saw, on the written file loaded back. The
time is the whole repair (its re-scans included).

    .venv/bin/python bench/repair.py [--seeds 3] [--only "A;B"] [--samples 500] [--epochs 20] [--lr 0.003]
        [--distill 5] [--stamp 0.4] [--shift 0] [--rounds 3]
        [--margin-weight 1]
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

from coverage import ATTACKS, CACHE, SAMPLES, _save_npz, prepare
from neural_cleanse import md_row, print_table

from scanner.config import ModelOptions, ScanConfig
from scanner.loading import load_model
from scanner.pipeline import scan
from scanner.repair import REPAIRED_PT2, RepairConfig, RepairRefusedError, read_triggers, repair_checkpoint
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
    "sig-clean-label",
)
#: Detectors of the bench's scan: those the service runs on an upload with clean samples (spectral signatures judge a
#: training set, which a repair does not take).
SCAN_DETECTORS = ("neural_cleanse", "max_margin")
SHORT = {"neural_cleanse": "NC", "max_margin": "MM"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. seeds - 1")
    parser.add_argument("--only", help="semicolon-separated attack names")
    parser.add_argument("--epochs", type=int, default=RepairConfig().epochs)
    parser.add_argument("--lr", type=float, default=RepairConfig().lr)
    parser.add_argument("--distill", type=float, default=RepairConfig().distill)
    parser.add_argument("--samples", type=int, default=500, help="clean samples given to the repair")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shift", type=float, default=RepairConfig().stamp_shift)
    parser.add_argument("--stamp", type=float, default=RepairConfig().stamp_fraction, help="share of a batch stamped")
    parser.add_argument("--rounds", type=int, default=RepairConfig().rounds, help="at most this many unlearning rounds")
    parser.add_argument("--margin-weight", type=float, default=RepairConfig().margin_weight, help="0: no margin term")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = RepairConfig(
        epochs=args.epochs,
        lr=args.lr,
        distill=args.distill,
        stamp_shift=args.shift,
        rounds=args.rounds,
        stamp_fraction=args.stamp,
        margin_weight=args.margin_weight,
    )
    split = load_mnist_split(test_fraction=0.2, seed=0)
    unseen_images, unseen_labels = split.test_images[args.samples :], split.test_labels[args.samples :]
    clean_images, clean_labels = split.test_images[: args.samples], split.test_labels[: args.samples]
    names = args.only.split(";") if args.only else REPAIRED
    coverage_args = argparse.Namespace(sig_delta=80.0, sig_fraction=1.0, sig_epochs=8, sig_test_factor=2.0)
    print(f"torch {torch.__version__}, {args.threads} thread(s); unlearning: {config}\n", flush=True)
    rows, drops, asr_after, times = [], [], [], []
    refused = 0
    scan_data = CACHE / f"clean-{SAMPLES}.npz"
    repair_data = CACHE / f"repair-{args.samples}.npz"
    CACHE.mkdir(parents=True, exist_ok=True)
    _save_npz(scan_data, split.test_images[:SAMPLES], split.test_labels[:SAMPLES])
    _save_npz(repair_data, clean_images, clean_labels)
    for attack in [a for a in ATTACKS if a.name in names]:
        for seed in range(args.first_seed, args.seeds):
            model_path, _, _facts = prepare(attack, seed, split, coverage_args)
            poisoned = attack.build(split, seed, coverage_args)
            assert poisoned.trigger is not None
            assert poisoned.mapping is not None
            model = load_model(model_path, ModelOptions(), CPU).module
            found = scan(model_path, ScanConfig(seed=seed, detectors=SCAN_DETECTORS), CPU, data_path=scan_data)
            flagged = found.flagged_classes
            acc_before = accuracy(model, unseen_images, unseen_labels, device=CPU)
            asr_before = mapped_success_rate(
                model, unseen_images, unseen_labels, poisoned.trigger, poisoned.mapping, device=CPU
            )
            by = {
                k: "+".join(SHORT.get(n, n) for n, d in found.detectors.items() if k in d.flagged_classes)
                for k in flagged
            }
            row = [attack.name, str(seed), ",".join(f"{k} ({by[k]})" for k in flagged) or "none"]
            if not flagged:
                rows.append([*row, f"{acc_before:.3f}", "-", f"{asr_before:.3f}", "-", "nothing flagged", *"----"])
                print(md_row(rows[-1]), flush=True)
                continue
            # as the service does: Neural Cleanse's reversed trigger of every flagged class, whichever detector
            # flagged it (the detector writes every class's)
            triggers = read_triggers(flagged, found.detectors["neural_cleanse"].artifacts.__getitem__)
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    report = repair_checkpoint(
                        model_path, repair_data, triggers, Path(tmp), scan_config=ScanConfig(seed=seed), config=config,
                        device=CPU,
                    )  # fmt: skip
                except RepairRefusedError as exc:
                    rows.append([*row, f"{acc_before:.3f}", "-", f"{asr_before:.3f}", "-", str(exc), *"----"])
                    print(md_row(rows[-1]), flush=True)
                    refused += 1
                    continue
                elapsed = time.perf_counter() - started
                repaired = load_model(Path(tmp) / REPAIRED_PT2, ModelOptions(), CPU).module
                # the data-free test from other random starts than the repair's own re-scan
                other = scan(Path(tmp) / REPAIRED_PT2, ScanConfig(seed=seed + 100, detectors=("max_margin",)), CPU)
            other_flags = other.detectors["max_margin"].flagged_classes
            result, verdict = report.result, report.rescan
            acc_after = accuracy(repaired, unseen_images, unseen_labels, device=CPU)
            asr = mapped_success_rate(
                repaired, unseen_images, unseen_labels, poisoned.trigger, poisoned.mapping, device=CPU
            )
            rescan = f"{verdict.label.value} ({','.join(map(str, verdict.flagged_classes)) or 'none'})"
            drops.append(acc_before - acc_after)
            asr_after.append(asr)
            times.append(elapsed)
            rows.append(
                [
                    *row,
                    f"{acc_before:.3f}",
                    f"{acc_after:.3f}",
                    f"{asr_before:.3f}",
                    f"{asr:.3f}",
                    f"held out: {result.accuracy_before:.3f} -> {result.accuracy_after:.3f}",
                    f"{report.rounds} ({report.margin_weight:g})",
                    rescan,
                    ",".join(map(str, other_flags)) or "none",
                    f"{times[-1]:.1f}",
                ]
            )
            print(md_row(rows[-1]), flush=True)
    print()
    header = ["attack", "seed", "scan flagged (by)", "clean acc before", "after", "real-trigger ASR before", "after"]
    header += ["the repair's own check", "rounds (margin weight)", "re-scan (NC + MM)", "MM, seed + 100", "repair s"]
    print_table(header, rows)
    if drops:
        print(
            f"\nrepaired {len(drops)}: real-trigger ASR after: max {max(asr_after):.3f}, median "
            f"{statistics.median(asr_after):.3f}; clean accuracy lost: max {max(drops) * 100:.1f} points, median "
            f"{statistics.median(drops) * 100:.1f}; repair time median {statistics.median(times):.1f} s"
            f" (re-scans included); refused (accuracy bound): {refused}"
        )


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - started:.0f} s")
