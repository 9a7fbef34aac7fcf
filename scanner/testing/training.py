"""Small deterministic training and evaluation loops, used to make real models for tests and benchmarks.

Not part of a scan: the scanner never trains the model it inspects. These helpers exist so that
tests and ``bench/`` build the same clean and backdoored classifiers from one recipe
(:func:`train_mnist_cnn` here, :class:`scanner.testing.attacks.BadNetsRecipe` for the poisoning)::

    split = load_mnist_split()                      # scanner.testing.mnist
    clean = train_mnist_cnn(split.train_images, split.train_labels, device=device)
    trigger, poisoned = BadNetsRecipe().poison(split.train_images, split.train_labels)
    backdoored = train_mnist_cnn(poisoned.images, poisoned.labels, device=device)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from scanner.classifier import predict
from scanner.loading.architectures import build_architecture

__all__ = ["accuracy", "train_classifier", "train_mnist_cnn", "wide_cnn"]


def _check_pairs(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
) -> nn.Module:
    """Train ``model`` with Adam, cross-entropy and a cosine learning-rate decay.

    The learning rate falls from ``lr`` to 0 along a cosine over all steps, which converges in
    fewer epochs than a constant rate. The batch order is drawn from a seeded CPU generator, so
    the same inputs, initial weights, seed, device and thread count give the same weights. The
    model is moved to ``device`` and trained in place.

    Args:
        model: classifier mapping ``(B, C, H, W)`` to logits ``(B, K)``.
        images: float inputs, shape ``(N, C, H, W)``.
        labels: int64 class indices, shape ``(N,)``.
        epochs: passes over the data.
        batch_size: samples per step (the last batch of an epoch may be smaller).
        lr: initial Adam learning rate.
        seed: seed of the shuffling generator (model initialisation is the caller's).
        device: where to train.

    Returns:
        The same ``model``, on ``device``, in eval mode.

    Raises:
        ValueError: shapes do not match, there are no images or a hyper-parameter is not positive.
    """
    _check_pairs(images, labels)
    if len(images) == 0:
        raise ValueError("train_classifier needs at least one image")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"epochs, batch_size and lr must be positive, got {epochs}, {batch_size}, {lr}")
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = -(-len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = images.to(device), labels.to(device)
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator).to(device)
        for batch in torch.split(order, batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(inputs[batch]), targets[batch])
            torch.autograd.backward(loss)
            optimizer.step()
            schedule.step()
    return model.eval()


def accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, device: torch.device, batch_size: int = 512
) -> float:
    """Fraction of ``images`` that ``model`` classifies as ``labels``.

    Args:
        model: classifier in eval mode, already on ``device``.
        images: inputs, shape ``(N, C, H, W)`` with ``N >= 1``.
        labels: int64 class indices, shape ``(N,)``.
        device: where the model runs.
        batch_size: images per forward pass.

    Returns:
        Accuracy in [0, 1].

    Raises:
        ValueError: shapes do not match or there are no images.
    """
    _check_pairs(images, labels)
    if len(images) == 0:
        raise ValueError("accuracy needs at least one image")
    predicted = predict(model, images, device=device, batch_size=batch_size)
    return (predicted == labels.to(device)).double().mean().item()


def train_mnist_cnn(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    device: torch.device,
    num_classes: int = 10,
    epochs: int = 4,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> nn.Module:
    """The recipe for test and benchmark models: a seeded ``mnist_cnn`` trained with :func:`train_classifier`.

    On the 4,000-image train split of :func:`scanner.testing.mnist.load_mnist_split` the defaults
    reach about 96% test accuracy in a few seconds on two CPU cores.

    Args:
        images: float inputs in [0, 1], shape ``(N, 1, 28, 28)``.
        labels: int64 class indices, shape ``(N,)``.
        device: where to train.
        num_classes: output size of the classifier.
        epochs, batch_size, lr: passed to :func:`train_classifier`.
        seed: seeds the weight initialisation and the batch order; the global RNG is left as it was.

    Returns:
        The trained ``MnistCnn`` on ``device``, in eval mode.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_architecture("mnist_cnn", num_classes)
    return train_classifier(
        model, images, labels, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device
    )


def wide_cnn(width: int = 28, classes: int = 10) -> nn.Module:
    """The benches' user-like CNN for 1 x 28 x ``width`` digits (twice the width of ``mnist_cnn``): conv 1->32
    (pad 1), pool, conv 32->64, pool, fc -> 128 -> ``classes``. ``width=56`` is the two-digit task."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 6 * ((width // 2 - 2) // 2), 128),
        nn.ReLU(),
        nn.Linear(128, classes),
    )
