"""The package's own structure: no import cycles; the core imports no framework at module level."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "orepa_convert"
FRAMEWORKS = {"ultralytics", "timm", "lightning"}


def _module_imports() -> dict[str, set[str]]:
    """Module-level (not function-level) imports of each package module, as package-relative module names."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        name = name.removesuffix(".__init__") if name != "__init__" else ""
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.parse(path.read_text()).body:  # top level only
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".") if package else []
                    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                    if node.module:
                        deps.add(".".join([*base, *node.module.split(".")]))
                    else:  # from . import a, b: the submodules a and b
                        deps.update(".".join([*base, a.name]) for a in node.names)
                elif node.module and node.module.split(".")[0] in FRAMEWORKS:
                    deps.add("!" + node.module)
            elif isinstance(node, ast.Import):
                deps.update("!" + a.name for a in node.names if a.name.split(".")[0] in FRAMEWORKS)
        graph[name] = deps
    return graph


def test_no_import_cycle():
    graph = _module_imports()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if dep.startswith("!") or dep not in graph or dep == "":
                continue
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*trail, node, dep])}"
            if dep not in state:
                visit(dep, [*trail, node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_only_plugins_import_frameworks_at_module_level():
    graph = _module_imports()
    importers = {m for m, deps in graph.items() if any(d.startswith("!") for d in deps)}
    # the ultralytics plugin is imported only once the user has imported ultralytics; the Lightning callback only
    # when the user imports it (nothing in the package imports it)
    assert importers <= {"integrations.ultralytics", "integrations.lightning"}, importers
    assert not any("integrations.lightning" in deps for deps in graph.values()), "the core must not import it"
