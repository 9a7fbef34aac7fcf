"""Penultimate-layer features: the input of a classifier's last linear layer, for any loaded model.

Spectral signatures (Tran, Li, Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018) and
other representation-based defences read the learned representation just before the classification
head. Two kinds of model reach the scanner:

- ordinary ``nn.Module`` trees (state_dicts loaded into an allowlisted architecture): the head is the
  last ``nn.Linear`` that runs in a forward pass, found with one probe pass; a forward pre-hook on it
  records its input.
- ``torch.export`` programs: ``ExportedProgram.module()`` is a ``torch.fx.GraphModule`` whose linear
  layers are ``call_function`` nodes (``aten.linear`` / ``aten.addmm`` / ``aten.mm``), so there is no
  module to hook. The graph is cut instead: a new graph module holds only the nodes the head's input
  depends on and returns that input. While features are extracted, the cut module stands in for the
  program inside its wrappers (normalisation, batch splitting), so those still apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from scanner.errors import FeatureExtractionError
from scanner.layers import graph_cut, last_graph_node, require_last_module, submodule_replaced

__all__ = ["penultimate_features"]

#: ATen ops that implement a linear layer in an exported graph, and the argument that is the layer's input.
_LINEAR_OPS: dict[Any, int] = {
    torch.ops.aten.linear.default: 0,
    torch.ops.aten.addmm.default: 1,
    torch.ops.aten.mm.default: 0,
    torch.ops.aten.matmul.default: 0,
}


@torch.no_grad()
def penultimate_features(
    model: nn.Module,
    images: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int = 512,
    progress: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """Input of the model's last linear layer for every image, computed in batches without gradients.

    Args:
        model: classifier in eval mode, already on ``device``: an ``nn.Module`` whose head is an
            ``nn.Linear``, or one that contains (or is) a ``torch.fx.GraphModule`` from
            ``torch.export`` whose head is a linear node.
        images: inputs, shape ``(N, C, H, W)``, on any device; moved to ``device`` one batch at a time.
        device: where the model runs.
        batch_size: images per forward pass.
        progress: called with the fraction done before every batch (it may raise to stop the extraction).

    Returns:
        float32 features, shape ``(N, D)``, on ``device``; ``D`` is the head's input width.

    Raises:
        FeatureExtractionError: no linear head was found, or its input is not ``(batch, D)``.
        ValueError: ``images`` is not 4-D or ``batch_size`` is not positive.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(images) == 0:
        raise ValueError("penultimate_features needs at least one image")
    batches = torch.split(images, batch_size)

    def each_batch(features_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        # one (N, D) tensor filled batch by batch: keeping each batch's features apart interleaves small long-lived
        # allocations with the batch's large short-lived ones, and the allocator's heap then grew by ~9 MB a batch
        # (199,999 samples: a worker at 5.5 GB instead of 2.4 GB; bench/worker_budget.py)
        features: torch.Tensor | None = None
        start = 0
        for number, batch in enumerate(batches):
            if progress is not None:
                progress(number / len(batches))
            found = features_of(batch.to(device))
            if features is None:
                features = found.new_empty((len(images), found.shape[1]))
            features[start : start + len(found)] = found
            start += len(found)
            del found  # not kept through the next forward: no small block left between its large ones
        assert features is not None  # there is at least one batch
        return features

    exported = last_graph_node(model, lambda node: node.target in _LINEAR_OPS)
    if exported is not None:
        name, graph_module, head_node = exported
        head_input = head_node.args[_LINEAR_OPS[head_node.target]]
        if not isinstance(head_input, fx.Node):
            raise FeatureExtractionError(f"the input of the last linear node {head_node.name} is not a graph value")
        cut = graph_cut(graph_module, head_input)
        if not name:
            return each_batch(lambda batch: _as_features(cut(batch)))
        with submodule_replaced(model, name, cut):
            return each_batch(lambda batch: _as_features(model(batch)))

    _, head = require_last_module(
        model,
        batches[0][:1].to(device),
        nn.Linear,
        FeatureExtractionError,
        "penultimate features need a linear classification head",
    )
    recorded: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        recorded.append(_as_features(args[0]))

    def hooked(batch: torch.Tensor) -> torch.Tensor:
        model(batch)
        features = recorded.pop()
        recorded.clear()
        return features

    handle = head.register_forward_pre_hook(record)
    try:
        return each_batch(hooked)
    finally:
        handle.remove()


def _as_features(tensor: Any) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise FeatureExtractionError(f"the last linear layer's input must be (batch, features), got {shape}")
    return tensor.detach().float()
