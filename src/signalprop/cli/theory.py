"""``signalprop theory {critical, phase, bn-rate}``: mean-field predictions on the command line.

- ``signalprop theory critical --activation tanh --sigma-b2 0.05 [--json]``: the edge of chaos
  (sigma_w, sigma_w^2, q*, chi_1), or ``sigma_w: null`` and the ``reason`` when none exists
  (exit status 0 either way).
- ``signalprop theory phase --activation tanh --out phase.png``: chi_1 over (sigma_w, sigma_b^2)
  with the critical line and contours of the gradient depth scale.
- ``signalprop theory bn-rate --activation relu --batch-size 32 [--json]``: the per-layer growth
  of the squared gradient norm in a deep batch-normalised network (Yang et al. 2019).

``--activation`` takes a registered name (``--activation leaky_relu -p negative_slope=0.2``) or a
callable by import path, ``package.module:function`` or ``path/to/file.py:function`` (imported,
never evaluated as a string).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from signalprop._imports import load_callable as _load


def register(group: click.Group) -> None:
    """Add the ``theory`` command group to the CLI."""
    group.add_command(theory_group)


@click.group("theory")
def theory_group() -> None:
    """Mean-field theory: edge of chaos, phase diagram, batch-norm gradient explosion."""


def _parse_params(params: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in params:
        key, sep, val = p.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--param expects KEY=VALUE, got {p!r}")
        try:
            out[key] = float(val)
        except ValueError:
            raise ValueError(f"--param {key}: {val!r} is not a number") from None
    return out


def load_callable(target: str) -> Any:
    """Import ``package.module:attr`` or ``path/to/file.py:attr`` (see signalprop._imports)."""
    return _load(target, what="activation")


def resolve_cli_activation(name: str, params: tuple[str, ...] = ()) -> Any:
    """A registered activation (with ``--param`` hyper-parameters) or an imported callable."""
    from signalprop.theory import get_activation  # lazy: torch (see signalprop.cli)

    hp = _parse_params(params)
    if ":" in name:
        if hp:
            raise ValueError("--param applies to registered activation names only")
        return get_activation(load_callable(name))
    try:
        return get_activation(name, **hp)
    except TypeError as e:
        if hp and "unexpected keyword argument" in str(e):
            raise ValueError(f"--param: activation {name!r} does not take {', '.join(hp)} "
                             f"({e})") from None
        raise


_ACT_HELP = (
    "registered name (linear, relu, leaky_relu, elu, selu, gelu, silu, softplus, sigmoid, tanh, "
    "softsign, hardtanh, erf, gaussian, sin) or module:function / file.py:function"
)


def _echo_json(obj: dict[str, Any]) -> None:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    click.echo(json.dumps({k: clean(v) for k, v in obj.items()}, indent=2))


@theory_group.command("critical")
@click.option("--activation", "-a", required=True, help=_ACT_HELP)
@click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE",
              help="Activation hyper-parameter, e.g. negative_slope=0.2 (repeatable).")
@click.option("--sigma-b2", type=float, default=0.0, show_default=True,
              help="Bias variance sigma_b^2.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def critical_cmd(activation: str, params: tuple[str, ...], sigma_b2: float, as_json: bool
                 ) -> None:
    """The edge of chaos: sigma_w with chi_1 = 1 (Schoenholz et al. 2017)."""
    from signalprop.theory import (  # lazy: torch (see signalprop.cli)
        NoCriticalPoint,
        critical_point,
        xi_q,
    )

    act = resolve_cli_activation(activation, params)
    if sigma_b2 < 0 or not math.isfinite(sigma_b2):
        raise ValueError(f"--sigma-b2 must be finite and >= 0, got {sigma_b2}")
    try:
        cp = critical_point(act, sigma_b2)
    except NoCriticalPoint as e:
        out = {"activation": act.name, "sigma_b2": sigma_b2, "sigma_w": None, "sigma_w2": None,
               "q_star": None, "chi_1": None, "reason": e.reason}
        if as_json:
            _echo_json(out)
        else:
            click.echo(f"{act.name} at sigma_b^2 = {sigma_b2:g}: no critical point")
            click.echo(f"  reason: {e.reason.split(': no critical point: ', 1)[-1]}")
        return
    d = cp.as_dict()
    d["reason"] = None
    if as_json:
        _echo_json(d)
        return
    q = cp.q_star
    qtxt = ("any (every q is a fixed point)" if math.isnan(q)
            else "0 (limit q* -> 0)" if q == 0 else f"{q:.6g}")
    click.echo(f"{act.name} at sigma_b^2 = {sigma_b2:g}: edge of chaos")
    click.echo(f"  sigma_w   = {cp.sigma_w:.6g}   (sigma_w^2 = {cp.sigma_w2:.6g}; weights ~ "
               "N(0, sigma_w^2 / fan_in))")
    click.echo(f"  q*        = {qtxt}")
    click.echo(f"  chi_1     = {cp.chi_1:.6g}   (per-layer growth of the squared gradient norm)")
    if cp.kind == "fixed-point":
        xq = xi_q(act, cp.sigma_w2, sigma_b2)
        click.echo(f"  q-map slope at q* = {cp.q_slope:.4g} (stable; q^l reaches q* on a depth "
                   f"scale xi_q = {xq:.3g} layers)")
    if cp.note:
        click.echo(f"  note: {cp.note}")


@theory_group.command("phase")
@click.option("--activation", "-a", required=True, help=_ACT_HELP)
@click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE",
              help="Activation hyper-parameter (repeatable).")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="Output image (.png, .pdf, .svg).")
@click.option("--sigma-w-max", type=float, default=None,
              help="Largest sigma_w on the x axis (default: 2.5 x the critical sigma_w, >= 3).")
@click.option("--sigma-b2-max", type=float, default=0.5, show_default=True,
              help="Largest sigma_b^2 on the y axis.")
@click.option("--resolution", type=click.IntRange(8, 400), default=48, show_default=True,
              help="Grid points along sigma_w (2/3 as many along sigma_b^2).")
def phase_cmd(activation: str, params: tuple[str, ...], out: str, sigma_w_max: float | None,
              sigma_b2_max: float, resolution: int) -> None:
    """Order-to-chaos phase diagram: chi_1 over (sigma_w, sigma_b^2), the critical line and the
    gradient depth scale (Poole et al. 2016; Schoenholz et al. 2017)."""
    import numpy as np

    from signalprop.theory import (  # lazy: torch (see signalprop.cli)
        NoCriticalPoint,
        critical_line,
        critical_point,
        phase_diagram,
    )

    act = resolve_cli_activation(activation, params)
    if not (sigma_b2_max > 0 and math.isfinite(sigma_b2_max)):
        raise ValueError(f"--sigma-b2-max must be > 0, got {sigma_b2_max}")
    if sigma_w_max is None:
        try:
            sw_c = critical_point(act, 0.0).sigma_w
        except NoCriticalPoint:
            sw_c = 1.5
        sigma_w_max = max(3.0, 2.5 * sw_c)
    if not (sigma_w_max > 0 and math.isfinite(sigma_w_max)):
        raise ValueError(f"--sigma-w-max must be > 0, got {sigma_w_max}")
    out_path = Path(out)
    if not out_path.parent.exists():
        raise FileNotFoundError(f"output directory {str(out_path.parent)!r} does not exist")
    from signalprop.errors import check_out_dir  # lazy: torch (see signalprop.cli)

    check_out_dir(out_path.parent, what="the folder of --out")  # before the computation

    sw = np.linspace(sigma_w_max / resolution, sigma_w_max, resolution)
    sb = np.linspace(0.0, sigma_b2_max, max(6, (2 * resolution) // 3))
    pd = phase_diagram(act, sw, sb)
    line_b = sigma_b2_max * np.linspace(0.0, 1.0, 25) ** 2  # denser near sigma_b = 0
    line = critical_line(act, line_b)
    fig = plot_phase_diagram(pd, line, act.name)
    fig.savefig(out_path, dpi=130, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    n_ok = int(np.sum(np.isfinite(line.sigma_w)))
    click.echo(f"wrote {out_path} (chi_1 on a {sb.size} x {sw.size} grid; critical line found at "
               f"{n_ok}/{line_b.size} sigma_b^2 values)")
    reasons = {r.split(": no critical point: ", 1)[-1] for r in line.reasons if r}
    for r in sorted(reasons)[:3]:
        click.echo(f"  no critical point where: {r}")


def plot_phase_diagram(pd: dict[str, Any], line: Any, name: str) -> Any:
    """Figure: log chi_1 heat map (diverging at chi_1 = 1), the critical line, xi contours."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    sw, sb = pd["sigma_w"], pd["sigma_b2"]
    chi = np.asarray(pd["chi_1"], dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        lc = np.log10(np.where(chi > 0, chi, np.nan))
    # colours saturate at a factor 10 per layer: the interesting structure is near chi_1 = 1
    lim = 1.0
    fig, ax = plt.subplots(figsize=(7.0, 4.8))
    mesh = ax.pcolormesh(sw, sb, np.clip(lc, -lim, lim), shading="auto", cmap="RdBu_r",
                         norm=TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim))
    cb = fig.colorbar(mesh, ax=ax, extend="both")
    cb.set_label(r"$\log_{10}\chi_1$  (<0 ordered: gradients vanish; >0 chaotic: explode)")
    # depth scale xi = 1/|ln chi_1|: contours of log10 chi_1 at +-log10(e)/xi (a smooth field,
    # unlike xi itself, which diverges on the critical line)
    xis = (3.0, 10.0, 30.0)
    lv = sorted([s * math.log10(math.e) / x for x in xis for s in (-1.0, 1.0)])
    names = {round(v, 12): rf"$\xi$={x:g}" for x in xis for v in
             (math.log10(math.e) / x, -math.log10(math.e) / x)}
    try:
        cs = ax.contour(sw, sb, lc, levels=lv, colors="k", linewidths=0.6, alpha=0.55)
        ax.clabel(cs, fmt=lambda v: names.get(round(v, 12), ""), fontsize=7)
    except (ValueError, TypeError):  # a flat field has no contours
        pass
    ok = np.isfinite(line.sigma_w)
    if np.any(ok):
        ax.plot(line.sigma_w[ok], line.sigma_b2[ok], "k-", lw=2.2,
                label=r"critical line $\chi_1 = 1$")
        ax.legend(loc="upper left", fontsize=8, framealpha=0.8)
    ax.set_xlabel(r"$\sigma_w$  (weights $\sim \mathcal{N}(0, \sigma_w^2/\mathrm{fan\_in})$)")
    ax.set_ylabel(r"$\sigma_b^2$  (bias variance)")
    ax.set_title(f"{name}: order-to-chaos phase diagram; contours: depth scale "
                 r"$\xi = 1/|\ln\chi_1|$ (layers)", fontsize=9)
    ax.set_xlim(sw.min(), sw.max())
    ax.set_ylim(sb.min(), sb.max())
    return fig


@theory_group.command("bn-rate")
@click.option("--activation", "-a", required=True, help=_ACT_HELP)
@click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE",
              help="Activation hyper-parameter (repeatable).")
@click.option("--batch-size", "-B", type=int, required=True, help="Batch size B >= 4.")
@click.option("--method", type=click.Choice(["auto", "closed", "quadrature"]), default="auto",
              show_default=True, help="Closed form (relu, linear) or quadrature.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def bn_rate_cmd(activation: str, params: tuple[str, ...], batch_size: int, method: str,
                as_json: bool) -> None:
    """Gradient explosion rate of a deep batch-normalised network at initialisation (Yang et al.
    2019): per-layer growth factor of the squared gradient norm."""
    from signalprop.theory import bn_gradient_rate  # lazy: torch (see signalprop.cli)

    act = resolve_cli_activation(activation, params)
    rate = bn_gradient_rate(act, batch_size, method=method)
    used = "closed" if (method != "quadrature" and act.name in ("relu", "linear")
                        and not act.hparams) else "quadrature"
    d: dict[str, Any] = {"activation": act.name, "batch_size": batch_size, "rate": rate,
                         "method": used, "depth_to_1000x": math.log(1000.0) / math.log(rate)
                         if rate > 1 else None}
    if act.name == "relu":
        d["large_batch_limit"] = math.pi / (math.pi - 1.0)
    elif act.name == "linear":
        d["large_batch_limit"] = 1.0
    if as_json:
        _echo_json(d)
        return
    click.echo(f"{act.name}, batch size {batch_size}: squared gradient norm grows by "
               f"{rate:.6g} per layer towards the input ({used})")
    if d["depth_to_1000x"] is not None:
        click.echo(f"  a factor 1000 after {d['depth_to_1000x']:.1f} layers")
    if "large_batch_limit" in d:
        click.echo(f"  large-batch limit: {d['large_batch_limit']:.6g}")
