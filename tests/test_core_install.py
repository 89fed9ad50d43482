"""The core install: probe, diagnosis, doctor and report work without the [lab] extra
(scikit-learn, pandas, mnist1d), and what needs it says which extra to install."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import signalprop

LAB = ("sklearn", "pandas", "mnist1d")


@pytest.fixture
def without_lab(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the [lab] packages were not installed: importing them (or any submodule) fails."""
    for name in list(sys.modules):
        if name.split(".")[0] in LAB:
            monkeypatch.setitem(sys.modules, name, None)
    for name in LAB:
        monkeypatch.setitem(sys.modules, name, None)


def test_core_works_without_the_lab_extra(without_lab, tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    rep = signalprop.doctor(model, (x, y), nn.CrossEntropyLoss(), steps=6, progress=False)
    paths = rep.save(tmp_path)
    assert paths["html"].stat().st_size > 10_000
    assert isinstance(signalprop.diagnose(rep.record), list)


def test_lab_needs_say_which_extra(without_lab) -> None:
    with pytest.raises(ImportError, match=r"digits data set needs the optional package 'sklearn'"
                       r": pip install 'signalprop\[lab\]'"):
        signalprop.load_dataset("digits")
    with pytest.raises(ImportError, match=r"pip install 'signalprop\[lab\]'"):
        signalprop.Record().to_dataframe()
