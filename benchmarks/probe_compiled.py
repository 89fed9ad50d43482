"""A sketch of a compiled recorded step: what the probe's per-layer work costs inside a graph.

``probe_floor.py`` shows that no eager, hook-based probe records every step of the 20 x 128 tanh
MLP at <= 1.10x: each watched output costs a Python gather in forward and a Python hook call in
backward. This benchmark measures the alternative the issue names, a ``torch.compile``d recorded
step, as a prototype (not the probe): the children of the ``nn.Sequential`` run inside one
compiled function that also takes each output's strided sample (256 values) and routes each
output through an identity ``autograd.Function`` whose backward writes ||dL/dh||^2 into the
gradient of a small leaf vector, so the output-gradient norms come out of the compiled backward
graph with no Python call per layer; the samples' moments are taken in bulk. Timed against eager
plain training and against the same model compiled without instrumentation (interleaved repeats,
medians), after one compilation each (its time is printed). The norms are checked against eager
autograd's ``retain_grad`` norms of the same step.

What it leaves out (so an upper bound of the per-layer savings, not a probe): percentiles,
saturated fractions, weight and update norms, NaN/Inf accounting, the record.

Usage: python benchmarks/probe_compiled.py [--device cpu|cuda] [--steps 20] [--repeats 9]
    [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from probe_floor import SAMPLES  # noqa: E402  (the floor's sample size)
from probe_overhead import make_mlp  # noqa: E402  (the benchmarks' MLP)


class Tap(torch.autograd.Function):
    """Identity whose backward adds ||dL/dh||^2 at position ``i`` of the gradient of ``acc``."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, acc: torch.Tensor, i: int) -> torch.Tensor:
        ctx.i, ctx.n = i, acc.numel()
        return h.view_as(h)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        d = torch.zeros(ctx.n, dtype=torch.float32, device=g.device)
        d[ctx.i] = (g.float() * g.float()).sum()
        return g, d, None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    dev = args.device
    torch.manual_seed(0)
    model = make_mlp().to(dev)
    mods = list(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(128, 128, device=dev)
    y = torch.randint(0, 10, (128,), device=dev)
    idx = torch.arange(SAMPLES, device=dev) * 67 % (128 * 128)
    acc = torch.zeros(len(mods), device=dev, requires_grad=True)

    def instrumented(x: torch.Tensor, acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        samples = []
        for i, m in enumerate(mods):
            x = m(x)
            if x.shape[-1] == 128:
                samples.append(torch.take(x.detach(), idx))
            x = Tap.apply(x, acc, i)
        return x, torch.stack(samples)

    def forward(x: torch.Tensor) -> torch.Tensor:
        for m in mods:
            x = m(x)
        return x

    comp_rec = torch.compile(instrumented, dynamic=False)
    comp_plain = torch.compile(forward, dynamic=False)

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def compiled_plain() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(comp_plain(x), y).backward()
        opt.step()

    def compiled_recorded() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        acc.grad = None
        out, s = comp_rec(x, acc)
        nn.functional.cross_entropy(out, y).backward()
        torch.std_mean(s, dim=1)
        opt.step()
        return acc.grad.sqrt()

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    fns = {"eager plain": plain, "compiled plain": compiled_plain,
           "compiled, recording": compiled_recorded}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        sync()
        print(f"{name}: first call {time.perf_counter() - t0:.1f} s")

    # the norms against eager autograd on the same weights (no step in between)
    opt.zero_grad(set_to_none=True)
    acc.grad = None
    out, _ = comp_rec(x, acc)
    nn.functional.cross_entropy(out, y).backward()
    tapped = acc.grad.sqrt().double().cpu()
    outs, h = [], x
    for m in mods:
        h = m(h)
        h.retain_grad()
        outs.append(h)
    nn.functional.cross_entropy(h, y).backward()
    want = torch.stack([torch.linalg.vector_norm(o.grad.double()) for o in outs]).cpu()
    rel = float(((tapped - want).abs() / want).max())
    print(f"output-gradient norms, compiled taps vs eager autograd: max relative difference "
          f"{rel:.1e} over {len(mods)} outputs")

    clock = time.process_time if dev == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            sync()
            t0 = clock()
            for _ in range(args.steps):
                fn()
            sync()
            times[name].append((clock() - t0) / args.steps)
    base = statistics.median(times["eager plain"])
    print(f"20 x 128 tanh MLP, batch 128, SGD; {dev}; torch {torch.__version__}; "
          f"{args.steps} steps x {args.repeats} interleaved repeats, "
          f"{'cpu' if dev == 'cpu' else 'wall'} clock, medians")
    for name, v in times.items():
        m = statistics.median(v)
        print(f"{name:22s} {1e3 * m:8.3f} ms {m / base:7.3f}x")
    rec, cp = statistics.median(times["compiled, recording"]), statistics.median(
        times["compiled plain"])
    print(f"samples and output-gradient norms inside the graph add {(rec - cp) / cp:+.1%} to the "
          f"compiled step ({(rec - base) / base:+.1%} against eager plain)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
