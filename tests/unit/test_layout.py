"""The package's shape: no import cycle between inferlog's modules, function-local imports
included (a local import hides a cycle from Python, not from a reader)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"inferlog": "inferlog", "inferlog.consumer": "consumer", "inferlog.replay": "replay",
            "inferlog.producer": "producer"}


def modules() -> dict[str, Path]:
    found = {}
    for pkg, folder in PACKAGES.items():
        for f in (REPO / folder).glob("*.py"):
            found[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return found


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The inferlog modules `name` imports anywhere in its file."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{up}.{node.module}" if node.module else up
            out |= {base, *(f"{base}.{a.name}" for a in node.names)}
    return {m for m in out if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_a_cycle_when_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_between_inferlogs_modules():
    known = modules()
    assert "inferlog.replay.runner" in known and "inferlog.consumer.engine" in known
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert "inferlog.replay.shared" in graph["inferlog.replay.runner"]  # the walk sees local imports too
    assert cycles(graph) == []


def test_no_two_test_files_share_a_name():
    """tests/ has no __init__.py files, so pytest imports each test file by its bare name: two of
    one name in different folders stop the whole collection ("import file mismatch")."""
    tests = Path(__file__).resolve().parents[1]
    seen: dict[str, list[str]] = {}
    for f in tests.rglob("test_*.py"):
        seen.setdefault(f.name, []).append(str(f.relative_to(tests)))
    assert not {n: fs for n, fs in seen.items() if len(fs) > 1}
