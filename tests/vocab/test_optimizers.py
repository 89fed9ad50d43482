"""The optimiser vocabulary: one default per optimiser, and the engine kernel and the torch face
take the same steps (issue 11)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from signalprop.engine.optim import OPTIMIZERS as ENGINE
from signalprop.remedies import REMEDIES
from signalprop.remedies.optimizers import DEFAULT_LR
from signalprop.remedies.optimizers import OPTIMIZERS as REMEDIES_OPT
from signalprop.sweep.config import SCHEMA, validate_config
from signalprop.train import make_optimizer as train_make
from signalprop.vocab import OPTIMIZERS, optimizer

NAMES = OPTIMIZERS.names()
WITH_ENGINE = [n for n in NAMES if optimizer(n).engine is not None]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_builds_with_its_one_default_and_steps(name: str) -> None:
    d = optimizer(name)
    m = _mlp()
    opt = train_make(name, m, d.lr)
    assert all(g["lr"] > 0 for g in opt.param_groups)
    w0 = [p.detach().clone() for p in m.parameters()]
    loss = m(torch.randn(16, 4)).square().mean()
    loss.backward()

    def closure() -> torch.Tensor:  # vSGD's finite-difference curvature re-evaluates the loss
        opt.zero_grad()
        out = m(torch.randn(16, 4)).square().mean()
        out.backward()
        return out

    opt.step(closure)
    assert any(not torch.equal(a, b) for a, b in zip(w0, m.parameters(), strict=True))
    # the one default learning rate, everywhere it is read
    assert DEFAULT_LR[name] == d.lr == OPTIMIZERS.defaults(name)["lr"]
    assert "lr" not in REMEDIES_OPT.defaults(name)
    if name in ENGINE:
        assert ENGINE.defaults(name) == {k: d.defaults[k] for k in d.engine.keys}
        assert validate_config({"optimizer": name})["lr"] == d.lr
    if name in REMEDIES and "lr" in REMEDIES.defaults(name):
        assert REMEDIES.defaults(name)["lr"] == d.lr


@pytest.mark.parametrize("name", WITH_ENGINE)
def test_engine_kernel_takes_the_torch_faces_steps(name: str) -> None:
    """20 steps of the batched kernel and of the torch optimiser on the same gradients, from the
    registered defaults (momentum/weight decay switched on where the rule has them): float64,
    rtol 1e-10 (the same operations in a possibly different order)."""
    d = optimizer(name)
    hp = d.engine_defaults()
    hp.update({k: v for k, v in {"momentum": 0.9, "weight_decay": 1e-2}.items() if k in hp})
    for k in d.engine_only:  # torch's Rprop and SMORMS3 have no weight decay: compare without
        hp[k] = 0.0
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(50, generator=g, dtype=torch.float64)
    grads = [torch.randn(50, generator=g, dtype=torch.float64) for _ in range(20)]
    flat = p0.clone()
    kernel = d.engine(flat, hp)
    w = nn.Parameter(p0.clone())
    ref = d.torch([w], **d.torch_kwargs(hp))
    for gr in grads:
        kernel.step(flat, gr)
        w.grad = gr.clone()
        ref.step()
    torch.testing.assert_close(flat, w.detach(), rtol=1e-10, atol=1e-12)


def test_unknown_optimizer_names_the_value_and_the_choices() -> None:
    for table in (OPTIMIZERS, ENGINE, REMEDIES_OPT):
        with pytest.raises(ValueError, match=r"unknown optimizer 'adma'; did you mean 'adam'\? "
                                             r"valid choices: .*sgd"):
            table.get("adma")
    with pytest.raises(ValueError, match="has no batched-engine kernel"):
        optimizer("adamw").engine_defaults()
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'"):
        ENGINE.get("adamw")


def test_flat_names_map_to_torch_arguments() -> None:
    d = optimizer("adam")
    assert d.torch_kwargs({"lr": 0.1, "beta1": 0.8, "beta2": 0.9, "eps": 1e-6}) == {
        "lr": 0.1, "betas": (0.8, 0.9), "eps": 1e-6}
    assert optimizer("rprop").torch_defaults() == {"etas": (0.5, 1.2), "step_sizes": (1e-6, 50.0)}
    assert optimizer("momentum").torch_defaults() == {"momentum": 0.9}


def test_a_hyper_parameter_shared_by_optimizers_has_one_default() -> None:
    """The sweep's flat run config has one default per key: the batched optimisers that share a
    key (momentum, weight_decay ...) must agree on it, and the schema reads it from them."""
    seen: dict[str, set] = {}
    for n in ENGINE:
        for k, v in ENGINE.defaults(n).items():
            seen.setdefault(k, set()).add(v)
    varying = {k for k, vs in seen.items() if len(vs) > 1}
    assert varying == {"lr", "eps"}  # resolved per optimiser from the config's null
    for k, vs in seen.items():
        if k not in varying:
            assert SCHEMA[k].default == next(iter(vs))
