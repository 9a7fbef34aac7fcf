"""Every class's trigger size on the many-class bench models: what the null of the outlier test must cover.

The screened scan (the default above 32 classes) reverses only the candidates and 16 references to convergence,
so it never shows the whole population of trigger sizes. This bench does: it runs the screen (30 steps, 8-sample
mini-batches) and then lets **every** class run on to convergence, on the two-digit 100-class ``.pt2`` models of
`bench/nc_uploads.py` (trained there and cached; 500 clean samples, fp32, loaded by the upload path). Per model and
Neural Cleanse seed it prints:

- the smallest class and its MAD index over all 100 converged classes (``log`` scale, as the detector), against
  the 5% thresholds of a normal null and of the many-class Student-t null;
- how many classes lie beyond index 2 and 2.7 on the small side (the target excluded), against what a normal and a
  t null with ``many_classes_tail_dof`` degrees of freedom expect: the tail that decides the smallest of 100;
- how well the screen ranks: the Spearman correlation of the screen's mask sizes with the converged ones, and the
  screen rank of the smallest converged classes;
- the screened test replayed on these sizes: the 6 smallest classes after the screen against 16 references drawn
  as the detector draws them (``NeuralCleanseConfig.screen_references``, seeds 0-5): the largest small-side index.

    .venv/bin/python bench/nc_class_sizes.py [--runs "two-digit-100-clean:0;two-digit-100-clean:1;..."]

One model run takes 5-7 minutes on a 2-core CPU (every class to convergence: ~440k stamped images).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import numpy as np
from nc_uploads import CACHE, Upload, cpu_has_bf16, cpu_name, prepare  # bench/ is on sys.path as a script
from neural_cleanse import print_table

DEFAULT_RUNS = "two-digit-100-badnets:0;two-digit-100-clean:0;two-digit-100-clean:1"
SAMPLES = 500
MAD = 1.4826


def collect(upload: Upload, seed: int) -> dict[str, Any]:
    """Screen sizes and converged sizes of every class (cached as JSON next to the model)."""
    out = CACHE / f"class-sizes-{upload.name}-{seed}.json"
    if out.exists():
        cached: dict[str, Any] = json.loads(out.read_text())
        return cached
    import torch

    from scanner import neural_cleanse as nc
    from scanner.config import ModelOptions, NeuralCleanseConfig
    from scanner.loading.model import load_model

    torch.set_num_threads(2)
    model_path, data_path, facts = prepare(upload, SAMPLES)
    model = load_model(model_path, ModelOptions(), torch.device("cpu")).module
    data = np.load(data_path)
    images = torch.from_numpy(data["x"]).float() / 255
    classes = int(facts["classes"])
    config = NeuralCleanseConfig(precision="fp32")
    at_screen: dict[int, tuple[float, float]] = {}

    class KeepAll(nc._Screen):  # every class survives the screen; record what the screen saw
        def survivors(self, targets: Any, best_l1: Any, l1_now: Any) -> set[int]:
            for target, best, now in zip(targets, best_l1, l1_now, strict=True):
                at_screen[int(target)] = (float(best), float(now))
            return set(range(len(targets)))

    original = nc._Screen
    nc._Screen = KeepAll  # type: ignore[misc]
    try:
        started = time.perf_counter()
        triggers = nc.reverse_engineer_triggers(
            model, images, classes, config, seed=seed, screen_references=list(range(classes))
        )
        seconds = time.perf_counter() - started
    finally:
        nc._Screen = original  # type: ignore[misc]
    result = {
        "model": upload.name,
        "seed": seed,
        "seconds": seconds,
        "classes": [
            {
                "target": t.target,
                "screen_best": at_screen[t.target][0],
                "screen_now": at_screen[t.target][1],
                "l1": t.mask_l1,
                "converged": t.converged,
                "images": t.images,
            }
            for t in triggers
        ],
    }
    out.write_text(json.dumps(result))
    return result


def expected_beyond(dof: float | None, count: int, cut: float) -> float:
    """Values of ``count`` null draws beyond index ``cut`` on the small side, on average (seeded Monte-Carlo)."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((20_000, count)) if dof is None else rng.standard_t(dof, (20_000, count))
    median = np.median(values, axis=1, keepdims=True)
    scale = MAD * np.median(np.abs(values - median), axis=1, keepdims=True)
    return float((((median - values) / scale) > cut).sum(axis=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="semicolon-separated model:seed (default: %(default)s)")
    args = parser.parse_args()
    from scanner.config import NeuralCleanseConfig
    from scanner.neural_cleanse import _OutlierTest, _reference_classes, _Screen, decision_thresholds
    from scanner.stats import anomaly_index, null_thresholds

    config = NeuralCleanseConfig()
    dof = config.many_classes_tail_dof
    print(
        f"{cpu_name()} (native bf16: {'yes' if cpu_has_bf16() else 'no'}), fp32, {SAMPLES} clean samples, every "
        f"class reversed to convergence after the screen; many-class null: Student-t, {dof} degrees of freedom\n",
        flush=True,
    )
    rows, replay = [], []
    for spec in args.runs.split(";"):
        name, _, seed_text = spec.partition(":")
        arch, _, kind = name.rpartition("-")
        upload = Upload(arch, kind == "badnets")
        found = collect(upload, int(seed_text or 0))
        entries = found["classes"]
        count = len(entries)
        sizes = np.log(np.array([max(e["l1"], 1e-3) for e in entries]))
        now = np.array([e["screen_now"] for e in entries])
        best = np.array([e["screen_best"] for e in entries])
        median = float(np.median(sizes))
        scale = MAD * float(np.median(np.abs(sizes - median)))
        index = np.where(sizes < median, anomaly_index(sizes), 0.0)  # the small side's index, 0 above the median
        order = np.argsort(sizes)
        natural = np.ones(count, dtype=bool)
        if upload.backdoored:
            natural[0] = False  # the bench's target
        converged_rank = np.argsort(np.argsort(sizes))
        screen_rank = np.argsort(np.argsort(now))
        spearman = float(np.corrcoef(converged_rank, screen_rank)[0, 1])
        rows.append(
            [
                f"{upload.name} (seed {found['seed']})",
                f"{sum(e['converged'] for e in entries)}/{count}",
                f"{int(order[0])} ({math.exp(sizes[order[0]]):.1f} px)",
                f"{index[order[0]]:.2f}",
                f"{math.exp(median):.0f} px",
                f"{scale:.3f}",
                str(int(((index > 2.0) & natural).sum())),
                str(int(((index > 2.7) & natural).sum())),
                f"{spearman:.2f}",
                str([int(screen_rank[k]) for k in order[:5]]),
                f"{found['seconds']:.0f}",
            ]
        )
        rows_all = np.arange(count)
        largest = []
        for reference_seed in range(6):  # the detector's own screen ranking, reference draw and outlier test
            references = _reference_classes(count, config, reference_seed) or []
            screen = _Screen(config.screen_steps, config.screen_candidates, frozenset(references))
            tested = np.isin(rows_all, sorted(screen.survivors(list(range(count)), best.tolist(), now.tolist())))
            reference = np.isin(rows_all, references)
            test = _OutlierTest(sizes, tested, reference, threshold=math.inf)
            small = test.indices()[tested & (sizes < np.median(sizes[reference]))]
            largest.append(float(small.max()) if small.size else 0.0)
        replay.append([f"{upload.name} (seed {found['seed']})", " / ".join(f"{v:.1f}" for v in largest)])

    count = 100
    normal_all = null_thresholds(count, config.false_positive_rate).index
    print_table(
        [
            "model",
            "converged",
            "smallest class",
            "its index (all classes)",
            "median",
            "MAD (log)",
            "# beyond 2",
            "# beyond 2.7",
            "screen Spearman",
            "screen ranks of the 5 smallest",
            "s",
        ],
        rows,
    )
    print(
        f"\nnull expectations for {count} classes: beyond 2: normal {expected_beyond(None, count, 2.0):.2f}, "
        f"t({dof}) {expected_beyond(dof, count, 2.0):.2f}; beyond 2.7: normal {expected_beyond(None, count, 2.7):.2f}, "
        f"t({dof}) {expected_beyond(dof, count, 2.7):.2f}"
    )
    print(
        f"5% thresholds, all {count} classes: normal null {normal_all:.2f}, this null "
        f"{decision_thresholds(config, count)[0]:.2f}; against {config.screen_references} references: normal "
        f"{null_thresholds(count, config.false_positive_rate, config.screen_references).index:.2f}, this null "
        f"{decision_thresholds(config, count, config.screen_references)[0]:.2f}\n"
    )
    print_table(["screened test replayed (reference draws 0-5)", "largest small-side index"], replay)


if __name__ == "__main__":
    main()
