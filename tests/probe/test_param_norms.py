"""The CPU's parameter and gradient norms on the host (stats.host_norms and HostNorms, used by
the probe's weight, pre-clip, clipped and SGD gradient norms) against a float64 oracle, and the records
of a probed model against the torch path (``update.HOST_NUMPY = False``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from signalprop import stats
from signalprop.probe import Probe, update
from signalprop.record import MODEL

pytestmark = pytest.mark.skipif(not stats.HOST_NORMS, reason="needs scipy's BLAS")

REL = 1e-6  # (measured: ~1e-7)


def _oracle(t: torch.Tensor) -> float:
    """||t|| in float64, scaled so that no square under- or overflows even in float64."""
    d = t.detach().double()
    m = float(d.abs().max()) if d.numel() else 0.0
    if m == 0.0 or not math.isfinite(m):
        return float(torch.linalg.vector_norm(d))
    return float(torch.linalg.vector_norm(d / m)) * m


def _params(dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    # small and large ones (one over two DOT_PIECEs), an empty one, and a 0-dim one
    torch.manual_seed(0)
    shapes = [(64,), (17,), (3, 5), (192,), (2000,), (40, 70), (stats.DOT_PIECE + 3,), (0,),
              (), (1,), (2, 3, 4, 5)]
    return [nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]


def _set_grads(ps: list[nn.Parameter], scale: float) -> None:
    for p in ps:
        p.grad = torch.randn_like(p) * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_host_norms_match_a_float64_norm_from_vanishing_to_exploding(dtype):
    ps = _params(dtype)
    plan = stats.HostNorms.of(ps, None)
    assert plan.ok
    # (float32 subnormals, below 1e-38, carry few bits: nrm2 ~2e-6; the probe redoes norms
    # below 1e-18 in float64 anyway)
    scales = (1.0, 1e-30, 1e-37, 1e30) if dtype == torch.float32 else (1.0, 1e-170, 1e170)
    for scale in scales:
        with torch.no_grad():
            for p in ps:
                p.copy_(torch.randn_like(p) * scale)
        _set_grads(ps, scale)
        for got, want in ((plan.weights(), [_oracle(p) for p in ps]),
                          (stats.host_norms([p.grad for p in ps]), [_oracle(p.grad) for p in ps])):
            assert len(got) == len(ps)
            for i, (g, w) in enumerate(zip(got, want, strict=True)):
                assert type(g) is float
                assert g == pytest.approx(w, rel=REL, abs=0.0), (scale, i, ps[i].shape)
        assert min(plan.weights()[:7]) > 0.0  # (1e-30 and 1e-40 scales: nothing underflowed)


def test_host_norms_are_nan_or_inf_where_the_tensor_holds_them():
    ps = _params()
    _set_grads(ps, 1.0)
    for i in (0, 1, 4, 6):
        for bad in (math.nan, math.inf, -math.inf):
            g = ps[i].grad
            keep = g.reshape(-1)[3].item()
            g.reshape(-1)[3] = bad
            got = stats.host_norms([p.grad for p in ps])
            want = float(torch.linalg.vector_norm(g.double()))  # (nan, or inf for +-inf)
            assert (math.isnan(got[i]) and math.isnan(want)) or got[i] == want == math.inf, (i, bad)
            assert all(math.isfinite(v) for j, v in enumerate(got) if j != i)
            g.reshape(-1)[3] = keep


def test_host_norms_of_mixed_dtypes():
    ps = _params()[:5] + _params(torch.float64)[3:]
    _set_grads(ps, 1e-30)
    got = stats.host_norms([p.grad for p in ps])
    assert got == pytest.approx([_oracle(p.grad) for p in ps], rel=REL, abs=0.0)
    assert stats.HostNorms.of(ps, None).weights() == pytest.approx([_oracle(p) for p in ps],
                                                                   rel=REL, abs=0.0)


def test_host_norms_refuse_what_they_do_not_take():
    ps = _params()
    _set_grads(ps, 1.0)
    grads = [p.grad for p in ps]
    assert stats.host_norms(grads) is not None
    for i, odd in ((5, grads[5].t().contiguous().t()),  # non-contiguous
                   (0, grads[0].to_sparse()),  # sparse
                   (4, grads[4].clone().requires_grad_()),  # create_graph=True's gradients
                   (2, grads[2].half()),  # no BLAS norm
                   (3, ps[3])):  # a parameter (requires grad; a subclass)
        assert stats.host_norms([odd if j == i else g for j, g in enumerate(grads)]) is None
    assert stats.host_norms([]) is None
    for other in ([nn.Parameter(torch.randn(5, 6).t())],  # non-contiguous
                  [nn.Parameter(torch.randn(8, dtype=torch.float16))],  # no BLAS norm
                  [nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(3)._neg_view())], []):
        assert not stats.HostNorms.of(other, None).ok


def test_host_norms_follow_parameters_whose_memory_or_shape_changes():
    model = nn.Sequential(nn.Linear(6, 40), nn.LayerNorm(40), nn.Linear(40, 3))
    ps = list(model.parameters())
    plan = stats.HostNorms.of(ps, None)
    assert stats.HostNorms.of(ps, plan) is plan
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # (copied into the same memory: the views see it)
    assert stats.HostNorms.of(ps, plan) is plan
    assert plan.weights() == pytest.approx([_oracle(p) for p in ps], rel=REL)
    with torch.no_grad():
        ps[0].data = ps[0].data.clone() * 3  # new memory
        ps[1].data = torch.randn(7)  # new memory and shape
    new = stats.HostNorms.of(ps, plan)
    assert new is not plan
    assert new.weights() == pytest.approx([_oracle(p) for p in ps], rel=REL)
    with torch.no_grad():
        ps[3].data = ps[3].data[:20]  # the same memory, a new shape
    assert stats.HostNorms.of(ps, new) is not new


def _run(host: bool, model_fn, opt_fn, steps: int = 3, clip: float | None = None,
         nan_at: int | None = None, **kw) -> tuple[Probe, dict]:
    update.HOST_NUMPY = host
    try:
        torch.manual_seed(0)
        model = model_fn()
        opt = opt_fn(model)
        x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        p = Probe(model, optimizer=opt, **kw).attach()
        for s in range(steps):
            opt.zero_grad()
            xs = x.clone()
            if nan_at == s:  # NaN gradients from backward on
                xs[0, 0] = math.nan
            nn.functional.cross_entropy(model(xs), y).backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            p.log(loss=0.0)
            opt.step()
        rec = p.record
        used = p.__dict__.get("_hnorms")
        p.detach()
        return used, rec.data
    finally:
        update.HOST_NUMPY = True


class _Tiny(nn.Module):
    """A model with a layer whose gradients vanish (~1e-31: their float32 squares underflow)
    and a parameter that never gets a gradient (the subset path)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 32)
        self.ln = nn.LayerNorm(32)
        self.b = nn.Linear(32, 3)
        self.c = nn.Linear(8, 3)
        self.unused = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.ln(self.a(x)))) + 1e-30 * self.c(x)


MODELS = {
    "mlp-sgd": (lambda: nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 24), nn.ReLU(),
                                      nn.Linear(24, 3)),
                lambda m: torch.optim.SGD(m.parameters(), lr=0.1), {}),
    "ln-adamw-clip": (lambda: nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.GELU(),
                                            nn.Linear(32, 3)),
                      lambda m: torch.optim.AdamW(m.parameters(), lr=0.01), {"clip": 0.05}),
    "vanishing-unused-sgd-wd": (_Tiny, lambda m: torch.optim.SGD(m.parameters(), lr=0.1,
                                                                 weight_decay=0.01), {}),
    "weights-only-lean": (lambda: nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3)),
                          lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                          {"forward": False, "backward": False}),
    "nan-gradient": (lambda: nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3)),
                     lambda m: torch.optim.SGD(m.parameters(), lr=0.1), {"nan_at": 1}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_records_on_the_host_path_match_the_torch_path(name):
    model_fn, opt_fn, kw = MODELS[name]
    used, a = _run(True, model_fn, opt_fn, **kw)
    unused, b = _run(False, model_fn, opt_fn, **kw)
    assert used is not None and used.ok and unused is None  # (each path was taken)
    assert a.keys() == b.keys() and len(a) == 3
    for s in b:
        assert a[s].keys() == b[s].keys()
        for layer, metrics in b[s].items():
            assert a[s][layer].keys() == metrics.keys(), (s, layer)
            for k, v in metrics.items():
                got = a[s][layer][k]
                if math.isnan(v):
                    assert math.isnan(got), (s, layer, k)
                else:
                    assert got == pytest.approx(v, rel=REL, abs=1e-300), (s, layer, k)
    if name == "vanishing-unused-sgd-wd":
        assert 0.0 < a[0]["c.weight"]["grad_norm"] < 1e-25  # (measured, not underflowed)
    if name == "ln-adamw-clip":
        assert "grad_norm_total_clipped" in a[0][MODEL]
    if name == "nan-gradient":
        assert math.isnan(a[1]["0.weight"]["grad_norm"])
        assert a[1]["0.weight"]["grad_nonfinite"] == 8 * 32 and a[1]["0.bias"]["grad_nonfinite"] == 32


def test_the_probe_follows_replaced_parameters_and_drops_its_views_off_the_host_path(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    p = Probe(model, optimizer=opt).attach()

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    first = p._hnorms
    with torch.no_grad():
        model[0].weight.data = model[0].weight.data * 2  # new memory between steps
    w = model[0].weight.detach().clone()  # (norms are taken before the optimiser's update)
    step()
    assert p._hnorms is not first and p._hnorms.ok
    assert p.record.get(1, "0.weight", "weight_norm") == pytest.approx(_oracle(w), rel=REL)
    monkeypatch.setattr(update, "HOST_NUMPY", False)  # (as for parameters moved to a GPU)
    step()
    assert "_hnorms" not in p.__dict__
    p.detach()
