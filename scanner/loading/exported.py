"""Loading a ``torch.export`` program (``.pt2``) that passed the ``model_file`` check, as a classifier.

The static check has already refused anything that ``torch.export.load`` would run; here the loaded
graph is checked once more (every node calls an allowed operator), switched to inference mode by
rewriting the ops' mode flags (exported modules refuse ``eval()``), and refused when it still draws
random numbers. :class:`ExportedClassifier` lets callers use any batch size, although the graph bakes
in the batch sizes it was exported for.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Self

import torch
from torch import Tensor, nn

from scanner.config import ModelOptions
from scanner.errors import DataModelMismatchError, UnsafeFileError, UnsupportedFormatError
from scanner.loading.pt2_program import allowed_graph_callable
from scanner.loading.types import FindingKind, ModelFileReport, PickleFinding

__all__ = ["ExportedClassifier", "load_exported"]

_RANDOM_OPS = frozenset(
    {
        "bernoulli", "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "normal",
        "uniform", "multinomial", "exponential", "geometric", "cauchy", "log_normal", "random", "poisson",
        "rrelu", "rrelu_with_noise",
    }
)  # fmt: skip


class ExportedClassifier(nn.Module):
    """An ``nn.Module`` around the graph module of a ``torch.export`` program.

    Exported graphs bake in the batch sizes they were exported for; this wrapper splits larger
    batches and zero-pads smaller ones so callers can use any batch size. The graph is always
    in inference mode (:func:`load_exported` rewrites it), so ``train()``/``eval()`` only set the
    flag; torch 2.14.1's exported modules raise on ``eval()``.

    Attributes:
        graph_module: the ``torch.fx.GraphModule`` of the program (for graph surgery, e.g.
            penultimate features).
        min_batch, max_batch: batch sizes the graph accepts (``max_batch`` None: unbounded).
    """

    def __init__(self, graph_module: torch.fx.GraphModule, min_batch: int, max_batch: int | None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.min_batch = min_batch
        self.max_batch = max_batch

    def train(self, mode: bool = True) -> Self:
        """Set the flag only: the exported graph's mode is fixed (inference)."""
        self.training = mode
        return self

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(N, K)`` for images ``(N, C, H, W)``, any ``N``."""
        count = images.shape[0]
        if count == 0 or (self.min_batch <= count and (self.max_batch is None or count <= self.max_batch)):
            result: Tensor = self.graph_module(images)
            return result
        step = self.max_batch if self.max_batch is not None else count
        outputs = []
        for start in range(0, count, step):
            chunk = images[start : start + step]
            real = chunk.shape[0]
            if real < self.min_batch:
                chunk = torch.cat([chunk, chunk.new_zeros((self.min_batch - real, *chunk.shape[1:]))])
            outputs.append(self.graph_module(chunk)[:real])
        return torch.cat(outputs)


def load_exported(
    path: Path, options: ModelOptions, device: torch.device, report: ModelFileReport
) -> tuple[nn.Module, tuple[int, int, int] | None]:
    """The program at ``path`` (``report`` is its clean ``model_file`` check) as a classifier on ``device``.

    Returns:
        The classifier and its input shape ``(C, H, W)``: ``options.input_shape``, else the exported one
        (None when the program's image size is dynamic).

    Raises:
        UnsafeFileError: a graph node calls something other than an allowed operator.
        DataModelMismatchError: ``options.input_shape`` is not the shape the program was exported for.
        UnsupportedFormatError: not one image-batch input, or the graph draws random numbers.
    """
    from torch.export.passes import move_to_device_pass

    with path.open("rb") as stream:  # a stream: torch warns about paths whose name does not end in .pt2
        program = torch.export.load(stream)
    _check_graph_targets(program, report)
    program = move_to_device_pass(program, device)
    exported_shape, min_batch, max_batch = _exported_input(program)
    if options.input_shape is not None and exported_shape is not None and options.input_shape != exported_shape:
        raise DataModelMismatchError(
            f"the archive was exported for images of shape {exported_shape} but input_shape is {options.input_shape}"
        )
    graph_module = program.module(check_guards=False)  # True would exec() the archive's guard code
    _switch_to_inference(graph_module)
    _refuse_random_ops(graph_module)
    return ExportedClassifier(graph_module, min_batch, max_batch), options.input_shape or exported_shape


def _check_graph_targets(program: torch.export.ExportedProgram, report: ModelFileReport) -> None:
    """Defence in depth after the static check: every node calls an allowed operator.

    Raises:
        UnsafeFileError: a node calls anything else (its report names the target).
    """
    for graph_module in program.graph_module.modules():
        if not isinstance(graph_module, torch.fx.GraphModule):
            continue
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and not allowed_graph_callable(node.target):
                name = getattr(node.target, "__qualname__", repr(node.target))
                finding = PickleFinding(
                    member="models/model.json",
                    globals=(f"{getattr(node.target, '__module__', '?')}.{name}",),
                    message=f"the exported program calls {name}, which is not an ATen operator",
                    kind=FindingKind.unsafe_program,
                )
                raise UnsafeFileError(
                    f"{finding.message}; the model was not run", report=dataclasses.replace(report, findings=(finding,))
                )


def _exported_input(program: torch.export.ExportedProgram) -> tuple[tuple[int, int, int] | None, int, int | None]:
    """``(C, H, W)`` (None when dynamic) and the batch range of the program's single image input."""
    from torch.export.graph_signature import InputKind

    user_inputs = [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT]
    if len(user_inputs) != 1:
        raise UnsupportedFormatError(f"the exported program takes {len(user_inputs)} inputs; a classifier takes one")
    placeholder = next(node for node in program.graph.nodes if node.op == "placeholder" and node.name == user_inputs[0])
    example = placeholder.meta.get("val")
    if not isinstance(example, Tensor) or example.dim() != 4:
        shape = tuple(example.shape) if isinstance(example, Tensor) else type(example).__name__
        raise UnsupportedFormatError(f"the exported program's input is {shape}, not an image batch (N, C, H, W)")
    batch, *image = example.shape
    image_shape = (image[0], image[1], image[2]) if all(type(size) is int for size in image) else None
    if not isinstance(batch, torch.SymInt):
        return image_shape, int(batch), int(batch)
    bounds = program.range_constraints.get(batch.node.expr)
    if bounds is None:
        return image_shape, 1, None
    lower = max(1, int(bounds.lower)) if bounds.lower.is_Integer else 1
    upper = int(bounds.upper) if bounds.upper.is_Integer else None
    return image_shape, lower, upper


def _switch_to_inference(graph_module: torch.fx.GraphModule) -> None:
    """Put an exported graph in inference mode by rewriting its ops' ``training``/``train`` flags.

    Exported graphs record the mode the model was exported in (``aten.batch_norm(...,
    training=True)``, ``aten.dropout(..., train=True)``) and torch 2.14.1 has no public way to
    switch it (``eval()`` raises ``NotImplementedError``). Dropout decomposed into random ops
    by ``run_decompositions`` cannot be recognised this way.
    """
    for module in graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        changed = False
        for node in module.graph.nodes:
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            for index, argument in enumerate(node.target._schema.arguments):
                if argument.name not in ("training", "train"):
                    continue
                if index < len(node.args) and node.args[index] is True:
                    node.update_arg(index, False)
                    changed = True
                elif node.kwargs.get(argument.name) is True:
                    node.update_kwarg(argument.name, False)
                    changed = True
        if changed:
            module.recompile()


def _refuse_random_ops(graph_module: torch.fx.GraphModule) -> None:
    """Refuse graphs that still draw random numbers after :func:`_switch_to_inference`.

    Training-only randomness behind a Python ``if self.training`` (stochastic depth, noise
    layers) is traced into plain random ops that no flag switches off.

    Raises:
        UnsupportedFormatError: naming the random operators.
    """
    random_ops = sorted(
        {
            str(node.target)
            for module in graph_module.modules()
            if isinstance(module, torch.fx.GraphModule)
            for node in module.graph.nodes
            if isinstance(node.target, torch._ops.OpOverload)
            and node.target.overloadpacket.__name__.rstrip("_") in _RANDOM_OPS
        }
    )
    if random_ops:
        raise UnsupportedFormatError(
            f"the exported program draws random numbers ({', '.join(random_ops)}), so its outputs are not"
            " reproducible; it was probably exported in training mode: call model.eval() before torch.export.export"
        )
