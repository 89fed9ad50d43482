"""The probe's cost contract, structurally (speed itself is in benchmarks/probe_overhead.py):

- no host read of a tensor on the training path except in the recorded step's one transfer
  (counted through a TorchFunctionMode that sees every ``.item()``, ``.tolist()``, ``.cpu()``,
  ``bool()``, ...), none at all on unrecorded steps;
- update ratios from the optimiser's own state agree with a copy of the weights (the oracle),
  and no copy of the weights is held for SGD / Adam / AdamW;
- update ratios that travel with the next transfer are never lost.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from signalprop import stats
from signalprop.probe import Probe, core, every, hooks, transfer

READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
}


PACKAGE = os.path.dirname(os.path.dirname(core.__file__))  # .../signalprop
PROBE = os.path.dirname(core.__file__)  # .../signalprop/probe (the flush lives in its modules)

SCALER = os.path.join("torch", "amp", "grad_scaler.py")

#: the probe's functions that move a step's values to the host (the "flush")
FLUSH = {"_to_dict", "_flush_ratios", "_fix_nonfinite_counts", "flush", "_materialise",
         "_start_transfer", "_fix_deferred"}


class CountReads(TorchFunctionMode):
    """Counts host reads of tensor values, split by whether a flush is on the call stack."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flush = 0
        self.transfers = 0  # .cpu() / .to("cpu") inside a flush
        self.outside: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        is_read = func in READS or (
            func in (torch.Tensor.to,) and any(str(a) == "cpu" for a in (*args[1:], *kwargs.values()))
        )
        if is_read:
            f = sys._getframe(1)
            flushing = by_probe = False
            while f is not None:
                if f.f_code.co_filename.endswith(SCALER) and f.f_code.co_name == "update":
                    # the scaler's own update(), run by the probe's wrapper around it: its
                    # reads are not the probe's (get_scale() called by the probe would be)
                    return func(*args, **kwargs)
                if f.f_code.co_filename.startswith(PACKAGE):
                    break
                f = f.f_back
            f = sys._getframe(1)
            while f is not None:
                if f.f_code.co_filename.startswith(PACKAGE):
                    by_probe = True  # (the optimiser's own reads are not the probe's)
                if f.f_code.co_name in FLUSH and f.f_code.co_filename.startswith(PROBE):
                    flushing = True
                    break
                f = f.f_back
            if not by_probe and not flushing:
                pass
            elif flushing:
                self.in_flush += 1
                self.transfers += func in (torch.Tensor.cpu, torch.Tensor.to)
            else:
                self.outside.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


def _mlp(depth: int = 4, width: int = 16) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = 8
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 3))


def _same_records(a, b, steps, rel=1e-12):
    """Records ``a`` and ``b`` hold the same steps and every value of ``a`` in ``b``."""
    assert a.steps == b.steps == steps
    for s in a.steps:
        for layer, metrics in a.data[s].items():
            for k, v in metrics.items():
                assert b.data[s][layer][k] == pytest.approx(v, rel=rel, nan_ok=True), (s, layer, k)


def _train(model, opt, probe, steps, x, y):
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        probe.log(loss=loss)
        opt.step()


@pytest.mark.parametrize("device_path", [False, True], ids=["cpu-path", "accelerator-path"])
@pytest.mark.parametrize("opt_name", ["sgd-momentum", "adamw"])
@pytest.mark.parametrize("flush_every", [1, 4])
def test_no_host_read_on_the_training_path_except_one_transfer(
    monkeypatch, device_path, opt_name, flush_every
):
    if device_path:
        # the code path an accelerator takes (no BLAS norm on the host in the gradient hook)
        monkeypatch.setattr(stats, "HOST_NORMS", {})
    # copies every flush_every recorded steps (the queue's memory budget never cuts in)
    monkeypatch.setattr(transfer, "QUEUE_FRACTION", float("inf"))
    torch.manual_seed(0)
    model = _mlp()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if opt_name != "adamw"
           else torch.optim.AdamW(model.parameters(), lr=1e-3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    p = Probe(model, optimizer=opt, schedule=every(2), flush_every=flush_every).attach()
    _train(model, opt, p, 2, x, y)  # first recorded step declares the layers
    mode = CountReads()
    with mode:
        _train(model, opt, p, 12, x, y)  # 6 recorded steps
    assert mode.outside == [], f"host reads outside a flush: {mode.outside}"
    if flush_every == 1:
        # at most one transfer to the host per recorded step; CPU tensors none at all (the
        # host reads them where they are, inside the step's flush)
        assert mode.transfers == 0 and mode.in_flush >= 6
    else:
        assert mode.in_flush <= 6 // flush_every  # one read per landed copy
    p.detach()
    assert p.record.steps == list(range(0, 14, 2))
    assert all(p.record.get(s, "0.weight", "update_ratio") > 0 for s in p.record.steps)


def test_loss_scale_is_never_read_on_the_host(monkeypatch):
    # GradScaler.get_scale() reads the scale (a device synchronisation on CUDA): the probe
    # keeps it as a tensor that travels with the step's transfer, and divides norms by it there
    monkeypatch.setattr(stats, "HOST_NORMS", {})  # the accelerators' path
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    p = Probe(model, optimizer=opt, scaler=scaler, schedule=every(2)).attach()

    def train(steps):
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    train(2)
    mode = CountReads()
    with mode:
        train(6)
    assert mode.outside == [], f"host reads outside a flush: {mode.outside}"
    p.detach()
    rec = p.record
    assert rec.get(6, "__model__", "loss_scale") == 1024.0
    # the norms are those of the unscaled loss: the first layer's output gradient equals an
    # unscaled autograd pass on the same weights (after the last step: compare the scale only)
    ref = nn.functional.cross_entropy(model(x), y)
    g = torch.autograd.grad(ref, list(model.parameters()))[0].norm().item()
    assert 0.01 * g < rec.get(6, "0.weight", "grad_norm") < 100 * g


def test_read_counter_sees_the_probes_reads(monkeypatch):
    mode = CountReads()
    monkeypatch.setattr(core.Probe, "_input_stats", lambda self, v, n: torch.ones(2).tolist())
    model = _mlp()
    with mode, Probe(model) as p:
        t = torch.ones(2)
        t.sum().item()  # not the probe's
        model(torch.randn(4, 8)).sum().backward()
        p.step()
    assert mode.outside == ["tolist"]


def test_unrecorded_steps_run_without_hooks_or_reads():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    p = Probe(model, optimizer=opt, schedule=[0]).attach()
    _train(model, opt, p, 1, x, y)
    assert not p._fwd_handles
    mode = CountReads()
    with mode:
        _train(model, opt, p, 3, x, y)
    assert mode.outside == [] and mode.in_flush == 0
    p.detach()


def _oracle_ratios(make_opt, steps=3, dtype=torch.float64, **probe_kw):
    torch.manual_seed(0)
    model = _mlp().to(dtype)
    ref = _mlp().to(dtype)
    ref.load_state_dict(model.state_dict())
    opt, ref_opt = make_opt(model.parameters()), make_opt(ref.parameters())
    x = torch.randn(32, 8, dtype=dtype)
    y = torch.randint(0, 3, (32,))
    p = Probe(model, optimizer=opt, **probe_kw).attach()
    expect: list[dict[str, float]] = []
    for _ in range(steps):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
        before = {n: q.detach().clone() for n, q in ref.named_parameters()}
        opt.step()
        ref_opt.step()
        expect.append(
            {
                n: ((q.detach() - before[n]).norm() / before[n].norm()).item()
                for n, q in ref.named_parameters()
            }
        )
    p.detach()
    return p, expect


OPTIMISERS = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.3), "sgd"),
    "sgd-wd": (lambda ps: torch.optim.SGD(ps, lr=0.3, weight_decay=0.1), "sgd"),
    "sgd-momentum": (
        lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9, dampening=0.1, weight_decay=0.01),
        "sgd-momentum",
    ),
    "nesterov": (lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9, nesterov=True), "copy"),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.01), "adam"),
    "adam-amsgrad": (lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True), "adam"),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1), "adam"),
    "adamw-maximize": (lambda ps: torch.optim.AdamW(ps, lr=0.01, maximize=True), "adam"),
    "rmsprop": (lambda ps: torch.optim.RMSprop(ps, lr=0.01), "copy"),
}


@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_update_ratios_from_optimiser_state_match_weight_copy(name):
    make, method = OPTIMISERS[name]
    p, expect = _oracle_ratios(make)
    assert p._updates is not None and p._updates.method == method
    for step, ex in enumerate(expect):
        for n, v in ex.items():
            got = p.record.get(step, n, "update_ratio")
            assert got == pytest.approx(v, rel=1e-7, abs=1e-300), (name, step, n)
    if method != "copy":
        assert p._updates._copy is None and p._buffers is None  # never held a weight copy


@pytest.mark.parametrize("name", ["sgd-momentum", "adamw"])
def test_update_ratio_option_copy_matches_the_closed_form_oracle(name):
    # update_ratio="copy" forces the weight copy where a closed form exists: both agree with
    # the oracle to float rounding (float64 here, so rel 1e-7 is far above either's error)
    make, _ = OPTIMISERS[name]
    p, expect = _oracle_ratios(make, update_ratio="copy")
    assert p._updates.method == "copy"
    for step, ex in enumerate(expect):
        for n, v in ex.items():
            assert p.record.get(step, n, "update_ratio") == pytest.approx(v, rel=1e-7), (step, n)


def test_update_ratio_option_false_and_bad_values():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    p = Probe(model, optimizer=opt, update_ratio=False).attach()
    _train(model, opt, p, 2, x, y)
    p.detach()
    assert p._updates is None and p._buffers is None  # nothing measured, nothing copied
    assert not p.record.has("update_ratio") and p.record.has("weight_norm")
    with pytest.raises(ValueError, match="update_ratio must be one of 'auto', 'optimizer'"):
        Probe(model, optimizer=opt, update_ratio="closed")
    rms = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="no closed-form update for RMSprop"):
        Probe(model, optimizer=rms, update_ratio="optimizer").attach()


def test_update_ratio_copy_is_released_between_recorded_steps():
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    p = Probe(model, optimizer=opt, schedule=every(3)).attach()
    _train(model, opt, p, 1, x, y)
    assert p._updates._copy is None  # step 1 is not recorded: the copy is gone
    _train(model, opt, p, 5, x, y)
    p.detach()
    assert p.record.steps == [0, 3] and p.record.has("update_ratio")


def test_update_ratios_travel_with_the_next_transfer_and_listeners_see_complete_steps():
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    seen: list[tuple[int, bool]] = []
    p = Probe(
        model, optimizer=opt, on_record=lambda s, v: seen.append((s, "update_ratio" in v["0.weight"])),
    ).attach()
    _train(model, opt, p, 4, x, y)
    assert seen == [(s, True) for s in range(4)]  # listeners: ratios read with their step
    p.detach()
    q = Probe(model, optimizer=opt).attach()
    _train(model, opt, q, 4, x, y)
    assert "update_ratio" not in q._record.data[3]["0.weight"]  # still on the device
    assert "update_ratio" in q._record.data[2]["0.weight"]  # came with step 3's transfer
    assert all("update_ratio" in q.record.data[s]["0.weight"] for s in range(4))  # read: all
    q.detach()


def test_forward_sample_is_fixed_small_and_spread_over_units():
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh())
    p = Probe(model, max_forward_samples=100)
    out = torch.arange(128 * 64, dtype=torch.float32).reshape(128, 64)
    s = p._sample(out)
    assert s.numel() == 100  # exactly the sample size: every site's samples stack together
    assert len(set(s.long().tolist())) == 100  # distinct positions (they wrap around)
    units = set((s.long() % 64).tolist())
    assert len(units) >= 50  # the stride is coprime with the row length: most units visited
    assert len(set((s.long() // 64).tolist())) >= 50  # and spread over the examples
    assert torch.equal(s, p._sample(out.clone()))  # fixed positions
    small = torch.arange(30, dtype=torch.float32).reshape(5, 6)
    assert torch.equal(p._sample(small), small.reshape(-1))  # smaller outputs: all of it


def test_mapping_step_keeps_no_forward_tensor_alive():
    # the first recorded step maps residual blocks through the torch-function mode; it must not
    # hold the forward's tensors (a residual stream kept alive through backward raised the
    # GPT-2 benchmark's peak memory by 8% of its state)
    import weakref

    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.f = nn.LayerNorm(8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(x + self.f(x))

    model = nn.Sequential(nn.Linear(8, 8), Res(), Res())
    with Probe(model) as p:
        out = model(torch.randn(4, 8))
        ref = weakref.ref(out)
        loss = out.sum()  # (sum's backward keeps no input)
        del out
        assert ref() is None
        loss.backward()
        p.step()
    assert p.record.meta.get("norm_placement") == "post"  # the map itself still drawn


def test_sampled_forward_statistics_match_exact_ones_within_sampling_error():
    # the forward sample (256 values per output) against the whole output, same forward pass:
    # the stated standard errors (stats.MAX_FORWARD_SAMPLES) with a 4-sigma margin
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 96), nn.Sigmoid())
    x = torch.randn(256, 32)
    recs = []
    for kw in ({}, {"max_forward_samples": None, "max_percentile_samples": None}):
        with Probe(model, **kw) as p:
            model(x).sum().backward()
            p.step()
        model.zero_grad()
        recs.append(p.record.data[0])
    sampled, exact = recs
    for layer, ex in exact.items():
        if "out_std" not in ex:
            continue
        got, sd = sampled[layer], ex["out_std"]
        assert abs(got["out_mean"] - ex["out_mean"]) <= 4 * sd / 16, layer
        assert abs(got["out_std"] - sd) <= 4 * 0.044 * sd, layer
        for q in ("out_p05", "out_p15", "out_p50", "out_p85", "out_p95"):
            assert abs(got[q] - ex[q]) <= 4 * 0.13 * sd, (layer, q)
        if "saturated_frac" in ex:
            f = ex["saturated_frac"]
            assert abs(got["saturated_frac"] - f) <= 4 * (f * (1 - f) / 256) ** 0.5 + 1e-9, layer
        assert got.keys() == ex.keys()


def test_nonfinite_output_gradients_counted_from_the_first_sighting_on(monkeypatch):
    # the accelerators' path: a healthy run takes no NaN/Inf count in the gradient hooks; the
    # first non-finite dL/dh is marked "not counted" (NaN) and counting starts from then on
    monkeypatch.setattr(stats, "HOST_NORMS", {})
    monkeypatch.setattr(hooks, "_COUNT_NONFINITE", [False])
    model = _mlp()
    x = torch.randn(8, 8)
    x[0, 0] = float("nan")
    with Probe(model) as p:
        for _ in range(2):
            out = model(x)
            out.sum().backward()
            p.step(out.sum())
    r = p.record
    assert torch.isnan(torch.tensor(r.get(0, "0", "out_grad_nonfinite")))
    assert r.get(1, "0", "out_grad_nonfinite") > 0
    assert r.get(0, "0.weight", "grad_nonfinite") > 0  # parameters: counted at the transfer


def test_deferred_values_reach_the_record_in_order_and_match_immediate_ones(monkeypatch):
    monkeypatch.setattr(transfer, "QUEUE_FRACTION", float("inf"))  # flush_every alone
    recs = []
    for flush_every in (1, 3):
        torch.manual_seed(0)
        model = _mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        p = Probe(model, optimizer=opt, flush_every=flush_every).attach()
        _train(model, opt, p, 7, x, y)
        if flush_every == 3:
            assert p._queue or p._inflight  # some values are still waiting
        recs.append(p.record)  # reading the record brings them
        p.detach()
    _same_records(*recs, steps=list(range(7)))



def test_values_waiting_on_the_device_stay_within_their_memory_budget():
    # a small model's deferred values would be a large share of its memory: they travel
    # once they reach QUEUE_FRACTION of the parameters' bytes, before flush_every steps
    recs = []
    for flush_every in (1, 16):
        torch.manual_seed(0)
        model = _mlp(width=256)  # budget: ~8 KB, a few steps' values
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        p = Probe(model, optimizer=opt, flush_every=flush_every).attach()
        budget = transfer.QUEUE_FRACTION * sum(q.numel() * 4 for q in model.parameters())
        copies = 0
        for _ in range(12):
            _train(model, opt, p, 1, x, y)
            queued = sum(-(-e[3].numel() * 8 // 512) * 512 for e in p._queue)
            assert queued == p._queued_bytes and queued < budget
            copies += not p._queue
        if flush_every == 16:
            assert 12 // 16 < copies < 12  # copied early, though not on every step
        recs.append(p.record)
        p.detach()
    _same_records(*recs, steps=list(range(12)))


@pytest.mark.parametrize("flush_every", [1, 3])
def test_host_kernels_record_what_the_torch_kernels_record(monkeypatch, flush_every):
    # CPU samples take the NumPy host kernels; the torch kernels are the reference: same
    # metrics, same values (float32 samples: sums rounded differently, rel 1e-5)
    from signalprop.probe.forward import ForwardStats

    recs = []
    for host in (True, False):
        monkeypatch.setattr(ForwardStats, "_host_kernels", host)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(),
                              nn.Linear(32, 24), nn.Sigmoid(), nn.Linear(24, 16), nn.GELU(),
                              nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(64, 8) * 3, torch.randint(0, 3, (64,))
        p = Probe(model, optimizer=opt, flush_every=flush_every).attach()
        _train(model, opt, p, 4, x, y)
        recs.append(p.record)
        p.detach()
    a, b = recs
    assert a.steps == b.steps == [0, 1, 2, 3]
    for s in a.steps:
        assert a.data[s].keys() == b.data[s].keys()
        for layer, metrics in b.data[s].items():
            assert a.data[s][layer].keys() == metrics.keys(), layer
            for k, v in metrics.items():
                assert a.data[s][layer][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (s, layer, k)
    assert "off_frac" in a.data[0]["3"] and "dead_frac" in a.data[0]["3"]
    assert "saturated_frac" in a.data[0]["1"] and "saturated_frac" in a.data[0]["5"]


@pytest.mark.skipif(not stats.HOST_NORMS, reason="needs scipy's BLAS")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_gradient_norm_matches_a_float64_norm_from_vanishing_to_exploding(dtype):
    # the CPU hooks' norm: sqrt(a . a) where no square can have under- or overflowed, else
    # the scaled nrm2 (vanishing gradients of 1e-25 square below float32's range; 1e25 above)
    torch.manual_seed(0)
    # (float32: one dot's error grows with length, 8e-7 at 2^20 values: summed in pieces)
    rel = 2e-7 if dtype == torch.float32 else 1e-12
    scales = (1.0, 1e-3, 1e-17, 1e-19, 1e-25, 1e-32, 1e18, 1e25) if dtype == torch.float32 \
        else (1.0, 1e-150, 1e-160, 1e-300, 1e150, 1e160)
    for n in (1, 7, 16384, stats.DOT_PIECE, stats.DOT_PIECE + 1, 1 << 20):
        for scale in scales:
            g = torch.randn(n, dtype=torch.float64) * scale
            g32 = g.to(dtype)
            m = float(g32.double().abs().max())  # (a scaled float64 reference: no underflow)
            want = float(torch.linalg.vector_norm(g32.double() / m)) * m
            got, count = hooks._host_norm(stats.HOST_NORMS[dtype], g32)
            assert got == pytest.approx(want, rel=rel, abs=0.0), (n, scale)
            assert count == 0.0
    for bad in (float("nan"), float("inf")):
        g = torch.randn(1000, dtype=dtype)
        g[17] = bad
        got, count = hooks._host_norm(stats.HOST_NORMS[dtype], g)
        assert not math.isfinite(got) and count == 1.0


@pytest.mark.parametrize("shape", [(7,), (64, 50), (3, 1000, 5)])
def test_norm64_matches_a_float64_norm_without_underflow(shape):
    # the accelerators' gradient norm: float64 accumulation in pieces (no float64 copy of g);
    # values of 1e-25 square to 1e-50, below float32's range: a float32 norm would give 0
    torch.manual_seed(0)
    for scale in (1.0, 1e-25, 1e30):
        g = torch.randn(shape) * scale
        for t in (g, g.transpose(0, -1)):  # also non-contiguous
            want = torch.linalg.vector_norm(t.double())
            got = stats.norm64(t)
            assert got.dtype == torch.float64 and got.dim() == 0
            assert float(got) == pytest.approx(float(want), rel=1e-12)
    g = torch.randn(5000)
    g[123] = float("nan")
    assert torch.isnan(stats.norm64(g))


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_accelerator_path_frees_forward_samples_before_the_peak_and_records_the_same(
        monkeypatch, micro_batches):
    # deferred steps with one forward pass compute their forward statistics as backward
    # begins (samples freed before the step's memory peaks) and pack the gradient norms of
    # 16 sites into one tensor: the records equal those of immediate steps
    monkeypatch.setattr(stats, "HOST_NORMS", {})  # the accelerators' norms
    recs, early = [], []
    for flush_every in (1, 4):
        torch.manual_seed(0)
        model = _mlp(depth=10)  # 21 sites: packed norms and loose ones
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
        p = Probe(model, optimizer=opt, flush_every=flush_every)
        p._host_kernels = False  # the torch kernels, as on an accelerator
        p.attach()
        for _ in range(5):
            opt.zero_grad(set_to_none=True)
            for xb, yb in zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True):
                nn.functional.cross_entropy(model(xb), yb).backward()
            early.append(p._early is not None)
            if p._early is not None:
                assert all(not p._sites[j].outs for j in p._used)  # freed in backward
            opt.step()
        recs.append(p.record)
        p.detach()
    _same_records(*recs, steps=list(range(5)))
    # immediate steps never; deferred ones after the mapping step, with one forward pass only
    assert early == [False] * 5 + [False] + [micro_batches == 1] * 4


def test_accelerator_path_extra_memory_is_under_5_percent_of_the_state(monkeypatch):
    # the memory target of issue 12 on the 20 x 128 MLP, measured as benchmarks/probe_overhead.py
    # does with --deferred --round 512 (the accelerator path on the CPU, allocations in the
    # CUDA allocator's 512-byte blocks: this reproduced the H100's 19.7% before the fix)
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "probe_overhead.py")
    spec = importlib.util.spec_from_file_location("probe_overhead", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("probe_overhead", bench)  # (its dataclass looks itself up there)
    spec.loader.exec_module(bench)
    # a healthy run: NaN/Inf counts not yet switched on by an earlier test's diverging run
    monkeypatch.setattr(hooks, "_COUNT_NONFINITE", [False])
    task = bench.make_task("mlp", "cpu", "fp32")
    opt = task.make_opt(task.model)
    bench.train(task, opt, 3, None)  # warm
    mem = {"deferred": True, "round_to": 512}
    plain = bench.peak_bytes(task, opt, 3, None, **mem)
    extra = bench.peak_bytes(task, opt, 3, 1, **mem) - plain
    state = bench.state_bytes(task.model, opt)
    assert 0 < extra <= 0.05 * state, (extra, state)
