"""Finding and cutting layers in any loaded classifier: module trees and ``torch.export`` graphs alike.

Penultimate features (:mod:`scanner.features`) and Grad-CAM (:mod:`scanner.gradcam`) both need "the last
layer of some kind that a forward pass runs" and a way to read or replace what flows through it. For an
``nn.Module`` tree that is a hook on the module found by one probe pass (:func:`last_module_run`). A
``torch.export`` program has no modules to hook: its layers are ``call_function`` nodes, so the graph is
searched (:func:`last_graph_node`), cut down to the part that a node depends on (:func:`graph_cut`), and the
cut graph stands in for the program inside the model's own wrappers (:func:`submodule_replaced`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import fx, nn

__all__ = [
    "ancestors",
    "graph_cut",
    "last_graph_node",
    "last_module_run",
    "require_last_module",
    "submodule_replaced",
]

M = TypeVar("M", bound=nn.Module)


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


def require_last_module(
    model: nn.Module, probe: torch.Tensor, kind: type[M], fail: Callable[[str], Exception], need: str
) -> tuple[str, M]:
    """:func:`last_module_run`, or ``fail(reason)`` raised when ``model`` has no module of type ``kind`` or none ran;
    ``need`` ends the reason (what the caller needs the layer for)."""
    layer = f"nn.{kind.__name__}"
    if not any(isinstance(module, kind) for module in model.modules()):
        raise fail(f"{type(model).__name__} has no {layer} layer and no torch.export graph with one: {need}")
    found = last_module_run(model, probe, kind)
    if found is None:
        raise fail(f"no {layer} layer ran in a forward pass: {need}")
    return found


def ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node that ``node`` depends on, directly or not (``node`` itself excluded)."""
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


def last_graph_node(model: nn.Module, matches: Callable[[fx.Node], bool]) -> tuple[str, fx.GraphModule, fx.Node] | None:
    """The first ``torch.export`` graph module inside ``model`` (or ``model`` itself) that has a node for which
    ``matches`` is true among the nodes its output depends on, and the last such node in execution order.

    Returns:
        ``(qualified name, graph module, node)``; the name is ``""`` when ``model`` is the graph module; ``None``
        when no graph module has a matching node.
    """
    for name, module in model.named_modules():
        if isinstance(module, fx.GraphModule):
            needed = ancestors(module.graph.output_node())
            found = [node for node in module.graph.nodes if node in needed and matches(node)]
            if found:
                return name, module, found[-1]
    return None


def graph_cut(module: fx.GraphModule, returns: fx.Node) -> fx.GraphModule:
    """A graph module with the same inputs as ``module`` that returns the value of the node ``returns``.

    Only the nodes that value depends on are copied (plus every placeholder, so the call signature stays the
    same); parameters are shared with ``module``, not copied.
    """
    keep = ancestors(returns) | {returns}
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    for node in module.graph.nodes:
        if node.op == "placeholder" or node in keep:
            copies[node] = graph.node_copy(node, lambda arg: copies[arg])
    graph.output(copies[returns])
    return fx.GraphModule(module, graph)


@contextmanager
def submodule_replaced(model: nn.Module, name: str, replacement: nn.Module) -> Iterator[None]:
    """Within the block, the submodule ``name`` of ``model`` is ``replacement`` (restored afterwards).

    The model's own wrappers around an exported program (normalisation, batch splitting) then run unchanged
    around a cut or tapped graph.
    """
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    original = getattr(parent, attribute)
    setattr(parent, attribute, replacement)
    try:
        yield
    finally:
        setattr(parent, attribute, original)
