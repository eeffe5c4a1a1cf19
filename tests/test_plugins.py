"""Structures are plug-ins: registered where they are defined, found by the registry, chosen by the
recipe, reported and gated by themselves; and the package has no import loop."""
from __future__ import annotations

import ast
import json
import re
import textwrap
from pathlib import Path

import pytest

from tests._tiny import FAST, cli_subprocess as _cli
from ticketforge import recipe as recipes, structures
from ticketforge.errors import UserError
from ticketforge.report_schema import Report

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- no import loop, imports inside functions counted

def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports, at module level or inside functions (imports
    under `if TYPE_CHECKING:` only name types and are left out; so are parent packages, which Python
    runs before any of their modules whoever imports them)."""
    top = package.name
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        package_parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package_parts[:len(package_parts) - node.level + 1] + ([base] if base else []))
                # `from a.b import c` imports the module a.b.c where there is one, else names of a.b
                # (a package's __init__ running first is the package system, not an import of it)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module") and node.args
                  and isinstance(node.args[0], ast.Constant)):
                targets = [node.args[0].value]  # importlib.import_module("a.literal.name")
            else:
                continue
            edges.update(t for t in map(resolve, (t for t in targets if t.split(".")[0] == top)) if t)
        edges.discard(name)
        graph[name] = edges
    return graph


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_loop_counting_imports_inside_functions():
    graph = import_graph(ROOT / "ticketforge")
    assert len(graph) > 50 and graph["ticketforge.recipe"]  # the walk sees the package
    assert loops(graph) == []


def test_the_loop_check_finds_a_planted_loop(tmp_path):
    pkg = tmp_path / "planted"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from planted import b\n")
    (pkg / "b.py").write_text("def late():\n    from .sub import c\n")              # inside a function
    (pkg / "sub" / "c.py").write_text("import importlib\nimportlib.import_module('planted.a')\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from planted import a\n")
    assert loops(import_graph(pkg)) == [["planted.a", "planted.b", "planted.sub.c"]]


# ---------------------------------------------------------------- names compared only where they are defined

def test_no_structure_or_method_name_is_compared_outside_its_own_module():
    """`x == "blocks"`, `x in ("cts", ...)`: a branch on a registered name outside the module that
    defines it means a new structure or method has to edit that place too."""
    from ticketforge.search import METHODS

    names = set(structures.STRUCTURES.names()) | set(METHODS.names())
    found = []
    for path in (ROOT / "ticketforge").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(("ticketforge/structures/", "ticketforge/search/")):
            continue  # where structures and methods are defined
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in names]
                found += [f"{rel}:{node.lineno}: {ast.unparse(node)}" for _ in consts[:1]]
    assert found == []


# ---------------------------------------------------------------- the registry

def test_structures_register_where_they_are_defined_and_the_schema_reads_the_registry():
    assert {"unstructured", "2:4", "channels", "blocks"} <= set(structures.STRUCTURES.names())
    assert recipes.choices_of(recipes.ConvertConfig.__dataclass_fields__["structure"].metadata) == \
        structures.STRUCTURES.names()
    with pytest.raises(UserError, match=r"'convert.structure': '3:9' is not one of 2:4, .*blocks, channels, unstructured"):
        recipes.resolve("magnitude", ["convert.structure=3:9"])


def test_method_and_structure_are_chosen_apart_and_the_old_method_names_still_work():
    r = recipes.resolve("cts-2to4")
    assert (r.search.method, r.convert.structure) == ("cts", "2:4")
    old = recipes.validate({"search": {"method": "magnitude-channels", "target_macs": 0.5}})
    assert (old.search.method, old.convert.structure) == ("magnitude", "channels")
    with pytest.raises(UserError, match="'cts-blocks' is method 'cts' on structure 'blocks'"):
        recipes.validate({"search": {"method": "cts-blocks"}, "convert": {"structure": "channels"}})
    # a method that scores no channels gives a weight ticket that channels converts; one that
    # scores no N:M groups is refused before any work
    assert recipes.resolve("magnitude-channels", ["search.method=snip"]).search.method == "snip"
    with pytest.raises(UserError, match="'2:4' is searched by the methods cts, magnitude"):
        recipes.resolve("magnitude-2to4", ["search.method=snip"])


def test_a_report_keeps_sections_it_has_no_field_for():
    minimal = {k: {} for k in ("recipe", "model", "data", "search", "convert", "sparsity", "params", "macs",
                                       "size_mb", "accuracy", "timings")} | {
        "ticketforge_version": "x", "seed": 0, "device": "cpu", "parity": 0.0, "latency": []}
    minimal["structure"] = {"9:16": {"groups": 3}}
    minimal["later_section"] = {"a": 1}
    again = Report.from_dict(minimal).to_dict()
    assert again["structure"] == {"9:16": {"groups": 3}} and again["later_section"] == {"a": 1}


# ---------------------------------------------------------------- plug-ins from the command line

def adding_a_structure_example() -> str:
    """The code block of the docs' "Adding a structure" example, as a user copies it."""
    text = (ROOT / "docs" / "adding-a-structure.md").read_text()
    return re.search(r"```python\n(# half\.py.*?)```", text, re.S).group(1)


def test_the_adding_a_structure_example_runs_end_to_end_from_the_cli(tiny):
    (tiny / "half.py").write_text(adding_a_structure_example())
    listed = _cli(tiny, "structures", "--plugin", "half")
    assert listed.returncode == 0 and re.search(r"^1:2 +1 of every 2 weights zero", listed.stdout, re.M), listed
    out = tiny / "out-half"
    r = _cli(tiny, "compress", "mlp.pt", *FAST, "--plugin", "half", "--recipe", "magnitude", "--set",
             "convert.structure=1:2", "--sparsity", "0.5", "--epochs", "1", "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["structure"]["1:2"]["pairs"] > 0
    assert "1:2:" in (out / "report.md").read_text()
    # without the plug-in the name is unknown: exit 2, one line, nothing written
    r = _cli(tiny, "compress", "mlp.pt", *FAST, "--recipe", "magnitude", "--set", "convert.structure=1:2",
             "--out", str(tiny / "none"))
    assert r.returncode == 2 and "'1:2' is not one of" in r.stderr and not (tiny / "none").exists()


def test_a_plugin_that_does_not_import_is_a_clear_error(tiny):
    r = _cli(tiny, "structures", "--plugin", "no_such_plugin_tf")
    assert r.returncode == 2 and "--plugin cannot import 'no_such_plugin_tf'" in r.stderr


def test_the_listing_names_each_structure_and_its_methods(cli):
    result = cli("structures")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert any(line.startswith("2:4 ") for line in lines)
    assert "methods: cts, similarity; budget keys: target_macs, blocks" in result.output
    assert textwrap.dedent(result.output).count("methods:") == len(structures.STRUCTURES.names())
