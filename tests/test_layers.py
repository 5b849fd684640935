"""The architecture, enforced: each module imports only from its own layer or the ones below it.

The layers are the README's "Architecture" picture, lowest first. A frame's path (edge -> session
-> hub -> bus) then cannot loop back, and no import circle can form between layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# Top-level module or package under tether -> its layer. A new one must be placed here.
LAYERS = {
    "protocol": 0,
    "clock": 0,
    "console": 0,
    "config": 1,
    "metrics": 1,
    "tasks": 1,
    "redisconn": 1,
    "store": 2,
    "livestate": 2,
    "bus": 2,
    "sockets": 3,
    "hub": 4,
    "ops": 5,
    "gateway": 5,
    "node": 6,
    "api": 7,
    "listen": 7,
    "app": 8,
    "cli": 9,
    "device": 9,
    "fleetcli": 9,
    "__main__": 10,
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in (SRC / "tether").rglob("*.py"):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tether."):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("tether."))
        graph[module.removesuffix(".__init__")] = deps
    return graph


def test_every_module_has_a_layer() -> None:
    unplaced = {_part(m) for m in _imports()} - set(LAYERS) - {"__init__"}
    assert not unplaced, f"place these in LAYERS (and the README picture): {sorted(unplaced)}"


def test_no_module_imports_from_a_higher_layer() -> None:
    upward = [
        f"{module} -> {dep}"
        for module, deps in _imports().items()
        for dep in deps
        if _part(module) != "__init__"
        and _part(dep) != _part(module)
        and LAYERS[_part(dep)] > LAYERS[_part(module)]
    ]
    assert not upward, upward


def test_no_import_circle() -> None:
    graph = _imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        for dep in graph.get(module, ()):
            if dep in path:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(dep) :], dep]))
            if dep not in done:
                visit(dep, [*path, dep])
        done.add(module)

    for module in graph:
        visit(module, [module])
