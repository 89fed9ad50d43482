"""Batched engine vs the per-config Python loop vs torch.func vmap, measured side by side.

K = 32 tanh MLPs (one learning rate each), 200 SGD steps, batch 64, on the digits data (64
inputs, 10 classes), for (depth 50, width 32) and (depth 20, width 64). Every method trains the
same K models on the same mini-batches; times are time-to-result (model construction, any
compilation and training; no evaluation). Also the engine's achieved GFLOP/s (matmul FLOPs of
forward and backward) against the float32 matmul peak of this machine, timed in the same run
with the same thread count.

Run:  .venv/bin/python benchmarks/sweep_engine.py [--threads 1] [--repeats 3] [--procs 2]

``--procs 2`` adds the engine split over 2 single-threaded processes (one per core; the
population is cut in two halves), timed from a warm pool.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from signalprop.data import load_dataset
from signalprop.engine import Arch, Population

K, STEPS, BATCH = 32, 200, 64
SHAPES = [(50, 32), (20, 64)]


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


def per_config_loop(depth: int, width: int, x: torch.Tensor, y: torch.Tensor,
                    idx: torch.Tensor) -> float:
    """What users write: one nn.Sequential + torch.optim.SGD per config, one after another."""
    t0 = time.perf_counter()
    loss_fn = nn.CrossEntropyLoss()
    for lr in lrs():
        torch.manual_seed(0)
        model = make_sequential(depth, width, x.shape[1], 10)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for t in range(STEPS):
            opt.zero_grad()
            loss = loss_fn(model(x[idx[t]]), y[idx[t]])
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def vmapped(depth: int, width: int, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> float:
    """torch.func: stack the K models' parameters, vmap(grad(loss)) over them, SGD by hand."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    t0 = time.perf_counter()
    torch.manual_seed(0)
    models = [make_sequential(depth, width, x.shape[1], 10) for _ in range(K)]
    params, _ = stack_module_state(models)
    params = {n: p.detach() for n, p in params.items()}
    base = models[0].to("meta")
    lr = torch.tensor(lrs())

    def loss_of(p: dict, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(base, p, (xb,)), yb)

    g_all = vmap(grad(loss_of), in_dims=(0, None, None))
    names = list(params)
    lr_views = {n: lr.view(K, *([1] * (params[n].dim() - 1))) for n in names}
    for t in range(STEPS):
        g = g_all(params, x[idx[t]], y[idx[t]])
        for n in names:
            params[n].sub_(lr_views[n] * g[n])
    return time.perf_counter() - t0


def engine(depth: int, width: int, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
           members: list[float] | None = None) -> float:
    """The batched engine: the whole population in one computation."""
    t0 = time.perf_counter()
    lr = members if members is not None else lrs()
    pop = Population(Arch(x.shape[1], 10, depth, width, "tanh"), len(lr), hparams={"lr": lr})
    pop.init_(list(range(len(lr))))
    n = len(lr)
    for t in range(STEPS):
        b = idx[t]
        pop.train_step(x[b].expand(n, *x[b].shape), y[b].expand(n, BATCH))
    return time.perf_counter() - t0


def matmul_peak(repeats: int = 5) -> float:
    """float32 GFLOP/s of a large square matmul (best of ``repeats``)."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b, out=c)
        best = min(best, (time.perf_counter() - t0) / 3)
    return 2 * n**3 / best / 1e9


def _half(args: tuple) -> float:
    torch.set_num_threads(1)
    depth, width, x, y, idx, members = args
    return engine(depth, width, x, y, idx, members)


def timed(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loop-repeats", type=int, default=1,
                    help="repeats of the (slow) per-config loop")
    ap.add_argument("--procs", type=int, default=1, help="also time the engine over N processes")
    ap.add_argument("--skip-vmap", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = load_dataset("digits")
    x, y = ds.x_train, ds.y_train
    idx = batches(x.shape[0])
    print(f"torch {torch.__version__}, {args.threads} thread(s); K={K}, {STEPS} SGD steps, "
          f"batch {BATCH}, tanh; median of {args.repeats} (loop: {args.loop_repeats})")
    peak = matmul_peak()
    print(f"float32 matmul peak (2048^3, {args.threads} thread(s)): {peak:.1f} GFLOP/s")
    pool = None
    if args.procs > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(args.procs)
        pool.map(_half, [(1, 8, x, y, idx[:, :2], [0.1])] * args.procs)  # warm the workers
    for depth, width in SHAPES:
        flops = K * STEPS * Arch(x.shape[1], 10, depth, width).flops_per_step(BATCH)
        t_loop = timed(lambda d=depth, w=width: per_config_loop(d, w, x, y, idx),
                       args.loop_repeats)
        t_vmap = (float("nan") if args.skip_vmap else
                  timed(lambda d=depth, w=width: vmapped(d, w, x, y, idx), args.repeats))
        t_eng = timed(lambda d=depth, w=width: engine(d, w, x, y, idx), args.repeats)
        print(f"\ndepth {depth}, width {width}  ({flops / 1e9:.1f} GFLOP of matmuls)")
        print(f"  per-config loop   {t_loop:7.2f} s   1.00x")
        print(f"  torch.func vmap   {t_vmap:7.2f} s   {t_loop / t_vmap:5.2f}x")
        print(f"  engine            {t_eng:7.2f} s   {t_loop / t_eng:5.2f}x   "
              f"{flops / t_eng / 1e9:6.1f} GFLOP/s = {flops / t_eng / 1e9 / peak:5.1%} of peak")
        if pool is not None:
            lr = lrs()
            parts = [lr[i :: args.procs] for i in range(args.procs)]

            def par(d: int = depth, w: int = width, parts: list = parts) -> float:
                t0 = time.perf_counter()
                pool.map(_half, [(d, w, x, y, idx, p) for p in parts])
                return time.perf_counter() - t0

            t_par = timed(par, args.repeats)
            print(f"  engine {args.procs} procs    {t_par:7.2f} s   {t_loop / t_par:5.2f}x   "
                  f"{flops / t_par / 1e9:6.1f} GFLOP/s (peak with {args.procs} threads: see above "
                  f"x{args.procs})")
    if pool is not None:
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
