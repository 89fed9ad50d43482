"""The documentation builds offline (pdoc API reference + Markdown guides), and the runnable
snippets of docs/integrations.md run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from signalprop import docs_build
from signalprop.docs_build import build, find_docs_dir, public_modules, render_markdown

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

# a page must not load anything from the network
_REMOTE = re.compile(r'<(?:script|img|iframe)[^>]+src="https?://|<link[^>]+href="https?://', re.I)


def test_markdown_links_to_sibling_pages_are_rewritten() -> None:
    out = render_markdown("See [sweeps](sweep.md#the-grid) and [pdoc](https://pdoc.dev/x.md).")
    assert 'href="sweep.html#the-grid"' in out
    assert 'href="https://pdoc.dev/x.md"' in out  # absolute links are left alone


def test_public_modules_found_without_importing() -> None:
    names = public_modules("signalprop")
    assert "signalprop.record" in names and "signalprop.integrations.tensorboard" in names
    assert "signalprop.__main__" not in names and "signalprop._registry" not in names
    with pytest.raises(ValueError, match="cannot find"):
        public_modules("signalprop_no_such_module")


def test_guides_only_build_via_cli(tmp_path, capsys) -> None:
    assert find_docs_dir() == DOCS
    rc = docs_build.main([str(tmp_path), "--no-api"])
    assert rc == 0
    assert "Docs:" in capsys.readouterr().out
    mds = sorted(DOCS.glob("*.md"))
    assert {p.stem for p in mds} >= {"integrations", "api"}
    index = (tmp_path / "index.html").read_text()
    for md in mds:
        page = tmp_path / "guide" / f"{md.stem}.html"
        assert page.exists(), md
        assert f'href="guide/{md.stem}.html"' in index
    page = (tmp_path / "guide" / "integrations.html").read_text()
    assert "<h1" in page and "SignalpropCallback" in page and "<table>" in page
    assert docs_build.main([str(tmp_path), "--docs", str(tmp_path / "missing")]) == 2


@pytest.mark.slow
def test_full_site_builds_offline(tmp_path) -> None:
    # show_source=False halves the time; the rendering of docstrings is the same
    site = build(tmp_path / "site", show_source=False)
    assert site.skipped == {}, f"modules that failed to import: {site.skipped}"
    api = tmp_path / "site" / "api"
    for mod in ("signalprop", "signalprop.record", "signalprop.probe", "signalprop.diagnosis",
                "signalprop.integrations.tensorboard", "signalprop.integrations.lightning"):
        assert mod in site.modules
        assert (api / (mod.replace(".", "/") + ".html")).exists(), mod
    tb = (api / "signalprop/integrations/tensorboard.html").read_text()
    assert "write_record" in tb and "nonfinite_layers" in tb
    rec = (api / "signalprop/record.html").read_text()
    assert "out_grad_norm" in rec
    assert (api / "search.js").exists()
    index = site.index.read_text()
    assert 'href="api/signalprop/record.html"' in index
    for page in (tmp_path / "site").rglob("*.html"):
        assert not _REMOTE.search(page.read_text()), f"{page} loads a remote resource"


def _runnable_blocks(md: str) -> list[str]:
    blocks = []
    for m in re.finditer(r"(<!-- no-run[^>]*-->\s*)?```python\n(.*?)```", md, re.S):
        if m.group(1) is None:
            blocks.append(m.group(2))
    return blocks


def test_integrations_snippets_run(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    blocks = _runnable_blocks((DOCS / "integrations.md").read_text())
    assert len(blocks) >= 3
    script = "\n".join(blocks) + (
        "\nassert len(probe.record) == 5 and list(steps) == [0, 10, 20, 30, 40]\n"
        "import os; assert os.listdir('runs/probe') and os.listdir('runs/live')\n"
        "print('snippets ok')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "snippets ok" in proc.stdout
