"""Find import circles among the package's own modules.

Two graphs, two kinds of circle:

- import time (default): module-level imports only (those run when the module is imported,
  including ones inside top-level ``if``/``try``/``with`` blocks, but not those inside functions
  or ``if TYPE_CHECKING:`` blocks). A circle here can break ``import``.
- ``--all``: every import of a package module anywhere in the file, function bodies included.
  A function-level import hides a dependency without removing it, so a circle here is two
  concepts that each need the other (issue 11's "import circles"). Two kinds of import are not
  edges: those in ``if TYPE_CHECKING:`` blocks (annotations only, they never run) and
  function-level imports whose line, or the comment line just above, says ``# lazy: <reason>``
  (an optional or costly dependency loaded on call, with the reason written beside it).

A submodule's edge to its own parent packages is dropped (Python runs a parent ``__init__`` first;
a package re-exporting its submodules is the normal layout, not a circle).

Usage: ``python scripts/import_cycles.py [--all] [--count-lazy] [SRC_DIR]`` (default ``src``);
prints each strongly connected component of more than one module (each holds at least one
circle) and exits 1 if there is any. ``--count-lazy`` also prints how many import statements of
the package's own modules sit below module level.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(path: Path, src: Path) -> str:
    """Dotted module name of ``path`` below ``src`` (``pkg/__init__.py`` -> ``pkg``)."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Import statements run at import time: top level and inside top-level if/try/with."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _top_level_imports(node.body)
            found += _top_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                found += _top_level_imports(block)
            for handler in node.handlers:
                found += _top_level_imports(handler.body)
        elif isinstance(node, ast.With):
            found += _top_level_imports(node.body)
    return found


def _all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _type_checking_imports(body: list[ast.stmt]) -> set[int]:
    """ids of the imports inside ``if TYPE_CHECKING:`` blocks at any depth."""
    found: set[int] = set()
    for node in ast.walk(ast.Module(body=body, type_ignores=[])):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.body:
                found |= {id(n) for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return found


def _marked_lazy(node: ast.stmt, lines: list[str]) -> bool:
    """The import's own line, or the comment block just above it, says ``# lazy: <reason>``."""
    if "# lazy:" in lines[node.lineno - 1]:
        return True
    i = node.lineno - 2
    while i >= 0 and lines[i].strip().startswith("#"):
        if lines[i].strip().startswith("# lazy:"):
            return True
        i -= 1
    return False


def _dependency_imports(tree: ast.Module, lines: list[str]) -> list[ast.Import | ast.ImportFrom]:
    """Every import that is a dependency: all but TYPE_CHECKING ones and marked lazy ones."""
    top = {id(n) for n in _top_level_imports(tree.body)}
    typing_only = _type_checking_imports(tree.body)
    return [
        n for n in _all_imports(tree)
        if id(n) not in typing_only and (id(n) in top or not _marked_lazy(n, lines))
    ]


def import_graph(src: Path, everywhere: bool = False) -> dict[str, set[str]]:
    """Map each module below ``src`` to the package modules it imports.

    Args:
        src: The folder holding the packages (``src``).
        everywhere: Count imports inside functions and ``TYPE_CHECKING`` blocks too.
    """
    files = {module_name(p, src): p for p in src.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(path))
        nodes = (
            _dependency_imports(tree, text.splitlines())
            if everywhere else _top_level_imports(tree.body)
        )
        for node in nodes:
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                if node.level:
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                # importing a.b.c runs a, a.b and a.b.c; the package __init__s count too
                while target:
                    if target in files and target != name:
                        graph[name].add(target)
                    target = target.rpartition(".")[0]
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def real_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Circles once the edges from a submodule to its own parent packages are dropped.

    A submodule "imports" its parent ``__init__`` only because Python runs that first; the
    parent re-exporting its submodules is the normal package layout, not a circle between
    two concepts. Dropping child -> ancestor edges leaves the circles between distinct modules.
    """
    pruned = {
        v: {w for w in ws if not v.startswith(w + ".")} for v, ws in graph.items()
    }
    return cycles(pruned)


def lazy_import_count(src: Path, package: str = "signalprop") -> int:
    """Import statements of ``package``'s own modules below module level (in functions, etc.)."""
    count = 0
    for path in src.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        top = {id(n) for n in _top_level_imports(tree.body)}
        for node in _all_imports(tree):
            if id(node) in top:
                continue
            if isinstance(node, ast.ImportFrom):
                own = node.level > 0 or (node.module or "").split(".")[0] == package
            else:
                own = any(a.name.split(".")[0] == package for a in node.names)
            count += own
    return count


def main(argv: list[str]) -> int:
    args = argv[1:]
    everywhere = "--all" in args
    count_lazy = "--count-lazy" in args
    rest = [a for a in args if not a.startswith("--")]
    src = Path(rest[0]) if rest else Path("src")
    if count_lazy:
        print(f"{lazy_import_count(src)} import statement(s) of the package below module level")
    found = real_cycles(import_graph(src, everywhere=everywhere))
    for component in found:
        print(f"circle ({len(component)} modules): " + ", ".join(component))
    kind = "dependency (all imports)" if everywhere else "import-time"
    print(f"{len(found)} {kind} import circle(s)")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
