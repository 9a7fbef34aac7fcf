"""Fine-pruning (Liu et al., "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks", RAID 2018)
on the coverage bench's backdoored models: measured against unlearning for issue 18, not a product method.

The last convolution's channels are pruned (weights and bias zeroed, kept at zero) in order of their mean ReLU
activation on the clean samples' fine-tuning part, while that part's accuracy stays within ``--max-drop`` of the
unpruned model's; then the model is fine-tuned on the same part (SGD, momentum 0.9, lr 0.003, 20 epochs, as the
unlearning). It needs no trigger, so it is tried on every backdoored model, including those whose trigger Neural
Cleanse did not reverse. The bench knows the real trigger: clean accuracy and its attack success rate are measured on
the 500 test images the repair never saw.

    .venv/bin/python bench/fine_pruning.py [--seeds 3] [--max-drop 0.05,0.10]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import fx
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from coverage import ATTACKS, prepare
from neural_cleanse import print_table
from repair import REPAIRED

from scanner.config import ModelOptions
from scanner.gradcam import _conv_tap, _is_conv2d
from scanner.layers import last_graph_node
from scanner.loading import load_model
from scanner.testing.attacks import mapped_success_rate
from scanner.testing.mnist import load_mnist_split
from scanner.testing.training import accuracy

CPU = torch.device("cpu")


def conv_params(model):
    _name, gm, conv = last_graph_node(model, _is_conv2d)
    w = gm.get_parameter(conv.args[1].target)
    b = gm.get_parameter(conv.args[2].target) if isinstance(conv.args[2], fx.Node) else None
    return w, b


def activity(model, images):
    with _conv_tap(model, images[:2]) as (_layer, forward, captured), torch.no_grad():
        for s in range(0, len(images), 256):
            forward(images[s : s + 256])
    acts = torch.cat([c.detach() for c in captured])
    return F.relu(acts).mean(dim=(0, 2, 3))


def fine_prune(model, images, labels, seed, max_drop=0.05, epochs=20, lr=0.003):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    _ho, tr = order[:150], order[150:]
    ti, tl = images[tr], labels[tr]
    m = copy.deepcopy(model)
    w, b = conv_params(m)
    act = activity(m, ti)
    base = accuracy(m, ti, tl, device=CPU)
    pruned = []
    for c in torch.argsort(act).tolist():
        wc, bc = w.data[c].clone(), (b.data[c].clone() if b is not None else None)
        w.data[c] = 0
        if b is not None:
            b.data[c] = 0
        if base - accuracy(m, ti, tl, device=CPU) > max_drop:
            w.data[c] = wc
            if b is not None:
                b.data[c] = bc
            break
        pruned.append(c)
    keep = torch.ones(w.shape[0], dtype=torch.bool)
    keep[pruned] = False
    params = [p for p in m.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    for _ep in range(epochs):
        perm = torch.randperm(len(tl), generator=g)
        for s in range(0, len(perm), 32):
            r = perm[s : s + 32]
            opt.zero_grad()
            F.cross_entropy(m(ti[r]), tl[r]).backward()
            w.grad[~keep] = 0
            if b is not None:
                b.grad[~keep] = 0
            opt.step()
    for p in params:
        p.requires_grad_(False)
    return m, len(pruned), w.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-drop", default="0.05,0.10", help="comma-separated pruning stops (accuracy lost)")
    parser.add_argument("--threads", type=int, default=2)
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    split = load_mnist_split(test_fraction=0.2, seed=0)
    ci, cl = split.test_images[:500], split.test_labels[:500]
    ui, ul = split.test_images[500:], split.test_labels[500:]
    args = argparse.Namespace(sig_delta=80.0, sig_fraction=1.0, sig_epochs=8, sig_test_factor=2.0)
    rows = []
    for attack in [a for a in ATTACKS if a.name in REPAIRED]:
        for seed in range(cli.seeds):
            path, _, _ = prepare(attack, seed, split, args)
            poisoned = attack.build(split, seed, args)
            model = load_model(path, ModelOptions(), CPU).module
            a0 = accuracy(model, ui, ul, device=CPU)
            asr0 = mapped_success_rate(model, ui, ul, poisoned.trigger, poisoned.mapping, device=CPU)
            for max_drop in (float(v) for v in cli.max_drop.split(",")):
                started = time.perf_counter()
                pruned_model, pruned, total = fine_prune(model, ci, cl, seed, max_drop=max_drop)
                asr = mapped_success_rate(pruned_model, ui, ul, poisoned.trigger, poisoned.mapping, device=CPU)
                a1 = accuracy(pruned_model, ui, ul, device=CPU)
                rows.append([attack.name, str(seed), f"{max_drop:g}", f"{pruned}/{total}", f"{a0:.3f}", f"{a1:.3f}",
                             f"{asr0:.3f}", f"{asr:.3f}", f"{time.perf_counter() - started:.1f}"])  # fmt: skip
                print(" | ".join(rows[-1]), flush=True)
    print()
    header = ["attack", "seed", "prune until lost", "channels pruned", "clean acc before", "after"]
    header += ["real-trigger ASR before", "after", "s"]
    print_table(header, rows)


if __name__ == "__main__":
    main()
