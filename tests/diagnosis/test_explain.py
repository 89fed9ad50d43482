"""Mean-field explanation of the measured gradient profile (signalprop.diagnosis.explain).

Oracle: on wide random MLPs (width 512, 20 weight layers, one forward/backward) the mean-field
prediction of ||dL/dh_1|| / ||dL/dh_20|| from the probe's own measurements (q_l, sigma_w^2) must
match the measured ratio within a factor 1.5 (measured: within 1.08 for every case below).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import signalprop
from signalprop.diagnosis.explain import (
    DISAGREEMENT_FACTOR,
    attach,
    critical_remedy,
    explain,
)
from signalprop.diagnosis.findings import Finding
from signalprop.probe import Probe
from signalprop.theory import critical_point, q_star
from signalprop.theory.torch_adapter import mean_field_init_
from signalprop.vocab.activations import Erf, Gaussian

WIDE_TOL = 1.5


class Swish(nn.Module):
    """A custom element-wise activation the probe does not know (no signalprop_activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class RowSoftmax(nn.Module):
    """Not element-wise: each output depends on the whole row (the sigmoid inside may make the
    probe label it "sigmoid"; the explanation must not believe that)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1) * torch.sigmoid(x)


def _probed(act: type[nn.Module], sw2: float, sb2: float, *, bn: bool = False,
            width: int = 512, depth: int = 20, batch: int = 32, seed: int = 0,
            extra: type[nn.Module] | None = None) -> tuple[nn.Module, signalprop.Record]:
    """A random MLP, one probed forward/backward with an isotropic output gradient."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers.append(nn.Linear(width, width, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm1d(width))
        layers.append(act())
        if extra is not None:
            layers.append(extra())
    layers.append(nn.Linear(width, width))
    net = nn.Sequential(*layers)
    mean_field_init_(net, sw2, sb2)
    x, v = torch.randn(batch, width), torch.randn(batch, width)
    p = Probe(net)
    with p:
        (v * net(x)).sum().backward()
        p.step()
    return net, p.record


@pytest.mark.parametrize("name,act,sw2,sb2,bn", [
    ("tanh", nn.Tanh, 1.5, 0.05, False),
    ("sigmoid", nn.Sigmoid, 4.0, 0.05, False),
    ("relu", nn.ReLU, 2.0, 0.0, False),
    ("gaussian", Gaussian, 2.0, 0.05, False),
    ("erf", Erf, 1.2, 0.05, False),
    ("custom callable", Swish, 3.0, 0.05, False),
    ("tanh+bn", nn.Tanh, 1.0, 0.0, True),
    ("relu+bn", nn.ReLU, 2.0, 0.0, True),
    ("sigmoid+bn", nn.Sigmoid, 1.0, 0.0, True),
])
def test_prediction_matches_wide_random_mlp(name, act, sw2, sb2, bn):
    net, rec = _probed(act, sw2, sb2, bn=bn)
    ex = explain(rec, net, batch_size=32)
    assert ex is not None
    assert ex.covered == 19  # every block is predicted
    assert {t.block for t in ex.init} == {"batchnorm" if bn else "elementwise"}
    # the ratios span 1e-8 .. 40 across these cases; the prediction follows within 1.5x
    assert ex.disagreement <= WIDE_TOL, (name, ex.predicted_ratio, ex.measured_ratio)
    assert ex.agrees and ex.reasons == []


def test_elementwise_chi_is_sigma_w2_times_e_dphi2():
    """chi_l = sigma_w,l+1^2 E[phi'(sqrt(q_l) z)^2] with both numbers as measured; at the fixed
    point it is the theory's chi_1."""
    sw2, sb2 = 1.5, 0.05
    net, rec = _probed(nn.Tanh, sw2, sb2)
    ex = explain(rec, net)
    t = ex.init[-1]  # deep in the net q_l has reached q*
    assert t.q == pytest.approx(q_star("tanh", sw2, sb2), rel=0.05)
    assert t.sigma_w2 == pytest.approx(sw2, rel=0.02)  # fan_in Var(W) of a 512x512 Gaussian
    assert t.chi == pytest.approx(t.sigma_w2 * t.e_dphi2, rel=1e-12)
    assert t.chi == pytest.approx(signalprop.theory.chi_1("tanh", sw2, sb2), rel=0.05)
    assert t.activation == "tanh"


def test_custom_callable_resolved_from_module():
    net, rec = _probed(Swish, 3.0, 0.05, depth=4, width=64)
    ex = explain(rec, net)
    # the module itself is integrated (phi' by autograd), whatever kind the probe guessed for it
    assert [t.block for t in ex.init] == ["elementwise"] * 3
    assert ex.init[0].activation.endswith("Swish")
    assert ex.disagreement <= WIDE_TOL
    # without the model only the record's label is left: no label, no prediction
    for info in rec.layers.values():
        info.activation = None
    bare = explain(rec)
    assert bare.covered == 0 and math.isnan(bare.predicted_ratio)


def test_non_elementwise_block_is_named():
    net, rec = _probed(nn.Tanh, 1.5, 0.05, depth=4, width=64, extra=RowSoftmax)
    ex = explain(rec, net, tolerance=1.0)
    assert [t.block for t in ex.init] == ["unknown"] * 3
    assert any("Tanh+RowSoftmax" in r and "not an element-wise" in r for r in ex.reasons)


def test_deep_sigmoid_example_numbers_and_reasons():
    """The built-in deep-sigmoid example at PyTorch's default init: sigma_w^2 = 1/3,
    sigma_b^2 = 1/192, q* = 0.090, chi = 0.020, 0.141 per layer, 2.3e-25 over 29 layers."""
    from signalprop.examples import load_example

    (model, data, loss), kw = load_example("deep-sigmoid")
    kw["steps"] = 3
    rep = signalprop.doctor(model, data, loss, progress=False, **kw)
    ex = rep.explanation
    assert ex is not None and ex.covered == 29
    assert ex.predicted_factor == pytest.approx(0.141, rel=0.03)
    assert 1.5e-25 < ex.predicted_ratio < 3.5e-25
    deep = ex.init[-10:]  # at the fixed point
    assert sum(t.q for t in deep) / 10 == pytest.approx(0.090, rel=0.15)
    assert sum(t.chi for t in deep) / 10 == pytest.approx(0.020, rel=0.1)
    assert "not saturation" in ex.cause and "sigmoid' <= 0.25" in ex.cause
    # the stated factor: agreement or a reason decided from the data, never silence
    assert ex.tolerance == DISAGREEMENT_FACTOR
    assert ex.agrees or ex.reasons
    # a stricter factor than a width-64 net can meet: the narrow layers are named as the reason
    strict = explain(rep.record, model, tolerance=1.0)
    assert any("narrow layers (width 64)" in r or "correlated" in r for r in strict.reasons)
    # the finding says why, with both numbers
    f = rep.finding("vanishing_gradients")
    assert "Why (mean-field theory" in f.evidence and "measured at init" in f.evidence
    assert f.numbers["predicted_ratio"] == ex.predicted_ratio
    # critical init for this model: sigmoid at the model's own bias variance
    rx = ex.prescription
    cp = critical_point("sigmoid", rx.sigma_b2)
    hidden = [v for k, v in rx.sigma_w2.items() if k != ex.layers[0]]
    assert hidden == pytest.approx([cp.sigma_w2] * 29)
    assert rx.sigma_w2[ex.layers[0]] * rx.input_second_moment + rx.sigma_b2 == pytest.approx(
        cp.q_star)  # layer 1 lands on q* for the measured input scale
    assert rx.predicted_ratio == pytest.approx(1.0, rel=1e-6)
    # JSON carries the explanation under its own key
    d = json.loads(rep.to_json())["explanation"]
    assert d["predicted_ratio"] == pytest.approx(ex.predicted_ratio)
    assert d["measured_ratio"] == pytest.approx(ex.measured_ratio)
    assert len(d["chi"]) == 29 and d["prescription"]["sigma_w"][ex.layers[1]] == pytest.approx(
        math.sqrt(cp.sigma_w2))


def test_critical_remedy_uses_the_prescribed_values():
    net, rec = _probed(nn.Tanh, 4.0, 0.05, depth=5, width=256)
    ex = explain(rec, net)
    rem = critical_remedy(ex)
    assert rem.name == "critical_init"
    new = rem.apply(net)
    for name, sw2 in ex.prescription.sigma_w2.items():
        w = new.get_submodule(name).weight.detach()
        assert float(w.var() * w.shape[1]) == pytest.approx(sw2, rel=0.05)
    assert ex.prescription.predicted_ratio == pytest.approx(1.0, abs=0.3)
    with pytest.raises(ValueError, match="no module 'nope'"):
        signalprop.remedies.get_remedy("critical_init", sigma_w2={"nope": 1.0}).apply(net)


def test_attach_and_missing_data():
    net, rec = _probed(nn.Tanh, 1.5, 0.05, depth=3, width=32)
    ex = explain(rec, net)
    f = Finding("vanishing_gradients", [], "Gradients vanish.", "warning")
    attach([f], ex)
    assert f.evidence.startswith("Gradients vanish. Why") and "predicted_ratio" in f.numbers
    assert explain(signalprop.Record()) is None
    with pytest.raises(ValueError, match="tolerance"):
        explain(rec, tolerance=0.5)


def test_figure_predicted_vs_measured():
    from signalprop.report import figures as F

    net, rec = _probed(nn.Tanh, 1.5, 0.05, depth=4, width=32)
    fig = F.theory_vs_measurement(rec, model=net)
    assert fig is not None
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and len(ax.lines) == 4
    assert F.theory_vs_measurement.requires == ("out_grad_norm", "out_std", "weight_norm")
    assert F.theory_vs_measurement(signalprop.Record()) is None


@pytest.mark.parametrize("act,alpha", [(nn.Tanh, 1.0), (nn.ReLU, 0.3), (nn.Tanh, 0.3)])
def test_residual_blocks_add_the_skip(act, alpha):
    """x_{k+1} = x_k + alpha phi(W x_k + b): the squared stream gradient grows by
    1 + alpha^2 sigma_w^2 E[phi'^2] per block (measured within 1.05x for these cases)."""
    from signalprop.remedies import Residual

    torch.manual_seed(0)
    w = 512
    net = nn.Sequential(nn.Linear(w, w), act(),
                        *[Residual(nn.Sequential(nn.Linear(w, w), act()), alpha)
                          for _ in range(15)], nn.Linear(w, w))
    mean_field_init_(net, 1.0, 0.05)
    x, v = torch.randn(32, w), torch.randn(32, w)
    p = Probe(net)
    with p:
        (v * net(x)).sum().backward()
        p.step()
    ex = explain(p.record, net)
    assert [t.block for t in ex.init] == ["residual"] * 15 + ["elementwise"]
    assert ex.disagreement <= WIDE_TOL
    assert "Skip connections" in ex.cause
    # without the model the probe's own skip marks (LayerInfo.residual) find the blocks; alpha
    # is then taken as 1
    plain = explain(p.record)
    assert [t.block for t in plain.init] == ["residual"] * 15 + ["elementwise"]
    if alpha == 1.0:
        assert plain.disagreement <= WIDE_TOL
    # with no skip marks at all, the chain formula (no "1 +") is far off, and the reasons
    # decided from the data name an unseen skip connection
    for info in p.record.layers.values():
        info.residual = None
    blind = explain(p.record)
    assert "residual" not in {t.block for t in blind.init}
    assert not blind.agrees
    assert any("skip connection" in r for r in blind.reasons)


def test_shared_activation_called_at_several_sites():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(512, 512) for _ in range(12)])
            self.act = nn.Tanh()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for lin in self.layers[:-1]:
                x = self.act(lin(x))
            return self.layers[-1](x)

    net = Shared()
    mean_field_init_(net, 1.5, 0.05)
    p = Probe(net)
    with p:
        (torch.randn(32, 512) * net(torch.randn(32, 512))).sum().backward()
        p.step()
    ex = explain(p.record, net)
    assert [t.block for t in ex.init] == ["elementwise"] * 11
    assert ex.disagreement <= WIDE_TOL
    assert set(ex.prescription.sigma_w2) == {f"layers.{i}" for i in range(12)}


def test_doctor_survives_an_explanation_error(monkeypatch):
    import signalprop.diagnosis.explain as E

    def boom(*a, **k):
        raise RuntimeError("theory broke")

    monkeypatch.setattr(E, "explain", boom)
    net, rec = _probed(nn.Tanh, 1.5, 0.05, depth=3, width=16)
    with pytest.warns(UserWarning, match="theory broke"):
        assert E.explain_or_skip(rec, net) is None
    assert rec.meta["explanation_skipped"] == "RuntimeError: theory broke"


def test_doctor_trial_of_critical_init_uses_the_prescription(monkeypatch):
    """The doctor's critical_init trial initialises each weight layer with the explanation's
    sigma_w^2 (checked on the model the trial actually trains)."""
    import signalprop.remedies as R

    seen: list[nn.Module] = []
    orig = R.Remedy.apply

    def spy(self, model, batch=None):
        out = orig(self, model, batch)
        if self.name == "critical_init":
            seen.append(out)
        return out

    monkeypatch.setattr(R.Remedy, "apply", spy)
    torch.manual_seed(0)
    x, y = torch.randn(256, 128), torch.randint(0, 3, (256,))
    model = nn.Sequential(nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                          nn.Linear(128, 3))
    rep = signalprop.doctor(model, (x, y), nn.CrossEntropyLoss(), steps=2, progress=False,
                            trial=True, remedies=["critical_init"], trial_seeds=1)
    rx = rep.explanation.prescription
    row = next(t for t in rep.trials if t["remedy"] == "critical_init")
    assert "computed for this model" in row["description"]
    assert seen
    for name, sw2 in rx.sigma_w2.items():
        w = seen[0].get_submodule(name).weight.detach()
        assert float(w.pow(2).mean() * w.shape[1]) == pytest.approx(sw2, rel=0.15)


def test_partly_covered_conv_net():
    """Conv layers use fan_in = channels x kernel; a ReLU+MaxPool block has no factor, is named,
    and the layers around it keep their measured scale in the prescription."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 16, 3, padding=1), nn.Tanh(),
                        nn.Conv2d(16, 16, 3, padding=1), nn.Tanh(), nn.Flatten(),
                        nn.Linear(16 * 4 * 4, 3))
    p = Probe(net)
    with p:
        nn.functional.cross_entropy(net(torch.randn(16, 1, 8, 8)),
                                    torch.randint(0, 3, (16,))).backward()
        p.step()
    ex = explain(p.record, net)
    assert [t.block for t in ex.init] == ["unknown", "elementwise", "elementwise"]
    assert ex.covered == 2
    assert "covers 2 of 3" in ex.sentence() and "ReLU+MaxPool2d" in ex.sentence()
    # PyTorch's default conv init: Var W = 1/(3 fan_in), fan_in = 16 * 3 * 3
    assert ex.init[1].sigma_w2 == pytest.approx(1 / 3, rel=0.15)
    rx = ex.prescription
    w0 = net[0].weight.detach()
    assert rx.sigma_w2["0"] == pytest.approx(float(w0.pow(2).sum() / w0.shape[0]))
    assert rx.sigma_w2["5"] == pytest.approx(critical_point("tanh", rx.sigma_b2).sigma_w2)
