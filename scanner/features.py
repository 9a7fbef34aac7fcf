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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import fx, nn

from scanner.errors import FeatureExtractionError

M = TypeVar("M", bound=nn.Module)

__all__ = ["FeatureExtractionError", "last_module_run", "penultimate_features"]

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

    exported = _exported_graph(model)
    if exported is not None:
        name, graph_module, head_node = exported
        cut = _graph_cut(graph_module, head_node)
        if not name:
            return each_batch(lambda batch: _as_features(cut(batch)))
        with _submodule_replaced(model, name, cut):
            return each_batch(lambda batch: _as_features(model(batch)))

    head = _last_linear_module(model, batches[0][:1].to(device))
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


def last_module_run(model: nn.Module, probe: torch.Tensor, kind: type[M]) -> tuple[str, M] | None:
    """The module of type ``kind`` that runs last in a forward pass on ``probe`` (one image is enough), with its
    qualified name; ``None`` when none of them ran."""
    names = {id(module): name for name, module in model.named_modules() if isinstance(module, kind)}
    order: list[nn.Module] = []
    handles = [
        module.register_forward_pre_hook(lambda layer, args: order.append(layer))
        for module in model.modules()
        if id(module) in names
    ]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    if not order:
        return None
    last = order[-1]
    assert isinstance(last, kind)
    return names[id(last)], last


def _last_linear_module(model: nn.Module, probe: torch.Tensor) -> nn.Linear:
    """The ``nn.Linear`` that runs last in a forward pass on ``probe``."""
    if not any(isinstance(module, nn.Linear) for module in model.modules()):
        raise FeatureExtractionError(
            f"{type(model).__name__} has no nn.Linear layer and no torch.export graph: "
            "penultimate features need a linear classification head"
        )
    found = last_module_run(model, probe, nn.Linear)
    if found is None:
        raise FeatureExtractionError("no nn.Linear layer ran in a forward pass; the classification head is not linear")
    return found[1]


def _exported_graph(model: nn.Module) -> tuple[str, fx.GraphModule, fx.Node] | None:
    """The graph module of a ``torch.export`` program inside ``model`` and its last linear node, if any.

    Returns:
        ``(qualified name, graph module, head node)``; the name is ``""`` when ``model`` is the graph module.
    """
    for name, module in model.named_modules():
        if isinstance(module, fx.GraphModule):
            head = _last_linear_node(module.graph)
            if head is not None:
                return name, module, head
    return None


def _last_linear_node(graph: fx.Graph) -> fx.Node | None:
    """The last linear node (in execution order) that the graph's output depends on."""
    needed = _ancestors(graph.output_node())
    candidates = [node for node in graph.nodes if node in needed and node.target in _LINEAR_OPS]
    return candidates[-1] if candidates else None


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


def _graph_cut(module: fx.GraphModule, head: fx.Node) -> fx.GraphModule:
    """A graph module with the same inputs as ``module`` that returns the input of ``head``.

    Only the nodes that input depends on are copied (plus every placeholder, so the call signature
    stays the same); parameters are shared with ``module``, not copied.
    """
    features = head.args[_LINEAR_OPS[head.target]]
    if not isinstance(features, fx.Node):
        raise FeatureExtractionError(f"the input of the last linear node {head.name} is not a graph value")
    keep = _ancestors(features) | {features}
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    for node in module.graph.nodes:
        if node.op == "placeholder" or node in keep:
            copies[node] = graph.node_copy(node, lambda arg: copies[arg])
    graph.output(copies[features])
    return fx.GraphModule(module, graph)


@contextmanager
def _submodule_replaced(model: nn.Module, name: str, replacement: nn.Module) -> Iterator[None]:
    """Within the block, the submodule ``name`` of ``model`` is ``replacement`` (restored afterwards).

    The model's own wrappers around the exported program (normalisation, batch splitting) then run
    unchanged around the cut graph, so ``model(images)`` returns the head's input instead of the logits.
    """
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    original = getattr(parent, attribute)
    setattr(parent, attribute, replacement)
    try:
        yield
    finally:
        setattr(parent, attribute, original)
