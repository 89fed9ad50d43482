"""Fault suite, part 3: bounded resources and damaged files (issue 16).

Gzip and YAML bombs are refused cheaply, damaged records name the file, a full disk fails with
one line and keeps the previous results, a nested probe keeps recording, and the reaper that
guards a local Ray instance kills a process tree left behind by a ``kill -9``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from signalprop.cli import main
from signalprop.record import MAX_RECORD_BYTES, Record, max_record_bytes


def _record_bytes() -> bytes:
    r = Record()
    r.add_scalar(0, "loss", 1.5)
    r.add_scalar(1, "loss", float("nan"))
    return r.to_json().encode()


# --- records ----------------------------------------------------------------------------------
def test_gzip_bomb_is_refused_without_inflating_it(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # 64 MB of JSON whitespace compresses to ~64 KB; with a 1 MB limit it must be refused
    # after inflating at most the limit
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [c.compress(b'{"format": "signalprop.record", "version": 1, "meta": {}, "pad": "')]
    chunk = b" " * 2**20
    parts += [c.compress(chunk) for _ in range(64)]
    parts += [c.compress(b'"}'), c.flush()]
    bomb = tmp_path / "bomb.json.gz"
    bomb.write_bytes(b"".join(parts))
    assert bomb.stat().st_size < 200_000
    monkeypatch.setenv("SIGNALPROP_MAX_RECORD_BYTES", str(2**20))
    assert max_record_bytes() == 2**20
    with pytest.raises(ValueError, match="decompresses to more than 1048576 bytes"):
        Record.load(bomb)
    with pytest.raises(ValueError, match="decompression bomb"):
        Record.load(bomb, max_bytes=10**6)
    # the default limit is finite and far above a real record
    assert 2**24 <= MAX_RECORD_BYTES <= 2**30


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("truncated.json.gz", lambda b: gzip.compress(b)[:-20], "corrupt or truncated record"),
        ("garbage.json.gz", lambda b: b"\x1f\x8b" + os.urandom(200), "corrupt or truncated record"),
        ("latin1.json", lambda b: b"\xff\xfe" + b, "corrupt or truncated record"),
        ("half.json", lambda b: b[: len(b) // 2], "corrupt or truncated record"),
        ("list.json", lambda b: b"[1, 2]", "not a signalprop record"),
        ("future.json", lambda b: b.replace(b'"version": 1', b'"version": 99'),
         "newer than this signalprop"),
        ("badversion.json", lambda b: b.replace(b'"version": 1', b'"version": "x"'),
         "version must be an integer"),
        ("badlayers.json", lambda b: b.replace(b'"layers": []', b'"layers": [{"nope": 1}]'),
         "corrupt or truncated record"),
        ("badvalue.json", lambda b: b.replace(b'"loss": 1.5', b'"loss": "abc"'),
         "corrupt or truncated record"),
    ],
)
def test_damaged_record_names_the_file(name: str, make: Any, message: str,
                                       tmp_path: Path) -> None:
    p = tmp_path / name
    p.write_bytes(make(_record_bytes()))
    with pytest.raises(ValueError, match=message) as ei:
        Record.load(p)
    assert str(p) in str(ei.value)


def test_good_record_still_loads(tmp_path: Path) -> None:
    r = Record()
    r.add_scalar(3, "loss", float("inf"))
    for ext in (".json", ".json.gz"):
        back = Record.load(r.save(tmp_path / f"r{ext}"))
        assert back.get(3, "__model__", "loss") == float("inf")


def test_damaged_record_through_the_cli(tmp_path: Path, capsys: Any) -> None:
    p = tmp_path / "record.json.gz"
    p.write_bytes(gzip.compress(_record_bytes())[:-10])
    assert main(["diagnose", str(p)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "corrupt or truncated record" in err and str(p) in err


# --- full disk --------------------------------------------------------------------------------
@pytest.fixture()
def small_tmpfs(tmp_path: Path) -> Any:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt: Path, leave: int) -> None:
    """Fill the file system, leaving about ``leave`` bytes free."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


FACTORY = '''
import torch
from torch import nn

def factory():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), (x, y), nn.CrossEntropyLoss()
'''


def test_full_disk_fails_cleanly_and_keeps_previous_results(small_tmpfs: Path, tmp_path: Path,
                                                             capsys: Any) -> None:
    f = tmp_path / "m.py"
    f.write_text(FACTORY)
    out = small_tmpfs / "out"
    argv = ["doctor", f"{f}:factory", "--steps", "3", "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0  # a first, complete result
        capsys.readouterr()
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        assert set(before) == {"report.html", "report.json", "record.json.gz"}
        # no room at all: refused before training, naming the folder and the reason
        _fill(small_tmpfs, 0)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("signalprop: error:") == 1 and "Traceback" not in err
        assert "No space left on device" in err and str(out) in err
        # room for the write test but not for the report: the diagnosis is still shown, the
        # error is one line, and the previous files are untouched (writes are atomic)
        (small_tmpfs / "filler").unlink()
        _fill(small_tmpfs, 24 * 1024)
        assert main(argv) == 2
        got, err = capsys.readouterr()
        assert "Sequential" in got  # the report was printed before saving failed
        assert err.count("signalprop: error:") == 1 and "Traceback" not in err
        assert "No space left on device" in err
        after = {p.name: p.read_bytes() for p in out.iterdir()}
        assert after == before, "a failed save damaged or left files"
        # a sweep whose database cannot grow: one line as well
        cfg = tmp_path / "g.yaml"
        cfg.write_text("base: {data: spiral, data_args: {n: 60}, depth: 2, width: 4, "
                       "steps: 2}\nseeds: 40\n")
        (small_tmpfs / "filler").unlink()
        _fill(small_tmpfs, 8 * 1024)
        rc = main(["sweep", str(cfg), "--out", str(small_tmpfs / "sw"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("signalprop: error:") == 1 and "Traceback" not in err
    finally:
        torch.set_num_threads(threads)


# --- probe re-entry ---------------------------------------------------------------------------
def test_nested_probe_keeps_recording() -> None:
    from signalprop.probe import Probe

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    p = Probe(m)
    with p:
        with p:  # an inner block used to remove every hook when it exited
            m(torch.randn(5, 3)).sum().backward()
            p.step()
        assert p.attached
        m(torch.randn(5, 3)).sum().backward()
        p.step()
    assert not p.attached
    assert p.record.steps == [0, 1]
    assert p.record.get(1, "0", "out_std") == p.record.get(1, "0", "out_std")  # recorded


# --- the reaper (guards a local Ray instance's agents) ----------------------------------------
REAPER_PARENT = '''
import subprocess, sys, time
from signalprop._lifeline import start_reaper

if __name__ == "__main__":
    reaper = start_reaper(poll=0.1)
    # a child that starts its own child, like raylet and its agents
    subprocess.Popen([sys.executable, "-c",
                      "import subprocess, sys, time; "
                      "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
                      "time.sleep(120)"])
    print("ready", flush=True)
    time.sleep(120)
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_reaper_kills_a_tree_left_by_kill_9(tmp_path: Path) -> None:
    import signalprop
    from signalprop._lifeline import descendants

    src = str(Path(signalprop.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = tmp_path / "parent.py"
    script.write_text(REAPER_PARENT)
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env,
                         start_new_session=True, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        end = time.monotonic() + 30
        while len(descendants(p.pid)) < 3 and time.monotonic() < end:  # reaper, child, grandchild
            time.sleep(0.05)
        tree = descendants(p.pid)
        assert len(tree) >= 3
        time.sleep(0.3)  # the reaper's snapshot includes the grandchild
        p.kill()
        p.wait()
        end = time.monotonic() + 5
        alive = list(tree)
        while alive and time.monotonic() < end:
            alive = [q for q in tree if _running(q, tree[q])]
            time.sleep(0.05)
        assert alive == [], "processes outlived their killed parent"
    finally:
        if p.poll() is None:
            p.kill()
        for q, start in descendants(p.pid).items():
            if _running(q, start):
                os.kill(q, signal.SIGKILL)


def _running(pid: int, start: str) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    rest = raw[raw.rfind(")") + 2:].split()
    return rest[0] != "Z" and rest[19] == start


def test_json_of_a_partial_report_is_valid(tmp_path: Path) -> None:
    """A doctor report interrupted by an error in the user's code is a full, valid report."""
    import signalprop
    from signalprop.validation import UserCodeError

    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.n = nn.Linear(4, 3), 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                self.n += 1
                if self.n == 4:
                    raise RuntimeError("broke at the 4th step")
            return self.lin(x)

    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    with pytest.raises(UserCodeError, match=r"error in your forward at step 3: RuntimeError") \
            as ei:
        signalprop.doctor(Boom(), (x, y), nn.CrossEntropyLoss(), steps=10, progress=False)
    rep = ei.value.report
    assert rep is not None and rep.meta["steps_run"] == 3
    assert rep.meta["stopped"]["reason"] == "error"
    d = json.loads(rep.to_json())
    assert d["meta"]["steps_run"] == 3 and d["summary"]["steps"] == 3
