"""The README's self-contained Python examples run (step counts shrunk to keep this fast)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks() -> list[str]:
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    # only blocks that import what they use stand alone; the others are fragments of a loop
    return [b for b in blocks if "import" in b]


def test_readme_has_runnable_examples():
    assert len(_blocks()) >= 2


@pytest.mark.parametrize("i", range(len(_blocks())))
def test_readme_block_runs(i, tmp_path, monkeypatch):
    code = _blocks()[i]
    code = re.sub(r"steps=\d+", "steps=8", code)
    code = code.replace("seeds=3", "seeds=1")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README block {i}", "exec"), {"__name__": "__readme__"})
