"""The package's layering, read from the import statements of its modules (function-level ones included).

    constants, config, io, device   shared basics
    data, models                    neither imports the other
    hf                              Hugging Face interop: on top of data and models
    train, eval                     on top of all of the above
    serve                           the HTTP server: on top of data, models, hf and eval
    commands, cli                   the command line
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vlmkit"
FORBIDDEN = {  # layer -> layers it must not import
    "data": {"models", "hf", "train", "eval", "serve", "commands", "cli"},
    "models": {"data", "hf", "train", "eval", "serve", "commands", "cli"},
    "hf": {"train", "eval", "serve", "commands", "cli"},
    "train": {"serve", "commands", "cli"},
    "eval": {"train", "serve", "commands", "cli"},
    "serve": {"train", "commands", "cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("vlmkit"):
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                            for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("vlmkit")}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def layer(module: str) -> str:
    return module.split(".")[1] if "." in module else "vlmkit"


def test_layers_import_only_downwards():
    wrong = [f"{a} imports {b}" for a, targets in import_graph().items() for b in targets
             if layer(b) in FORBIDDEN.get(layer(a), ())]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [module, target]) if target in path
                              else f"{module} -> {target}")
            elif target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(cycles)


def test_the_graph_sees_real_imports():  # guard against a reader that finds nothing and passes vacuously
    graph = import_graph()
    assert "vlmkit.models.vlm" in graph["vlmkit.hf.pretrained"]
    assert "vlmkit.data.shapes_world" in graph["vlmkit.data.scenes"] or any(
        t.startswith("vlmkit.data.shapes_world") for t in graph["vlmkit.data.scenes"])
