"""The batched engine against single models trained the ordinary way (autograd + torch.optim)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from signalprop.data import Dataset, load_dataset
from signalprop.engine import (
    ACTIVATIONS,
    Arch,
    Population,
    fit_reference,
    get_activation,
    make_optimizer,
    member_batches,
)
from signalprop.record import MODEL


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def _run_pair(ds, arch_kw, *, K=3, steps=8, batch=32, dtype=torch.float64, optimizer="sgd",
              hp=None, clip="none", init_kw=None):
    """Train a population and each member alone; return (FitResult, [(losses, module)])."""
    arch = Arch(ds.in_features, ds.out_features, **arch_kw)
    pop = Population(arch, K, optimizer=optimizer, hparams=hp or {}, clip=clip, dtype=dtype)
    seeds = list(range(K))
    pop.init_(seeds, data_x=ds.x_train, **(init_kw or {}))
    refs = [pop.member_module(k) for k in range(K)]
    res = pop.fit(ds, steps, batch, seeds, record_every=3, evaluate=False)
    alone = []
    for k in range(K):
        hk = {n: float(v[k]) for n, v in pop.hparams.items()}
        bl = member_batches(seeds[k], ds.x_train.shape[0], batch, steps)
        y = ds.y_train.to(dtype) if arch.task == "regression" else ds.y_train
        losses = fit_reference(refs[k], ds.x_train.to(dtype), y, bl, optimizer, hk, clip,
                               float(pop.clip_threshold[k]), task=arch.task)
        alone.append((losses, refs[k]))
    return pop, res, alone


def _max_param_diff(pop: Population, k: int, module: torch.nn.Module) -> float:
    mine = pop.member_module(k).state_dict()
    theirs = module.state_dict()
    return max(
        (mine[n].double() - theirs[n].double()).abs().max().item()
        for n in theirs if theirs[n].is_floating_point()
    )


EQUIV_F64 = [
    ("plain-sgd-momentum", {"depth": 3, "width": 16}, "sgd",
     {"lr": [0.05, 0.1, 0.2], "momentum": [0.0, 0.9, 0.5]}, "none"),
    ("bn-pre-adam", {"depth": 3, "width": 16, "norm": "batch"}, "adam",
     {"lr": [1e-3, 3e-3, 1e-2], "beta1": [0.9, 0.8, 0.9]}, "none"),
    ("ln-post-residual-rmsprop", {"depth": 3, "width": 16, "norm": "layer",
                                  "norm_position": "post", "residual": True, "activation": "gelu"},
     "rmsprop", {"lr": [1e-3, 3e-3, 1e-2], "momentum": [0.0, 0.9, 0.0]}, "none"),
    ("rbf-relu-rprop", {"depth": 2, "width": 16, "rbf": 12, "activation": "relu"}, "rprop",
     {"lr": [1e-3, 3e-3, 1e-2]}, "none"),
    ("bn-noaffine-clipnorm", {"depth": 3, "width": 16, "norm": "batch", "norm_affine": False,
                              "activation": "elu"}, "sgd", {"lr": 0.1}, "norm"),
    ("sigmoid-clipvalue-wd", {"depth": 3, "width": 16, "activation": "sigmoid"}, "sgd",
     {"lr": 0.5, "momentum": 0.9, "weight_decay": [0.0, 1e-3, 1e-2]}, "value"),
]


@pytest.mark.parametrize("name,arch_kw,opt,hp,clip", EQUIV_F64, ids=[c[0] for c in EQUIV_F64])
def test_members_equal_single_models_float64(digits, name, arch_kw, opt, hp, clip):
    pop, res, alone = _run_pair(digits, arch_kw, optimizer=opt, hp=hp, clip=clip,
                                init_kw={"bias_std": 0.1})
    for k, (losses, module) in enumerate(alone):
        assert len(losses) == res.losses.shape[0]
        np.testing.assert_allclose(res.losses[:, k], losses, rtol=1e-10, atol=1e-12)
        # 1e-8, not 1e-10: a linear bias right before batch norm has a gradient that is zero up
        # to rounding, and Adam divides it by its own RMS, so rounding noise moves it by ~lr*1e-9
        assert _max_param_diff(pop, k, module) < 1e-8


@pytest.mark.parametrize(
    "arch_kw,opt,hp",
    [
        ({"depth": 4, "width": 32}, "sgd", {"lr": [0.05, 0.1, 0.2]}),
        ({"depth": 4, "width": 32}, "adam", {"lr": [1e-3, 2e-3, 5e-3]}),
        # batch norm: rounding is amplified by training (performance-notes.md), so few steps
        # and a small learning rate
        ({"depth": 4, "width": 32, "norm": "batch"}, "sgd", {"lr": [0.01, 0.02, 0.05]}),
    ],
    ids=["sgd", "adam", "bn-sgd"],
)
def test_members_equal_single_models_float32(digits, arch_kw, opt, hp):
    pop, res, alone = _run_pair(digits, arch_kw, optimizer=opt, hp=hp, steps=10,
                                dtype=torch.float32)
    for k, (losses, module) in enumerate(alone):
        np.testing.assert_allclose(res.losses[:, k], losses, rtol=1e-5, atol=1e-6)
        assert _max_param_diff(pop, k, module) < 1e-5


def test_probe_values_match_autograd(digits):
    """Step-0 gradient norms and output-gradient norms equal those of autograd on the module."""
    ds = digits
    arch = Arch(ds.in_features, ds.out_features, depth=3, width=16, norm="batch",
                activation="relu")
    pop = Population(arch, 2, hparams={"lr": 0.1}, dtype=torch.float64)
    pop.init_([3, 4])
    mods = [pop.member_module(k) for k in range(2)]
    res = pop.fit(ds, 2, 32, [3, 4], record_every=1, evaluate=False)
    for k in range(2):
        m = mods[k]
        idx = member_batches([3, 4][k], ds.x_train.shape[0], 32, 1)[0]
        acts: dict[str, torch.Tensor] = {}

        def keep(name: str, acts: dict = acts):
            def hook(mod, inp, out):
                out.retain_grad()
                acts[name] = out
            return hook

        for name, mod in m.named_modules():
            if name.endswith(("act", "linear", "norm")):
                mod.register_forward_hook(keep(name))
        logits = m(ds.x_train[idx].double())
        loss = torch.nn.functional.cross_entropy(logits, ds.y_train[idx])
        loss.backward()
        rec = res.records[k]
        assert rec.get(0, MODEL, "loss") == pytest.approx(loss.item(), rel=1e-12)
        for n, p in m.named_parameters():
            assert rec.get(0, n, "grad_norm") == pytest.approx(float(p.grad.norm()), rel=1e-9)
            assert rec.get(0, n, "weight_norm") == pytest.approx(p.norm().item(), rel=1e-12)
        for n, t in acts.items():
            assert rec.get(0, n, "out_grad_norm") == pytest.approx(float(t.grad.norm()), rel=1e-9)
            assert rec.get(0, n, "out_mean") == pytest.approx(t.mean().item(), abs=1e-12)
        dead = (acts["layers.1.act"] <= 0).all(dim=0).double().mean()
        assert rec.get(0, "layers.1.act", "dead_frac") == pytest.approx(float(dead))
        total = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in m.parameters()))
        assert rec.get(0, MODEL, "grad_norm_total") == pytest.approx(total, rel=1e-9)
        # every recorded layer is a module or parameter name of the reference
        names = {n for n, _ in m.named_modules()} | {n for n, _ in m.named_parameters()}
        assert set(rec.layer_names()) <= names


@pytest.mark.parametrize("name", ACTIVATIONS.names())
def test_activation_backward_matches_autograd(name):
    act = get_activation(name)
    z = (torch.randn(3, 5, 7, dtype=torch.float64) * 2).requires_grad_(True)
    h = act.module()(z)
    dh = torch.randn_like(h)
    (expected,) = torch.autograd.grad(h, z, dh)
    with torch.no_grad():
        hh = act.forward(z)
        got = act.backward(dh, z, hh)
    torch.testing.assert_close(hh, h.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _smorms3_reference(x0, grads, lr, eps):
    """SMORMS3 exactly as written in references.md, one scalar at a time (NumPy)."""
    x = np.array(x0, dtype=np.float64)
    mem, g, g2 = np.ones_like(x), np.zeros_like(x), np.zeros_like(x)
    for grad in grads:
        for i in range(x.size):
            r = 1.0 / (mem[i] + 1.0)
            g[i] = (1 - r) * g[i] + r * grad[i]
            g2[i] = (1 - r) * g2[i] + r * grad[i] ** 2
            xx = g[i] ** 2 / (g2[i] + eps)
            x[i] -= grad[i] * min(lr, xx) / (np.sqrt(g2[i]) + eps)
            mem[i] = 1 + mem[i] * (1 - xx)
    return x


def test_smorms3_matches_its_equations():
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=12)
    grads = [rng.normal(size=12) for _ in range(15)]
    p = torch.tensor(x0)
    lr = torch.tensor([1e-3] * 6 + [5e-2] * 6, dtype=torch.float64)  # per-element rates
    opt = make_optimizer("smorms3", p, {"lr": lr, "eps": 1e-16, "weight_decay": 0.0})
    for g in grads:
        opt.step(p, torch.tensor(g))
    ref = np.concatenate([
        _smorms3_reference(x0[:6], [g[:6] for g in grads], 1e-3, 1e-16),
        _smorms3_reference(x0[6:], [g[6:] for g in grads], 5e-2, 1e-16),
    ])
    np.testing.assert_allclose(p.numpy(), ref, rtol=1e-12, atol=1e-14)


def test_diverging_member_does_not_disturb_the_others(digits):
    ds = digits
    arch = Arch(ds.in_features, ds.out_features, depth=3, width=16, activation="relu")
    lrs = [0.05, 100.0, 0.1]  # the middle member blows up (float32 overflows within steps)
    pop = Population(arch, 3, hparams={"lr": lrs})
    pop.init_([0, 1, 2])
    res = pop.fit(ds, 30, 32, [0, 1, 2], record_every=5)
    d = res.diverged_step[1]
    assert d is not None and 0 < d < 30
    assert res.diverged_step[0] is None and res.diverged_step[2] is None
    # the loss bound of the one policy stops it before its loss overflows
    assert res.diverged_reason == [None, "loss_bound", None]
    assert res.losses[d, 1] > 100 * max(res.losses[0, 1], 1) and np.isnan(res.losses[d + 1 :, 1]).all()
    assert math.isnan(res.final[1]["final_loss"]) and res.final[1]["diverged_step"] == d
    assert res.final[1]["diverged_reason"] == "loss_bound"
    assert max(res.records[1].steps) <= d  # nothing recorded after the divergence
    # the same run as the package's one result type (signalprop.train.FitResult)
    from signalprop import stats
    from signalprop.train import FitResult

    m1, m0 = res.member(1), res.member(0, model=pop.member_module(0))
    assert isinstance(m1, FitResult) and m1.diverged and m1.diverged_step == d
    assert m1.diverged_reason == "loss_bound" and m1.steps == d + 1 and math.isnan(m1.final_loss)
    assert not m0.diverged and m0.steps == 30 and isinstance(m0.model, torch.nn.Module)
    assert m0.final_loss == pytest.approx(res.final[0]["final_loss"], rel=1e-9)
    # one definition of the gradient ratio: the engine's numbers are stats.grad_ratio's
    assert m0.grad_ratio == pytest.approx(res.final[0]["grad_ratio_final"], rel=1e-12)
    assert stats.grad_ratio(res.records[0], "first") == pytest.approx(
        res.final[0]["grad_ratio_init"], rel=1e-12)
    # frozen: never updated again, so its parameters stay those that gave the rejected loss
    assert torch.isfinite(pop.flat).all()
    # the others: exactly what they do in populations of their own
    for k in (0, 2):
        alone = Population(arch, 1, hparams={"lr": lrs[k]})
        alone.init_([k])
        r1 = alone.fit(ds, 30, 32, [k], record_every=5)
        np.testing.assert_allclose(res.losses[:, k], r1.losses[:, 0], rtol=1e-6, atol=0)
        assert res.final[k]["test_accuracy"] == pytest.approx(r1.final[0]["test_accuracy"])


def test_init_schemes_and_member_independence(digits):
    ds = digits
    arch = Arch(ds.in_features, ds.out_features, depth=4, width=256)
    pop = Population(arch, 4, dtype=torch.float64)
    pop.init_([0, 1, 2, 3], init=["lecun", "xavier", "kaiming", "orthogonal"],
              init_scale=[1.0, 1.0, 2.0, 1.5])
    w = pop.params["layers.1.linear.weight"]  # 256 x 256
    assert float(w[0].std()) == pytest.approx(1 / 16, rel=0.03)
    assert float(w[1].std()) == pytest.approx(math.sqrt(2 / 512), rel=0.03)
    assert float(w[2].std()) == pytest.approx(2 * math.sqrt(2 / 256), rel=0.03)
    torch.testing.assert_close(w[3].T @ w[3], 1.5**2 * torch.eye(256, dtype=torch.float64))
    # a member's init depends on its seed only, not on its population
    solo = Population(arch, 1, dtype=torch.float64).init_([2], init="kaiming", init_scale=2.0)
    for name, v in solo.params.items():
        assert torch.equal(v[0], pop.params[name][2]), name


def test_lsuv_gives_unit_variance(digits):
    ds = digits
    arch = Arch(ds.in_features, ds.out_features, depth=6, width=64, activation="tanh")
    pop = Population(arch, 2, dtype=torch.float64)
    pop.init_([0, 1], init=["lsuv", "lecun"], data_x=ds.x_train)
    x = ds.x_train[:512].double()
    cache = pop._forward(x.expand(2, *x.shape), train=True, keep=True)
    for i in range(6):
        v = cache["z"][f"layers.{i}.linear"].reshape(2, -1).var(dim=1)
        assert abs(float(v[0]) - 1.0) < 0.1
    with pytest.raises(ValueError, match="lsuv"):
        Population(arch, 1).init_([0], init="lsuv")


def test_agc_bounds_unit_ratios(digits):
    ds = digits
    arch = Arch(ds.in_features, ds.out_features, depth=2, width=16)
    pop = Population(arch, 2, hparams={"lr": 0.0}, clip="agc", clip_threshold=[0.01, 0.05],
                     dtype=torch.float64)
    pop.init_([0, 1])
    x, y = ds.x_train[:32].double(), ds.y_train[:32]
    pop.train_step(x.expand(2, *x.shape).contiguous(), y.expand(2, 32).contiguous())
    for name in ("layers.0.linear.weight", "layers.1.linear.weight"):
        g, w = pop.grads[name], pop.params[name]
        ratio = g.norm(dim=1) / w.norm(dim=1).clamp_min(1e-3)
        assert float(ratio[0].max()) <= 0.01 * (1 + 1e-9)
        assert float(ratio[1].max()) <= 0.05 * (1 + 1e-9)


def test_bad_options_name_valid_choices():
    arch = Arch(4, 2, depth=1, width=4)
    with pytest.raises(ValueError, match="valid choices"):
        Population(arch, 2, optimizer="adamw")
    with pytest.raises(ValueError, match="momentum"):
        Population(arch, 2, optimizer="adam", hparams={"momentum": 0.9})
    with pytest.raises(ValueError, match="valid choices"):
        Arch(4, 2, activation="sigmiod")
    with pytest.raises(ValueError, match="expected one value or 2"):
        Population(arch, 2, hparams={"lr": [0.1, 0.2, 0.3]})


def test_regression_task_matches_reference():
    ds = load_dataset("teacher", n=400, out_features=2)
    pop, res, alone = _run_pair(ds, {"depth": 2, "width": 8, "task": "regression"},
                                hp={"lr": [0.01, 0.05, 0.1]})
    for k, (losses, module) in enumerate(alone):
        np.testing.assert_allclose(res.losses[:, k], losses, rtol=1e-10)
        assert _max_param_diff(pop, k, module) < 1e-10


def test_flops_counts_the_matmuls():
    a = Arch(64, 10, depth=2, width=32)
    # layer 0: fwd + weight grad; layer 1, head: fwd + weight grad + input grad
    assert a.flops_per_step(8) == 2 * 8 * (64 * 32 * 2 + 32 * 32 * 3 + 32 * 10 * 3)


def test_agc_on_rbf_centres_is_per_centre(digits):
    ds = digits
    arch = Arch(ds.in_features, ds.out_features, depth=1, width=8, rbf=6)
    pop = Population(arch, 1, hparams={"lr": 0.0}, clip="agc", clip_threshold=0.01,
                     dtype=torch.float64)
    pop.init_([0])
    x, y = ds.x_train[:32].double(), ds.y_train[:32]
    pop.train_step(x.unsqueeze(0), y.unsqueeze(0))
    g, c = pop.grads["rbf.centres"][0], pop.params["rbf.centres"][0]  # [units, in]
    assert float((g.norm(dim=1) / c.norm(dim=1)).max()) <= 0.01 * (1 + 1e-9)


def test_record_schedule(digits):
    ds = digits
    pop = Population(Arch(ds.in_features, ds.out_features, depth=1, width=8), 2)
    pop.init_([0, 1])
    res = pop.fit(ds, 20, 16, [0, 1], record_every=7, evaluate=False)
    assert res.records[0].steps == [0, 7, 14, 19]
    res = pop.fit(ds, 20, 16, [0, 1], record_steps=[1, 2, 4, 8, 16], evaluate=False)
    assert res.records[1].steps == [0, 1, 2, 4, 8, 16, 19]
    assert math.isnan(res.final[0]["test_accuracy"])  # evaluate=False
