"""Time ``signalprop.theory.critical_point`` for every registered activation (target: < 50 ms).

Prints the median wall time of ``--repeats`` calls per (activation, sigma_b^2) after one warm-up
call (which fills the quadrature-rule caches), and the result. The machine may be shared: treat
the numbers as indicative and compare medians.

    python benchmarks/theory_speed.py [--repeats 7] [--sigma-b2 0.0 0.05]
"""

from __future__ import annotations

import argparse
import statistics
import time

from signalprop.theory import NoCriticalPoint, activation_names, critical_point

TARGET_MS = 50.0


def time_one(name: str, sb2: float, repeats: int) -> tuple[float, str]:
    def call() -> str:
        try:
            cp = critical_point(name, sb2)
        except NoCriticalPoint:
            return "none"
        return f"sigma_w={cp.sigma_w:.5f}"

    call()  # warm-up: Gauss-Hermite/Legendre rules are cached after the first use
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sigma-b2", type=float, nargs="+", default=[0.0, 0.05])
    args = ap.parse_args()
    rows = []
    for sb2 in args.sigma_b2:
        for name in activation_names():
            ms, out = time_one(name, sb2, args.repeats)
            rows.append((name, sb2, ms, out))
    print(f"{'activation':12s} {'sigma_b2':>8s} {'median ms':>10s}  result")
    for name, sb2, ms, out in rows:
        flag = "" if ms < TARGET_MS else f"  (over {TARGET_MS:g} ms)"
        print(f"{name:12s} {sb2:8g} {ms:10.2f}  {out}{flag}")
    worst = max(rows, key=lambda r: r[2])
    print(f"\nslowest: {worst[0]} at sigma_b2={worst[1]:g}: {worst[2]:.1f} ms; median over all: "
          f"{statistics.median(r[2] for r in rows):.1f} ms (target < {TARGET_MS:g} ms)")


if __name__ == "__main__":
    main()
