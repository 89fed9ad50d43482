"""Critical initialisation for an activation signalprop has never heard of.

The activation here is the inverse square root unit, ISRU(x) = x / sqrt(1 + x^2) (Carlile et al.
2017): smooth, odd, bounded like tanh. Mean-field theory (Poole et al. 2016; Schoenholz et al.
2017) needs only phi and phi' (taken by autograd from the torch function), and gives

- chi_1 = sigma_w^2 E[phi'(sqrt(q*) z)^2], the factor by which the squared gradient norm grows
  per layer going backwards: < 1 vanishes, > 1 explodes;
- the edge of chaos sigma_w^2 where chi_1 = 1 (``theory.critical_point``).

The script builds a deep ISRU MLP twice, with PyTorch's default init and with
``signalprop.init.critical_``, measures ||dL/dh|| at the first and last layer with a probe on one
batch, and prints measurement beside prediction: over L layers the squared ratio should be about
chi_1^(L-1).

    python examples/critical_init_custom_activation.py [--depth 30] [--width 256] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch import nn

import signalprop
from signalprop import theory
from signalprop.init import critical_


def isru(x: torch.Tensor) -> torch.Tensor:
    """Inverse square root unit: x / sqrt(1 + x^2)."""
    return x * torch.rsqrt(1.0 + x * x)


class ISRU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return isru(x)


def mlp(depth: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), ISRU()]
    return nn.Sequential(*layers)


def first_last_ratio(model: nn.Sequential, x: torch.Tensor) -> float:
    """||dL/dh_1|| / ||dL/dh_L|| at the Linear outputs, measured by a probe on one batch."""
    probe = signalprop.Probe(model, forward=False, weights=False)
    with probe:
        out = model(x)
        # an isotropic random readout, so dL/dh_L has no preferred direction
        loss = (out * torch.randn_like(out)).sum()
        loss.backward()
        probe.step()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    g = probe.record.at(0, "out_grad_norm")
    return g[linears[0]] / g[linears[-1]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=30)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--sigma-b2", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=None, help="also write the table as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    depth, width, sb2 = args.depth, args.width, args.sigma_b2

    cp = theory.critical_point(isru, sigma_b2=sb2)
    print(f"ISRU edge of chaos at sigma_b^2 = {sb2}: sigma_w = {cp.sigma_w:.4f} "
          f"(sigma_w^2 = {cp.sigma_w2:.4f}), q* = {cp.q_star:.4f}, chi_1 = {cp.chi_1:.4f}")

    # PyTorch's nn.Linear default: W ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), Var W = 1/(3 fan_in)
    default_sw2, default_sb2 = 1.0 / 3.0, 1.0 / (3.0 * width)
    chi_default = theory.chi_1(isru, default_sw2, default_sb2)

    # inputs scaled so that the first pre-activation starts at the fixed point q*
    x = torch.randn(128, width) * math.sqrt(max(cp.q_star - sb2, 0.0) / cp.sigma_w2)
    net = mlp(depth, width)
    r_default = first_last_ratio(net, x)
    critical_(net, activation=isru, sigma_b2=sb2)
    r_critical = first_last_ratio(net, x)

    rows = [
        ("default init", chi_default, r_default),
        ("critical_ init", cp.chi_1, r_critical),
    ]
    print(f"\n{depth}-layer ISRU MLP, width {width}: gradient at layer 1 / layer {depth}")
    print(f"{'':16s} {'chi_1':>8s} {'predicted':>11s} {'measured':>11s}")
    table = []
    for name, chi, measured in rows:
        predicted = math.sqrt(chi ** (depth - 1))  # chi_1 scales the *squared* norm per layer
        print(f"{name:16s} {chi:8.4f} {predicted:11.3e} {measured:11.3e}")
        table.append({"init": name, "chi_1": chi, "predicted": predicted, "measured": measured})
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "critical_init.json"
        path.write_text(json.dumps({"critical_point": cp.sigma_w2, "rows": table}, indent=2))
        print(f"table: {path}")


if __name__ == "__main__":
    main()
