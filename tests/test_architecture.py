"""The shape of the code base, checked: no import cycles in ``scanner/`` or ``service/``, the scanner's layers import
only downwards, nothing at run time depends on the test helpers in ``scanner.testing``, no private name crosses a
module boundary, and the pieces that a client needs load without torch.

The import graph is read from the source (every ``import``: module level, inside functions, under
``TYPE_CHECKING``), so a cycle hidden in a function-local import counts. Then every module is imported in a fresh
interpreter, dependencies first.
"""

from __future__ import annotations

import ast
import graphlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scanner", "service")

#: The scanner's layers, lowest first: a module may import from its own layer and the ones below it, never above.
#: Prefixes match a module and its submodules. ``scanner.loading.types`` is a leaf that ``errors`` names in a type.
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "scanner._version",
        "scanner.errors",
        "scanner.verdict",
        "scanner.digest",
        "scanner.stats",
        "scanner.config",
        "scanner.device",
        "scanner.loading.types",
    ),
    ("scanner.classifier", "scanner.trigger", "scanner.layers"),
    ("scanner.loading",),
    (
        "scanner.neural_cleanse",
        "scanner.max_margin",
        "scanner.features",
        "scanner.spectral",
        "scanner.gradcam",
        "scanner.evidence",
    ),
    ("scanner.detectors",),
    ("scanner.pipeline",),
    ("scanner.repair",),
    ("scanner.render",),
    ("scanner.testing",),
    ("scanner",),
)

#: Modules that clients (``backdoor-scan submit``, the report page) load: they must not pull in torch.
TORCH_FREE = (
    "scanner._version",
    "scanner.digest",
    "scanner.render.text",
    "scanner.render.sarif",
    "scanner.render.html",
)


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (for ``from package import name``: the submodule when ``name`` is one)
    names: tuple[str, ...]  # the names taken with ``from ... import``
    line: int


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _imports(modules: dict[str, Path]) -> list[Import]:
    found = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.extend(Import(name, alias.name, (), node.lineno) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against the importing package
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names = tuple(alias.name for alias in node.names)
                submodules = [f"{base}.{item}" for item in names if f"{base}.{item}" in modules]
                found.extend(Import(name, target, names, node.lineno) for target in submodules or [base])
    return [item for item in found if item.target.split(".")[0] in PACKAGES]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for item in _imports(modules):
        if item.target != item.source:
            graph[item.source].add(item.target)
    return graph


def _layer(module: str) -> int:
    best = (-1, -1)  # (prefix length, layer)
    for number, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[0]:
                best = (len(prefix), number)
    assert best[1] >= 0, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def test_the_graph_sees_a_known_edge() -> None:
    """The checks below would pass on an empty graph: make sure the parser finds real imports."""
    graph = _graph()
    assert (
        "scanner.detectors.neural_cleanse" in graph["scanner.pipeline"]
        or "scanner.detectors" in graph["scanner.pipeline"]
    )
    assert "scanner.loading" in graph["service.routes.scans"] or "scanner.loading" in {
        target for targets in graph.values() for target in targets
    }
    assert len(graph) > 40


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package: str) -> None:
    graph = {
        name: {target for target in targets if target.split(".")[0] == package}
        for name, targets in _graph().items()
        if name.split(".")[0] == package
    }
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        pytest.fail(f"import cycle in {package}/: {' -> '.join(error.args[1])}")


def test_scanner_layers_import_only_downwards() -> None:
    wrong = [
        f"{source} (layer {_layer(source)}) imports {target} (layer {_layer(target)})"
        for source, targets in _graph().items()
        if source.startswith("scanner")
        for target in targets
        if target.startswith("scanner") and _layer(target) > _layer(source)
    ]
    assert not wrong, "\n".join(wrong)


def test_scanner_never_imports_the_service() -> None:
    wrong = [
        f"{source} imports {target}"
        for source, targets in _graph().items()
        if source.startswith("scanner")
        for target in targets
        if target.startswith("service")
    ]
    assert not wrong


def test_nothing_at_run_time_imports_the_test_helpers() -> None:
    """``scanner.testing`` (attacks, training, MNIST) is for ``tests/`` and ``bench/`` only."""
    wrong = [
        f"{source} imports {target}"
        for source, targets in _graph().items()
        if not source.startswith("scanner.testing")
        for target in targets
        if target == "scanner.testing" or target.startswith("scanner.testing.")
    ]
    assert not wrong


def test_no_private_name_is_imported_from_another_module() -> None:
    wrong = [
        f"{item.source}:{item.line} imports {name} from {item.target}"
        for item in _imports(_modules())
        for name in item.names
        if name.startswith("_") and not name.startswith("__") and item.target != item.source
    ]
    assert not wrong, "\n".join(wrong)


#: Scripts that run only inside another tool: alembic executes the migration environment and revisions itself.
NOT_IMPORTABLE = ("service.migrations",)


def test_every_module_imports_in_a_fresh_interpreter_dependencies_first() -> None:
    order = [
        name
        for name in graphlib.TopologicalSorter(_graph()).static_order()
        if not any(name == prefix or name.startswith(prefix + ".") for prefix in NOT_IMPORTABLE)
    ]
    assert len(order) > 40
    script = (
        "import importlib, json, sys\n"
        "failed = {}\n"
        f"for name in {order!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed[name] = f'{type(exc).__name__}: {exc}'\n"
        "print(json.dumps(failed))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}


def test_client_side_modules_load_without_torch() -> None:
    script = (
        "import importlib, sys\n"
        f"for name in {TORCH_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(name for name in sys.modules if name == 'torch' or name.startswith('torch.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
