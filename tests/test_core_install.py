"""The core install: probe, diagnosis, doctor and report work without the [lab] extra
(scikit-learn, pandas, mnist1d), and what needs it says which extra to install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys
for m in ("sklearn", "pandas", "mnist1d"):  # as if not installed: importing them fails
    sys.modules[m] = None
import torch
from torch import nn
import signalprop

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
rep = signalprop.doctor(model, (x, y), nn.CrossEntropyLoss(), steps=10, progress=False)
paths = rep.save(sys.argv[1])
assert paths["html"].stat().st_size > 10_000
assert signalprop.diagnose(rep.record) is not None
for what, call in (("digits", lambda: signalprop.load_dataset("digits")),
                   ("to_dataframe", lambda: rep.record.to_dataframe())):
    try:
        call()
    except ImportError as e:
        assert "pip install 'signalprop[lab]'" in str(e), str(e)
        print(what, "->", e)
    else:
        raise AssertionError(what + " worked without its extra")
assert not any(sys.modules.get(m) for m in ("sklearn", "pandas", "mnist1d"))
print("core ok")
"""


def test_core_works_without_the_lab_extra(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "core ok" in proc.stdout
    assert "digits -> the digits data set needs the optional package 'sklearn'" in proc.stdout
