"""More real architectures' odd corners, each checked against autograd on an unprobed copy
(``load_state_dict``, ``retain_grad()``): what the probe records must be what the model did."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from signalprop.probe import Probe


@dataclasses.dataclass
class _Out:
    codes: torch.Tensor
    h: torch.Tensor


class _ArgmaxLeaf(nn.Module):
    """A leaf returning ``(indices, values)``: the indices are no signal."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6) * 0.4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x @ self.w
        return h.argmax(-1), h


class _DictLeaf(_ArgmaxLeaf):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        h = x @ self.w
        return {"ids": h.argmin(-1), "hidden": h, "norm": h.norm()}


class _DataclassLeaf(_ArgmaxLeaf):
    def forward(self, x: torch.Tensor) -> _Out:  # type: ignore[override]
        h = torch.tanh(x @ self.w)
        return _Out(h.argmax(-1), h)


class _Structured(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = _ArgmaxLeaf(), _DictLeaf(), _DataclassLeaf()
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, keep: list[torch.Tensor] | None = None) -> torch.Tensor:
        hs = [self.a(x)[1]]
        hs.append(self.b(hs[-1])["hidden"])
        hs.append(self.c(hs[-1]).h)
        if keep is not None:
            for h in hs:
                h.retain_grad()
            keep += hs
        return self.head(hs[-1])


def test_leaf_outputs_with_integer_parts_dicts_and_dataclasses_record_their_signal():
    # a leaf's output used to stand for its first element whatever it was: the mean of the
    # argmax indices was recorded as the layer's out_mean (and no gradient: NaN), and a leaf
    # returning a dict or a dataclass was not recorded at all
    model = _Structured()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = Probe(model, optimizer=opt, max_forward_samples=None).attach()
    torch.manual_seed(1)
    for step in range(2):
        x = torch.randn(5, 6)
        ref = _Structured()
        ref.load_state_dict(model.state_dict())
        keep: list[torch.Tensor] = []
        ref(x, keep).pow(2).mean().backward()
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        r = p.record
        for name, h in zip("abc", keep, strict=True):
            assert r.get(step, name, "out_mean") == pytest.approx(float(h.detach().double().mean()),
                                                                  rel=1e-5)
            assert r.get(step, name, "out_grad_norm") == pytest.approx(float(h.grad.double().norm()),
                                                                       rel=1e-5)
