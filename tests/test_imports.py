"""The package's modules import one another without circles."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_lopt

PACKAGE = Path(lightning_lopt.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source (local imports count too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from package import submodule` depends on the submodule, not on the package's other names
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                deps.update(subs)
                if len(subs) < len(node.names):
                    deps.add(node.module)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            # Package __init__ files only re-export; every submodule import passes through them.
            todo.extend(d for d in graph.get(node, ()) if not PACKAGE.joinpath(*d.split(".")[1:], "__init__.py").exists())
    return False


def test_update_rule_does_not_import_the_optimizer() -> None:
    graph = import_graph()
    assert "lightning_lopt.hrnn" in graph["lightning_lopt.optimizer"]
    assert not _reaches(graph, "lightning_lopt.hrnn", "lightning_lopt.optimizer")


def test_plots_do_not_import_the_monitor() -> None:
    graph = import_graph()
    assert "lightning_lopt.plots" in graph["lightning_lopt.callbacks.monitor"]
    assert not _reaches(graph, "lightning_lopt.plots", "lightning_lopt.callbacks.monitor")


def test_factory_form_builds_the_optimizer() -> None:
    import torch

    p = torch.nn.Parameter(torch.zeros(3))
    opt = lightning_lopt.HierarchicalRNN().optimizer([p], lr=0.5)
    assert isinstance(opt, lightning_lopt.HierarchicalRNNOptimizer) and opt.param_groups[0]["lr"] == 0.5
