"""The grammar a serialized ``.pt2`` program must fit, so that loading it runs no Python of the file's choosing.

A ``.pt2`` archive can run code without any pickle: ``torch.export.load`` resolves graph node targets
with ``getattr`` chains from ``torch`` (``torch.os.system`` is callable), parses symbolic shapes with
``sympy.sympify`` (which evaluates Python), and ``ExportedProgram.module()`` compiles the archive's
guard strings into Python. :func:`program_problems` checks the parsed JSON before torch sees it:
ATen/prims operators, higher-order operators and torch's symbolic Python operators only, sympy
expression classes over shape symbols, and shape guards over input sizes. :func:`allowed_graph_callable`
is the same rule for a graph that torch has already loaded.
"""

from __future__ import annotations

import ast
import re

__all__ = ["allowed_graph_callable", "program_problems"]

# Python callables an exported graph may name (torch's serializer writes f"{module}.{name}").
_PT2_PYTHON_OPERATORS = frozenset(
    [
        f"_operator.{name}"
        for name in (
            "getitem", "eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub", "floordiv",
            "mod", "pow", "truediv", "and_", "or_", "lshift", "rshift",
        )
    ]
    + ["math.trunc"]
    + [f"torch.sym_{name}" for name in ("not", "int", "float", "ite", "max", "min", "sqrt")]
)  # fmt: skip
_PT2_OPERATOR_NAMESPACES = ("aten", "prims")
# What sympy may construct from the graph's symbolic expressions (torch parses them with
# sympy.sympify, which evaluates Python): sympy's and torch.utils._sympy's expression classes.
_SYMPY_CALLS = frozenset(
    [
        "Symbol",
        "Integer",
        "Float",
        "Rational",
        "Add",
        "Mul",
        "Pow",
        "Mod",
        "Max",
        "Min",
        "Abs",
        "floor",
        "ceiling",
        "Piecewise",
        "ExprCondPair",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "Equality",
        "Unequality",
        "StrictLessThan",
        "StrictGreaterThan",
        "LessThan",
        "GreaterThan",
        "And",
        "Or",
        "Not",
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "LShift",
        "RShift",
        "PowByNatural",
        "FloatPow",
        "FloatTrueDiv",
        "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "Identity",
    ]
)
_SYMPY_CONSTANTS = frozenset({"oo", "zoo", "nan", "true", "false"})
_SYMPY_KEYWORDS = frozenset(
    {"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "precision", "evaluate"}
)
_SYMBOL_NAME = re.compile(r"[a-z]+[0-9]+")
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})


def program_problems(document: object) -> list[str]:
    """The operator targets, symbolic expressions and guards of a serialized program that are not allowed."""
    problems: list[str] = []
    if isinstance(document, dict):
        guards = document.get("guards_code", [])
        for guard in guards if isinstance(guards, list) else [guards]:
            if not (isinstance(guard, str) and _guard_allowed(guard)):
                problems.append(f"guard code {guard!r}")
    pending = [document]
    while pending:
        value = pending.pop()
        if isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                if key in ("target", "as_operator") and isinstance(item, str):
                    if not _operator_allowed(item):
                        problems.append(f"operator {item!r}")
                elif key == "expr_str" and isinstance(item, str):
                    if not _sympy_expression_allowed(item):
                        problems.append(f"symbolic expression {item!r}")
                else:
                    pending.append(item)
    return problems


def _operator_allowed(target: str) -> bool:
    """An ATen/prims ``OpOverload``, a higher-order operator, or one of torch's symbolic Python operators."""
    if target in _PT2_PYTHON_OPERATORS:
        return True
    parts = target.split(".")
    if parts[:2] != ["torch", "ops"] or not all(part.isidentifier() and not part.startswith("__") for part in parts):
        return False
    import torch

    expected: type
    if len(parts) == 5 and parts[2] in _PT2_OPERATOR_NAMESPACES:
        expected = torch._ops.OpOverload
    elif len(parts) == 4 and parts[2] == "higher_order":
        expected = torch._ops.HigherOrderOperator
    else:
        return False
    resolved: object = torch.ops
    try:
        for part in parts[2:]:
            resolved = getattr(resolved, part)
    except Exception:  # unknown operators raise AttributeError or RuntimeError
        return False
    return isinstance(resolved, expected)


def allowed_graph_callable(target: object) -> bool:
    """Whether a deserialized graph node may call ``target`` (the check of :func:`_operator_allowed`, resolved).

    ATen/prims operator overloads, higher-order operators, and torch's symbolic Python operators.
    """
    import torch

    if isinstance(target, torch._ops.OpOverload):
        return target.namespace in _PT2_OPERATOR_NAMESPACES
    if isinstance(target, torch._ops.HigherOrderOperator):
        return True
    module, name = getattr(target, "__module__", None), getattr(target, "__name__", None)
    return f"{module}.{name}" in _PT2_PYTHON_OPERATORS


def _parse_expression(text: str) -> ast.Expression | None:
    if len(text) > 100_000 or "\n" in text or "\r" in text:
        return None
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


_EXPRESSION_NODES = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.Compare,
    ast.BoolOp,
    ast.operator,
    ast.unaryop,
    ast.cmpop,
    ast.boolop,
    ast.Load,
)


def _sympy_expression_allowed(text: str) -> bool:
    """Arithmetic over symbols (``s0``) and calls of sympy expression classes; strings only as names.

    ``Max('...')`` would sympify (evaluate) its string argument, so strings are allowed only as
    the first argument of ``Symbol``/``Float``.
    """
    tree = _parse_expression(text)
    if tree is None:
        return False
    name_strings: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _SYMPY_CALLS:
                return False
            if node.func.id in ("Symbol", "Float") and node.args and isinstance(node.args[0], ast.Constant):
                name_strings.add(id(node.args[0]))
            for keyword in node.keywords:
                if keyword.arg not in _SYMPY_KEYWORDS or not isinstance(keyword.value, ast.Constant):
                    return False
        elif isinstance(node, ast.Name):
            if not (node.id in _SYMPY_CALLS or node.id in _SYMPY_CONSTANTS or _SYMBOL_NAME.fullmatch(node.id)):
                return False
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str | bytes) and id(node) not in name_strings:
                return False
        elif not isinstance(node, (*_EXPRESSION_NODES, ast.keyword)):
            return False
    return True


def _guard_allowed(text: str) -> bool:
    """Shape guards like ``L['x'].size()[2] >= 3``: arithmetic and comparisons over input sizes."""
    tree = _parse_expression(text)
    if tree is None or '"' in text or "\\" in text:  # the guard is pasted into a string literal too
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Attribute) or node.keywords:
                return False
        elif isinstance(node, ast.Attribute):
            if node.attr not in _GUARD_METHODS:
                return False
        elif isinstance(node, ast.Name):
            if node.id != "L":
                return False
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str) and not node.value.isidentifier():
                return False
            if isinstance(node.value, bytes):
                return False
        elif not isinstance(node, (*_EXPRESSION_NODES, ast.Subscript)):
            return False
    return True
