"""The docstring examples (``>>>``) of the package run and print what they show (issue 11).

Only the modules whose source holds an example are imported, so a module that needs an optional
dependency is skipped (not an error) when that dependency is missing."""

from __future__ import annotations

import doctest
import importlib
import io
from pathlib import Path

import pytest

import signalprop

PACKAGE = Path(signalprop.__file__).resolve().parent
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules_with_examples() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if ">>>" not in path.read_text(encoding="utf-8"):
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = _modules_with_examples()


def test_examples_are_found() -> None:
    # The finder itself: a package whose docstrings hold examples must yield modules to run.
    assert "signalprop.record" in MODULES and "signalprop.theory" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and not e.name.startswith("signalprop"):
            pytest.skip(f"{name} needs {e.name}")
        raise
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, name)
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for t in tests:
        runner.run(t, out=out.write)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0, f"{name}: no example was run (all skipped?)"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed\n{out.getvalue()}"
