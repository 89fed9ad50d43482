"""UpdateNorms' closed forms against the oracle: the actual change of the weights."""

import math

import pytest
import torch
from torch import nn

from signalprop.probe import update
from signalprop.probe.update import UpdateNorms

# (optimiser factory, method UpdateNorms must pick)
ADAMS = {
    "adamw-wd": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
    "adamw-wd-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1, amsgrad=True),
    "adamw-tiny-wd": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=1e-9),
    "adam-l2": lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.01, amsgrad=True),
    # two groups, one without decay, in one chunk: the mixed-chunk path
    "adamw-groups": lambda ps: torch.optim.AdamW(
        [{"params": ps[::2], "weight_decay": 0.2}, {"params": ps[1::2], "weight_decay": 0.0}],
        lr=0.05),
}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}  # (measured: 1e-15, 6e-7)


@pytest.fixture(params=["numpy", "torch"])
def path(request, monkeypatch):
    """The CPU's NumPy path and the torch path (the accelerators'), both checked here."""
    monkeypatch.setattr(update, "HOST_NUMPY", request.param == "numpy")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(ADAMS))
def test_adam_closed_form_matches_the_weights_actual_change(name, dtype, path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)
    params = list(model.parameters())
    opt = ADAMS[name](params)
    upd = UpdateNorms(opt, params)
    assert upd.method == "adam"
    upd.limit = 20  # small chunks: tensors cut into pieces, chunks holding several tensors
    _check_steps(model, params, opt, upd, dtype, 5, name)
    assert all(g.host == (path == "numpy") for g in upd._plan[1])


def _check_steps(model, params, opt, upd, dtype, steps, label, x=None):
    x = torch.randn(16, 6, dtype=dtype) if x is None else x
    y = torch.randint(0, 3, (x.shape[0],))
    for step in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        upd.before(None)
        w0 = [p.detach().clone() for p in params]
        opt.step()
        upd.advance()
        got = upd.after()
        want = torch.stack([(p.detach() - w).double().norm() for p, w in zip(params, w0, strict=True)])
        assert got.dtype == torch.float64
        assert got.tolist() == pytest.approx(want.tolist(), rel=TOL[dtype], abs=1e-12), (label, step)


@pytest.mark.parametrize("limit", [20, 40])
def test_adam_small_tensors_gathered_flat_and_the_plan_follows_new_state(limit, path):
    # limit 20: the 72-element weight is cut, the others gathered in several flat chunks; 40:
    # one flat chunk with runs of equal sizes (3; 12, 12, 12) and a second one (36)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 3))
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0}],
        lr=0.05)
    upd = UpdateNorms(opt, params)
    upd.limit = limit
    _check_steps(model, params, opt, upd, torch.float32, 3, "fresh")
    opt.load_state_dict(opt.state_dict())  # new state tensors: the cached views are stale
    _check_steps(model, params, opt, upd, torch.float32, 2, "loaded")
    with torch.no_grad():
        params[0].data = params[0].data.clone()  # a parameter moved: its view is stale
    _check_steps(model, params, opt, upd, torch.float32, 2, "moved")


@pytest.mark.parametrize("path", ["numpy"], indirect=True)
def test_adam_channels_last_state_is_read_in_place(path):
    # a channels_last weight's Adam state is channels_last too: no flat view of it exists
    # (.reshape(-1) would copy, and a cached copy would go stale), so it takes the torch
    # path whole, and the other tensors of its group with it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3))
    model[0].to(memory_format=torch.channels_last)
    params = list(model.parameters())
    assert not params[0].is_contiguous()
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    upd = UpdateNorms(opt, params)
    upd.limit = 40
    _check_steps(model, params, opt, upd, torch.float32, 3, "channels_last",
                 x=torch.randn(8, 3, 6, 6))
    assert not opt.state[params[0]]["exp_avg"].is_contiguous()
    assert not upd._plan[1][0].host


@pytest.mark.filterwarnings("error")
def test_adam_empty_parameter_and_zero_state_without_eps(path):
    # a parameter without elements, and a zero gradient under eps=0: 0 / 0 in the optimiser's
    # own step makes the weights NaN, and the closed form says NaN too (without warnings)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    empty = nn.Parameter(torch.zeros(0, 3))
    params = [*model.parameters(), empty]
    for eps in (1e-8, 0.0):
        opt = torch.optim.AdamW(params, lr=0.1, eps=eps)
        upd = UpdateNorms(opt, params)
        for _ in range(2):
            opt.zero_grad()
            (model(torch.randn(5, 4)).sum() + empty.sum()).backward()
            params[1].grad.zero_()
            upd.before(None)
            w0 = [p.detach().clone() for p in params]
            opt.step()
            upd.advance()
            got = upd.after().tolist()
            want = [(p.detach() - w).double().norm().item() for p, w in zip(params, w0, strict=True)]
            assert got == pytest.approx(want, rel=1e-5, abs=1e-12, nan_ok=True), eps
        assert got[-1] == 0.0
        assert math.isnan(got[1]) == (eps == 0.0)
