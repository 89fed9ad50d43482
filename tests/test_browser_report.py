"""Open the lab's report in a real headless browser (Debian's ``chromium``) and check that every
figure loads and that the page logs no console error.

Chromium is driven through the DevTools protocol over a WebSocket, with a minimal client written
on the standard library (RFC 6455 framing), so the test needs no extra Python package. When
``/usr/bin/chromium`` is missing, ``scripts/ensure_chromium.sh`` installs it (apt-get); the test is
skipped, with the reason, only when that is impossible.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from signalprop.lab import STUDY_NAMES
from signalprop.lab.base import read_json
from signalprop.lab.runner import run_smoke

ROOT = Path(__file__).resolve().parents[1]
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


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


class WebSocket:
    """The smallest RFC 6455 client the DevTools protocol needs (text frames, ping/pong)."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        assert url.startswith("ws://"), url
        hostport, _, path = url[5:].partition("/")
        host, _, port = hostport.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
             "Sec-WebSocket-Version: 13\r\n\r\n").encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        head, _, self.buf = head.partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(f"websocket handshake failed: {head[:200]!r}")

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def recv(self) -> str:
        parts: list[bytes] = []
        while True:
            b0, b1 = self._read(2)
            fin, opcode, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._read(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._read(8))
            mask = self._read(4) if b1 & 0x80 else b""
            data = self._read(n)
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            if opcode == 0x9:  # ping
                self._send_frame(0xA, data)
                continue
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the browser")
            if opcode in (0x1, 0x0):
                parts.append(data)
                if fin:
                    return b"".join(parts).decode()

    def close(self) -> None:
        try:
            self._send_frame(0x8, b"")
        except OSError:
            pass
        self.sock.close()


class Browser:
    """A headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, chromium: str, profile: Path) -> None:
        self.proc = subprocess.Popen(
            [chromium, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.quit()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = []
        while not targets and time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                targets = [t for t in json.load(r) if t.get("type") == "page"]
            time.sleep(0.05)
        self.ws = WebSocket(targets[0]["webSocketDebuggerUrl"])
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params or {}}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, event: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {event} within {timeout} s")
            self.events.append(json.loads(self.ws.recv()))

    def quit(self) -> None:
        try:
            if hasattr(self, "ws"):
                try:
                    self.call("Browser.close")
                except (OSError, RuntimeError, ConnectionError):
                    pass
                self.ws.close()
        finally:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def inspect_page(chromium: str, page: Path, profile: Path) -> dict[str, Any]:
    """Load ``page``; return its images' load state and every console error/exception."""
    b = Browser(chromium, profile)
    try:
        for domain in ("Runtime", "Log", "Page"):
            b.call(f"{domain}.enable")
        b.call("Page.navigate", {"url": page.resolve().as_uri()})
        b.wait_for("Page.loadEventFired")
        res = b.call("Runtime.evaluate", {
            "expression": "JSON.stringify({title: document.title, "
                          "sections: document.querySelectorAll('section').length, "
                          "images: Array.from(document.images).map(i => ({alt: i.alt, "
                          "complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}))})",
            "returnByValue": True,
        })
        info = json.loads(res["result"]["value"])
        time.sleep(0.3)  # let late console messages arrive
        b.call("Runtime.evaluate", {"expression": "1"})
    finally:
        b.quit()
    errors = []
    for e in b.events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.exceptionThrown":
            errors.append(f"exception: {p.get('exceptionDetails', {}).get('text')}")
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append(f"console.{p['type']}: {[a.get('value') for a in p.get('args', [])]}")
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
    info["errors"] = errors
    return info


@pytest.fixture(scope="module")
def chromium() -> str:
    path, reason = find_chromium()
    if path is None:
        pytest.skip(reason)
    return path


def test_checker_catches_broken_images_and_console_errors(chromium: str, tmp_path: Path) -> None:
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
    info = inspect_page(chromium, page, tmp_path / "profile")
    by_alt = {i["alt"]: i for i in info["images"]}
    assert by_alt["ok"]["w"] == 1
    assert by_alt["broken"]["w"] == 0
    assert any("boom" in e for e in info["errors"])


def test_report_opens_in_chromium(
    chromium: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    out = tmp_path_factory.getbasetemp() / "lab-smoke"  # shared with test_lab_smoke
    run_smoke(out)
    n_figs = sum(len(read_json(out / n / "meta.json")["figures"]) for n in STUDY_NAMES)
    info = inspect_page(chromium, out / "index.html", tmp_path / "profile")
    assert info["title"] == "signalprop lab report"
    assert info["sections"] == len(STUDY_NAMES)
    assert len(info["images"]) == n_figs > 0
    broken = [i["alt"] for i in info["images"] if not i["complete"] or i["w"] <= 0]
    assert not broken, f"figures that did not load: {broken}"
    assert all(i["w"] > 200 and i["h"] > 150 for i in info["images"])
    assert not info["errors"], info["errors"]
