"""Zoo: activation statistics whatever the activation's form (module, functional, reused,
in-place). Truth: dead/saturated fractions computed by hand from the same forward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from signalprop import stats
from signalprop.diagnosis import diagnose

from .zoo_helpers import finding, kinds, run_probed


def _dead_channels(h: torch.Tensor) -> float:
    """Fraction of channels inactive at every example and position of [B, C, H, W]."""
    return 1.0 - (h > 0).transpose(0, 1).reshape(h.shape[1], -1).any(1).double().mean().item()


class FunctionalCNN(nn.Module):
    """Three conv layers with F.relu in forward (no activation modules); biases -50 kill all
    channels of the first three, so the truth is '100% dead in 3 layers'."""

    def __init__(self, dead: bool = True) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3)
        self.head = nn.Linear(8, 3)
        if dead:
            with torch.no_grad():
                for c in (self.c1, self.c2, self.c3):
                    c.bias.fill_(-50.0)

    def hidden(self, x: torch.Tensor) -> list[torch.Tensor]:
        h1 = F.relu(self.c1(x))
        h2 = torch.relu(self.c2(h1))
        h3 = self.c3(h2).relu()
        return [h1, h2, h3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(x)[-1].mean((2, 3)))


def test_functional_relu_cnn_dead_in_three_layers():
    model = FunctionalCNN()
    x, y = torch.randn(8, 1, 10, 10), torch.randint(0, 3, (8,))
    with torch.no_grad():
        truth = [_dead_channels(h) for h in model.hidden(x)]
    assert truth == [1.0, 1.0, 1.0]
    p = run_probed(model, [(x, y)] * 3, F.cross_entropy, lr=0.1)
    r = p.record
    names = ["FunctionalCNN/relu", "FunctionalCNN/relu#2", "FunctionalCNN/relu#3"]
    assert p.layer_map == ["c1", names[0], "c2", names[1], "c3", names[2], "head"]
    for n, t in zip(names, truth, strict=True):
        assert r.get(2, n, "dead_frac") == pytest.approx(t, abs=1e-12)
        assert r.layers[n].activation == "relu" and r.layers[n].type == "functional relu"
    d = finding(diagnose(r), "dead_units")
    assert d.layers == names and "3 of 3" in d.evidence


def test_functional_relu_cnn_healthy_has_no_dead_units():
    torch.manual_seed(1)
    model = FunctionalCNN(dead=False)
    x, y = torch.randn(16, 1, 10, 10), torch.randint(0, 3, (16,))
    with torch.no_grad():
        truth = [_dead_channels(h) for h in model.hidden(x)]
    p = run_probed(model, [(x, y)] * 2, F.cross_entropy, lr=0.0)
    got = [p.record.get(1, n, "dead_frac") for n in
           ("FunctionalCNN/relu", "FunctionalCNN/relu#2", "FunctionalCNN/relu#3")]
    assert got == pytest.approx(truth, abs=1e-12)
    assert "dead_units" not in kinds(diagnose(p.record))


class SigmoidMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
        self.head = nn.Linear(16, 2)
        with torch.no_grad():
            for lin in self.layers:
                lin.weight.mul_(40.0)  # huge pre-activations: saturated sigmoids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin in self.layers:
            x = torch.sigmoid(lin(x))
        return self.head(x)


def test_functional_sigmoid_saturation_matches_definition():
    torch.manual_seed(0)
    model = SigmoidMLP()
    x, y = torch.randn(64, 16), torch.randint(0, 2, (64,))
    truth = []
    with torch.no_grad():
        h = x
        for lin in model.layers:
            h = torch.sigmoid(lin(h))
            d = h * (1 - h)
            truth.append((d < stats.SATURATION_DERIVATIVE_RATIO * 0.25).double().mean().item())
    p = run_probed(model, [(x, y)] * 2, F.cross_entropy, lr=0.0,
                   max_forward_samples=None)
    names = ["SigmoidMLP/sigmoid"] + [f"SigmoidMLP/sigmoid#{k}" for k in (2, 3, 4)]
    got = [p.record.get(1, n, "saturated_frac") for n in names]
    assert got == pytest.approx(truth, abs=1e-12)
    assert min(truth) > 0.4
    s = finding(diagnose(p.record), "saturation")
    assert s.layers == names


class ConvBNInplace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.conv(x)))
        h = F.relu(self.conv2(h), inplace=True)
        return self.head(h.mean((2, 3)))


def test_inplace_relu_after_batchnorm_keeps_bn_statistics():
    torch.manual_seed(0)
    model = ConvBNInplace()
    ref = ConvBNInplace()
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 3, 9, 9), torch.randint(0, 2, (16,))
    bn_out = ref.bn(ref.conv(x)).detach()  # before any ReLU touches it
    c2 = ref.conv2(F.relu(bn_out)).detach()
    p = run_probed(model, [(x, y)], F.cross_entropy, lr=0.0, max_forward_samples=None,
                   max_percentile_samples=None)
    r = p.record
    assert r.get(0, "bn", "out_mean") == pytest.approx(bn_out.mean().item(), abs=1e-6)
    assert r.get(0, "bn", "out_std") == pytest.approx(bn_out.std(unbiased=False).item(), rel=1e-5)
    assert r.get(0, "bn", "out_p05") < 0  # a ReLU'd tensor has no negative percentile
    assert r.get(0, "conv2", "out_p05") == pytest.approx(
        torch.quantile(c2.flatten(), 0.05).item(), rel=1e-4, abs=1e-6)
    assert r.get(0, "act", "dead_frac") == pytest.approx(_dead_channels(F.relu(bn_out)), abs=1e-12)
    assert "ConvBNInplace/relu" in r.layers  # the functional in-place ReLU is a layer too
    assert "unchecked" not in r.meta


def test_transformer_default_functional_activation_is_measured():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(4, 16), nn.TransformerEncoder(layer, 2,
                                                                   enable_nested_tensor=False))
    x = torch.randn(8, 5, 4)
    p = run_probed(model, [(x, None)], lambda out, _: out.pow(2).mean(), lr=0.0)
    r = p.record
    name = "1.layers.0/relu"
    assert r.layers[name].activation == "relu"
    # truth: dead = a feature of linear1's output inactive at every example and position
    with torch.no_grad():
        h = F.relu(model[1].layers[0].linear1(model[1].layers[0].norm1(
            model[0](x) + model[1].layers[0]._sa_block(model[0](x), None, None))))
    truth = 1.0 - (h > 0).reshape(-1, 32).any(0).double().mean().item()
    assert r.get(0, name, "dead_frac") == pytest.approx(truth, abs=1e-12)


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class TanhFn(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


def test_custom_activation_modules_are_identified_or_reported_unchecked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), TanhFn(), nn.Linear(8, 8), Swish(), nn.Linear(8, 2))
    x, y = torch.randn(16, 4) * 10, torch.randint(0, 2, (16,))
    p = run_probed(model, [(x, y)] * 2, F.cross_entropy, lr=0.0, max_forward_samples=None)
    r = p.record
    assert r.layers["1"].activation == "tanh"  # returns torch.tanh's output: it is a tanh
    with torch.no_grad():
        h = torch.tanh(model[0](x))
    truth = (1 - h * h < stats.SATURATION_DERIVATIVE_RATIO).double().mean().item()
    assert r.get(1, "1", "saturated_frac") == pytest.approx(truth, abs=1e-12)
    assert r.layers["3"].activation is None  # sigmoid is an intermediate step of Swish
    assert "custom activation" in r.meta["unchecked"]["3"]
    assert "Sequential/sigmoid" not in r.layers


def test_hugging_face_gelu_module_is_known():
    activations = pytest.importorskip("transformers.activations")
    model = nn.Sequential(nn.Linear(4, 8), activations.GELUActivation(), nn.Linear(8, 2),
                          activations.NewGELUActivation())
    p = run_probed(model, [(torch.randn(8, 4), torch.randint(0, 2, (8,)))], F.cross_entropy)
    assert p.record.layers["1"].activation == "gelu"
    assert p.record.layers["3"].activation == "gelu"  # computed from tanh, still a GELU


def test_unchecked_layers_reach_the_doctor_json_and_html(tmp_path):
    import json

    import signalprop

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), Swish(), nn.Linear(8, 2))
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    rep = signalprop.doctor(model, (x, y), F.cross_entropy, steps=3, progress=False)
    paths = rep.save(tmp_path)
    d = json.loads(paths["json"].read_text()) if "json" in paths else rep.to_dict()
    assert "custom activation" in d["meta"]["unchecked"]["1"]
    html = rep.to_html(tmp_path / "r.html").read_text()
    assert "Not checked: 1 (a custom activation" in html
