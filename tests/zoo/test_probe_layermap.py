"""Zoo: the layer map follows the signal (call sites, execution order, parameters used outside
module calls) and survives outputs of varying shape. Truth is computed by hand in each test."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from signalprop.diagnosis import diagnose
from signalprop.diagnosis.context import context_of
from signalprop.probe import Probe
from signalprop.record import MODEL

from .zoo_helpers import PosTransformer, finding, kinds, run_probed


class ReusedAct(nn.Module):
    """One ``self.act`` after layers of widths 16, 32, 24; biases -50 kill every unit."""

    def __init__(self, dead: bool = True) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(8, 16), nn.Linear(16, 32), nn.Linear(32, 24)
        self.head = nn.Linear(24, 3)
        self.act = nn.ReLU()
        if dead:
            with torch.no_grad():
                for lin in (self.l1, self.l2, self.l3):
                    lin.bias.fill_(-50.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.l3(self.act(self.l2(self.act(self.l1(x)))))))


def _dead_truth(model: ReusedAct, x: torch.Tensor) -> list[float]:
    with torch.no_grad():
        h1 = F.relu(model.l1(x))
        h2 = F.relu(model.l2(h1))
        h3 = F.relu(model.l3(h2))
    return [1.0 - (h > 0).any(0).double().mean().item() for h in (h1, h2, h3)]


def test_reused_activation_gets_one_entry_per_call_site():
    model = ReusedAct()
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    truth = _dead_truth(model, x)
    assert truth == [1.0, 1.0, 1.0]
    p = run_probed(model, [(x, y)] * 3, F.cross_entropy, lr=0.1)
    r = p.record
    assert p.layer_map == ["l1", "act", "l2", "act#2", "l3", "act#3", "head"]
    for name, t in zip(["act", "act#2", "act#3"], truth, strict=True):
        assert r.get(2, name, "dead_frac") == pytest.approx(t, abs=1e-12)
        assert r.layers[name].module == "act"
    assert r.layers["act#2"].shape == [32] and r.layers["act#3"].site == 2
    f = diagnose(r)
    dead = finding(f, "dead_units")
    assert dead.layers == ["act", "act#2", "act#3"]
    assert dead.numbers["mean_fraction"] == 1.0 and "3 of 3" in dead.evidence
    assert "saturation" not in kinds(f) and "exploding_gradients" not in kinds(f)


def test_reused_activation_healthy_has_no_dead_finding():
    torch.manual_seed(3)
    model = ReusedAct(dead=False)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    truth = _dead_truth(model, x)
    p = run_probed(model, [(x, y)] * 2, F.cross_entropy, lr=0.01)
    got = [p.record.get(1, n, "dead_frac") for n in ("act", "act#2", "act#3")]
    assert got == pytest.approx(_dead_truth(model, x), abs=1e-12)
    assert max(truth) < 0.4
    assert "dead_units" not in kinds(diagnose(p.record))


class PaddedEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.mix = nn.Linear(8, 8)
        self.act = nn.Tanh()
        self.head = nn.Linear(8, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.mix(self.embed(tokens))).mean(1))


def test_accumulation_with_dynamic_padding_one_step_per_optimizer_step():
    torch.manual_seed(0)
    model = PaddedEncoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lengths = [5, 9, 3, 7]  # two optimiser steps of two micro-batches, each padded differently
    batches = [(torch.randint(0, 10, (4, n)), torch.randint(0, 2, (4,))) for n in lengths]
    # truth: ||dL/dh|| of the mix layer over the window = norm over both micro-batches
    ref = PaddedEncoder()
    ref.load_state_dict(model.state_dict())
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1)
    truth_norm, truth_loss, truth_total = [], [], []
    for w in range(2):
        ropt.zero_grad()
        sq, losses = 0.0, []
        for x, y in batches[2 * w : 2 * w + 2]:
            h = ref.mix(ref.embed(x))
            h.retain_grad()
            loss = F.cross_entropy(ref.head(ref.act(h).mean(1)), y) / 2
            loss.backward()
            sq += h.grad.norm().item() ** 2
            losses.append(loss.item())
        truth_norm.append(math.sqrt(sq))
        truth_loss.append(sum(losses) / 2)
        truth_total.append(math.sqrt(sum(q.grad.norm().item() ** 2 for q in ref.parameters())))
        ropt.step()
    with Probe(model, optimizer=opt) as p:
        for w in range(2):
            opt.zero_grad()
            for x, y in batches[2 * w : 2 * w + 2]:
                loss = F.cross_entropy(model(x), y) / 2
                loss.backward()
                p.log(loss=loss)
            opt.step()
    r = p.record
    assert r.steps == [0, 1]
    assert p.layer_map == ["embed", "mix", "act", "head"]  # no "#2": micro-batches, not sites
    for s in (0, 1):
        assert r.get(s, "mix", "out_grad_norm") == pytest.approx(truth_norm[s], rel=1e-5)
        assert r.get(s, MODEL, "loss") == pytest.approx(truth_loss[s], rel=1e-5)
        assert r.get(s, MODEL, "grad_norm_total") == pytest.approx(truth_total[s], rel=1e-5)
    # forward statistics come from the first micro-batch (its shape differs from the second)
    assert math.isfinite(r.get(0, "act", "saturated_frac"))


def _embed_head_grad_truth(model: PosTransformer, x: torch.Tensor, y: torch.Tensor) -> float:
    e = model.embed(x)
    e.retain_grad()
    z = model.encoder(e + model.pos).mean(1)
    out = model.head(z)
    out.retain_grad()
    F.cross_entropy(out, y).backward()
    model.zero_grad()
    return e.grad.norm().item() / out.grad.norm().item()


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_reference_layers_are_input_and_head(norm_first):
    torch.manual_seed(0)
    model = PosTransformer(norm_first=norm_first)
    x, y = torch.randint(0, 12, (8, 10)), torch.randint(0, 2, (8,))
    truth = _embed_head_grad_truth(model, x, y)
    p = run_probed(model, [(x, y)] * 2, F.cross_entropy, lr=0.0)
    r = p.record
    ctx = context_of(r)
    # the path starts at the embedding and ends at the head; out_proj acts inside attention
    assert ctx.weight_layers[0] == "embed" and ctx.weight_layers[-1] == "head"
    op = r.layers["encoder.layers.0.self_attn.out_proj.weight"]
    assert op.module == "encoder.layers.0.self_attn" and "never called" in op.placement
    assert op.depth < r.layers["encoder.layers.0.linear1"].depth
    assert r.layers["pos"].depth < r.layers["encoder.layers.0.self_attn"].depth or \
        not r.layers["pos"].on_path
    got = r.get(1, "embed", "out_grad_norm") / r.get(1, "head", "out_grad_norm")
    assert got == pytest.approx(truth, rel=1e-4, abs=0)
    f = diagnose(r)
    assert ("vanishing_gradients" in kinds(f)) == (truth < 1e-2)
    assert ("exploding_gradients" in kinds(f)) == (truth > 1e2)


def test_two_optimisers_both_get_update_ratios():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    opt_a = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt_b = torch.optim.Adam(model[2].parameters(), lr=1e-2)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    with Probe(model, optimizer=[opt_a, opt_b]) as p:
        for _ in range(3):
            opt_a.zero_grad()
            opt_b.zero_grad()
            before = [q.detach().clone() for q in model.parameters()]
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            p.log(loss=loss)
            opt_a.step()
            opt_b.step()
    r = p.record
    assert r.steps == [0, 1, 2]
    for (n, q), b in zip(model.named_parameters(), before, strict=True):
        truth = ((q.detach() - b).norm() / b.norm()).item()
        assert truth > 1e-4
        assert r.get(2, n, "update_ratio") == pytest.approx(truth, rel=1e-4)
    assert "update_ratio" not in kinds(diagnose(r))


def test_gradient_norms_before_and_after_clipping():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 6) * 5, torch.randint(0, 3, (16,))
    clip = 1e-3
    pre, post = [], []
    with Probe(model, optimizer=opt) as p:
        for _ in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            pre.append(math.sqrt(sum(q.grad.norm().item() ** 2 for q in model.parameters())))
            grads = {n: q.grad.norm().item() for n, q in model.named_parameters()}
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            post.append(math.sqrt(sum(q.grad.norm().item() ** 2 for q in model.parameters())))
            opt.step()
    r = p.record
    assert all(v > 10 * clip for v in pre)
    for s in r.steps:
        assert r.get(s, MODEL, "grad_norm_total") == pytest.approx(pre[s], rel=1e-5)
        assert r.get(s, MODEL, "grad_norm_total_clipped") == pytest.approx(post[s], rel=1e-4)
        assert r.get(s, MODEL, "grad_norm_total_clipped") == pytest.approx(clip, rel=1e-4)
    for n, v in grads.items():
        assert r.get(2, n, "grad_norm") == pytest.approx(v, rel=1e-5)


def test_no_clipping_records_no_clipped_norm():
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    p = run_probed(model, [(x, y)] * 2, F.cross_entropy, lr=0.01)
    assert not p.record.has("grad_norm_total_clipped")


def test_frozen_layers_are_not_reported_as_stalled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    for q in model[0].parameters():
        q.requires_grad_(False)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.05)
    p = run_probed(model, [(x, y)] * 4, F.cross_entropy, optimizer=opt)
    r = p.record
    assert "0.weight" not in r.layers  # frozen: not a parameter of the run
    assert r.get(3, "0", "out_std") > 0  # its output is still measured
    f = diagnose(r)
    assert "update_ratio" not in kinds(f) and "vanishing_gradients" not in kinds(f)


def test_ddp_style_wrapper_is_unwrapped():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    wrapped = nn.DataParallel(model)  # same .module contract as DistributedDataParallel
    p = Probe(wrapped)
    assert p.model is model
    assert [n for n, _ in p.params] == ["0.weight", "0.bias", "2.weight", "2.bias"]


@pytest.mark.parametrize("how", ["wrapper", "in_place"])
def test_compiled_model_works_like_the_eager_one(how):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # truth: layer '1' is 100% dead
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    if how == "wrapper":
        compiled = torch.compile(model, backend="eager")
    else:
        model.compile(backend="eager")
        compiled = model
    compiled(x).sum().backward()  # compiled and run before the probe attaches
    opt = torch.optim.SGD(compiled.parameters(), lr=0.0)
    with Probe(compiled, optimizer=opt, schedule=[0, 2]) as p:
        for _ in range(4):
            opt.zero_grad()
            loss = F.cross_entropy(compiled(x), y)
            loss.backward()
            p.log(loss=loss)
            opt.step()
    r = p.record
    assert r.steps == [0, 2] and p.layer_map == ["0", "1", "2", "3", "4"]
    with torch.no_grad():  # truth, eagerly (lr 0: the weights do not move)
        h1 = model[1](model[0](x))
        h3 = model[3](model[2](h1))
    truth = [1.0 - (h > 0).any(0).double().mean().item() for h in (h1, h3)]
    assert [r.get(2, "1", "dead_frac"), r.get(2, "3", "dead_frac")] == truth
    assert truth[0] == 1.0
    assert finding(diagnose(r), "dead_units").layers == [
        n for n, t in zip(["1", "3"], truth, strict=True) if t >= 0.4]
    # the compiled path is restored for the unrecorded steps
    if how == "wrapper":
        assert "forward" in vars(compiled) and compiled.forward is not model.__call__
    else:
        assert model._compiled_call_impl is not None


def test_scheduler_rate_is_recorded_per_step():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    truth = []
    with Probe(model, optimizer=opt) as p:
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            truth.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
    assert [p.record.get(s, MODEL, "lr") for s in p.record.steps] == pytest.approx(truth)
    assert truth[0] == 0.1 and truth[-1] == 0.025
