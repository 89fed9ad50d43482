"""The probe on CUDA: no host synchronisation on the training path except the one transfer of
each recorded step (checked by CUDA itself: ``torch.cuda.set_sync_debug_mode("error")`` with
the transfer alone exempted), records equal to the CPU's, bf16 autocast.

Skipped without CUDA. Runs as a script too (``python tests/probe/test_probe_cuda.py``) for machines
without pytest.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from signalprop.probe import Probe, core, every

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _mlp(depth: int = 6, width: int = 32, act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = 16
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 4))


def _train(model, opt, probe, steps, x, y, autocast=False):
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with ctx:
            out = model(x)
        loss = nn.functional.cross_entropy(out.float(), y)
        loss.backward()
        probe.log(loss=loss)
        opt.step()


#: the probe's functions that move a step's values to the host: the only ones allowed to sync
FLUSH = ("_to_dict", "_flush_ratios", "_fix_nonfinite_counts")


@contextlib.contextmanager
def _sync_is_error(counts: dict[str, int]):
    """Any host synchronisation raises, except inside the probe's transfer (counted)."""
    saved = {n: getattr(core.Probe, n) for n in FLUSH}

    def exempt(name, fn):
        def run(*a, **k):
            counts[name] = counts.get(name, 0) + 1
            torch.cuda.set_sync_debug_mode(0)
            try:
                return fn(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode("error")
        return run

    for n, fn in saved.items():
        setattr(core.Probe, n, exempt(n, fn))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)
        for n, fn in saved.items():
            setattr(core.Probe, n, fn)


@pytest.mark.parametrize(
    "opt_name,act,autocast,flush_every",
    [("sgd", nn.Tanh, False, 1), ("adamw", nn.ReLU, False, 1), ("adamw", nn.GELU, True, 3),
     ("rmsprop", nn.Sigmoid, False, 3), ("sgd", nn.Tanh, False, 3)],
)
def test_cuda_training_path_never_synchronises(opt_name, act, autocast, flush_every):
    torch.manual_seed(0)
    model = _mlp(act=act).cuda()
    make = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    }[opt_name]
    opt = make(model.parameters())
    x = torch.randn(64, 16, device="cuda")
    y = torch.randint(0, 4, (64,), device="cuda")
    p = Probe(model, optimizer=opt, schedule=every(2), flush_every=flush_every).attach()
    _train(model, opt, p, 2, x, y, autocast)  # warm-up: layer map, optimiser state, kernels
    counts: dict[str, int] = {}
    with _sync_is_error(counts):
        _train(model, opt, p, 14, x, y, autocast)  # 7 recorded steps, 7 unrecorded
    # flush_every=1: one transfer (one synchronisation) per recorded step, none otherwise;
    # deferred: non-blocking copies only, not a single synchronisation
    assert counts.get("_to_dict", 0) == (7 if flush_every == 1 else 0)
    rec = p.record  # reading the record may wait for the device: outside the training path
    p.detach()
    assert rec.steps == list(range(0, 16, 2))
    for s in rec.steps:
        assert math.isfinite(rec.get(s, "0", "out_grad_norm"))
        assert rec.get(s, "0.weight", "update_ratio") > 0


def test_cuda_loss_scale_is_not_read_on_the_host():
    # GradScaler.step() reads found_inf itself (its own synchronisation); the probe's step
    # computations inside it must not add one: get_scale() would (.item() on the scale)
    torch.manual_seed(0)
    model = _mlp().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    x = torch.randn(64, 16, device="cuda")
    y = torch.randint(0, 4, (64,), device="cuda")
    p = Probe(model, optimizer=opt, scaler=scaler, flush_every=4).attach()
    pre = core.Probe._pre_step
    seen = []

    def strict(self):  # the probe's end-of-gradients work, under "error" mode
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return pre(self)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            seen.append(1)

    core.Probe._pre_step = strict
    try:
        for _ in range(6):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    finally:
        core.Probe._pre_step = pre
    p.detach()
    assert len(seen) == 6
    rec = p.record
    assert rec.get(5, "__model__", "loss_scale") == 1024.0
    assert math.isfinite(rec.get(5, "0.weight", "grad_norm"))


def test_cuda_records_match_cpu():
    torch.manual_seed(0)
    cpu = _mlp(act=nn.ReLU).double()
    gpu = _mlp(act=nn.ReLU).double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(64, 16, dtype=torch.float64)
    y = torch.randint(0, 4, (64,))
    recs = []
    for m, dev in ((cpu, "cpu"), (gpu, "cuda")):
        # (SGD: Adam divides by sqrt(v), which turns float64 rounding differences between the
        # devices into visible ones within a few steps)
        opt = torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9)
        p = Probe(m, optimizer=opt).attach()
        _train(m, opt, p, 3, x.to(dev), y.to(dev))
        p.detach()
        recs.append(p.record)
    a, b = recs
    assert a.steps == b.steps == [0, 1, 2]
    for s in a.steps:
        for layer, metrics in a.data[s].items():
            for k, v in metrics.items():
                w = b.data[s][layer][k]
                assert w == pytest.approx(v, rel=1e-6, abs=1e-12, nan_ok=True), (s, layer, k)


def test_cuda_tiny_gradients_do_not_underflow():
    # a deep sigmoid net's first layers see gradients far below float32's squaring range
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 4)).cuda()
    with torch.no_grad():
        model[2].weight.mul_(1e-24)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 16, device="cuda")
    y = torch.randint(0, 4, (8,), device="cuda")
    p = Probe(model, optimizer=opt).attach()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    p.detach()
    g = model[0].weight.grad.double().norm().item()
    assert 0 < g < 1e-18
    assert p.record.get(0, "0.weight", "grad_norm") == pytest.approx(g, rel=1e-5)
    assert 0 < p.record.get(0, "1", "out_grad_norm") < 1e-18


if __name__ == "__main__":  # a machine without pytest
    import sys
    import traceback

    failed = 0
    cases = [
        (test_cuda_training_path_never_synchronises, ("sgd", nn.Tanh, False, 1)),
        (test_cuda_training_path_never_synchronises, ("adamw", nn.ReLU, False, 1)),
        (test_cuda_training_path_never_synchronises, ("adamw", nn.GELU, True, 3)),
        (test_cuda_training_path_never_synchronises, ("rmsprop", nn.Sigmoid, False, 3)),
        (test_cuda_training_path_never_synchronises, ("sgd", nn.Tanh, False, 3)),
        (test_cuda_loss_scale_is_not_read_on_the_host, ()),
        (test_cuda_records_match_cpu, ()),
        (test_cuda_tiny_gradients_do_not_underflow, ()),
    ]
    for fn, args in cases:
        try:
            fn(*args)
            print(f"PASSED {fn.__name__}{args}")
        except Exception:
            failed += 1
            print(f"FAILED {fn.__name__}{args}")
            traceback.print_exc()
    sys.exit(1 if failed else 0)
