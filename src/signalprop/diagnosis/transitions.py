"""Reading a record for :mod:`signalprop.diagnosis.explain`: the blocks between consecutive
weight layers, and per block the measured and the mean-field predicted factor of the squared
backward signal (:class:`Transition`). The numbers; explain.py decides and says what they mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from signalprop.probe.modules import activation_kind
from signalprop.record import Record
from signalprop.theory import bn_gradient_rate, gaussian_expectations, get_activation
from signalprop.theory.torch_adapter import resolve_activation

_BN = "BatchNorm"


@dataclass
class Transition:
    """The predicted and measured factor between weight layers l and l+1 at one step.

    Attributes:
        layer, next_layer: Weight-layer module names (h_l, h_{l+1} are their outputs).
        index: 1-based index l of ``layer`` among the weight layers.
        block: ``"elementwise"``, ``"batchnorm"``, ``"residual"`` or ``"unknown"``.
        modules: Module types between the two weight layers (``["Sigmoid"]``).
        activation: The activation's name (``None`` when there is none or it is unknown).
        q: Measured E[h_l^2] (pre-activation second moment).
        mean: Measured mean of h_l (over batch and units; ~0 for zero-mean weights and biases).
        sigma_w2: Measured fan_in Var(W_{l+1}).
        e_dphi2: E[phi'(sqrt(q) z)^2] (element-wise blocks).
        chi: Predicted ratio of squared gradient norms r_l (NaN when not predicted).
        measured: Measured ratio of squared gradient norms.
    """

    layer: str
    next_layer: str
    index: int
    block: str
    modules: list[str]
    activation: str | None
    q: float
    mean: float
    sigma_w2: float
    e_dphi2: float
    chi: float
    measured: float


# --- reading the record ---------------------------------------------------------------------
def _first_finite_step(record: Record, names: list[str], last: bool) -> int | None:
    """The first (last) step whose gradient norms are finite and > 0 and whose forward
    statistics are finite, for every weight layer."""
    steps = record.steps[::-1] if last else record.steps
    for s in steps:
        g = [record.get(s, n, "out_grad_norm") for n in names]
        f = [record.get(s, n, k) for n in names[:-1] for k in ("out_mean", "out_std")]
        if all(math.isfinite(x) and x > 0 for x in g) and all(math.isfinite(x) for x in f):
            return s
    return None


def _second_moment(record: Record, step: int, layer: str) -> float:
    m, s = record.get(step, layer, "out_mean"), record.get(step, layer, "out_std")
    return m * m + s * s


def _weight_scale(record: Record, step: int, param: str, default: float = math.nan) -> float:
    """fan_in Var(W) ~= ||W||_F^2 / fan_out."""
    info = record.layers.get(param)
    w = record.get(step, param, "weight_norm")
    if info is None or not info.shape or not math.isfinite(w):
        return default
    return w * w / info.shape[0]


def _bias_scale(record: Record, step: int, layers: list[str]) -> float:
    """Median Var(b) = ||b||^2 / numel over the given weight layers' biases (0 without biases)."""
    vals = []
    for m in layers:
        info = record.layers.get(f"{m}.bias")
        b = record.get(step, f"{m}.bias", "weight_norm")
        if info is not None and info.shape and math.isfinite(b):
            vals.append(b * b / max(1, int(np.prod(info.shape))))
    return float(np.median(vals)) if vals else 0.0


def _resolve(kind: str | None, module: Any) -> Any:
    """A theory Activation for a block's activation: the module itself when we have it (exact for
    default-configured torch modules, autograd for anything else), else the recorded kind."""
    if module is not None:
        try:
            return resolve_activation(module)
        except (TypeError, ValueError):
            pass
    if kind is None:
        return None
    try:
        return get_activation(kind)
    except ValueError:
        return None


def _is_elementwise(module: Any, shape: list[int] | None) -> bool:
    """Whether an unlabelled, parameter-free module acts element-wise: f(x)[perm] == f(x[perm])
    along the features, and a row's output does not depend on the other rows."""
    if module is None or any(True for _ in module.parameters()):
        return False
    n = int(np.prod(shape)) if shape else 16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, min(n, 64), generator=gen, dtype=torch.float64)
    perm = torch.randperm(x.shape[1], generator=gen)
    try:
        with torch.no_grad():
            y = module(x)
            ok = (y.shape == x.shape
                  and torch.allclose(module(x[:, perm]), y[:, perm])
                  and torch.allclose(module(x[:1]), y[:1]))
    except Exception:  # noqa: BLE001 - any failure means "not usable as an element-wise map"
        return False
    return bool(ok)


def _acts_elementwise(info: Any, module: Any) -> bool:
    """Whether a recorded module (or functional call) is an element-wise activation: a torch
    activation class or a declared ``signalprop_activation`` is; any other module we can run
    must pass :func:`_is_elementwise` (a probe label inferred from the functions it calls, e.g.
    "sigmoid" for x * sigmoid(x), says nothing about the whole map); without the module (a
    functional call, no model) the record's label is all there is."""
    if module is None:
        return info.activation is not None
    if activation_kind(module) is not None:
        return True
    return _is_elementwise(module, info.shape)


def _residual_alphas(record: Record, model: Any, ctx: Any) -> dict[str, tuple[str, float]]:
    """Weight layers that are the only weight layer of a skip-connection block x + alpha f(x):
    weight layer -> (block name, alpha). Blocks are found in the model (signalprop's
    ``Residual``) or marked by the probe (``LayerInfo.residual``)."""
    cands: dict[str, float] = {}
    if model is not None:
        for name, m in model.named_modules():
            if type(m).__name__ == "Residual" and hasattr(m, "block") and name:
                cands[name] = float(getattr(m, "alpha", 1.0))
    for info in record.layers.values():
        if getattr(info, "residual", None):
            cands.setdefault(info.module or info.name, 1.0)
    out: dict[str, tuple[str, float]] = {}
    for r, a in cands.items():
        inside = [w for w in ctx.weight_layers
                  if (getattr(record.layers.get(w), "module", None) or w).startswith(r + ".")]
        if len(inside) == 1:
            out[inside[0]] = (r, a)
    return out


def _blocks(record: Record, model: Any, ctx: Any) -> list[tuple[str, list[str], Any, str | None]]:
    """For each transition l -> l+1: (block kind, module types, theory activation, act name).

    Kinds: ``"elementwise"``, ``"batchnorm"`` (BN then phi), ``"residual"`` (W_{l+1} is the
    weight layer of a skip block x + alpha phi(W x + b); phi before it may be absent) and
    ``"unknown"``.
    """
    mods = dict(model.named_modules()) if model is not None else {}
    res = _residual_alphas(record, model, ctx)
    modules = sorted((i for i in record.layers.values() if i.role == "module"),
                     key=lambda i: i.depth)
    L = ctx.weight_layers
    between_of = [[i for i in modules if ctx.block.get(i.name) == j + 1 and i.name != L[j]]
                  for j in range(ctx.depth)]
    out = []
    for j in range(ctx.depth - 1):
        between = between_of[j]
        types = [i.type for i in between]
        acts, bn, other = [], False, []
        for i in between:
            mod = mods.get(i.module or i.name)  # a call site "act#2" is module "act"
            if _BN in i.type:
                bn = True
            elif _acts_elementwise(i, mod):
                acts.append((i.activation, mod))
            else:
                other.append(i.type)
        if L[j + 1] in res and not bn and not other and len(acts) <= 1:
            # the branch must be [W, phi] inside the block: the modules after W_{l+1} are in it
            r = res[L[j + 1]][0]
            nxt = between_of[j + 1] if j + 1 < ctx.depth - 1 else []
            if nxt and all((i.module or i.name).startswith(r + ".") for i in nxt):
                act = _resolve(*acts[0]) if acts else None
                if acts and act is None:
                    out.append(("unknown", types, None, acts[0][0]))
                else:
                    out.append(("residual", types or ["(skip)"], act,
                                act.name if act is not None else None))
                continue
        if len(acts) != 1 or other:
            out.append(("unknown", types, None, None))
            continue
        act = _resolve(*acts[0])
        if act is None:
            out.append(("unknown", types, None, acts[0][0]))
            continue
        out.append(("batchnorm" if bn else "elementwise", types, act, act.name))
    return out, res


def _transitions(record: Record, ctx: Any, blocks: list, step: int, batch_size: int | None,
                 res: dict[str, tuple[str, float]] | None = None) -> list[Transition]:
    L = ctx.weight_layers
    cache: dict[tuple[Any, ...], float] = {}

    def memo(fn: Any, act: Any, *args: Any) -> float:
        key = (fn, id(act), *args)
        if key not in cache:
            cache[key] = fn(act, *args)
        return cache[key]

    g = [record.get(step, m, "out_grad_norm") for m in L]
    q = [_second_moment(record, step, m) for m in L]
    out = []
    for j, (kind, types, act, name) in enumerate(blocks):
        sw2 = _weight_scale(record, step, ctx.weight_params[L[j + 1]])
        with np.errstate(divide="ignore", invalid="ignore"):
            meas = (g[j] / g[j + 1]) ** 2
        e2 = chi = math.nan
        res = res or {}
        a2 = res[L[j]][1] ** 2 if L[j] in res else 1.0  # h_l feeds the stream scaled by alpha
        if kind == "elementwise" and math.isfinite(q[j]) and math.isfinite(sw2):
            e2 = _dphi2(act, record.get(step, L[j], "out_mean"), record.get(step, L[j], "out_std"))
            chi = a2 * sw2 * e2
        elif kind == "residual" and j + 1 < len(blocks) and blocks[j + 1][2] is not None \
                and math.isfinite(sw2):
            # x_{l+1} = x_l + alpha phi(W x_l + b): ||dL/dx_l||^2 = (1 + alpha^2 sigma_w^2
            # E[phi'^2]) ||dL/dx_{l+1}||^2, and dL/dh = alpha phi'(h) (.) dL/dx on both sides
            a_next = res[L[j + 1]][1]
            e_next = _dphi2(blocks[j + 1][2], record.get(step, L[j + 1], "out_mean"),
                            record.get(step, L[j + 1], "out_std"))
            e2 = 1.0 if act is None else _dphi2(act, record.get(step, L[j], "out_mean"),
                                                record.get(step, L[j], "out_std"))
            if e_next > 0:
                chi = a2 * e2 / (a_next ** 2 * e_next) * (1 + a_next ** 2 * sw2 * e_next)
        elif kind == "batchnorm" and batch_size is not None and batch_size >= 4 \
                and q[j] > 0 and math.isfinite(sw2):
            # BN divides by each unit's batch std, so the scale that matters is the per-unit
            # variance over the batch: after BN then phi it is sigma_w^2 Var[phi(z)], z ~ N(0, 1)
            # (unit means are the same for every unit and cancel); else the measured q
            v_next = sw2 * memo(_bn_output_variance, act)
            v_here = q[j]
            if j > 0 and blocks[j - 1][0] == "batchnorm":
                v_here = _weight_scale(record, step, ctx.weight_params[L[j]]) * \
                    memo(_bn_output_variance, blocks[j - 1][2])
            try:
                chi = memo(bn_gradient_rate, act, batch_size) * v_next / v_here
            except ValueError:
                chi = math.nan
        out.append(Transition(L[j], L[j + 1], j + 1, kind, types, name, q[j],
                              record.get(step, L[j], "out_mean"), sw2, e2, chi, float(meas)))
    return out


def _dphi2(act: Any, mean: float, std: float) -> float:
    """E[phi'(h)^2] for h ~ N(mean, std^2) as measured. With zero-mean weights and biases the
    mean is ~0 and this is E[phi'(sqrt(q) z)^2]; a constant bias shift (all units at -3) is kept
    where the zero-mean formula would put half the units on either side."""
    if abs(mean) <= 1e-3 * std:
        return float(gaussian_expectations(lambda x: act.dphi(x) ** 2, std * std,
                                           kinks=act.kinks)[0])
    return float(gaussian_expectations(lambda x: act.dphi(x + mean) ** 2, std * std,
                                       kinks=tuple(k - mean for k in act.kinks))[0])


def _bn_output_variance(act: Any) -> float:
    """Var[phi(z)], z ~ N(0, 1): the per-unit batch variance of phi after batch norm."""
    m = gaussian_expectations(lambda x: np.stack([act.phi(x), act.phi(x) ** 2]), 1.0,
                              kinks=act.kinks)
    return float(m[1] - m[0] ** 2)


def _ratio(ts: list[Transition], attr: str) -> tuple[float, int]:
    """Product of sqrt(r) over the transitions with a prediction (norm ratio) and their count."""
    vals = [getattr(t, attr) for t in ts if math.isfinite(t.chi)]
    if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
        return math.nan, len(vals)
    return float(math.exp(0.5 * sum(math.log(v) for v in vals))), len(vals)


def _off_by(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
        return math.nan
    return float(max(a / b, b / a))
