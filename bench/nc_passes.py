"""Where Neural Cleanse's time goes on this machine: cost per stamped image by pass size, and an operator profile.

The speed ratio of batched over sequential Neural Cleanse has two factors: how many stamped images each pushes
through the model (the schedule: `bench/neural_cleanse.py` prints it as the work ratio) and what one image costs
in a pass of 10 classes versus a pass of one (batching). This script measures the second factor with the real
optimisation loop (10 classes of a clean ``mnist_cnn`` from the zoo, a fixed 60 steps, no early stop):

- ``sequential``: one class per chunk (``chunk_size=1``), 32 images per pass: the original's shape;
- ``batched, P images per pass``: all 10 classes in one chunk, their 320 stamped images sent through the model
  P at a time (``images_per_pass``; the gradients add up to the same step);
- both again with the default precision (``"auto"``: bfloat16 passes on a CPU with native bf16).

All rows but the last two run in float32.

Median of ``--repeats`` interleaved runs, then a torch.profiler table of the default (batched) loop.

    .venv/bin/python bench/nc_passes.py [--threads 2] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
from neural_cleanse import ZOO, trained  # the main bench's zoo (bench/ is on sys.path when run as a script)
from torch.profiler import ProfilerActivity, profile

from scanner.config import NeuralCleanseConfig
from scanner.neural_cleanse import reverse_engineer_triggers
from scanner.testing.mnist import load_mnist_split

STEPS = 60
CLASSES = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    split = load_mnist_split(test_fraction=0.2, seed=0)
    images = split.test_images[: args.samples].to(device)
    model = trained(next(e for e in ZOO if e.target is None), split)[0].to(device)
    # every class runs STEPS steps, in float32 unless the row says otherwise
    fixed = NeuralCleanseConfig(max_steps=STEPS, early_stop_patience=10 * STEPS, precision="fp32")
    variants = {"sequential (1 class, 32 images per pass)": replace(fixed, chunk_size=1)}
    for per_pass in (32, 64, 128, 160, 192, 320):
        variants[f"batched, {per_pass} images per pass"] = replace(fixed, images_per_pass=per_pass)
    default = replace(fixed, precision=NeuralCleanseConfig().precision)
    variants["batched, default passes and precision"] = default
    variants["sequential, default precision"] = replace(default, chunk_size=1)

    def timed(config: NeuralCleanseConfig) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        reverse_engineer_triggers(model, images, CLASSES, config, seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    timed(replace(fixed, max_steps=3))  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, config in variants.items():
            seconds[name].append(timed(config))

    stamped = STEPS * CLASSES * fixed.batch_size
    sequential = statistics.median(seconds[next(iter(variants))])
    print(
        f"torch {torch.__version__}, device {device}, {args.threads} thread(s), {CLASSES} classes x {STEPS} steps x "
        f"{fixed.batch_size} images = {stamped} stamped images per run, median of {args.repeats}\n"
    )
    print("| variant | s (median) | us per image | vs sequential |")
    print("|---|---|---|---|")
    for name, runs in seconds.items():
        median = statistics.median(runs)
        print(f"| {name} | {median:.2f} | {1e6 * median / stamped:.0f} | {sequential / median:.2f}x |")

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        reverse_engineer_triggers(model, images, CLASSES, replace(default, max_steps=STEPS // 2), seed=0)
    print(f"\nProfile of the default (batched, precision {default.precision}) loop, 30 steps, top operators:\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()
