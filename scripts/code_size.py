"""Longest files and functions of a source tree (issue 11's size counts).

Usage: ``python scripts/code_size.py [SRC_DIR] [--limit N] [--top K]`` (defaults ``src``, 60, 5).
Prints the longest files (lines), the longest functions (lines from ``def`` to the last line of the
body, decorators excluded) and how many functions are over ``--limit`` lines.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def function_lengths(src: Path) -> list[tuple[int, str]]:
    """``(lines, "path:qualname")`` for every function and method below ``src``."""
    found: list[tuple[int, str]] = []
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

        def walk(node: ast.AST, prefix: str, path: Path = path) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{prefix}{child.name}"
                    length = (child.end_lineno or child.lineno) - child.lineno + 1
                    found.append((length, f"{path}:{name}"))
                    walk(child, name + ".")
                elif isinstance(child, ast.ClassDef):
                    walk(child, f"{prefix}{child.name}.")
                else:
                    walk(child, prefix)

        walk(tree, "")
    return sorted(found, reverse=True)


def file_lengths(src: Path) -> list[tuple[int, str]]:
    """``(lines, path)`` for every Python file below ``src``, longest first."""
    return sorted(
        ((len(p.read_text(encoding="utf-8").splitlines()), str(p)) for p in src.rglob("*.py")),
        reverse=True,
    )


def main(argv: list[str]) -> int:
    args = argv[1:]
    limit, top = 60, 5
    if "--limit" in args:
        i = args.index("--limit")
        limit = int(args[i + 1])
        del args[i : i + 2]
    if "--top" in args:
        i = args.index("--top")
        top = int(args[i + 1])
        del args[i : i + 2]
    src = Path(args[0]) if args else Path("src")
    files = file_lengths(src)
    funcs = function_lengths(src)
    print("longest files:")
    for n, p in files[:top]:
        print(f"  {n:5d}  {p}")
    print("longest functions:")
    for n, p in funcs[:top]:
        print(f"  {n:5d}  {p}")
    print(f"{sum(n > limit for n, _ in funcs)} function(s) over {limit} lines; "
          f"{sum(n > 600 for n, _ in files)} file(s) over 600 lines")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
