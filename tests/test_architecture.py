"""The module layout as docs/architecture.md describes it: no import cycles between modules
or between parts, every module in a named part, and the page's table current."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def import_graph():
    """docs/import_graph.py, the script that derives the page's table from the source."""
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "docs" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def graph(import_graph):
    return import_graph.imports(import_graph.module_files())


def test_no_module_imports_itself_through_others(import_graph, graph):
    """Imports inside function bodies count too: a cycle hidden in a function is still one."""
    assert import_graph.cycles(graph) == []


def test_the_parts_import_each_other_in_one_direction(import_graph, graph):
    assert import_graph.cycles(import_graph.collapse(graph)) == []


def test_cycle_finder_sees_a_cycle_through_a_function_import(import_graph):
    graph = {"a": {"b": True}, "b": {"c": False}, "c": {"a": True}, "d": {"a": True}}
    assert import_graph.cycles(graph) == [["a", "b", "c"]]


def test_every_module_belongs_to_a_named_part(import_graph, graph):
    named = set(import_graph.PARTS.values())
    assert sorted(m for m in graph if import_graph.part_of(m) not in named) == []


def test_the_architecture_page_shows_the_current_graph(import_graph, graph):
    page = (ROOT / "docs" / "architecture.md").read_text()
    assert import_graph.table(import_graph.collapse(graph), "part") in page, (
        "docs/architecture.md is out of date: paste the output of python docs/import_graph.py")


def test_no_public_name_is_also_a_submodule():
    """``moeify.write`` the function and a module ``moeify/write.py`` cannot share a name:
    once the module is imported, the attribute is the module."""
    import moeify

    root = ROOT / "moeify"
    submodules = {p.stem for p in root.glob("*.py")} | {
        p.name for p in root.iterdir() if (p / "__init__.py").exists()}
    assert sorted(set(moeify.__all__) & submodules) == []
