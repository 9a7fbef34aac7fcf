"""Finding and cutting layers: module trees (one probe pass) and ``torch.export`` graphs (a cut graph standing in
for the program inside the model's wrappers)."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from scanner.layers import ancestors, graph_cut, last_graph_node, last_module_run, submodule_replaced


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 5), nn.Linear(5, 3)).eval()


def test_last_module_run_is_the_last_that_ran_not_the_last_defined() -> None:
    class Reordered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 3)
            self.body = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    found = last_module_run(Reordered(), torch.zeros(1, 4), nn.Linear)
    assert found is not None
    assert found[0] == "head"
    assert last_module_run(Reordered(), torch.zeros(1, 4), nn.Conv2d) is None


def test_graph_cut_returns_what_the_chosen_node_computes() -> None:
    model = _net()
    images = torch.rand(2, 1, 8, 8)
    program = torch.export.export(model, (images,)).module()
    assert isinstance(program, fx.GraphModule)
    found = last_graph_node(program, lambda node: node.target in (torch.ops.aten.linear.default,))
    assert found is not None
    name, graph_module, head = found
    assert name == ""
    cut = graph_cut(graph_module, head.args[0])  # the head's input: the first linear layer's output
    with torch.no_grad():
        expected = model[3](model[2](model[1](model[0](images))))
        assert torch.allclose(cut(images), expected, atol=1e-6)
    assert head.args[0] in ancestors(head)


def test_submodule_replaced_restores_the_original_even_after_an_error() -> None:
    model = nn.Sequential(nn.Identity(), nn.Sequential(nn.Identity(), nn.Linear(2, 2)))
    original = model[1][1]
    seen: list[nn.Module] = []

    def fail_inside() -> None:
        with submodule_replaced(model, "1.1", nn.Identity()):
            seen.append(model[1][1])
            raise RuntimeError("the caller fails inside the block")

    with pytest.raises(RuntimeError):
        fail_inside()
    assert isinstance(seen[0], nn.Identity)
    assert model[1][1] is original
