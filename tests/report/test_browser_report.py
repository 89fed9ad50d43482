"""Open the reports in a real headless browser: Playwright's Python package drives the system
Chromium (``executable_path``; ``scripts/ensure_chromium.sh`` installs Debian's ``chromium`` when
it is missing). The tests click through the doctor's page (navigation links, collapsible
prescriptions and details) and load the lab's report, and fail on any console error, uncaught
exception, failed request or broken image. They are skipped, with the reason, only when neither
Playwright nor a Chromium can be had.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from signalprop.lab import STUDY_NAMES
from signalprop.lab.base import read_json
from signalprop.lab.runner import run_smoke

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

#: every image on the page: loaded, and with a real size
_IMAGES_JS = """() => Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,
    w: i.naturalWidth, h: i.naturalHeight}))"""


def find_chromium() -> tuple[str | None, str]:
    """(path, "") of a Chromium binary, installing it if needed; (None, reason) otherwise."""
    for c in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser",
              shutil.which("chromium")):
        if c and os.access(c, os.X_OK):
            return c, ""
    script = ROOT / "scripts" / "ensure_chromium.sh"
    try:
        r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"could not run {script}: {e}"
    if r.returncode == 0 and r.stdout.strip():
        return r.stdout.strip().splitlines()[-1], ""
    return None, f"chromium cannot be installed here: {r.stderr.strip()[-300:]}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install 'signalprop[dev]')")
    path, reason = find_chromium()
    if path is None:
        pytest.skip(reason)
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


class Page:
    """A page with every console error, page error and failed request collected."""

    def __init__(self, browser: Any, path: Path) -> None:
        self.errors: list[str] = []
        self.page = browser.new_page()
        self.page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}")
                     if m.type in ("error", "assert") else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"exception: {e}"))
        self.page.on("requestfailed", lambda r: self.errors.append(
            f"request failed: {r.url[:80]} {r.failure}"))
        self.page.goto(path.resolve().as_uri(), wait_until="load")

    def images(self) -> list[dict[str, Any]]:
        return self.page.evaluate(_IMAGES_JS)

    def close(self) -> None:
        self.page.wait_for_timeout(200)  # late console messages
        self.page.close()


def _broken(images: list[dict[str, Any]]) -> list[str]:
    return [i["alt"] for i in images if not i["complete"] or i["w"] <= 0]


def test_checker_catches_broken_images_and_console_errors(browser, tmp_path: Path) -> None:
    """The check can fail: a page with a broken image and a console error is caught."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"><link rel="icon" href="data:,">'
        "<title>bad</title></head><body>"
        '<img alt="ok" src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJ'
        'AAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==">'
        '<img alt="broken" src="data:image/png;base64,AAAA">'
        '<script>console.error("boom")</script></body></html>'
    )
    p = Page(browser, page)
    imgs = p.images()
    p.close()
    assert _broken(imgs) == ["broken"]
    assert any("boom" in e for e in p.errors)


@pytest.fixture(scope="module")
def doctor_page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    import torch
    from torch import nn

    import signalprop

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(16, 3))
    x, y = torch.randn(128, 16), torch.randint(0, 3, (128,))
    rep = signalprop.doctor(model, (x, y), nn.CrossEntropyLoss(), steps=30, progress=False)
    out = tmp_path_factory.mktemp("doctor-page")
    return rep.save(out)["html"], rep


def test_doctor_page_clicks_through(browser, doctor_page) -> None:
    path, rep = doctor_page
    assert rep.findings and rep.prescriptions  # a page with something to click
    p = Page(browser, path)
    page = p.page
    # navigation: every in-page link leads to an element that exists and scrolls into view
    links = page.locator("nav a")
    hrefs = [links.nth(i).get_attribute("href") for i in range(links.count())]
    assert "#findings" in hrefs and "#prescriptions" in hrefs and "#figures" in hrefs
    for href in hrefs:
        assert href.startswith("#"), f"a link leaves the page: {href}"
        page.locator(f'nav a[href="{href}"]').click()
        target = page.locator(href)
        assert target.count() == 1, f"link {href} has no target"
        assert page.evaluate("() => location.hash") == href
        assert target.evaluate("e => { const r = e.getBoundingClientRect(); "
                               "return r.bottom > 0 && r.top < innerHeight; }"), href
    # collapsible sections: every <details> opens on a click on its summary and shows content
    details = page.locator("details")
    n = details.count()
    assert n >= len(rep.findings)
    opened = 0
    for i in range(n):
        d = details.nth(i)
        was_open = d.evaluate("e => e.open")
        d.locator("summary").first.scroll_into_view_if_needed()
        d.locator("summary").first.click()
        assert d.evaluate("e => e.open") is (not was_open)
        if not was_open:
            opened += 1
            body = d.evaluate("e => e.innerText.length - e.querySelector('summary').innerText"
                              ".length")
            assert body > 0, f"details #{i} opened onto nothing"
    assert opened >= 1
    # the first finding's prescriptions list the remedies the report ranks first
    first = page.locator("details", has_text="Prescriptions").first
    if not first.evaluate("e => e.open"):
        first.locator("summary").click()
    text = first.inner_text()
    for pr in rep.findings[0].prescriptions[:2]:
        assert pr.remedy in text
    imgs = p.images()
    p.close()
    assert imgs and not _broken(imgs), _broken(imgs)
    assert not p.errors, p.errors


def test_lab_report_opens_in_chromium(browser, tmp_path_factory: pytest.TempPathFactory) -> None:
    out = tmp_path_factory.getbasetemp() / "lab-smoke"  # shared with test_lab_smoke
    run_smoke(out)
    n_figs = sum(len(read_json(out / n / "meta.json")["figures"]) for n in STUDY_NAMES)
    p = Page(browser, out / "index.html")
    title = p.page.title()
    sections = p.page.locator("section").count()
    imgs = p.images()
    p.close()
    assert title == "signalprop lab report"
    assert sections == len(STUDY_NAMES)
    assert len(imgs) == n_figs > 0
    assert not _broken(imgs), f"figures that did not load: {_broken(imgs)}"
    assert all(i["w"] > 200 and i["h"] > 150 for i in imgs)
    assert not p.errors, p.errors
