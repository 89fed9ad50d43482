"""UpdateNorms' closed forms against the oracle: the actual change of the weights."""

import math

import pytest
import torch
from torch import nn

from signalprop import stats
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
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05),
    "adamw-no-wd": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.0),
    "adam-decoupled": lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.1,
                                                  decoupled_weight_decay=True),
    # three groups (AMSGrad in one), different rates and decays
    "adamw-3-groups": lambda ps: torch.optim.AdamW(
        [{"params": ps[:2], "weight_decay": 0.3}, {"params": ps[2:4], "amsgrad": True},
         {"params": ps[4:], "lr": 0.2, "weight_decay": 0.0}], lr=0.05),
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
    for k in range(3):  # loaded again and again: a freed state's id may come back
        opt.load_state_dict(opt.state_dict())
        _check_steps(model, params, opt, upd, torch.float32, 1, f"reloaded {k}")
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


# ---- the closed form against two oracles: float64 from the optimiser's state, and the copy ----
#: Relative tolerance against the float64 evaluation of the closed form (measured: NumPy float32
#: ~1e-7, torch float32 ~6e-6, float64 ~1e-15).
REL64 = {("numpy", torch.float32): 1e-6, ("torch", torch.float32): 2e-5,
         ("numpy", torch.float64): 1e-12, ("torch", torch.float64): 1e-12}


def _closed_form64(opt, params):
    """||dW|| of the step just taken, in float64 from the optimiser's state after it: the step
    ``s = m_hat / (sqrt(v_hat) + eps)`` with each parameter's own step count, W_before rebuilt
    from W_after (W_after = (1 - lr wd) W_before - lr s), dW = -lr (s + wd W_before)."""
    group = {id(p): g for g in opt.param_groups for p in g["params"]}
    out = []
    for p in params:
        st, g = opt.state.get(p, {}), group[id(p)]
        if p.grad is None or "exp_avg" not in st:
            out.append(0.0)
            continue
        (b1, b2), t, lr = g["betas"], float(st["step"]), g["lr"]
        wd = g["weight_decay"] if isinstance(opt, torch.optim.AdamW) or g.get(
            "decoupled_weight_decay") else 0.0
        v = st["max_exp_avg_sq" if g["amsgrad"] else "exp_avg_sq"].double()
        s = st["exp_avg"].double() / (1 - b1**t) / ((v / (1 - b2**t)).sqrt() + g["eps"])
        w_before = (p.detach().double() + lr * s) / (1 - lr * wd)
        out.append(float(torch.linalg.vector_norm(lr * (s + wd * w_before))))
    return out


def _adam_params(dtype, scale=1.0):
    # one tensor of 4608 elements (above SMALL_TENSOR: the CPU reads it in place, in pieces of
    # limit // 2 = 2048) and small ones (gathered by size: runs of 72, 48 and 16 elements)
    torch.manual_seed(0)
    shapes = [(72, 64), (72,), (16,), (3, 16), (16,), (3, 16)]
    return [nn.Parameter(scale * torch.randn(s, dtype=dtype)) for s in shapes]


def _step_and_check(opt, params, upd, grads, path, label):
    """One optimiser step with ``grads`` (None: no gradient); the closed form against the
    float64 oracle and against the weight copy (which carries the float rounding of the stored
    weights, ~eps ||W_after||)."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    upd.before(None)
    w0 = [p.detach().clone() for p in params]
    opt.step()
    upd.advance()
    got = upd.after().tolist()
    want = _closed_form64(opt, params)
    dtype = params[0].dtype
    rel, eps = REL64[(path, dtype)], torch.finfo(dtype).eps
    for i, p in enumerate(params):
        copy = float((p.detach().double() - w0[i].double()).norm())
        ctx = (label, i, got[i], want[i], copy)
        if math.isnan(want[i]):
            assert math.isnan(got[i]) and math.isnan(copy), ctx
            continue
        assert abs(got[i] - want[i]) <= rel * want[i], ctx
        assert abs(got[i] - copy) <= rel * copy + 2 * eps * float(p.detach().double().norm()), ctx
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(ADAMS))
def test_adam_closed_form_against_float64_and_the_copy(name, dtype, path):
    params = _adam_params(dtype)
    opt = ADAMS[name](params)
    upd = UpdateNorms(opt, params)
    assert upd.method == "adam" and upd.limit == update.MIN_CHUNK
    for step in range(4):
        grads = [torch.randn_like(p) for p in params]
        if step == 3:
            grads[2] = None  # a parameter without a gradient: not stepped, ||dW|| = 0
        got = _step_and_check(opt, params, upd, grads, path, (name, step))
    assert got[2] == 0.0
    assert all(g.host == (path == "numpy") for g in upd._plan[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", ["tiny", "huge-weights", "huge-grads", "nan-grad"])
@pytest.mark.parametrize("path", ["numpy"], indirect=True)
def test_adam_closed_form_at_extreme_values(case, dtype, path):
    # float32 squares of ~1e-22 (tiny) underflow and of ~1e20 (huge weights) overflow in the
    # BLAS dots: those pieces are taken again the careful way; huge gradients overflow v (the
    # step is the decay alone); a NaN gradient makes its tensor's update NaN, not the others'
    scale = {"tiny": 1e-30, "huge-weights": 1e20}.get(case, 1.0)
    gscale = {"tiny": 1e-30, "huge-grads": 1e30}.get(case, 1.0)
    params = _adam_params(dtype, scale)
    opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
    upd = UpdateNorms(opt, params)
    for step in range(3):
        grads = [gscale * torch.randn_like(p) for p in params]
        if case == "nan-grad" and step == 1:
            grads[0][3, 5] = float("nan")
            grads[4][0] = float("nan")
        got = _step_and_check(opt, params, upd, grads, path, (case, step))
    assert all(g > 0 for g in got) or case == "nan-grad"
    if case == "nan-grad":
        assert math.isnan(got[0]) and math.isnan(got[4]) and got[1] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_adam_closed_form_when_decay_and_step_cancel(dtype, path):
    # W_before chosen so that the decay undoes the Adam step: after one AdamW step from zero
    # state the step is s = g / (|g| + eps) ~ sign(g), and with W_before = (lr - 1/wd) s / (1 -
    # lr wd) + noise, dW = -lr (s + wd W_before) = -lr wd noise: ||dW|| ~ 1e-3 lr ||s||, where
    # ||d|| and wa ||W_after|| (the terms of the closed form) cancel to 1e-3 of each other
    lr, wd = 0.01, 0.1
    params = _adam_params(dtype)
    grads = [torch.randn_like(p) for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            s = g / (g.abs() + 1e-8)
            p.copy_((lr - 1 / wd) * s / (1 - lr * wd) + 1e-2 * torch.randn_like(p))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    upd = UpdateNorms(opt, params)
    if dtype == torch.float64:  # exact weights: both oracles agree to float64 rounding
        _step_and_check(opt, params, upd, grads, path, "cancel")
        return
    # float32: the stored weights' rounding (~eps ||W|| = 1e-6) swamps ||dW|| (~1e-4) in the
    # copy; against the float64 oracle the error is that of float32 terms of ~||s||, not 1e-6
    # of the cancelled result
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    upd.before(None)
    opt.step()
    upd.advance()
    got, want = upd.after().tolist(), _closed_form64(opt, params)
    terms = [lr * float(torch.linalg.vector_norm(g.double() / (g.double().abs() + 1e-8)))
             for g in grads]
    for i in range(len(params)):
        assert want[i] < 3e-3 * terms[i]  # (the case does cancel)
        err = 4 * torch.finfo(dtype).eps * terms[i] if path == "numpy" else 2e-5 * terms[i]
        assert abs(got[i] - want[i]) <= 1e-6 * want[i] + err, (i, got[i], want[i], terms[i])


@pytest.mark.parametrize("path", ["numpy"], indirect=True)
def test_adam_host_scratch_is_one_dot_piece_however_large_the_limit(path):
    # a limit as for a 100M-parameter model: the 90000-element weight is read in two pieces of
    # DOT_PIECE elements (norms combined in double), and the scratch arrays stay that size
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(300, 300)), nn.Parameter(torch.randn(300))]
    opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
    upd = UpdateNorms(opt, params)
    upd.limit = 10**7
    for step in range(2):
        _step_and_check(opt, params, upd, [torch.randn_like(p) for p in params], path, step)
    plan = upd._plan[1][0].flat
    assert plan.most == stats.DOT_PIECE and [len(p) for _, p in plan.big] == [2]
