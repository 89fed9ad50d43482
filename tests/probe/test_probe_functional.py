"""Functional activations after the mapping step: seen by patching the module attribute they are
called through (``nn.TransformerEncoderLayer.activation``), not by a torch-function mode around
every op. Truth: the same records taken with the mode (the mapping step's way)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from signalprop.probe import Probe
from signalprop.probe.layermap import LayerMap


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation="gelu",
                                       batch_first=True)
    return nn.Sequential(nn.Linear(6, 16), nn.TransformerEncoder(layer, 2), nn.Linear(16, 2))


class Mixed(nn.Module):
    """Calls its activation through an attribute AND directly (only the mode sees both)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 2)
        self.act = F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.gelu(self.act(self.a(x))))


def _records(model: nn.Module, steps: int = 4, **kw) -> tuple[Probe, dict]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    p = Probe(model, optimizer=opt, **kw).attach()
    for _ in range(steps):
        x = torch.randn(4, 5, 6, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    p.detach()
    return p, p.record.data


def test_attribute_patches_replace_the_mode_and_record_the_same(monkeypatch):
    p, got = _records(_encoder())
    assert p._fn_patches and not p._use_mode  # the mode is off after mapping
    assert sum(1 for s in p.layer_map if s.endswith("/gelu")) == 2  # one per encoder layer
    monkeypatch.setattr(LayerMap, "_fn_patch_plan", lambda self: None)
    q, ref = _records(_encoder())
    assert q._use_mode and q._fn_patches is None
    assert got.keys() == ref.keys()
    for step in ref:  # bitwise: the same ops on the same tensors, only observed differently
        assert got[step].keys() == ref[step].keys(), step
        for layer, metrics in ref[step].items():
            for k, v in metrics.items():
                w = got[step][layer][k]
                assert w == v or (math.isnan(v) and math.isnan(w)), (step, layer, k)


def test_direct_calls_beside_the_attribute_fall_back_to_the_mode():
    p, data = _records(Mixed(), steps=4)
    # step 1 saw fewer calls through the patch than mapping saw: the mode from step 2 on
    assert p._use_mode and p._fn_patches is None
    sites = [s for s in p.layer_map if "/gelu" in s]
    assert len(sites) == 2
    for step in (0, 2, 3):
        assert all("out_mean" in data[step][s] for s in sites), step


@pytest.mark.parametrize("schedule", [1, 3])
def test_patches_are_removed_between_recorded_steps(schedule):
    model = _encoder()
    p, _ = _records(model, steps=4, schedule=schedule)
    for layer in model[1].layers:
        assert layer.activation is F.gelu  # the attribute restored (detached probe)
