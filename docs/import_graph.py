"""Print which part of moeify imports which, from the source (docs/architecture.md's table).

Reads every module of ``moeify/`` and ``passes/`` (installed as ``moeify.passes``) with
`ast`, keeps the imports of other moeify modules, and prints, per part (`PARTS` maps a
module-name prefix to the part it belongs to), the parts it imports at module level and
those it imports only inside a function body (where an optional heavy dependency, or a
cycle, hides). A module no prefix claims is printed under its own name, so a new module
shows up rather than vanishing.

    python docs/import_graph.py            # parts
    python docs/import_graph.py --modules  # modules
    python docs/import_graph.py --check    # exit 1 on an import cycle between modules or parts

Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module-name prefix -> part; the longest matching prefix wins. Edit with the layout.
PARTS = {
    "moeify._lazy": "foundation",
    "moeify.errors": "foundation",
    "moeify.config": "foundation",
    "moeify.switch": "layer",
    "moeify.compiler": "compiler",
    "moeify.passes": "compiler",
    "moeify.io": "I/O",
    "moeify.api": "api",
    "moeify.hf": "HF formats",
    "moeify.onnx": "ONNX",
    "moeify.distributed": "distributed",
    "moeify.writer": "writer",
    "moeify.verify": "verify",
    "moeify.distillation": "distill",
    "moeify.cli": "CLI",
    "moeify.__main__": "CLI",
    "moeify.__init__": "public surface",
}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for moeify/ and passes/ (as moeify.passes)."""
    found = {}
    for package, prefix in (("moeify", "moeify"), ("passes", "moeify.passes")):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT / package).with_suffix("").parts
            if parts[-1] == "__init__":  # a package: its own name
                parts = parts[:-1]
            found[".".join((prefix, *parts))] = path
    return found


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports(modules: dict[str, Path]) -> dict[str, dict[str, bool]]:
    """module -> {imported moeify module: imported at module level}."""
    graph: dict[str, dict[str, bool]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        at_top = {id(node) for node in tree.body}
        typing_only: set[int] = set()  # ``if TYPE_CHECKING:`` imports never run
        for node in tree.body:  # a guarded import (if / try) is top level too
            if isinstance(node, (ast.If, ast.Try)):
                inside = {id(child) for child in ast.walk(node)}
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    typing_only |= inside
                else:
                    at_top |= inside
        edges: dict[str, bool] = {}
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, module, is_package)
                names = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            names = [n.replace("passes.", "moeify.passes.", 1) if n.split(".")[0] == "passes"
                     else n for n in names]
            for name in names:
                target = _owner(name, modules)
                if target and target != module:
                    edges[target] = edges.get(target, False) or id(node) in at_top
        graph[module] = edges
    return graph


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` (a module or a name inside one) belongs to."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def part_of(module: str) -> str:
    key = module if module != "moeify" else "moeify.__init__"
    matches = [p for p in PARTS if key == p or key.startswith(p + ".")]
    return PARTS[max(matches, key=len)] if matches else key


def collapse(graph: dict[str, dict[str, bool]]) -> dict[str, dict[str, bool]]:
    """The graph between parts: part -> {part: some import of it is at module level}."""
    parts: dict[str, dict[str, bool]] = defaultdict(dict)
    for module, edges in graph.items():
        source = part_of(module)
        parts[source]
        for target, top in edges.items():
            other = part_of(target)
            if other != source:
                parts[source][other] = parts[source].get(other, False) or top
    return parts


def cycles(graph: dict[str, dict[str, bool]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan): each is a set of
    modules (or parts) that import each other, directly or through others."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, {}):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def table(graph: dict[str, dict[str, bool]], what: str) -> str:
    rows = [f"| {what} | imports at module level | imports only inside functions |",
            "| --- | --- | --- |"]
    for source in sorted(graph):
        top = sorted(t for t, at in graph[source].items() if at)
        late = sorted(t for t, at in graph[source].items() if not at)
        rows.append(f"| {source} | {', '.join(top)} | {', '.join(late)} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    graph = imports(module_files())
    if argv == ["--check"]:
        found = cycles(graph) + cycles(collapse(graph))
        for component in found:
            print("import cycle: " + " -> ".join(component), file=sys.stderr)
        return 1 if found else 0
    if argv == ["--modules"]:
        print(table(graph, "module"))
    elif not argv:
        print(table(collapse(graph), "part"))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
