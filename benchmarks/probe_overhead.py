"""Probe overhead: plain training vs training with the full probe, side by side in one run.

Models (``--model``):

- ``mlp``: a 20-layer, width-128 tanh MLP, batch 128, SGD (lr 0.01).
- ``transformer``: a GPT-2-small-shaped decoder built from ``torch.nn`` (token + position
  embeddings, 12 pre-LN ``nn.TransformerEncoderLayer`` blocks with a causal mask, final LayerNorm,
  untied LM head), AdamW. On CUDA: d 768, 12 heads, vocab 50304, batch 8 x 256 (GPT-2 small).
  On the CPU it is shrunk (d 64, 4 heads, vocab 2048, batch 4 x 64) so a step takes tens of ms.
  ``--dtype bf16`` trains under ``torch.autocast`` (CUDA only).

Variants: plain; the full probe (forward, backward and weight statistics) recording every step;
the full probe recording every 10th step. They run interleaved (plain, every step, every 10th,
plain, ...) so machine load affects all alike; the medians of each variant's per-step time and the
ratios to plain are printed, with the range of each repeat's ratio to the plain run beside it. Targets (issue 12): every step <= 1.10x, every 10th <= 1.02x.

Memory: the probe's extra peak memory, measured in a separate pass after the timing (peak memory
of 10 + ``--mem-steps`` probed steps, the probe created inside the window so that what it keeps
across steps counts, minus that of the same plain steps, starting from the same warm state),
against the bytes of model parameters + optimiser state (target: <= 5%). On CUDA from
``torch.cuda.max_memory_allocated``; on the CPU from the allocation events of PyTorch's own
profiler (``profile_memory=True``: every tensor allocation and free, so the peak is exact tensor
accounting, unaffected by other processes).

The accelerator path on the CPU (``--deferred``, memory pass only): the probe's CPU fast paths
are switched off (NumPy host kernels for forward statistics, BLAS norms in the gradient hooks)
and its values wait on the "device" for ``FLUSH_EVERY_ACCELERATOR`` recorded steps, as on CUDA;
``--round 512`` counts every allocation as the CUDA caching allocator does (sizes rounded up to
multiples of 512 bytes, so each small tensor costs at least 512 B), and ``--mem-detail N``
prints the N largest allocations alive at the probe's peak with the Python frames that made them.

``--split`` adds probes that record one part each (forward, backward, weights) every step and
one attached that never records (the cost of an unrecorded step) to the timed table;
``--phases`` prints each variant's extra time in forward, backward and the optimiser step.

Usage: python benchmarks/probe_overhead.py [--device cpu|cuda] [--model mlp|transformer]
    [--dtype fp32|bf16] [--steps 50] [--repeats 7] [--threads 1] [--clock wall|cpu] [--split]
    [--phases] [--every N ...]
    [--update-ratio auto|optimizer|copy|off] [--deferred] [--round BYTES] [--mem-detail N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from signalprop import Probe, stats
from signalprop.probe.core import FLUSH_EVERY_ACCELERATOR


# ---- models -------------------------------------------------------------------------------------
def make_mlp(depth: int = 20, width: int = 128) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


class GPT(nn.Module):
    """GPT-2-shaped decoder from stock torch.nn modules (pre-LN, GELU, causal self-attention)."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, seq: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True,
                norm_first=True,
            )
            for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq),
                             persistent=False)
        self.register_buffer("positions", torch.arange(seq), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.tok(idx) + self.pos(self.positions[:t])
        for b in self.blocks:
            h = b(h, src_mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.ln_f(h))


@dataclass
class Task:
    """A model, its optimiser factory, a batch and the loss."""

    name: str
    model: nn.Module
    make_opt: Callable[[nn.Module], torch.optim.Optimizer]
    x: torch.Tensor
    y: torch.Tensor
    autocast: torch.dtype | None

    def loss(self, out: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]).float(), self.y.reshape(-1))


def make_task(model: str, device: str, dtype: str) -> Task:
    torch.manual_seed(0)
    ac = torch.bfloat16 if dtype == "bf16" else None
    if model == "mlp":
        m = make_mlp().to(device)
        x = torch.randn(128, 128, device=device)
        y = torch.randint(0, 10, (128,), device=device)
        return Task("20 x 128 tanh MLP, batch 128, SGD", m,
                    lambda m: torch.optim.SGD(m.parameters(), lr=0.01), x, y, ac)
    if device == "cuda":
        vocab, d, heads, seq, batch = 50304, 768, 12, 256, 8
    else:
        vocab, d, heads, seq, batch = 2048, 64, 4, 64, 4
    m = GPT(vocab, d, heads, 12, seq).to(device)
    x = torch.randint(0, vocab, (batch, seq), device=device)
    y = torch.randint(0, vocab, (batch, seq), device=device)
    return Task(f"GPT-2-shaped, 12 pre-LN blocks, d {d}, vocab {vocab}, batch {batch} x {seq}, "
                f"AdamW", m, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4), x, y, ac)


# ---- one timed run ------------------------------------------------------------------------------
def train(task: Task, opt: torch.optim.Optimizer, steps: int, probe: Probe | None) -> None:
    ctx = (torch.autocast(task.x.device.type, dtype=task.autocast) if task.autocast
           else contextlib.nullcontext())
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with ctx:
            out = task.model(task.x)
        loss = task.loss(out)
        loss.backward()
        if probe is not None:
            probe.log(loss=loss)
        opt.step()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(task: Task, opt: torch.optim.Optimizer, steps: int, p: Probe | None,
        cpu_clock: bool) -> float:
    """Seconds for ``steps`` more steps with probe ``p`` attached (or none); reading the record
    at the end (which brings the last values to the host) is part of the measured cost.

    Each variant keeps one probe across its runs: the first recorded step of a probe (which
    maps the layers) belongs to the warm-up, as it would to a long training run."""
    dev = task.x.device.type
    clock = time.process_time if cpu_clock else time.perf_counter
    want = 0 if p is None else sum(
        bool(p.schedule(s)) for s in range(p.step_index, p.step_index + steps))
    sync(dev)
    t0 = clock()
    before = len(p.record.data) if p is not None else 0
    train(task, opt, steps, p)
    if p is not None:
        n = len(p.record.steps) - before
        if n != want:
            raise RuntimeError(f"probe recorded {n} steps, expected {want}")
    sync(dev)
    return clock() - t0


# ---- memory -------------------------------------------------------------------------------------
def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    return n


@contextlib.contextmanager
def _quiet():  # the profiler's C++ side prints start/stop lines on the process's own fds
    sys.stdout.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def cpu_peak_bytes(fn: Callable[[], None], round_to: int = 1, detail: int = 0) -> int:
    """Peak of live tensor bytes allocated during ``fn`` (relative to its start), from the
    allocation/free events of PyTorch's profiler.

    Args:
        fn: What to measure.
        round_to: Count each allocation as its size rounded up to a multiple of this (512:
            the CUDA caching allocator's block granularity).
        detail: Print the largest ``detail`` groups of allocations alive at the peak that the
            probe made (by the signalprop frames that made them).
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                           with_stack=detail > 0) as prof:
        fn()

    def rounded(n: int) -> int:
        return (-(-abs(n) // round_to) * round_to) * (1 if n >= 0 else -1)

    if detail:
        return _peak_detail(prof, rounded, detail)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += rounded(e.nbytes())
        peak = max(peak, cur)
    return peak


def _peak_detail(prof: object, rounded: Callable[[int], int], top: int) -> int:
    """The peak from the profiler's event tree (allocations by address), and a print of the
    probe's allocations alive at it, grouped by the frames that made them."""
    allocs = []

    def walk(node: object) -> None:
        t = node.typed  # type: ignore[attr-defined]
        if str(t[0]).endswith("Allocation"):
            frames, q = [], node.parent  # type: ignore[attr-defined]
            while q is not None:
                if "signalprop/" in q.name or "probe_overhead" in q.name:
                    frames.append(q.name.split("signalprop/")[-1][:70])
                q = q.parent
            allocs.append((node.start_time_ns, t[1].ptr, t[1].alloc_size, frames))  # type: ignore
        for c in node.children:  # type: ignore[attr-defined]
            walk(c)

    for root in prof.profiler.kineto_results.experimental_event_tree():  # type: ignore
        walk(root)
    allocs.sort(key=lambda a: a[0])
    live: dict[int, tuple[int, list[str]]] = {}
    cur = peak = 0
    at_peak: dict[int, tuple[int, list[str]]] = {}
    for _, ptr, size, frames in allocs:
        if size > 0:
            live[ptr] = (rounded(size), frames)
            cur += live[ptr][0]
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif ptr in live:
            cur -= live.pop(ptr)[0]
    groups: dict[str, list[int]] = {}
    for size, frames in at_peak.values():
        probe = [f for f in frames if "probe_overhead" not in f]
        key = " < ".join(probe[:4]) if probe else "(not the probe) " + " < ".join(frames[:2])
        groups.setdefault(key, []).append(size)
    print(f"    at the peak ({peak} B live): the largest groups of allocations")
    for key, sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"    {sum(sizes):9d} B in {len(sizes):4d}: {key}")
    return peak


def peak_bytes(task: Task, opt: torch.optim.Optimizer, steps: int, schedule: int | None,
               update_ratio: str | bool = "auto", deferred: bool = False, round_to: int = 1,
               detail: int = 0) -> int:
    """Peak memory above the start of 10 + ``steps`` steps, with a probe (created and attached
    inside the measured window, so buffers it keeps across steps count too) recording every
    ``schedule``-th step: the mapping step, then regular recorded steps."""
    p = None

    def body() -> None:
        nonlocal p
        if schedule:
            p = Probe(task.model, optimizer=opt, schedule=schedule, update_ratio=update_ratio,
                      flush_every=FLUSH_EVERY_ACCELERATOR if deferred else None)
            if deferred:
                p._host_kernels = False  # the torch kernels, as on an accelerator
            p.attach()
        train(task, opt, 10 + steps, p)
        if p is not None:
            len(p.record.steps)

    # start without gradients: blocks allocated before a profiling session are freed with an
    # unknown size, which would make the CPU accounting depend on what ran before
    opt.zero_grad(set_to_none=True)
    try:
        if task.x.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            body()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        with _no_host_norms(deferred):
            return cpu_peak_bytes(body, round_to, detail if schedule else 0)
    finally:
        if p is not None:
            p.detach()


@contextlib.contextmanager
def _no_host_norms(on: bool):
    """Gradient hooks take the accelerator's norms (float64 on the "device") while ``on``."""
    saved = dict(stats.HOST_NORMS)
    if on:
        stats.HOST_NORMS.clear()
    try:
        yield
    finally:
        stats.HOST_NORMS.update(saved)


def _timing(args: argparse.Namespace, task: Task, opt: torch.optim.Optimizer, steps: int,
            probes: dict[str, Probe | None]) -> None:
    """The interleaved timed runs and their table."""
    cpu_clock = args.clock == "cpu"
    times: dict[str, list[float]] = {k: [] for k in probes}
    for _ in range(args.repeats):
        for k, pr in probes.items():
            if pr is not None:
                pr.attach()
            times[k].append(run(task, opt, steps, pr, cpu_clock))
            if pr is not None:
                pr.detach()
    base = statistics.median(times["plain"])
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"{task.name}, {args.dtype}; {dev}; torch {torch.__version__}; "
          f"update_ratio={args.update_ratio}")
    print(f"{steps} steps x {args.repeats} interleaved repeats, {args.clock} clock, medians; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'variant':34s} {'ms/step':>8s} {'ratio':>7s} {'repeats':>15s}  target")
    targets = {"probe: full, every step": 1.10, "probe: full, every 10th step": 1.02}
    for k, v in times.items():
        m = statistics.median(v)
        t = targets.get(k)
        verdict = "" if t is None else f"<= {t:.2f}x: {'met' if m / base <= t else 'NOT met'}"
        # each repeat's ratio to the plain run beside it: the spread is the noise of the ratio
        paired = [a / b for a, b in zip(v, times["plain"], strict=True)]
        spread = "" if k == "plain" else f"[{min(paired):.3f}, {max(paired):.3f}]"
        print(f"{k:34s} {1e3 * m / steps:8.2f} {m / base:7.3f}x {spread:>15s}  {verdict}")


#: ``--split``: probes that record one part each, every step, and one that never records.
SPLIT: dict[str, dict[str, object]] = {
    "probe: forward only, every step": {"backward": False, "weights": False},
    "probe: backward only, every step": {"forward": False, "weights": False},
    "probe: weights only, every step": {"forward": False, "backward": False},
    "probe: attached, never records": {"schedule": [10**12]},
}


def _phases(args: argparse.Namespace, task: Task, opt: torch.optim.Optimizer,
            probes: dict[str, Probe | None]) -> None:
    """Per-phase medians of this thread's CPU time (or wall time on CUDA, synchronised per
    phase): zero_grad + forward + loss, backward (with the probe's gradient hooks and its
    end-of-backward work), log + optimiser step (with the probe's step hooks), interleaved."""
    dev = task.x.device.type
    clock = time.thread_time if dev == "cpu" else time.perf_counter
    names = ("forward", "backward", "step")
    times: dict[str, list[list[float]]] = {k: [[], [], []] for k in probes}
    ctx = (torch.autocast(dev, dtype=task.autocast) if task.autocast else contextlib.nullcontext())
    for _ in range(max(args.repeats, 1)):
        for k, pr in probes.items():
            if pr is not None:
                pr.attach()
            for _ in range(10):
                sync(dev)
                t0 = clock()
                opt.zero_grad(set_to_none=True)
                with ctx:
                    out = task.model(task.x)
                loss = task.loss(out)
                sync(dev)
                t1 = clock()
                loss.backward()
                sync(dev)
                t2 = clock()
                if pr is not None:
                    pr.log(loss=loss)
                opt.step()
                sync(dev)
                t3 = clock()
                for i, v in enumerate((t1 - t0, t2 - t1, t3 - t2)):
                    times[k][i].append(v)
            if pr is not None:
                pr.detach()
    base = [statistics.median(v) for v in times["plain"]]
    print(f"\nper phase, ms ({'thread CPU' if dev == 'cpu' else 'wall, synchronised'} time, "
          f"medians of {10 * max(args.repeats, 1)} steps; plain, then each variant's extra)")
    print(f"{'variant':34s}" + "".join(f"{n:>12s}" for n in names))
    for k, ph in times.items():
        med = [statistics.median(v) for v in ph]
        cells = [f"{1e3 * m:12.2f}" if k == "plain" else f"{1e3 * (m - b):+12.2f}"
                 for m, b in zip(med, base, strict=True)]
        print(f"{k:34s}" + "".join(cells))


# ---- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", choices=["mlp", "transformer"], default="mlp")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: train under torch.autocast(bfloat16) (CUDA only)")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per timed run (multiple of 10; default 50 mlp, 20 transformer)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repeats of each variant (0: memory pass only)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: elapsed time; cpu: this process's CPU time (CPU device only)")
    ap.add_argument("--mem-steps", type=int, default=3, help="steps of the memory pass (0: skip)")
    ap.add_argument("--update-ratio", choices=["auto", "optimizer", "copy", "off"], default="auto",
                    help="the probe's update_ratio option (off: False)")
    ap.add_argument("--deferred", action="store_true",
                    help="memory pass on the CPU through the accelerator path (no host kernels, "
                         "values deferred on the device as on CUDA)")
    ap.add_argument("--round", type=int, default=1, metavar="BYTES",
                    help="CPU memory pass: count allocations rounded up to multiples of BYTES "
                         "(512: as the CUDA caching allocator)")
    ap.add_argument("--mem-detail", type=int, default=0, metavar="N",
                    help="CPU memory pass: print the N largest groups of the probe's "
                         "allocations alive at its peak")
    ap.add_argument("--every", type=int, nargs="*", default=[], metavar="N",
                    help="also time the full probe recording every N-th step (N divides --steps)")
    ap.add_argument("--split", action="store_true",
                    help="also time probes recording one part each (forward, backward, "
                         "weights) every step, and one attached that never records")
    ap.add_argument("--phases", action="store_true",
                    help="also print each variant's extra time per phase (forward, backward, "
                         "step)")
    args = ap.parse_args(argv)
    if (args.deferred or args.round != 1 or args.mem_detail) and args.device != "cpu":
        print("--deferred, --round and --mem-detail are for the CPU memory pass (on CUDA the "
              "accelerator path is the probe's own)", file=sys.stderr)
        return 2
    if args.round < 1:
        print(f"--round must be >= 1, got {args.round}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here", file=sys.stderr)
        return 2
    if args.dtype == "bf16" and args.device != "cuda":
        print("--dtype bf16 is for --device cuda (autocast on the CPU is not what users train "
              "with)", file=sys.stderr)
        return 2
    if args.clock == "cpu" and args.device == "cuda":
        print("--clock cpu measures the host only; use wall time on CUDA", file=sys.stderr)
        return 2
    steps = args.steps or (50 if args.model == "mlp" else 20)
    torch.set_num_threads(args.threads)
    task = make_task(args.model, args.device, args.dtype)
    opt = task.make_opt(task.model)
    variants: dict[str, int | None] = {
        "plain": None,
        "probe: full, every step": 1,
        "probe: full, every 10th step": 10,
    }
    for n in args.every:
        if n < 2 or steps % n:
            print(f"--every {n}: must be >= 2 and divide --steps ({steps})", file=sys.stderr)
            return 2
        variants[f"probe: full, 1 step in {n}"] = n
    if steps % 10:
        print("--steps must be a multiple of 10", file=sys.stderr)
        return 2
    # one probe per variant, attached only while its variant runs (hooks of the others would
    # fire too)
    ur = False if args.update_ratio == "off" else args.update_ratio
    probes = {
        k: Probe(task.model, optimizer=opt, schedule=s, update_ratio=ur) if s else None
        for k, s in variants.items()
    }
    if args.split:  # what each part of the probe costs, recording every step
        for k, kw in SPLIT.items():
            probes[k] = Probe(task.model, optimizer=opt, update_ratio=ur, **kw)
    for pr in probes.values():  # warm-up: allocator, optimiser state, kernels, layer map
        if pr is not None:
            pr.attach()
        run(task, opt, 10, pr, False)
        if pr is not None:
            pr.detach()
    if args.repeats > 0:
        _timing(args, task, opt, steps, probes)
    if args.phases:
        _phases(args, task, opt, probes)
    if args.mem_steps > 0:
        sb = state_bytes(task.model, opt)
        mem = {"deferred": args.deferred, "round_to": args.round, "detail": args.mem_detail}
        plain = peak_bytes(task, opt, args.mem_steps, None, **mem)
        how = (" (accelerator path forced on the CPU)" if args.deferred else "") + (
            f" (allocations rounded up to {args.round} B)" if args.round > 1 else "")
        print(f"\nmemory{how}: model + optimiser state {sb / 2**20:.1f} MiB; peak above it during "
              f"{10 + args.mem_steps} plain steps {plain / 2**20:.1f} MiB")
        for k, s in variants.items():
            if s is None:
                continue
            extra = peak_bytes(task, opt, args.mem_steps, s, ur, **mem) - plain
            print(f"  {k:28s} extra peak {extra / 2**20:8.2f} MiB = {extra / sb:6.1%} of state "
                  f"(target <= 5%: {'met' if extra <= 0.05 * sb else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
