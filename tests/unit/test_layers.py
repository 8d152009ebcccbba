"""The house rules of docs/ARCHITECTURE.md, computed from the code: no import cycles in
engine/, and no import against the layers.

Every import counts: at module level, inside functions (a lazy import is still a
dependency) and under `if TYPE_CHECKING:` (a type-only import of a higher class is the
same coupling; the lower layer names a Protocol instead).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[2] / "engine"

# Highest first. A module may import its own package and anything of a strictly lower
# rank; modules of one rank but different packages (inbound, delivery) never import
# each other. docs/ARCHITECTURE.md draws the same table.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("engine.__main__",),
    ("engine.cli",),
    ("engine.lab", "engine.doctor"),
    ("engine.supervisor",),
    ("engine.worker",),
    ("engine.cluster",),
    ("engine.control",),
    ("engine.inbound", "engine.delivery", "engine.http"),
    ("engine.queue",),
    ("engine.dns",),
    ("engine.errors", "engine.cmdline", "engine.mail"),
    ("engine.smtp", "engine.config", "engine.observe", "engine.version", "engine"),
)
RANK = {unit: len(LAYERS) - i for i, units in enumerate(LAYERS) for unit in units}


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name → file, for every .py under `root` (a package named like it)."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(name: str, modules: Mapping[str, Path]) -> str | None:
    """The module a dotted name lives in (`engine.config.Size` → `engine.config`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, source: str, modules: Mapping[str, Path], is_package: bool) -> set[str]:
    """The engine modules `module` imports, anywhere in its source."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        names: Iterable[str]
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            # `from engine.lab.demo import report` imports the submodule `report`.
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph(root: Path = ENGINE) -> dict[str, set[str]]:
    modules = module_names(root)
    return {
        name: imports_of(name, path.read_text(encoding="utf-8"), modules, path.name == "__init__.py")
        for name, path in modules.items()
    }


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def unit_of(module: str) -> str:
    """The layer unit a module belongs to: the longest LAYERS name that prefixes it."""
    best = "engine"
    for unit in RANK:
        if (module == unit or module.startswith(unit + ".")) and len(unit) > len(best):
            best = unit
    return best


def against_layers(graph: Mapping[str, set[str]]) -> list[str]:
    """Every import of a module of an equal or higher layer outside its own package."""
    bad = []
    for module, targets in sorted(graph.items()):
        here = unit_of(module)
        for target in sorted(targets):
            there = unit_of(target)
            if there != here and RANK[there] >= RANK[here]:
                bad.append(f"{module} imports {target} ({there} is not below {here})")
    return bad


# --- the rules -------------------------------------------------------------------------


def test_the_graph_sees_the_whole_engine() -> None:
    graph = import_graph()
    assert {"engine.cli", "engine.worker", "engine.smtp.server", "engine.lab.blast.run"} <= set(graph)
    assert "engine.smtp.replies" in graph["engine.errors"]  # a known edge is seen


def test_every_module_has_a_layer() -> None:
    assert [m for m in import_graph() if unit_of(m) == "engine" and m != "engine"] == []


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_import_against_the_layers() -> None:
    found = against_layers(import_graph())
    assert found == [], "imports against the layers:\n" + "\n".join(found)


# --- the checker catches what it must (negative controls) ---------------------------------


def _graph_of(tmp_path: Path, files: Mapping[str, str]) -> dict[str, set[str]]:
    for rel, text in files.items():
        path = tmp_path / "engine" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return import_graph(tmp_path / "engine")


@pytest.mark.parametrize("how", [
    "from engine.b import x",
    "def f():\n    from engine import b",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from engine.b import X",
    "from . import b",
])
def test_a_cycle_is_found_however_it_is_imported(tmp_path: Path, how: str) -> None:
    graph = _graph_of(tmp_path, {"__init__.py": "", "a.py": how, "b.py": "import engine.a"})
    assert cycles(graph) == [["engine.a", "engine.b"]]


def test_an_upward_import_is_found(tmp_path: Path) -> None:
    graph = _graph_of(tmp_path, {
        "__init__.py": "", "worker.py": "",
        "queue/__init__.py": "", "queue/store.py": "def f():\n    from engine.worker import W",
    })
    assert against_layers(graph) == [
        "engine.queue.store imports engine.worker (engine.worker is not below engine.queue)"]


def test_peers_of_one_layer_may_not_import_each_other(tmp_path: Path) -> None:
    graph = _graph_of(tmp_path, {
        "__init__.py": "", "inbound/__init__.py": "", "delivery/__init__.py": "",
        "inbound/x.py": "from engine.delivery import y", "delivery/y.py": "",
    })
    assert against_layers(graph) == [
        "engine.inbound.x imports engine.delivery.y (engine.delivery is not below engine.inbound)"]


def test_own_package_and_lower_layers_are_allowed(tmp_path: Path) -> None:
    graph = _graph_of(tmp_path, {
        "__init__.py": "", "smtp/__init__.py": "", "smtp/replies.py": "",
        "queue/__init__.py": "", "queue/a.py": "from engine.queue import b\nfrom engine.smtp.replies import R",
        "queue/b.py": "",
    })
    assert against_layers(graph) == [] and cycles(graph) == []
