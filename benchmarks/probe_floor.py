"""The floor of a hook-based probe: what the cheapest possible per-layer recording costs.

issue 12 asks for the full probe at <= 1.10x plain training every step on a 20 x 128 tanh MLP
(batch 128, SGD; ``--model mlp``, the default) and a GPT-2-shaped transformer (``--model
transformer``, below). This benchmark builds the cheapest probe that records the same kind of
quantities with PyTorch's eager hooks, one ingredient at a time, and times each rung against
plain training, interleaved, in one run (medians). Every rung does strictly less than
signalprop's probe (no layer map, no NaN/Inf handling, no micro-batches, no record), so its
cost is a lower bound for any design that samples each watched output in the forward pass and
takes each output gradient's norm in backward. The MLP's rungs:

- ``plain``: ``model(x)``, loss, backward, SGD step.
- ``loop``: the children called from a Python loop (as a probe's recorded step must, to see
  each output) instead of ``nn.Sequential``'s own.
- ``+ sample``: one strided gather of 256 values of each watched output (41: 21 linear layers
  and 20 activations).
- ``+ hooks``: one no-op gradient hook per (linear layer, activation) pair, on the
  activation's backward node (it sees both gradients: 21 hooks).
- ``+ norms``: the hooks take ||dL/dz|| and ||dL/dh|| (sqrt of a BLAS dot on the CPU, with
  no guard against underflow; a float64 reduction on an accelerator: no host synchronisation).
- ``+ end``: the end-of-step statistics in bulk: moments, five percentiles and the saturated
  fraction of the stacked samples, the gradient and weight norms of all parameters in two
  fused calls, and the values brought to the host in one copy.
- ``signalprop``: the real :class:`signalprop.Probe` (forward, backward and weight statistics,
  update ratios), recording every step.

``--model transformer``: probe_overhead.py's GPT-2-shaped transformer (12 pre-LN
``nn.TransformerEncoderLayer`` blocks, AdamW; on the CPU d 64, batch 4 x 64), watched where
signalprop's probe watches it: a :class:`signalprop.Probe` maps the model in one recorded step
and its record names the sites (on the CPU 76 sampled outputs: the 64 leaf modules that run,
and the GELU each block calls through its ``activation`` attribute, patched as the probe patches
it; 88 gradient norms: those outputs and the 12 blocks' inputs). Hooks are installed once per
rung, outside the timed steps (a probe recording every step may keep them):

- ``plain``: ``model(x)``, loss, backward, AdamW step.
- ``+ sample``: a forward hook per watched module (a patched function for GELU) taking the
  probe's strided sample (:data:`signalprop.stats.MAX_FORWARD_SAMPLES` values, its index
  rule) with one ``torch.take``.
- ``+ hooks``: a no-op pre-hook on the backward node of each watched output, and of each
  block's input (what the probe registers).
- ``+ norms``: those hooks take the gradient's norm (a bare BLAS dot on the CPU; a float64
  norm, :func:`signalprop.stats.norm64`, elsewhere).
- ``+ out stats``: moments and five percentiles of the stacked samples (the probe's host
  kernels, ``stats.moments_host`` / ``stats.percentiles_host``; the torch ones elsewhere).
- ``+ W/g norms``: the norms of every weight and gradient (on the CPU bare BLAS dots over
  cached NumPy views of the weights, the fastest measured there; elsewhere the probe's fused
  ``device_norms``).
- ``+ updates``: Adam's update norms from its state after the step
  (:class:`signalprop.probe.update.UpdateNorms`, the package's closed form).
- ``signalprop``: the real :class:`signalprop.Probe` recording every step.

Each end-of-step rung brings its values to the host in one copy. The transformer's table adds
each rung's range of per-repeat ratios (to the plain run beside it): the noise of the ratio;
``--phases`` adds each rung's extra thread CPU time in forward, backward and the optimiser step
(with the end of the step), medians over the single timed steps (robust to steps another process
interrupted). On a loaded machine ``--steps 1 --repeats 180`` interleaves single steps, which
gave steadier medians here than runs of 20 steps (every rung's setup stays outside the timed
step; signalprop's probe installs its next step's hooks inside it, as in a long run).

The last lines compute, from the measured rungs, a bound on the every-step and every-10th-step
ratios of such a design on this model and device (the ``+ norms`` rung: any design does at least
this) and the ratio of the cheapest full recording built here (``+ end`` on the MLP, ``+
updates`` on the transformer), against the issue's targets.

Usage: python benchmarks/probe_floor.py [--model mlp|transformer] [--device cpu|cuda]
    [--steps 20 (mlp), 10 (transformer)] [--repeats 9] [--threads 1] [--clock cpu|wall]
    [--phases (transformer, CPU)]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn

from signalprop import Probe, stats
from signalprop.probe.update import UpdateNorms, device_norms

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from probe_overhead import make_mlp, make_task  # noqa: E402  (the benchmark's models)

SAMPLES = stats.MAX_FORWARD_SAMPLES  # values kept per watched output (the probe's default)
#: positions of the probe's percentiles in a sorted sample (nearest rank)
_RANKS = [round(q / 100 * (SAMPLES - 1)) for q in stats.PERCENTILES]


def _nrm2() -> Callable[[np.ndarray], float] | None:
    # the cheapest host norm (BLAS dot, no underflow guard: a floor may skip what a probe
    # cannot)
    try:
        from scipy.linalg import blas
    except ImportError:
        return None
    return lambda a: math.sqrt(blas.sdot(a, a))


class Ladder:
    """One model, optimiser and batch; each rung is a training step doing a bit more."""

    RUNGS = ["plain", "loop", "sample", "hooks", "norms", "end", "signalprop"]
    LABELS = {"sample": "+ sample", "hooks": "+ hooks", "norms": "+ norms", "end": "+ end"}
    #: the rung with samples and gradient norms only (the bound), the cheapest full recording
    BOUND, FULL = "norms", "end"

    def __init__(self, device: str) -> None:
        torch.manual_seed(0)
        self.model = make_mlp().to(device)
        self.mods = list(self.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.x = torch.randn(128, 128, device=device)
        self.y = torch.randint(0, 10, (128,), device=device)
        n = 128 * 128
        self.idx = torch.arange(SAMPLES, device=device) * 67 % n  # (67: coprime with n)
        self.params = list(self.model.parameters())
        self.cpu = device == "cpu"
        self.nrm2 = _nrm2() if self.cpu else None
        self.probe = Probe(self.model, optimizer=self.opt, schedule=1)  # attached in its rung

    def _finish(self, out: torch.Tensor) -> None:
        nn.functional.cross_entropy(out, self.y).backward()

    def plain(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self._finish(self.model(self.x))
        self.opt.step()

    def _loop(self, sample: bool, hook: Callable | None, store: list) -> tuple[torch.Tensor, list]:
        x, samples = self.x, []
        for i, m in enumerate(self.mods):
            x = m(x)
            if sample and x.shape[-1] == 128:
                samples.append(torch.take(x.detach(), self.idx))
            if hook is not None and i % 2 == 1:
                x.grad_fn.register_hook(partial(hook, store))
        return x, samples

    def _norm(self, g: torch.Tensor) -> object:
        if self.nrm2 is not None:
            return self.nrm2(g.numpy().reshape(-1))
        return torch.linalg.vector_norm(g, dtype=torch.float64)

    def _pair_noop(self, store: list, gi: tuple, go: tuple) -> None:
        pass

    def _pair_norms(self, store: list, gi: tuple, go: tuple) -> None:
        store.append(self._norm(go[0]))
        store.append(self._norm(gi[0]))

    def _rung(self, sample: bool, hook: Callable | None, end: bool) -> None:
        self.opt.zero_grad(set_to_none=True)
        store: list = []
        out, samples = self._loop(sample, hook, store)
        self._finish(out)
        if end:
            self._end(samples, store)
        self.opt.step()

    def setup(self, name: str) -> Callable[[], None]:
        """Rung ``name``'s training step (the probe attached for its own rung)."""
        if name == "signalprop":
            self.probe.attach()
        return getattr(self, name)

    def teardown(self, name: str) -> None:
        if name == "signalprop":
            self.probe.detach()

    def _end(self, samples: list[torch.Tensor], store: list) -> None:
        # the cheapest bulk statistics we know: NumPy on the host (one sort for all
        # percentiles), torch on an accelerator; gradient and weight norms in two fused calls
        with torch.no_grad():
            gn = torch._foreach_norm([p.grad for p in self.params])
            wn = torch._foreach_norm(self.params)
        s = torch.stack(samples)
        if self.cpu:
            a = s.numpy()
            mean = a.mean(axis=1, dtype=np.float64)
            std = a.std(axis=1, dtype=np.float64)
            srt = np.sort(a, axis=1)
            pct = srt[:, _RANKS]
            sat = np.count_nonzero(np.abs(a) > 0.99, axis=1) / a.shape[1]
            norms = torch.cat([torch.stack(gn), torch.stack(wn)]).numpy()
            np.concatenate([mean, std, pct.reshape(-1), sat, norms, np.asarray(store)])
            return
        std, mean = torch.std_mean(s, dim=1, correction=0)
        srt = s.sort(dim=1).values
        pct = srt[:, torch.tensor(_RANKS, device=s.device)]
        sat = (s.abs() > 0.99).float().mean(dim=1)
        torch.cat([mean, std, pct.reshape(-1), sat, torch.stack(gn), torch.stack(wn),
                   torch.stack(store).float()]).cpu()

    def loop(self) -> None:
        self._rung(False, None, False)

    def sample(self) -> None:
        self._rung(True, None, False)

    def hooks(self) -> None:
        self._rung(True, self._pair_noop, False)

    def norms(self) -> None:
        self._rung(True, self._pair_norms, False)

    def end(self) -> None:
        self._rung(True, self._pair_norms, True)

    def signalprop(self) -> None:
        self.plain()


class TransformerLadder:
    """probe_overhead's GPT-2-shaped transformer (AdamW), watched where signalprop's probe
    watches it; each rung adds one ingredient (see the module docstring)."""

    RUNGS = ["plain", "sample", "hooks", "norms", "stats", "weights", "updates", "signalprop"]
    LABELS = {"sample": "+ sample", "hooks": "+ hooks", "norms": "+ norms",
              "stats": "+ out stats", "weights": "+ W/g norms", "updates": "+ updates"}
    #: the rung with samples and gradient norms only (the bound), the cheapest full recording
    BOUND, FULL = "norms", "updates"
    _LEVEL = {k: i for i, k in enumerate(RUNGS)}

    def __init__(self, device: str) -> None:
        self.task = make_task("transformer", device, "fp32")
        self.model = self.task.model
        self.opt = self.task.make_opt(self.model)
        self.params = list(self.model.parameters())
        self.cpu = device == "cpu"
        self.nrm2 = _nrm2() if self.cpu else None
        # (parameters are updated in place: views made once stay valid)
        self.wviews = [p.detach().numpy().reshape(-1) for p in self.params] if self.cpu else []
        # Adam's closed-form update norms (the package's), advanced on every optimiser step
        self.updates = UpdateNorms(self.opt, self.params)
        self.level = 0
        self.samples: list[torch.Tensor] = []
        self.gnorms: list[object] = []
        self.grad_hook: Callable | None = None
        self._handles: list = []
        #: ``--phases``: a clock timing each step's forward, backward and optimiser step (+ the
        #: end of the step), and the times of the rung set up last
        self.clock: Callable[[], float] | None = None
        self.phase_times: list[tuple[float, float, float]] = []
        # what the probe watches: one recorded step maps the model; its record names the
        # sampled outputs (modules, and activation functions called inside a module as
        # "<module>/<function>") and the blocks whose input gradient it takes
        self.probe = Probe(self.model, optimizer=self.opt, schedule=1)
        self.probe.attach()
        self.plain()
        self.probe.detach()
        rec = self.probe.record
        step = rec.steps[-1]
        self.sites = list(rec.at(step, "out_mean"))
        self.blocks = [self.model.get_submodule(n) for n in rec.at(step, "in_grad_norm")]
        self.mods: list[tuple[int, nn.Module]] = []
        self.fns: list[tuple[int, nn.Module, str, Callable]] = []
        for j, name in enumerate(self.sites):
            if "/" not in name:
                self.mods.append((j, self.model.get_submodule(name)))
                continue
            where, fname = name.split("/", 1)
            owner = self.model.get_submodule(where) if where else self.model
            # the module attribute holding the function (what the probe patches)
            attrs = [a for a, v in vars(owner).items()
                     if callable(v) and getattr(v, "__name__", None) == fname]
            if len(attrs) != 1:
                raise RuntimeError(f"{name}: no single attribute of {where!r} holds {fname}")
            self.fns.append((j, owner, attrs[0], getattr(owner, attrs[0])))
        self.idx: list[torch.Tensor | None] = [None] * len(self.sites)

    def describe(self) -> str:
        """The watched sites, by module type."""
        kinds: dict[str, int] = {}
        for _, m in self.mods:
            kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
        mods = ", ".join(f"{n} {k}" for k, n in kinds.items())
        fns = sorted({f"{a} ({getattr(f, '__name__', '?')})" for _, _, a, f in self.fns})
        return (f"watched as signalprop's probe watches it: {len(self.sites)} sampled outputs "
                f"({len(self.mods)} modules: {mods}; {len(self.fns)} calls of "
                f"{', '.join(fns)}), {len(self.sites) + len(self.blocks)} gradient norms "
                f"(those outputs and {len(self.blocks)} block inputs), "
                f"{2 * len(self.params)} weight and gradient norms, {len(self.params)} "
                f"update norms")

    # ---- hooks ----------------------------------------------------------------------------------
    def _site(self, j: int, out: torch.Tensor) -> None:
        idx = self.idx[j]
        if idx is None:  # (the probe's strided sample: its own rule, cached per site)
            idx = self.idx[j] = self.probe._sample_index(out)
        self.samples.append(torch.take(out.detach(), idx))
        if self.grad_hook is not None:
            out.grad_fn.register_prehook(partial(self.grad_hook, out.output_nr))

    def _out_hook(self, j: int, module: nn.Module, args: tuple, out: object) -> None:
        self._site(j, out[0] if type(out) is tuple else out)  # (attention: (output, None))

    def _fn_call(self, j: int, func: Callable, *args: object, **kwargs: object) -> torch.Tensor:
        out = func(*args, **kwargs)
        self._site(j, out)
        return out

    def _block_in(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        x.grad_fn.register_prehook(partial(self.grad_hook, x.output_nr))

    def _noop(self, k: int, grads: tuple) -> None:
        pass

    def _norm_hook(self, k: int, grads: tuple) -> None:
        g = grads[k]
        if self.nrm2 is not None:
            self.gnorms.append(self.nrm2(g.numpy().reshape(-1)))
        else:
            self.gnorms.append(stats.norm64(g))

    def setup(self, name: str) -> Callable[[], None]:
        """Install what rung ``name`` needs (outside the timed window: a probe that records
        every step may keep its hooks installed); returns its training step."""
        self.level = self._LEVEL[name]
        self.phase_times = []
        if name == "signalprop":
            self.probe.attach()
            return self.step
        if self.level < self._LEVEL["sample"]:
            return self.step
        self.grad_hook = None if self.level < self._LEVEL["hooks"] else (
            self._noop if self.level < self._LEVEL["norms"] else self._norm_hook)
        add = self._handles.append
        for j, m in self.mods:
            add(m.register_forward_hook(partial(self._out_hook, j)))
        for j, owner, attr, func in self.fns:
            setattr(owner, attr, partial(self._fn_call, j, func))
        if self.grad_hook is not None:
            for b in self.blocks:
                add(b.register_forward_pre_hook(self._block_in))
        return self.step

    def teardown(self, name: str) -> None:
        if name == "signalprop":
            self.probe.detach()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for _, owner, attr, func in self.fns:
            setattr(owner, attr, func)
        self.grad_hook = None

    # ---- the step -------------------------------------------------------------------------------
    def plain(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.task.loss(self.model(self.task.x)).backward()
        self.opt.step()
        self.updates.advance()

    def step(self) -> None:
        """One training step of the rung set up last (every rung, plain and signalprop's
        included; with ``clock`` set, the step's phases are timed into ``phase_times``)."""
        lv, L, clk = self.level, self._LEVEL, self.clock
        if clk is not None:
            t0 = clk()
        self.samples, self.gnorms = [], []
        self.opt.zero_grad(set_to_none=True)
        loss = self.task.loss(self.model(self.task.x))
        if clk is not None:
            t1 = clk()
        loss.backward()
        if clk is not None:
            t2 = clk()
        end = L["stats"] <= lv < L["signalprop"]
        if end:
            vals = self._sample_stats()
            if lv >= L["weights"]:
                vals.append(self._weight_norms())
            if lv >= L["updates"]:
                self.updates.before(None)
        self.opt.step()
        self.updates.advance()
        if end:
            if lv >= L["updates"]:
                vals.append(self.updates.after())
            self._to_host(vals)
        if clk is not None:
            self.phase_times.append((t1 - t0, t2 - t1, clk() - t2))

    def _sample_stats(self) -> list:
        """Moments and percentiles of the stacked samples (the stats kernels the probe uses:
        NumPy on the CPU, torch elsewhere)."""
        x = torch.stack(self.samples)
        if self.cpu:
            a = x.numpy()
            mean, std = stats.moments_host(a)
            return [mean, std, stats.percentiles_host(a, stats.PERCENTILES).reshape(-1)]
        mean, std = stats.moments(x)
        return [mean, std, stats.percentiles(x, stats.PERCENTILES).reshape(-1)]

    def _weight_norms(self) -> object:
        """||g|| and ||W|| of every parameter: on the CPU bare BLAS dots over the weights' cached
        NumPy views and the gradients' (in a step here 0.7-0.95 ms, against 1.0-1.4 ms for
        ``torch._foreach_norm`` over the same 298 tensors and ~0.2 ms more for the guarded
        ``stats.host_norms`` / ``stats.HostNorms`` the probe uses); elsewhere one fused call
        (the probe's ``device_norms``)."""
        nrm = self.nrm2
        if nrm is None:
            with torch.no_grad():
                return device_norms([p.grad for p in self.params] + self.params)
        return [nrm(p.grad.numpy().reshape(-1)) for p in self.params] + \
            [nrm(w) for w in self.wviews]

    def _to_host(self, vals: list) -> None:
        """Everything of the step on the host, in one copy (on an accelerator)."""
        if self.cpu:
            np.concatenate([v.numpy() if isinstance(v, torch.Tensor) else v for v in vals] +
                           [np.asarray(self.gnorms)])
            return
        torch.cat([v.reshape(-1).to(torch.float64) for v in vals] +
                  [torch.stack(self.gnorms).reshape(-1)]).cpu()


def _print_table(rungs: list[str], labels: dict[str, str], times: dict[str, list[float]],
                 spread: bool) -> None:
    """The medians, ratios and increments (``spread``: each repeat's ratio to the plain run
    beside it, min and max: the noise of the ratio; the MLP's table is printed as before)."""
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["plain"]
    print(f"{'rung':12s} {'ms/step':>8s} {'ratio':>7s} {'this rung adds':>15s}" +
          ("" if not spread else f" {'repeats':>15s}"))
    prev = base
    for k in rungs:
        m = med[k]
        add = "" if k in ("plain", "signalprop") else f"{(m - prev) / base:+14.1%}"
        paired = [a / b for a, b in zip(times[k], times["plain"], strict=True)]
        rng = "" if not spread or k == "plain" else f" [{min(paired):.3f}, {max(paired):.3f}]"
        print(f"{labels.get(k, k):12s} {1e3 * m:8.3f} {m / base:7.3f}x {add:>15s}" +
              (rng.rjust(16) if rng else ""))
        if k != "signalprop":
            prev = m


def _print_verdicts(hook_floor: float, full: float, mlp: bool) -> None:
    """The bound (samples and gradient norms only) and the cheapest full recording built here,
    against issue 12's targets."""
    if mlp:
        print(f"\nsampling every output and taking every output gradient's norm, nothing else: "
              f"{hook_floor:.3f}x every step;")
        print(f"with the end-of-step statistics: {full:.3f}x every step, so about "
              f"{1 + (full - 1) / 10:.3f}x recording every 10th step (unrecorded steps free).")
    else:
        print(f"\nsampling every watched output and taking its gradient's norm (and the block "
              f"inputs'), nothing else: {hook_floor:.3f}x every step;")
        print(f"with the end-of-step statistics, weight and gradient norms and Adam's update "
              f"norms: {full:.3f}x every step, so about {1 + (full - 1) / 10:.3f}x recording "
              f"every 10th step (unrecorded steps free).")
    # the bound: samples and norms only (any design must do at least this); the cheapest full
    # recording built here adds the end-of-step statistics (weight and gradient norms included,
    # which a full probe records): not a bound, the best we know
    for what, target, bound, best in (
            ("every step", 1.10, hook_floor, full),
            ("every 10th step", 1.02, 1 + (hook_floor - 1) / 10, 1 + (full - 1) / 10)):
        if bound > target:
            verdict = "below the bound: no hook-based eager design reaches it on this model here"
        elif best > target:
            verdict = (f"above the bound, below the cheapest full recording built here "
                       f"({best:.3f}x)")
        else:
            verdict = "reachable"
        print(f"target {what} <= {target:.2f}x vs bound {bound:.3f}x: {verdict}")


def _print_phases(rungs: list[str], labels: dict[str, str],
                  phases: dict[str, list[tuple[float, float, float]]]) -> None:
    """Per-step medians of each phase (plain absolute, the rungs' extra) and of whole steps:
    a median over single steps sets aside the steps another process interrupted."""
    med = {k: [statistics.median(ph[i] for ph in v) for i in range(3)] + [
        statistics.median(sum(ph) for ph in v)] for k, v in phases.items()}
    base = med["plain"]
    print(f"\nper phase, ms (thread CPU time, medians of {len(phases['plain'])} steps; plain, "
          f"then each rung's extra)")
    print(f"{'rung':12s} {'forward':>9s} {'backward':>9s} {'step+end':>9s} {'whole step':>11s}"
          f" {'ratio':>7s}")
    for k in rungs:
        m = med[k]
        cells = [f"{1e3 * v:9.2f}" if k == "plain" else f"{1e3 * (v - b):+9.2f}"
                 for v, b in zip(m[:3], base[:3], strict=True)]
        print(f"{labels.get(k, k):12s} {' '.join(cells)} {1e3 * m[3]:11.2f} "
              f"{m[3] / base[3]:6.3f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["mlp", "transformer"], default="mlp",
                    help="probe_overhead.py's MLP (SGD) or GPT-2-shaped transformer (AdamW)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per timed run (default 20 mlp, 10 transformer)")
    ap.add_argument("--repeats", type=int, default=9, help="interleaved repeats of each rung")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default=None,
                    help="cpu: this process's CPU time (default on the CPU); wall (default on CUDA)")
    ap.add_argument("--phases", action="store_true",
                    help="transformer, CPU: also each rung's extra thread CPU time in forward, "
                         "backward and the optimiser step (+ the end of the step), per-step "
                         "medians of the same timed steps")
    args = ap.parse_args(argv)
    if args.phases and (args.model != "transformer" or args.device != "cpu"):
        print("--phases is for --model transformer on the CPU", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    if args.clock == "cpu" and args.device == "cuda":
        print("--clock cpu measures the host only; use wall time on CUDA", file=sys.stderr)
        return 2
    steps = args.steps if args.steps is not None else (20 if args.model == "mlp" else 10)
    if steps < 1 or args.repeats < 1:
        print("--steps and --repeats must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    clock_name = args.clock or ("cpu" if args.device == "cpu" else "wall")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    mlp = args.model == "mlp"
    lad = Ladder(args.device) if mlp else TransformerLadder(args.device)
    rungs, labels = lad.RUNGS, lad.LABELS

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    phases: dict[str, list[tuple[float, float, float]]] = {k: [] for k in rungs}

    def timed(name: str) -> float:
        fn = lad.setup(name)
        sync()
        t0 = clock()
        for _ in range(steps):
            fn()
        sync()
        t = clock() - t0
        lad.teardown(name)
        if args.phases:
            phases[name] += lad.phase_times
        return t / steps

    for name in rungs:  # warm-up (the probe's first recorded step maps the layers)
        for _ in range(3):
            timed(name)
    if args.phases:
        lad.clock = time.thread_time
    times: dict[str, list[float]] = {k: [] for k in rungs}
    for _ in range(args.repeats):
        for name in rungs:
            times[name].append(timed(name))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["plain"]
    dev = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"CPU, {args.threads} thread(s)"
    what = "20 x 128 tanh MLP, batch 128, SGD" if mlp else lad.task.name
    print(f"{what}; {dev}; torch {torch.__version__}")
    if not mlp:
        print(lad.describe())
    print(f"{steps} steps x {args.repeats} interleaved repeats, {clock_name} clock, medians; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    _print_table(rungs, labels, times, spread=not mlp)
    if args.phases:
        _print_phases(rungs, labels, phases)
    _print_verdicts(med[lad.BOUND] / base, min(med[lad.FULL], med["signalprop"]) / base, mlp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
