"""The package's architecture, checked: no import cycles, and every module imports only from its
own layer or the layers below it (docs/architecture.md explains the layers).

Imports are read from the source (ast), not by importing: the ones inside functions and under
TYPE_CHECKING count too, since a cycle hidden inside a function is still a cycle, and a
type-only import is still a dependency of the code that reads it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vggtrain"

# The layer map, lowest first: a module may import from its own layer and those before it. It
# lives here, not in the package: nothing at run time needs it, and docs/architecture.md's table
# is checked against it (test_the_architecture_page_lists_every_module_in_its_layer).
LAYERS: dict[str, tuple[str, ...]] = {
    "base": ("__init__", "errors", "safeio", "atomic", "device", "distributed", "allocator",
             "numfmt"),
    "core": ("config", "model", "optim", "schedule", "averaging", "trainable", "selection",
             "checkpoint", "inference", "images", "folder", "policies", "data", "evaluate", "finetune",
             "calibration", "distill"),
    "training": ("run", "rundir", "graphs", "train", "tb", "tracking"),
    "reporting": ("report", "draw", "curves", "calibration_report", "corruptions"),
    "commands": ("program", "config_reference", "fit", "eval", "export", "quantize", "predict", "gradcam",
                 "runs", "summary", "sweep", "bench", "stepcount", "synthetic", "lr_find"),
    "cli": ("cli", "__main__"),
}
LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}
RANK = {layer: i for i, layer in enumerate(LAYERS)}


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that the file imports, anywhere in it: `import vggtrain.x`,
    `from vggtrain import x`, `from vggtrain.x import y`, `from . import x`, `from .x import y`;
    `import vggtrain` and `from vggtrain import __version__` are the package's __init__."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "vggtrain":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.ImportFrom):
            assert node.level <= 1, f"{path.name}: a relative import above the package"
            module = (node.module or "").split(".")
            if node.level == 0:
                if module[0] != "vggtrain":
                    continue
                module = module[1:]  # what follows "vggtrain."
            if module and module[0]:  # from vggtrain.x import y / from .x import y
                found.add(module[0])
            else:  # from vggtrain import x / from . import x: a module, or a name of __init__
                found.update(a.name if a.name in modules else "__init__" for a in node.names)
    found.discard(path.stem)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    # An import of a module that is not there fails where it runs; here it is no edge.
    return {p.stem: imports_of(p, modules) & modules for p in sorted(PACKAGE.glob("*.py"))}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) through each strongly connected group of modules (Tarjan's)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(_cycle_in(graph, set(group)) for group in groups)


def _cycle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in {group}")  # a strongly connected group always has one


def test_the_package_has_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_every_module_imports_only_from_its_layer_or_below():
    graph = import_graph()
    unplaced = sorted(set(graph) - set(LAYER_OF))
    assert not unplaced, (f"modules in no layer: {unplaced}; add each to LAYERS in {Path(__file__).name} "
                          f"and to the table in docs/architecture.md")
    upward = [f"{m} ({LAYER_OF[m]}) imports {d} ({LAYER_OF[d]})" for m, deps in graph.items()
              for d in sorted(deps) if RANK[LAYER_OF[d]] > RANK[LAYER_OF[m]]]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_nothing_imports_the_cli():
    # The command line is the top: the package's code and the scripts use the Python API (a
    # script may still run a whole command line through cli.main, as a user would).
    graph = import_graph()
    offenders = [f"vggtrain/{m}.py" for m, deps in graph.items() if "cli" in deps and m != "__main__"]
    for script in sorted((ROOT / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "vggtrain.cli":
                offenders += [f"scripts/{script.name}: {a.name}" for a in node.names if a.name != "main"]
    assert not offenders, "imports from vggtrain.cli:\n" + "\n".join(offenders)


def test_the_checks_see_what_they_must(tmp_path):
    # What the walk must find for the tests above to mean anything: imports inside functions,
    # under TYPE_CHECKING, relative ones, `from vggtrain import x`, `import vggtrain`; and cycles.
    probe = tmp_path / "probe.py"
    probe.write_text("import vggtrain\nimport torch\nfrom vggtrain import __version__, errors\n"
                     "from . import data\nfrom typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from vggtrain.run import Run\n"
                     "def f():\n    from .report import x\n    import vggtrain.train as t\n")
    assert imports_of(probe, set(LAYER_OF)) == {"__init__", "errors", "data", "run", "report", "train"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b", "c"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}) == [["a", "b", "a"], ["c", "d", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_architecture_page_lists_every_module_in_its_layer():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| *(\w+) *\| *`(\w+)\.py` *\|", text, re.M)
    documented = {module: layer for layer, module in rows}
    assert documented == LAYER_OF, (
        f"docs/architecture.md's table and LAYERS disagree: "
        f"{sorted(set(documented.items()) ^ set(LAYER_OF.items()))}")
