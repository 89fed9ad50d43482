"""Probe overhead: plain training vs training with the full probe recording every step.

A 20-layer, width-128 tanh MLP, batch 128, SGD. Both variants run in this process, interleaved
(plain, probed, plain, probed, ...) so machine load affects both alike; the ratio of medians is
printed. Target (issue 2): <= 1.10x.

Usage: python benchmarks/probe_overhead.py [--steps 50] [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from signalprop import Probe

#: Time with this process's CPU time (robust when other processes share the cores) or wall time.
CPU_TIME = False


def make_model(depth: int = 20, width: int = 128) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, probed: bool, **kw) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    p = Probe(model, optimizer=opt, **kw).attach() if probed else None
    t0 = time.process_time() if CPU_TIME else time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if p is not None:
            p.log(loss=loss)
        opt.step()
    dt = (time.process_time() if CPU_TIME else time.perf_counter()) - t0
    if p is not None:
        p.detach()
        assert len(p.record.steps) >= 1
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (use on a shared machine)",
    )
    args = ap.parse_args()
    global CPU_TIME
    CPU_TIME = args.clock == "cpu"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(128, 128), torch.randint(0, 10, (128,))
    model = make_model()
    variants = {
        "plain": dict(probed=False),
        "probe: full, every step": dict(probed=True),
        "probe: weights+grads only": dict(probed=True, forward=False),
        "probe: full, every 10th step": dict(probed=True, schedule=10),
    }
    for kw in variants.values():  # warm-up
        run(model, x, y, 5, **kw)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for k, kw in variants.items():
            times[k].append(run(model, x, y, args.steps, **kw))
    base = statistics.median(times["plain"])
    print(f"20 x 128 tanh MLP, batch 128, SGD, {args.steps} steps x {args.repeats} interleaved "
          f"repeats, {args.threads} thread(s), {args.clock} clock; medians")
    print(f"{'variant':32s} {'ms/step':>8s} {'ratio':>7s}")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"{k:32s} {1e3 * m / args.steps:8.3f} {m / base:7.3f}x")
    full = statistics.median(times["probe: full, every step"]) / base
    print(f"\nfull probe every step: {full:.3f}x plain (target <= 1.10x): "
          f"{'met' if full <= 1.10 else 'NOT met'}")


if __name__ == "__main__":
    main()
