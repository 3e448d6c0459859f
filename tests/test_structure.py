"""The package's structure, drawn from its imports: no import circles, no module taking another
module's private names, and the public names that moved keep working."""
from __future__ import annotations

import ast
from pathlib import Path

import cntk_engine

PKG = Path(cntk_engine.__file__).resolve().parent
EXTENSIONS = {"_cuda"}     # compiled modules imported by name


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = ("cntk_engine",) + f.relative_to(PKG).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def import_graph():
    """({module: modules it imports}, [(module, source, private name)])."""
    mods = _modules()
    edges = {m: set() for m in mods}
    private = []
    for m, f in mods.items():
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = m.split(".") if is_pkg else m.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("cntk_engine"):
                    continue
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                # `from . import sub` imports the submodule; the package only for its own names
                for t in subs + ([target] if len(subs) < len(node.names) else []):
                    if t in mods and t != m:
                        edges[m].add(t)
                for a in node.names:
                    if (a.name.startswith("_") and not a.name.startswith("__")
                            and f"{target}.{a.name}" not in mods and a.name not in EXTENSIONS):
                        private.append((m, target, a.name))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods and a.name != m:
                        edges[m].add(a.name)
    return edges, private


def cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_and_no_private_imports():
    edges, private = import_graph()
    assert len(edges) > 20 and edges["cntk_engine.api"]        # the graph was really drawn
    assert cycles(edges) == []
    assert private == []


def test_the_checker_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_store_format_is_known_only_to_the_store():
    """The done-marker and checksum arrays and the zarr version floor are spelled in
    jobs/store.py only."""
    for m, f in _modules().items():
        if m == "cntk_engine.jobs.store":
            continue
        text = f.read_text()
        assert "tiles_done" not in text and "tiles_checksum" not in text and "3.1.3" not in text, m


def test_public_names_unchanged():
    import cntk_engine as ce
    from cntk_engine import solver
    for name in ("gram", "Architecture", "available_backends", "solver", "CNTKClassifier",
                 "CNTKRegressor", "__version__"):
        assert hasattr(ce, name), name
    for name in solver.__all__:
        assert hasattr(solver, name), name
    from cntk_engine.cli import main  # the console script's entry point
    assert callable(main)
