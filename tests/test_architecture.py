"""The layout's rules, checked on the source itself: imports without cycles, each setting and method named only
in its own file and the registries, no ``sys.path`` edits, and source files of a readable size."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from smear.routing import available_methods
from trainables.settings import available_settings

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("smear", "trainables", "service")          # the product: library, trainables, driver
REGISTRIES = {"smear/routing/_registry.py", "trainables/settings/__init__.py"}
MAX_LINES = 400


def _sources(*roots: str) -> list[Path]:
    return sorted(p for r in roots for p in (REPO / r).rglob("*.py"))


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports, anywhere in it (functions included): ``from a import b`` is
    module ``a.b`` when that is a module, else ``a``."""
    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    me, out = _module(path), set()
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {m for a in node.names if (m := known(a.name))}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package
                for _ in range(node.level - 1):
                    up = up.rpartition(".")[0]
                base = f"{up}.{base}" if base else up
            for a in node.names:
                m = f"{base}.{a.name}" if f"{base}.{a.name}" in modules else known(base)
                if m:
                    out.add(m)
    out.discard(me)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1; stack.append(w); on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop(); on.discard(w); comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_import_graph_has_no_cycle():
    paths = _sources(*PACKAGES, "benchmarks")
    modules = {_module(p) for p in paths}
    graph = {_module(p): _imports(p, modules) for p in paths}
    assert _cycles(graph) == []


def test_the_cycle_finder_has_teeth():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_imports_go_one_way():
    """service -> trainables -> smear: the library imports neither, the trainables never the service."""
    modules = {_module(p) for p in _sources(*PACKAGES)}
    for path in _sources(*PACKAGES):
        layer = PACKAGES.index(_module(path).split(".")[0])
        above = {m for m in _imports(path, modules) if PACKAGES.index(m.split(".")[0]) > layer}
        assert not above, f"{path.relative_to(REPO)} imports {sorted(above)}, a layer above it"


def _own_file(name: str, path: str) -> bool:
    return path in REGISTRIES or path in (f"smear/routing/methods/{name}.py", f"trainables/settings/{name}.py")


@pytest.mark.parametrize("path", [str(p.relative_to(REPO)) for p in _sources(*PACKAGES)])
def test_no_setting_or_method_is_named_outside_its_file(path):
    """A string constant equal to a registered method or setting name appears only in that method's or
    setting's own file and the registries: everything else asks the registry, or a hook the method or
    setting implements."""
    names = set(available_methods()) | set(available_settings())
    constants = {n.value for n in ast.walk(ast.parse((REPO / path).read_text()))
                 if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    named = sorted(n for n in constants & names if not _own_file(n, path))
    assert not named, f"{path} names {named}: use the registry or a RoutingMethod / Setting hook instead"


def test_no_sys_path_edits():
    for path in _sources(*PACKAGES, "benchmarks", "tests"):
        tree = ast.parse(path.read_text())
        edits = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in ("insert", "append")
                 and isinstance(n.value, ast.Attribute) and n.value.attr == "path"
                 and isinstance(n.value.value, ast.Name) and n.value.value.id == "sys"]
        assert not edits, f"{path.relative_to(REPO)}:{edits[0]} edits sys.path: the package is installed"


@pytest.mark.parametrize("path", [str(p.relative_to(REPO)) for p in _sources(*PACKAGES)])
def test_source_files_stay_readable(path):
    lines = len((REPO / path).read_text().splitlines())
    assert lines <= MAX_LINES, f"{path} has {lines} lines (at most {MAX_LINES}): split it by concern"
