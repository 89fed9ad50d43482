"""Zoo: residual and normalised architectures. Residual blocks and pre/post-LN placement are
recognised from the forward itself; ||dL/dx|| at each block input (the residual stream) is
checked against autograd, and the first/last ratio along the path against the findings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from signalprop.diagnosis import diagnose
from signalprop.diagnosis.context import context_of
from signalprop.probe import Probe

from . import zoo_helpers
from .zoo_helpers import finding, kinds

LAYERS = 12


def _pos_transformer(norm_first: bool) -> zoo_helpers.PosTransformer:
    return zoo_helpers.PosTransformer(LAYERS, d=32, heads=4, ff=64, norm_first=norm_first)


def _truth(model: zoo_helpers.PosTransformer, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Autograd on a hook-free copy: ||dL/dx|| at each block input, dL/dh at embed and head."""
    ref = _pos_transformer(model.encoder.layers[0].norm_first)
    ref.load_state_dict(model.state_dict())
    e = ref.embed(x)
    e.retain_grad()
    h = e + ref.pos
    ins = []
    for layer in ref.encoder.layers:
        h.retain_grad()
        ins.append(h)
        h = layer(h)
    out = ref.head(h.mean(1))
    out.retain_grad()
    F.cross_entropy(out, y).backward()
    d = {f"encoder.layers.{i}": t.grad.double().norm().item() for i, t in enumerate(ins)}
    d["embed"], d["head"] = e.grad.double().norm().item(), out.grad.double().norm().item()
    return d


def _train(norm_first: bool, steps: int = 30) -> tuple[Probe, dict[str, float]]:
    torch.manual_seed(0)
    model = _pos_transformer(norm_first)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randint(0, 12, (32, 10))
    y = (x[:, 0] > 5).long()
    last = steps - 1
    with Probe(model, optimizer=opt, schedule=[0, last - 1, last]) as p:
        for s in range(steps):
            if s == last:
                truth = _truth(model, x, y)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            p.log(loss=loss)
            opt.step()
    return p, truth


@pytest.fixture(scope="module")
def post_ln() -> tuple[Probe, dict[str, float]]:
    return _train(norm_first=False)


@pytest.fixture(scope="module")
def pre_ln() -> tuple[Probe, dict[str, float]]:
    return _train(norm_first=True)


@pytest.mark.parametrize("which", ["post", "pre"])
def test_residual_stream_matches_autograd(which, post_ln, pre_ln):
    p, truth = post_ln if which == "post" else pre_ln
    r = p.record
    s = r.steps[-1]
    blocks = [n for n, i in r.layers.items() if i.role == "block"]
    assert blocks == [f"encoder.layers.{i}" for i in range(LAYERS)]
    assert all(r.layers[b].residual and r.layers[b].norm_placement == which for b in blocks)
    assert r.meta["residual"] is True and r.meta["norm_placement"] == which
    for b in blocks:
        assert r.get(s, b, "in_grad_norm") == pytest.approx(truth[b], rel=1e-3, abs=0)
        assert all(st in r.series(b, "in_grad_norm")[0] for st in r.steps)  # mapping step too
    ctx = context_of(r)
    assert ctx.residual is True and ctx.norm_placement == which
    assert ctx.residual_blocks == blocks
    assert ctx.weight_layers[0] == "embed" and ctx.weight_layers[-1] == "head"
    # blocks sit on the path in forward order, the positional parameter where it is used
    depths = [r.layers[b].depth for b in blocks]
    assert depths == sorted(depths) and r.layers["pos"].depth < depths[0]


def test_post_ln_vanishes_along_the_path(post_ln):
    p, truth = post_ln
    ratio = truth["embed"] / truth["head"]
    block_ratio = truth["encoder.layers.0"] / truth[f"encoder.layers.{LAYERS - 1}"]
    assert ratio < 1e-6 and block_ratio < 1e-4  # the truth for this collapsed post-LN run
    f = diagnose(p.record)
    v = finding(f, "vanishing_gradients")
    assert v.layers[0] == "embed"
    assert v.numbers["ratio"] == pytest.approx(
        _median_ratio_truth(p, "embed", "head"), rel=1e-6, abs=0)
    assert v.numbers["ratio"] < 1e-6
    r = p.record
    first, last = "encoder.layers.0", f"encoder.layers.{LAYERS - 1}"
    assert v.numbers["block_ratio"] == pytest.approx(10 ** float(np.median(
        [np.log10(r.get(s, first, "in_grad_norm") / r.get(s, last, "in_grad_norm"))
         for s in r.steps])), rel=1e-6, abs=0)
    assert v.numbers["block_ratio"] < 1e-4 and "residual stream" in v.evidence
    # architecture-aware: nothing that is already there or cannot apply
    assert not set(v.remedies) & {"residual", "batchnorm", "fewer_layers", "highway"}
    assert "pre_ln" in v.remedies
    assert "exploding_gradients" not in kinds(f)


def _median_ratio_truth(p: Probe, a: str, b: str) -> float:
    r = p.record
    return float(10 ** np.median([np.log10(r.get(s, a, "out_grad_norm") /
                                           r.get(s, b, "out_grad_norm")) for s in r.steps]))


def test_pre_ln_has_no_depth_finding(pre_ln):
    p, truth = pre_ln
    ratio = truth["embed"] / truth["head"]
    assert 1e-2 < ratio < 1e2
    f = diagnose(p.record)
    assert not kinds(f) & {"vanishing_gradients", "exploding_gradients", "nonfinite"}


class BasicBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x  # torchvision style: in place on bn2's output
        return self.relu(out)


class SmallResNet(nn.Module):
    def __init__(self, blocks: int = 3, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(*[BasicBlock(c) for _ in range(blocks)])
        self.head = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_small_resnet_blocks_and_inplace_add():
    torch.manual_seed(0)
    model = SmallResNet()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    ref = SmallResNet()
    ref.load_state_dict(model.state_dict())
    h = ref.stem(x)
    bn2_truth = []
    for blk in ref.blocks:
        out = blk.relu(blk.bn1(blk.conv1(h)))
        o2 = blk.bn2(blk.conv2(out))
        bn2_truth.append(o2.detach().clone())
        h = F.relu(o2 + h)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    # exact forward statistics (whole outputs kept, with the in-place guard), to compare
    with Probe(model, optimizer=opt, max_forward_samples=None) as p:
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    r = p.record
    assert [n for n, i in r.layers.items() if i.role == "block"] == [
        "blocks.0", "blocks.1", "blocks.2"]
    assert r.layers["blocks.0"].norm_placement is None  # BN inside the branch, not at the sum
    for k in range(3):  # bn2's output was recorded before `out += x` changed it
        for s in (0, 1):
            assert r.get(s, f"blocks.{k}.bn2", "out_mean") == pytest.approx(
                bn2_truth[k].mean().item(), abs=1e-5)
    assert "unchecked" not in r.meta
    assert context_of(r).residual is True
    f = diagnose(r)
    assert "residual" not in [p for x in f for p in x.remedies]


def test_plain_conv_bn_relu_stack_is_not_residual():
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(10):
        layers += [nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 6 * 6, 3))
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with Probe(model, optimizer=opt) as p:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    r = p.record
    assert not [n for n, i in r.layers.items() if i.role == "block"]
    assert r.meta.get("residual") is not True
    assert len(context_of(r).weight_layers) == 11
