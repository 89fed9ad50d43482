"""More real architectures' odd corners, each checked against autograd on an unprobed copy
(``load_state_dict``, ``retain_grad()``): what the probe records must be what the model did."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

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


def _check_against_autograd(make: Any, names: list[str], steps: int) -> None:
    """Train ``make()`` under a probe with SGD and compare each step's record of the layers
    ``names`` with the outputs an unprobed copy keeps (``forward(x, keep)``, retained)."""
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = Probe(model, optimizer=opt).attach()
    torch.manual_seed(1)
    for step in range(steps):
        x = torch.randn(5, 6)
        ref = make()
        ref.load_state_dict(model.state_dict())
        keep: list[torch.Tensor] = []
        ref(x, keep).pow(2).mean().backward()
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        r = p.record
        for name, h in zip(names, keep, strict=True):
            assert r.get(step, name, "out_grad_norm") == pytest.approx(
                float(h.grad.double().norm()), rel=1e-5)
            assert r.get(step, name, "out_mean") == pytest.approx(
                float(h.detach().double().mean()), rel=1e-4, abs=1e-6)


def test_leaf_outputs_with_integer_parts_dicts_and_dataclasses_record_their_signal():
    # a leaf's output used to stand for its first element whatever it was: the mean of the
    # argmax indices was recorded as the layer's out_mean (and no gradient: NaN), and a leaf
    # returning a dict or a dataclass was not recorded at all
    _check_against_autograd(_Structured, list("abc"), steps=2)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))


def test_two_backward_passes_through_one_graph_are_not_pooled_as_if_apart():
    # multi-task style `a.backward(retain_graph=True); b.backward()`: dL/dh is g_a + g_b; the
    # per-pass norms used to be pooled like micro-batches' (sqrt(|g_a|^2 + |g_b|^2): silently
    # wrong); now the layer's norm is NaN (not measured) with a warning, the weights' exact
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = Probe(model, optimizer=opt).attach()
    torch.manual_seed(1)
    for step, passes in enumerate((2, 1, 2)):
        x = torch.randn(5, 6)
        ref = _mlp()
        ref.load_state_dict(model.state_dict())
        y0 = ref[0](x)
        h = ref[1](y0)
        for t in (y0, h):
            t.retain_grad()
        out = ref[2](h)
        losses = [out.pow(2).mean(), out.abs().mean()][:passes]
        sum(losses).backward()
        opt.zero_grad()
        out = model(x)
        losses = [out.pow(2).mean(), out.abs().mean()][:passes]
        if passes == 2:
            losses[0].backward(retain_graph=True)
            with pytest.warns(UserWarning, match="several backward passes"):
                losses[1].backward()
        else:
            losses[0].backward()
        opt.step()
        r = p.record
        for name, t in (("0", y0), ("1", h)):
            got = r.get(step, name, "out_grad_norm")
            assert math.isnan(got) if passes == 2 else got == pytest.approx(
                float(t.grad.double().norm()), rel=1e-5)
        assert r.get(step, "1", "out_mean") == pytest.approx(float(h.detach().double().mean()),
                                                             rel=1e-4, abs=1e-6)
        assert r.get(step, "0.weight", "grad_norm") == pytest.approx(
            float(ref[0].weight.grad.double().norm()), rel=1e-5)


@pytest.mark.parametrize("sequential", [True, False])
def test_a_gradient_penalty_records_the_losses_gradient(sequential):
    # WGAN-GP style: autograd.grad(critic.sum(), x, create_graph=True) passes through the
    # outputs first (a gradient of another function), then the loss's backward delivers the
    # whole dL/dh; the two used to be pooled, now the later pass replaces the earlier one
    model = _mlp() if sequential else _Wrapped()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = Probe(model, optimizer=opt).attach()
    torch.manual_seed(1)
    for step in range(2):
        x = torch.randn(4, 6, requires_grad=True)
        ref = _mlp() if sequential else _Wrapped()
        ref.load_state_dict(model.state_dict())
        seq = ref if sequential else ref.net
        y0 = seq[0](x)
        h = seq[1](y0)
        out = seq[2](h)
        (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        # (the oracle by autograd.grad: retain_grad would also keep the first pass's gradient)
        want = torch.autograd.grad(out.pow(2).mean() + g.pow(2).sum(), [y0, h])
        opt.zero_grad()
        x2 = x.detach().requires_grad_()
        out = model(x2)
        (g,) = torch.autograd.grad(out.sum(), x2, create_graph=True)
        (out.pow(2).mean() + g.pow(2).sum()).backward()
        opt.step()
        r = p.record
        pre = "" if sequential else "net."
        for name, w in zip((f"{pre}0", f"{pre}1"), want, strict=True):
            assert r.get(step, name, "out_grad_norm") == pytest.approx(float(w.double().norm()),
                                                                       rel=1e-5)


class _Wrapped(nn.Module):
    """The MLP called layer by layer (not through nn.Sequential's own forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[1](self.net[0](x)))


class _Looped(nn.Module):
    """A parent that runs an nn.Sequential's children itself (``for m in seq``, ``seq[i]``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(8, 2))

    def forward(self, x: torch.Tensor, keep: list[torch.Tensor] | None = None) -> torch.Tensor:
        for m in self.body:
            x = m(x)
            if keep is not None:
                x.retain_grad()
                keep.append(x)
        return self.head(x)


def test_sequential_children_called_by_their_parent_are_recorded_after_the_mapping_step():
    # the children of an nn.Sequential called once per pass had their hooks moved into the
    # container's own loop after the mapping step; a parent calling them itself bypasses that
    # loop: from step 1 on nothing of them was recorded (out_mean and out_grad_norm NaN)
    _check_against_autograd(_Looped, [f"body.{i}" for i in range(4)], steps=3)


class _Scripted(nn.Module):
    """A model with a TorchScript part (``torch.jit.script``: it takes no module hooks)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 8)
        self.mid = torch.jit.script(nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True)))
        self.b = nn.Linear(8, 8)
        self.act = nn.Tanh()
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, keep: list[torch.Tensor] | None = None) -> torch.Tensor:
        hs = [self.a(x)]
        hs.append(self.b(self.mid(hs[-1])))
        hs.append(self.act(hs[-1]))
        if keep is not None:
            for h in hs:
                h.retain_grad()
            keep += hs
        return self.head(hs[-1])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_torchscript_submodule_is_left_out_with_a_note_and_the_rest_recorded():
    # attaching used to crash (register_forward_pre_hook is not supported on ScriptModules)
    _check_against_autograd(_Scripted, ["a", "b", "act"], steps=2)
    model = _Scripted()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = Probe(model, optimizer=opt).attach()
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    assert "mid" in p.record.meta["unchecked"]
    assert not [n for n, i in p.record.layers.items() if n.startswith("mid") and i.role != "param"]
    assert p.record.get(0, "mid.0.weight", "grad_norm") == pytest.approx(
        float(model.mid[0].weight.grad.double().norm()), rel=1e-6)


class _PosTable(nn.Module):
    """A learned position table returned as is: the module's output is a leaf (a parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(4, 8) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos


class _WithPos(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.pos, self.head = nn.Linear(6, 8), _PosTable(), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(x) + self.pos(x)))


def test_a_module_returning_a_parameter_gets_one_gradient_hook_per_step():
    # the tensor hook on a leaf output was never removed: one more on the parameter every
    # recorded step (a leak; each later backward ran them all), and with accumulation the
    # first micro-batch's hook fired again in the second's backward (counted twice)
    model = _WithPos()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = Probe(model, optimizer=opt).attach()
    torch.manual_seed(1)
    for step in range(3):
        xs = [torch.randn(4, 6), torch.randn(4, 6)]
        ref = _WithPos()
        ref.load_state_dict(model.state_dict())
        parts = [torch.autograd.grad(ref(x).pow(2).mean(), ref.pos.pos)[0] for x in xs]
        want = float(torch.stack([g.double().norm() for g in parts]).norm())
        opt.zero_grad()
        for x in xs:
            model(x).pow(2).mean().backward()
        opt.step()
        assert p.record.get(step, "pos", "out_grad_norm") == pytest.approx(want, rel=1e-5)
        assert not model.pos.pos._backward_hooks
