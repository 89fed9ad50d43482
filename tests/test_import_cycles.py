"""No import circle among the package's modules (issue 11), checked by scripts/import_cycles.py."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

_spec = importlib.util.spec_from_file_location("import_cycles", ROOT / "scripts" / "import_cycles.py")
assert _spec is not None and _spec.loader is not None
ic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ic)

#: Dependency circles still open on main; this set may only shrink (empty since issue 11).
KNOWN: set[frozenset[str]] = set()


@functools.cache
def _dependency_circles() -> list[list[str]]:
    return ic.real_cycles(ic.import_graph(SRC, everywhere=True))


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_detector_finds_a_function_level_circle(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import g\n",
        "pkg/b.py": "def g():\n    from pkg import a\n    return a\n",
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import g\n",
        "pkg/d.py": "def f():\n    # lazy: costly\n    from pkg.a import g\n    return g\n",
    })
    assert ic.real_cycles(ic.import_graph(tmp_path)) == []  # b -> a only inside a function
    assert ic.real_cycles(ic.import_graph(tmp_path, everywhere=True)) == [["pkg.a", "pkg.b"]]
    _write(tmp_path, {"pkg/b.py": "from pkg import a\n"})
    assert ic.real_cycles(ic.import_graph(tmp_path)) == [["pkg.a", "pkg.b"]]


def test_no_import_time_circle() -> None:
    assert ic.real_cycles(ic.import_graph(SRC)) == []


def test_no_new_dependency_circle() -> None:
    found = {frozenset(c) for c in _dependency_circles()}
    assert found <= KNOWN, sorted(sorted(c) for c in found - KNOWN)


@pytest.mark.parametrize("a, b", [
    ("signalprop.lab.report", "signalprop.lab.runner"),
    ("signalprop.diagnosis.report", "signalprop.report.doctor_page"),
    ("signalprop.doctor", "signalprop.report.doctor_page"),
    ("signalprop.record", "signalprop.integrations.tensorboard"),
    ("signalprop.train.batches", "signalprop.validation"),
    # the probe's activation names live in the vocabulary, not in remedies (issue 11)
    ("signalprop.probe.core", "signalprop.remedies"),
    ("signalprop.init", "signalprop.theory.torch_adapter"),
])
def test_broken_circles_stay_broken(a: str, b: str) -> None:
    for c in _dependency_circles():
        assert not {a, b} <= set(c)


def test_light_entry_points_do_not_import_torch() -> None:
    """The package, its CLI and the lab runner import without torch (0.5-4 s): spawned sweep
    workers re-import the caller's module and must reach their die-with-parent initialiser fast
    (tests/faults/test_faults_signals.py kills the parent within seconds of their start)."""
    import subprocess
    import sys

    code = ("import sys, signalprop, signalprop.cli, signalprop.lab, signalprop.lab.runner; "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(SRC), "PATH": ""})
    assert "torch" not in out.stdout, out.stdout
