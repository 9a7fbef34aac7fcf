"""The grammar of serialized .pt2 programs: operators, symbolic expressions, guards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from scanner.config import ModelOptions
from scanner.errors import UnsafeFileError
from scanner.loading import FindingKind, load_model, scan_model_file
from scanner.loading.pt2_program import program_problems
from tests.scanner.loading.helpers import CPU


def test_scan_pt2_with_batchnorm_and_dropout_is_clean(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Dropout(), nn.Linear(2 * 4 * 4, 2))
    path = tmp_path / "bn.pt2"
    torch.export.save(torch.export.export(net.train(), (torch.rand(2, 1, 6, 6),)), path)
    assert scan_model_file(path).findings == ()


def test_scan_pt2_with_symbolic_shapes_and_guards_is_clean(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    auto = torch.export.Dim.AUTO
    program = torch.export.export(net, (torch.zeros(4, 3, 16, 16),), dynamic_shapes=({0: auto, 2: auto, 3: auto},))
    assert program._guards_code  # this export has guards and sympy expressions to check
    path = tmp_path / "auto.pt2"
    torch.export.save(program, path)
    assert scan_model_file(path).findings == ()
    loaded = load_model(path, ModelOptions(input_shape=(3, 20, 24)), CPU)
    assert loaded.num_classes == 5


@torch.library.custom_op("bdstest::double", mutates_args=())
def _double(features: torch.Tensor) -> torch.Tensor:
    return features * 2


@_double.register_fake
def _double_fake(features: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(features)


class _CustomOpNet(nn.Module):
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        doubled: torch.Tensor = torch.ops.bdstest.double(features)
        return doubled


def test_scan_and_load_refuse_operators_outside_aten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "custom_op.pt2"
    torch.export.save(torch.export.export(_CustomOpNet(), (torch.zeros(2, 3),)), path)
    (finding,) = scan_model_file(path).findings
    assert finding.kind is FindingKind.unsafe_program
    assert finding.globals == ("operator 'torch.ops.bdstest.double.default'",)

    # Defence in depth: with the static check blinded, the loader still refuses before running anything.
    monkeypatch.setattr("scanner.loading.pt2_program._operator_allowed", lambda target: True)
    with pytest.raises(UnsafeFileError) as caught:
        load_model(path, ModelOptions(), CPU)
    assert caught.value.report.findings[0].kind is FindingKind.unsafe_program
    assert "double" in caught.value.detail


@pytest.mark.parametrize(
    ("expression", "allowed"),
    [
        ("Symbol('s0', positive=True, integer=True)", True),
        ("Mul(Integer(4), Max(Integer(1), Add(Symbol('s0', positive=True, integer=True), Integer(-2))))", True),
        ("s0 + 2*s1 - FloorDiv(s0, 3)", True),
        ("Max('__import__(\"os\")')", False),  # sympy functions sympify string arguments
        ("Symbol('s0').__class__", False),
        ("__import__('os').system('true')", False),
        ("S('1 + 1')", False),
        ("(lambda: 0)()", False),
        ("Symbol('s0', positive=exec)", False),
    ],
)
def test_symbolic_expression_grammar(expression: str, allowed: bool) -> None:
    program = {"graph_module": {"graph": {"tensor_values": {"x": {"sizes": [{"as_expr": {"expr_str": expression}}]}}}}}
    assert (program_problems(program) == []) is allowed


@pytest.mark.parametrize(
    ("guard", "allowed"),
    [
        ("L['x'].size()[2] >= 3", True),
        ("((-2) + L['x'].size()[3]) != 1", True),
        ("L['x'].size()[0] == 2 and L['x'].stride()[1] == 1", True),
        ("L['x'].__class__", False),
        ("print(1)", False),
        ("L['x\") or 1 or (\"'].size()[0] == 1", False),
        ("1)\n  import os\n  (1", False),
    ],
)
def test_guard_grammar(guard: str, allowed: bool) -> None:
    assert (program_problems({"guards_code": [guard]}) == []) is allowed
