"""Update norms ||W_after - W_before|| in the training loop: the ways the probe can take them.

Trains ``probe_overhead.py``'s model (``--model transformer``: AdamW; ``mlp``: SGD) on the CPU
with no probe and, after every optimiser step, times the probe's ``UpdateNorms`` for the same
step (its ``before`` just ahead of the step, its ``after`` just behind it: the state is where
the probe meets it, not warm from a repeat). Variants, interleaved (each a run of ``--steps``
steps, ``--repeats`` times), medians of the per-step process time:

- ``closed form, NumPy``: the CPU's path (each large tensor's state read in place by NumPy, the
  decay term by BLAS dots; the small tensors gathered);
- ``closed form, torch``: the path accelerators take, here on the CPU (one launch per pass);
- ``weight copy``: the fallback for optimisers without a closed form (copy before, subtract and
  norm after).

(Accuracy is the tests' business: tests/probe/test_update.py checks every path against the
weights' actual change.)

Usage: python benchmarks/update_norms.py [--model transformer|mlp] [--steps 10] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import probe_overhead as PO  # noqa: E402  (the benchmark's models and training loop)

from signalprop.probe import update  # noqa: E402

VARIANTS = {"closed form, NumPy": ("auto", True), "closed form, torch": ("auto", False),
            "weight copy": ("copy", True)}


def timed_steps(task: PO.Task, opt: torch.optim.Optimizer, upd: update.UpdateNorms,
                host: bool, steps: int) -> float:
    """Per-step process time of ``upd`` over ``steps`` training steps."""
    update.HOST_NUMPY = host
    params = upd.params
    spent = 0.0
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        task.loss(task.model(task.x)).backward()
        # (outside the timing: the probe takes the gradient norms anyway)
        gn = update.device_norms([p.grad for p in params])
        t = time.process_time()
        upd.before(gn)
        spent += time.process_time() - t
        opt.step()
        t = time.process_time()
        upd.advance()
        upd.after()
        spent += time.process_time() - t
        upd.release()
    return spent / steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["mlp", "transformer"], default="transformer")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed run")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved runs of each variant")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    task = PO.make_task(args.model, "cpu", "fp32")
    opt = task.make_opt(task.model)
    params = list(task.model.parameters())
    PO.train(task, opt, 3, None)  # (state exists: the closed forms have something to read)
    upds = {k: update.UpdateNorms(opt, params, method=m) for k, (m, _) in VARIANTS.items()}
    for u in upds.values():  # (the probe reads the step count once, when it attaches)
        u.steps_taken = [u._initial_step(g) for g in opt.param_groups]
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for _ in range(args.repeats):
        for k, (_, host) in VARIANTS.items():
            times[k].append(timed_steps(task, opt, upds[k], host, args.steps))
            for other in upds.values():  # (each counts every optimiser step, as in a probe)
                other.steps_taken = list(upds[k].steps_taken)
    update.HOST_NUMPY = True
    print(f"{task.name}; {upds['closed form, NumPy'].method} closed form; "
          f"{sum(p.numel() for p in params)} parameters in {len(params)} tensors")
    print(f"{'variant':22s} {'ms/step':>8s}")
    for k in VARIANTS:
        print(f"{k:22s} {1e3 * statistics.median(times[k]):8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
