"""The package's modules import each other without cycles, function-local imports included
(a local import that closes a cycle only hides it: the two modules are one in fact)."""

import ast
from pathlib import Path

import emdask

PACKAGE = Path(emdask.__file__).parent


def imports(path: Path) -> set[str]:
    """The emdask modules that a module imports anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                 else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        out |= {n.split(".")[1] for n in names if n.startswith("emdask.")}
    return out - {path.stem}


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, found = {}, {}, [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in deps[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(part) > 1:
                found.append(sorted(part))

    for v in deps:
        if v not in index:
            visit(v)
    return found


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_back():
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    deps = {m: imports(p) & set(modules) for m, p in modules.items()}
    assert cycles(deps) == []
