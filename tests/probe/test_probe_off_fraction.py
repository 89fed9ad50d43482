"""The probe's ``off_frac``: units off (output <= 0) per example, against a direct count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from signalprop.probe import Probe


@pytest.mark.parametrize("samples", [None, 64])
def test_off_fraction_matches_a_direct_count(samples: int | None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    with torch.no_grad():
        model[1].bias.fill_(-0.5)  # a negative shift: more than half of the units off
    x = torch.randn(50, 8)
    p = Probe(model, backward=False, weights=False, max_forward_samples=samples)
    with p:
        model(x)
        p.step()
    h = model[2](model[1](model[0](x))).detach()
    truth = float((h <= 0).float().mean())
    got = p.record.get(0, "2", "off_frac")
    if samples is None:
        assert got == pytest.approx(truth, abs=1e-6)
    else:  # a strided sample of 64 of the 1600 values: close, not exact
        assert abs(got - truth) < 0.15
    assert truth > 0.6
    # dead (off for every example) is a different, smaller quantity
    assert p.record.get(0, "2", "dead_frac") < got
