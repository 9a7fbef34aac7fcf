"""Grad-CAM heatmaps on a classifier's last convolutional layer, for any loaded model.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization", ICCV 2017:
for class ``c`` and the activations ``A`` (K, h, w) of the last convolutional layer, each channel is weighted by
the spatial mean of ``d y_c / d A_k`` (``y_c`` the class's logit, before the softmax), and the heatmap is
``ReLU(sum_k w_k A_k)``, upsampled to the input size.

The last convolutional layer is found the way :mod:`scanner.features` finds the classification head:

- ordinary ``nn.Module`` trees: the last ``nn.Conv2d`` that runs in a forward pass (one probe pass); a forward
  hook on it swaps its output for a leaf tensor that requires grad, so the gradient is taken there even when the
  weights are frozen.
- ``torch.export`` programs: convolutions are ``call_function`` nodes (``aten.conv2d`` / ``aten.convolution``),
  so there is no module to hook. A copy of the graph (parameters shared) routes the last convolution node that the
  output depends on through an identity module, and the same hook goes on that; while the heatmaps are computed
  the copy stands in for the program inside its wrappers (normalisation, batch splitting).

Models with neither (TorchScript, models without convolutions) raise :class:`GradCamUnavailableError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from scanner.errors import GradCamUnavailableError
from scanner.layers import last_graph_node, require_last_module, submodule_replaced

__all__ = ["GradCam", "GradCamUnavailableError", "grad_cam", "heat_fraction_inside", "last_conv_layer"]

#: ATen ops that implement a 2-D convolution in an exported graph.
_CONV_OPS: frozenset[Any] = frozenset(
    {
        torch.ops.aten.conv2d.default,
        torch.ops.aten.conv2d.padding,
        torch.ops.aten.convolution.default,
        torch.ops.aten._convolution.default,
    }
)
_TRANSPOSED_ARG = 6  # ``transposed`` of aten.convolution / aten._convolution
_TAP = "gradcam_tap"
_MAX_LAYER_NAME = 200

#: ``forward(images) -> logits``, with the activations of the last convolution recorded on the way.
_Forward = Callable[[Tensor], Tensor]


@dataclass(frozen=True, eq=False)  # holds tensors: compare by identity
class GradCam:
    """Grad-CAM of a batch of images.

    Attributes:
        heatmaps: float32 ``(N, H, W)`` in [0, 1], the input's size and device; each image's maximum is 1 (all 0
            when no channel has positive evidence for the class).
        classes: int64 ``(N,)``: the class each heatmap explains.
        predictions: int64 ``(N,)``: the model's prediction for each image.
        layer: the convolutional layer used: a module path (``features.3``), or for an exported program the
            layer's path recorded in the program, else the graph node's name.
    """

    heatmaps: Tensor
    classes: Tensor
    predictions: Tensor
    layer: str


class _Tap(nn.Identity):
    """Where the hook goes in an exported graph: the last convolution's output passes through it."""


def grad_cam(model: nn.Module, images: Tensor, classes: Tensor | None = None, *, batch_size: int = 64) -> GradCam:
    """Grad-CAM heatmaps of ``images`` on the model's last convolutional layer.

    Args:
        model: classifier in eval mode on the device of ``images``, taking ``(N, C, H, W)``: an ``nn.Module`` with
            ``nn.Conv2d`` layers, or one that contains (or is) a ``torch.fx.GraphModule`` from ``torch.export``.
            Its weights are not changed and get no gradients.
        images: ``(N, C, H, W)`` float inputs, as the model takes them.
        classes: int64 ``(N,)``, the class to explain for each image; default: the model's prediction.
        batch_size: images per forward/backward pass.

    Returns:
        The heatmaps, the explained classes, the predictions and the layer's name.

    Raises:
        GradCamUnavailableError: no 2-D convolution runs in the model, or its output is not ``(N, K, h, w)``.
        ValueError: ``images`` is not a non-empty 4-D batch, or ``classes`` does not fit it.
    """
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    if classes is not None and classes.shape != (len(images),):
        raise ValueError(f"classes must have shape ({len(images)},), got {tuple(classes.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    heatmaps, explained, predictions = [], [], []
    with _conv_tap(model, images[:1]) as (layer, forward, captured):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            captured.clear()
            with torch.enable_grad():
                logits = forward(batch)
                if not captured:
                    raise GradCamUnavailableError(f"the convolutional layer {layer} did not run in a forward pass")
                predicted = logits.detach().argmax(dim=1)
                wanted = predicted if classes is None else classes[start : start + batch_size].to(logits.device)
                score = logits.gather(1, wanted.unsqueeze(1)).sum()
                gradients = torch.autograd.grad(score, captured, allow_unused=True)
            # an exported program may split a batch or pad it: its captures hold the real rows first, in order
            activation = torch.cat([a.detach() for a in captured])[: len(batch)]
            gradient = torch.cat(
                [torch.zeros_like(a) if g is None else g for a, g in zip(captured, gradients, strict=True)]
            )[: len(batch)]
            heatmaps.append(_heatmaps(activation, gradient, batch.shape[-2:]))
            explained.append(wanted)
            predictions.append(predicted)
    return GradCam(
        heatmaps=torch.cat(heatmaps),
        classes=torch.cat(explained),
        predictions=torch.cat(predictions),
        layer=layer,
    )


def _heatmaps(activation: Tensor, gradient: Tensor, size: torch.Size) -> Tensor:
    """``ReLU(sum_k mean(dy/dA_k) A_k)`` per image, upsampled to ``size`` and scaled to a maximum of 1."""
    weights = gradient.float().mean(dim=(2, 3), keepdim=True)  # (n, K, 1, 1)
    cam = torch.relu((weights * activation.float()).sum(dim=1, keepdim=True))  # (n, 1, h, w)
    cam = F.interpolate(cam, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))


def heat_fraction_inside(heatmaps: Tensor, mask: Tensor) -> Tensor:
    """The share of each heatmap's total heat that lies inside a trigger's region.

    The region is where the mask reaches half its maximum (``mask >= max / 2``): a real patch trigger's pixels,
    and the core of a reversed Neural Cleanse mask, whose values are soft but concentrate near 1 on few pixels.
    Half of the maximum rather than a fixed level, so that a blended trigger (mask ``alpha`` everywhere) is the
    whole image, and a fraction rather than a mean heat, so that the region's size does not need its own scale:
    heat spread evenly gives the region's share of the image.

    Args:
        heatmaps: ``(N, H, W)`` non-negative heat (e.g. :attr:`GradCam.heatmaps`).
        mask: ``(H, W)`` trigger mask in [0, 1], any device (moved to that of ``heatmaps``).

    Returns:
        float32 ``(N,)`` in [0, 1]; 0 for a heatmap without heat.

    Raises:
        ValueError: the shapes do not match, or the mask is all zero.
    """
    if heatmaps.ndim != 3 or mask.shape != heatmaps.shape[1:]:
        raise ValueError(
            f"expected heatmaps (N, H, W) and a mask (H, W), got {tuple(heatmaps.shape)} and {tuple(mask.shape)}"
        )
    peak = float(mask.max())
    if not peak > 0:
        raise ValueError("the mask is all zero: it has no region")
    region = (mask.to(heatmaps.device) >= peak / 2).to(heatmaps.dtype)
    total = heatmaps.sum(dim=(1, 2))
    inside = (heatmaps * region).sum(dim=(1, 2))
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(heatmaps.dtype).tiny), 0.0).float()


def last_conv_layer(model: nn.Module, probe: Tensor) -> str:
    """The name of the layer :func:`grad_cam` uses (see :attr:`GradCam.layer`).

    Args:
        model: as for :func:`grad_cam`.
        probe: one or a few inputs ``(n, C, H, W)`` on the model's device (runs one forward pass for modules).

    Raises:
        GradCamUnavailableError: the model has no 2-D convolution that runs.
    """
    with _conv_tap(model, probe) as (layer, _, _):
        return layer


@contextmanager
def _conv_tap(model: nn.Module, probe: Tensor) -> Iterator[tuple[str, _Forward, list[Tensor]]]:
    """Within the block: the layer's name, a forward function, and the list its activations are recorded into.

    Each recorded activation is a leaf that requires grad and stands in for the layer's output downstream, so
    ``torch.autograd.grad(score, recorded)`` gives ``d score / d A`` whatever the weights' ``requires_grad``.
    """
    captured: list[Tensor] = []

    def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor:
        if not isinstance(output, Tensor) or output.ndim != 4:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise GradCamUnavailableError(f"the last convolution's output must be (N, K, h, w), got {shape}")
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    exported = last_graph_node(model, _is_conv2d)
    if exported is not None:
        name, graph_module, conv = exported
        tapped, tap = _tapped_graph(graph_module, conv)
        handle = tap.register_forward_hook(record)
        try:
            if not name:
                yield _node_layer_name(conv), tapped, captured
            else:
                with submodule_replaced(model, name, tapped):
                    yield _node_layer_name(conv), model, captured
        finally:
            handle.remove()
        return

    layer, conv_module = require_last_module(
        model, probe, nn.Conv2d, GradCamUnavailableError, "Grad-CAM needs a convolutional layer"
    )
    handle = conv_module.register_forward_hook(record)
    try:
        yield layer, model, captured
    finally:
        handle.remove()


def _is_conv2d(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _CONV_OPS:
        return False
    if node.target in (torch.ops.aten.convolution.default, torch.ops.aten._convolution.default):
        transposed = node.args[_TRANSPOSED_ARG] if len(node.args) > _TRANSPOSED_ARG else False
        weight = node.args[1]
        value = weight.meta.get("val") if isinstance(weight, fx.Node) else None
        return transposed is False and (value is None or getattr(value, "ndim", 4) == 4)
    return True


def _node_layer_name(node: fx.Node) -> str:
    """The module path the exporter recorded for the node (``features.3``), else the node's name."""
    stack = node.meta.get("nn_module_stack")
    if isinstance(stack, dict) and stack:
        path = list(stack.values())[-1]
        if isinstance(path, tuple) and path and isinstance(path[0], str) and path[0]:
            return f"{path[0][:_MAX_LAYER_NAME]} ({node.name})"
    return node.name


def _tapped_graph(module: fx.GraphModule, conv: fx.Node) -> tuple[fx.GraphModule, _Tap]:
    """A copy of ``module`` (same calling convention, parameters shared) whose node ``conv`` feeds a :class:`_Tap`
    that every former user of ``conv`` now reads from."""
    graph = fx.Graph()
    graph.set_codegen(module.graph._codegen)
    copies: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(module.graph, copies))
    tapped = fx.GraphModule(module, graph)
    tap = _Tap()
    tapped.add_submodule(_TAP, tap)
    conv_copy = copies[conv]
    with graph.inserting_after(conv_copy):
        tap_node = graph.call_module(_TAP, (conv_copy,))
    conv_copy.replace_all_uses_with(tap_node, delete_user_cb=lambda user: user is not tap_node)
    tapped.recompile()
    return tapped, tap
