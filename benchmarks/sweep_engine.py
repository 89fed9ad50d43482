"""Batched engine vs the per-config Python loop vs torch.func vmap, measured side by side.

K = 32 tanh MLPs (one learning rate each), 200 SGD steps, batch 64, on the digits data (64
inputs, 10 classes), for (depth 50, width 32) and (depth 20, width 64). Every method trains the
same K models on the same mini-batches; times are time-to-result (model construction, any
compilation and training; no evaluation). Also the engine's achieved GFLOP/s (matmul FLOPs of
forward and backward) against the float32 matmul peak of this machine, timed in the same run
with the same thread count.

Run:  .venv/bin/python benchmarks/sweep_engine.py [--device cpu|cuda] [--threads 1] [--repeats 3]
    [--procs 2]

``--device cuda`` runs every method on the GPU (times are wall clock after a device
synchronisation; the CPU-time column then only shows the host's share).

``--procs 2`` adds the engine split over 2 single-threaded processes (one per core; the
population is cut in two halves), timed from a warm pool.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

from signalprop.data import load_dataset
from signalprop.engine import Arch, Population

K, STEPS, BATCH = 32, 200, 64
DEVICE = torch.device("cpu")
SHAPES = [(50, 32), (20, 64)]


def set_size(k: int, steps: int) -> None:
    """Change K and the number of steps (for a quick smoke run of this script)."""
    global K, STEPS
    K, STEPS = k, steps


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def lrs() -> list[float]:
    return [float(v) for v in torch.logspace(-3, -1, K)]


def batches(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, n, (STEPS, BATCH), generator=g)


def make_sequential(depth: int, width: int, d_in: int, d_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    fan = d_in
    for _ in range(depth):
        layers += [nn.Linear(fan, width), nn.Tanh()]
        fan = width
    layers.append(nn.Linear(fan, d_out))
    return nn.Sequential(*layers)


class Clock:
    """Wall-clock and CPU time of this process (the CPU time is what survives a machine shared
    with other jobs: it does not count the time other processes held the cores)."""

    def __init__(self) -> None:
        sync()
        self.w, self.c = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        sync()
        return time.perf_counter() - self.w, time.process_time() - self.c


def per_config_loop(depth: int, width: int, x: torch.Tensor, y: torch.Tensor,
                    idx: torch.Tensor) -> tuple[float, float]:
    """What users write: one nn.Sequential + torch.optim.SGD per config, one after another."""
    clock = Clock()
    loss_fn = nn.CrossEntropyLoss()
    for lr in lrs():
        torch.manual_seed(0)
        model = make_sequential(depth, width, x.shape[1], 10).to(DEVICE)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for t in range(STEPS):
            opt.zero_grad()
            loss = loss_fn(model(x[idx[t]]), y[idx[t]])
            loss.backward()
            opt.step()
    return clock.read()


def vmapped(depth: int, width: int, x: torch.Tensor, y: torch.Tensor,
            idx: torch.Tensor) -> tuple[float, float]:
    """torch.func: stack the K models' parameters, vmap(grad(loss)) over them, SGD by hand."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    clock = Clock()
    torch.manual_seed(0)
    models = [make_sequential(depth, width, x.shape[1], 10).to(DEVICE) for _ in range(K)]
    params, _ = stack_module_state(models)
    params = {n: p.detach() for n, p in params.items()}
    base = models[0].to("meta")
    lr = torch.tensor(lrs(), device=DEVICE)

    def loss_of(p: dict, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(base, p, (xb,)), yb)

    g_all = vmap(grad(loss_of), in_dims=(0, None, None))
    names = list(params)
    lr_views = {n: lr.view(K, *([1] * (params[n].dim() - 1))) for n in names}
    for t in range(STEPS):
        g = g_all(params, x[idx[t]], y[idx[t]])
        for n in names:
            params[n].sub_(lr_views[n] * g[n])
    return clock.read()


def engine(depth: int, width: int, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
           members: list[float] | None = None) -> tuple[float, float]:
    """The batched engine: the whole population in one computation."""
    clock = Clock()
    lr = members if members is not None else lrs()
    pop = Population(Arch(x.shape[1], 10, depth, width, "tanh"), len(lr), hparams={"lr": lr},
                     device=DEVICE)
    pop.init_(list(range(len(lr))))
    n = len(lr)
    for b in idx:
        pop.train_step(x[b].expand(n, *x[b].shape), y[b].expand(n, len(b)))
    return clock.read()


def matmuls_only(depth: int, width: int, d_in: int) -> tuple[float, float]:
    """The engine's matmuls alone (same shapes, same order, 200 steps, no element-wise work):
    the bound on what fusing the rest could reach at these sizes."""
    g = torch.Generator().manual_seed(0)
    dims = [d_in] + [width] * depth + [10]
    ws = [(torch.randn(K, a, b, generator=g) / a**0.5).to(DEVICE)
          for a, b in zip(dims[:-1], dims[1:], strict=True)]
    bs = [torch.zeros(K, 1, b, device=DEVICE) for b in dims[1:]]
    gs = [torch.empty_like(w) for w in ws]
    x = torch.randn(K, BATCH, d_in, generator=g).to(DEVICE)
    clock = Clock()
    for _ in range(STEPS):
        acts = [x]
        for w, b in zip(ws, bs, strict=True):
            acts.append(torch.baddbmm(b, acts[-1], w))
        d = acts[-1]
        for i in reversed(range(len(ws))):
            torch.bmm(acts[i].transpose(1, 2), d, out=gs[i])
            if i > 0:
                d = torch.bmm(d, ws[i].transpose(1, 2))
    return clock.read()


def matmul_peak(repeats: int = 3) -> tuple[float, float]:
    """float32 GFLOP/s of a large square matmul, best of ``repeats``: (by wall, by CPU time)."""
    n = 8192 if DEVICE.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    c = torch.empty(n, n, device=DEVICE)
    torch.mm(a, b, out=c)
    best_w = best_c = float("inf")
    for _ in range(repeats):
        clock = Clock()
        for _ in range(3):
            torch.mm(a, b, out=c)
        w, cpu = clock.read()
        best_w, best_c = min(best_w, w / 3), min(best_c, cpu / 3)
    return 2 * n**3 / best_w / 1e9, 2 * n**3 / best_c / 1e9


def _half(args: tuple) -> tuple[float, float]:
    torch.set_num_threads(1)
    depth, width, x, y, idx, members = args
    return engine(depth, width, x, y, idx, members)


def med(xs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(x[0] for x in xs), statistics.median(x[1] for x in xs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loop-repeats", type=int, default=1,
                    help="repeats of the (slow) per-config loop")
    ap.add_argument("--procs", type=int, default=1, help="also time the engine over N processes")
    ap.add_argument("--skip-vmap", action="store_true")
    ap.add_argument("--steps", type=int, default=STEPS, help="(smoke tests only)")
    ap.add_argument("--k", type=int, default=K, help="(smoke tests only)")
    args = ap.parse_args(argv)
    set_size(args.k, args.steps)
    global DEVICE
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here", file=sys.stderr)
        return 2
    if args.device == "cuda" and args.procs > 1:
        print("--procs is for the CPU (one single-threaded process per core)", file=sys.stderr)
        return 2
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    try:
        ds = load_dataset("digits")
        x, y = ds.x_train, ds.y_train
    except ImportError:  # a bare GPU machine without scikit-learn: same shapes, random values
        print("scikit-learn missing: random data of the digits' shape (1437 x 64, 10 classes)")
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(1437, 64, generator=g), torch.randint(0, 10, (1437,), generator=g)
    idx = batches(x.shape[0])
    x, y, idx = x.to(DEVICE), y.to(DEVICE), idx.to(DEVICE)
    load0 = os.getloadavg()[0]
    where = (torch.cuda.get_device_name() if DEVICE.type == "cuda"
             else f"CPU, {args.threads} thread(s)")
    print(f"torch {torch.__version__}, {where}; K={K}, {STEPS} SGD steps, "
          f"batch {BATCH}, tanh; medians of {args.repeats} interleaved repeats (loop: "
          f"{args.loop_repeats}); load average {load0:.1f} on {os.cpu_count()} cores")
    pool = None
    if args.procs > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(args.procs)
        pool.map(_half, [(1, 8, x, y, idx[:5], [0.1])] * args.procs)  # warm the workers
    for depth, width in SHAPES:
        flops = K * STEPS * Arch(x.shape[1], 10, depth, width).flops_per_step(BATCH)
        t: dict[str, list[tuple[float, float]]] = {"loop": [], "vmap": [], "engine": [],
                                                   "peak": [], "par": [], "mm": []}
        lr = lrs()
        parts = [lr[i :: args.procs] for i in range(args.procs)]
        for r in range(args.repeats):
            if r < args.loop_repeats:
                t["loop"].append(per_config_loop(depth, width, x, y, idx))
            if not args.skip_vmap:
                t["vmap"].append(vmapped(depth, width, x, y, idx))
            t["peak"].append(matmul_peak())
            t["engine"].append(engine(depth, width, x, y, idx))
            t["mm"].append(matmuls_only(depth, width, x.shape[1]))
            if pool is not None:
                clock = Clock()
                pool.map(_half, [(depth, width, x, y, idx, p) for p in parts])
                t["par"].append((clock.read()[0], float("nan")))
        loop, peak, eng = med(t["loop"]), med(t["peak"]), med(t["engine"])
        print(f"\ndepth {depth}, width {width}  ({flops / 1e9:.1f} GFLOP of matmuls; "
              f"matmul peak {peak[0]:.1f} GFLOP/s by wall time, {peak[1]:.1f} by CPU time)")
        print("                     wall s  speed-up |  CPU s  speed-up")

        def line(name: str, v: tuple[float, float], loop: tuple[float, float] = loop) -> None:
            print(f"  {name:17s} {v[0]:7.2f}  {loop[0] / v[0]:6.2f}x  | {v[1]:6.2f}  "
                  f"{loop[1] / v[1]:6.2f}x")

        line("per-config loop", loop)
        if t["vmap"]:
            line("torch.func vmap", med(t["vmap"]))
        line("engine", eng)
        print(f"  engine: {flops / eng[0] / 1e9:.1f} GFLOP/s = {flops / eng[0] / 1e9 / peak[0]:.0%} "
              f"of the matmul peak by wall time; {flops / eng[1] / 1e9:.1f} GFLOP/s = "
              f"{flops / eng[1] / 1e9 / peak[1]:.0%} by CPU time")
        mm = med(t["mm"])
        print(f"  the engine's matmuls alone: {mm[0]:.2f} s = {flops / mm[0] / 1e9:.1f} GFLOP/s = "
              f"{flops / mm[0] / 1e9 / peak[0]:.0%} of the peak (the bound for this step)")
        if t["par"]:
            par = med(t["par"])
            print(f"  engine, {args.procs} single-threaded processes (warm pool): {par[0]:.2f} s "
                  f"wall, {loop[0] / par[0]:.2f}x the loop, {flops / par[0] / 1e9:.1f} GFLOP/s")
    if pool is not None:
        pool.close()
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
