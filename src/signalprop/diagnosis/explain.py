"""Why the gradient vanishes or explodes: mean-field theory evaluated for the user's own model,
beside what the probe measured.

For every pair of consecutive weight layers l, l+1 (Linear/Conv: modules owning a >= 2-D
parameter) the block between them decides the predicted per-layer factor of the *squared*
backward signal r_l = ||dL/dh_l||^2 / ||dL/dh_{l+1}||^2 (h = a weight layer's output):

- an element-wise activation phi: r_l = chi_l = sigma_w,l+1^2 E[phi'(sqrt(q_l) z)^2]
  (Poole et al. 2016; Schoenholz et al. 2017), with q_l = E[h_l^2] and
  sigma_w,l+1^2 = fan_in Var(W_{l+1}) ~= ||W_{l+1}||_F^2 / fan_out, both *measured* by the probe;
- batch norm then phi: r_l = lambda_G(phi, B) q_{l+1} / q_l, the batch-norm gradient rate
  (Yang et al. 2019) corrected by BN's scale invariance for layers of different scale;
- a skip block x + alpha phi(W x + b) (signalprop's ``Residual`` in the model, or a block the
  probe marked ``residual``): r_l = (alpha_l^2 E_l / alpha_{l+1}^2 E_{l+1})
  (1 + alpha_{l+1}^2 sigma_w,l+1^2 E_{l+1}), E = E[phi'^2] on either side;
- anything else (layer norm, pooling, an unknown module): no prediction; the explanation says
  which block it is.

The product of sqrt(r_l) along the path is the predicted ||dL/dh_1|| / ||dL/dh_L||, compared with
the measured one at the first recorded step (init) and at the last (end of the run). Where they
disagree by more than :data:`DISAGREEMENT_FACTOR`, the failed assumption is decided from the
record (finite width, non-Gaussian pre-activations, a non-element-wise block, weights moved far
from init). The critical-init prescription gives per-layer sigma_w^2 that make chi = 1 at the
model's own activation, bias variance and measured input scale, with the ratio it predicts.

The theory is :mod:`signalprop.theory` (NumPy/SciPy); torch is only touched to resolve a
user's activation module into a callable the theory can integrate.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from signalprop.diagnosis.context import context_of, fmt
from signalprop.diagnosis.transitions import (  # Transition is re-exported (a public name)
    Transition,
    _bias_scale,
    _blocks,
    _first_finite_step,
    _off_by,
    _ratio,
    _second_moment,
    _transitions,
    _weight_scale,
)
from signalprop.record import MODEL, Record
from signalprop.remedies import get_remedy
from signalprop.theory import NoCriticalPoint, critical_point, length_moments

#: Prediction and measurement of the end-to-end gradient-norm ratio "agree" within this factor.
DISAGREEMENT_FACTOR = 2.0

#: chi in this range counts as "near the edge of chaos" in the cause sentence.
NEAR_CRITICAL = (0.8, 1.25)

#: Pre-activations count as Gaussian when their measured 5-95% range is within this fraction of
#: the Gaussian one (2 x 1.645 std).
GAUSSIAN_RANGE_TOL = 0.25

#: Per-layer scatter (std of the log norm factor) that finite width N explains: WIDTH_SCATTER /
#: sqrt(N). Wide random nets measure ~0.6 / sqrt(N); the deep-sigmoid example (N = 64) ~1.7.
WIDTH_SCATTER = 4.0

#: Weights count as "moved far from init" when a weight norm changed by more than this fraction.
MOVED_FRACTION = 0.5

_Z05 = 1.6448536269514722  # the 95% point of N(0, 1)


@dataclass
class Prescription:
    """Critical initialisation computed for this model (chi = 1 at every element-wise layer).

    Attributes:
        sigma_w2: Weight-layer module name -> sigma_w^2 (W ~ N(0, sigma_w^2 / fan_in)); the
            names ``model.get_submodule`` takes.
        sigma_b2: Bias variance (the model's own, measured).
        q_star: The fixed point q* of the length map at the critical point.
        input_second_moment: Measured E[x^2] of the model's input (sets layer 1's sigma_w^2 so
            that q_1 = q*; NaN when not recorded).
        predicted_ratio: Predicted ||dL/dh_1|| / ||dL/dh_L|| after the change (mean-field, the
            length map iterated from the measured input scale).
        activation: The activation the critical point is for.
        note: Why some layers keep their weights, or why there is no critical point.
    """

    sigma_w2: dict[str, float]
    sigma_b2: float
    q_star: float
    input_second_moment: float
    predicted_ratio: float
    activation: str
    note: str = ""

    @property
    def sigma_w(self) -> dict[str, float]:
        return {k: math.sqrt(v) for k, v in self.sigma_w2.items()}


@dataclass
class Explanation:
    """Mean-field prediction of the gradient profile beside the measurement.

    Ratios are of gradient *norms*, ||dL/dh_1|| / ||dL/dh_L|| (layer 1 = input side), over the
    transitions the theory covers; per-layer factors are their geometric means.
    """

    layers: list[str]
    step_init: int
    step_end: int
    init: list[Transition]
    end: list[Transition]
    predicted_ratio: float
    measured_ratio: float
    predicted_factor: float
    measured_factor: float
    predicted_ratio_end: float
    measured_ratio_end: float
    covered: int
    tolerance: float
    disagreement: float
    disagreement_end: float
    reasons: list[str]
    reasons_end: list[str]
    cause: str
    prescription: Prescription | None
    prescription_note: str = ""
    norms: dict[str, list[float]] = field(default_factory=dict)

    @property
    def agrees(self) -> bool:
        """Prediction and measurement at init agree within ``tolerance``."""
        return self.disagreement <= self.tolerance

    def sentence(self) -> str:
        """The explanation as a finding's "why" sentences."""
        out = self.cause
        unknown = sorted({"+".join(t.modules) or "nothing" for t in self.init
                          if t.block == "unknown"})
        if unknown and self.covered:
            out += (f" The theory covers {self.covered} of {len(self.init)} layer-to-layer "
                    f"blocks; no mean-field factor for: {', '.join(unknown)}.")
        if not (math.isfinite(self.predicted_ratio) and math.isfinite(self.measured_ratio)) \
                and self.reasons:
            out += " Not predicted: " + "; ".join(self.reasons) + "."
        if math.isfinite(self.predicted_ratio) and math.isfinite(self.measured_ratio):
            out += (f" Predicted {fmt(self.predicted_factor)} per layer and "
                    f"{fmt(self.predicted_ratio)} over {self.covered} layers; measured at init "
                    f"{fmt(self.measured_factor)} per layer and {fmt(self.measured_ratio)}.")
            if self.agrees:
                out += f" Theory and measurement agree within {fmt(self.tolerance)}x."
            else:
                out += (f" They differ by {fmt(self.disagreement)}x (> {fmt(self.tolerance)}x): "
                        + "; ".join(self.reasons) + ".")
        if self.reasons_end and math.isfinite(self.disagreement_end) \
                and self.disagreement_end > self.tolerance:
            out += (f" At the end of the run they differ by {fmt(self.disagreement_end)}x: "
                    + "; ".join(self.reasons_end) + ".")
        if self.prescription is not None:
            p = self.prescription
            sw = sorted({round(v, 4) for v in p.sigma_w.values()})
            out += (f" Critical init for this model: sigma_w = "
                    f"{', '.join(fmt(v, 3) for v in sw)} (sigma_b^2 = {fmt(p.sigma_b2)}), "
                    f"predicted ratio after the change {fmt(p.predicted_ratio, 3)}"
                    + (f"; {p.note.strip().rstrip('.')}" if p.note.strip() else "") + ".")
        elif self.prescription_note:
            out += f" No critical init: {self.prescription_note}"
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN kept as float; the report's encoder writes ``null``)."""
        d = asdict(self)
        d["agrees"] = self.agrees
        d["chi"] = [t.chi for t in self.init]
        d["sentence"] = self.sentence()
        if self.prescription is not None:
            d["prescription"]["sigma_w"] = self.prescription.sigma_w
        return d


# --- deciding why theory and measurement differ ---------------------------------------------------
def _gaussian_misfit(record: Record, step: int, layers: list[str]) -> float:
    """Median over layers of |measured 5-95% range / Gaussian range - 1| of the pre-activations."""
    vals = []
    for m in layers:
        p5, p95 = record.get(step, m, "out_p05"), record.get(step, m, "out_p95")
        s = record.get(step, m, "out_std")
        if all(math.isfinite(v) for v in (p5, p95, s)) and s > 0:
            vals.append(abs((p95 - p5) / (2 * _Z05 * s) - 1.0))
    return float(np.median(vals)) if vals else math.nan


def _width(record: Record, ctx: Any, layers: list[str]) -> int | None:
    """Smallest fan_out (units or channels) of the given weight layers."""
    ws = [i.shape[0] for m in layers
          if (i := record.layers.get(ctx.weight_params.get(m, ""))) and i.shape]
    return min(ws) if ws else None


def _reasons(record: Record, ts: list[Transition], step: int, ctx: Any, at_end: bool,
             step0: int) -> list[str]:
    """Which mean-field assumption fails, decided from the record."""
    out = []
    unknown = [t for t in ts if t.block == "unknown"]
    if unknown:
        kinds = sorted({"+".join(t.modules) or "nothing" for t in unknown})
        out.append(f"{len(unknown)} block(s) are not an element-wise activation (or batch norm "
                   f"then one) and have no mean-field factor: {', '.join(kinds)}")
    if at_end:
        moved = []
        for m in ctx.weight_layers:
            p = ctx.weight_params[m]
            a, b = record.get(step0, p, "weight_norm"), record.get(step, p, "weight_norm")
            if math.isfinite(a) and math.isfinite(b) and a > 0:
                moved.append(abs(b / a - 1.0))
        if moved and max(moved) > MOVED_FRACTION:
            out.append(f"training moved the weights far from init (a weight norm changed by "
                       f"{fmt(100 * max(moved), 2)}%), so they are no longer independent random "
                       "matrices")
    cov = [t for t in ts if math.isfinite(t.chi) and t.measured > 0 and math.isfinite(t.measured)]
    if not cov:
        return out
    gm = _gaussian_misfit(record, step, [t.layer for t in cov])
    if math.isfinite(gm) and gm > GAUSSIAN_RANGE_TOL:
        out.append(f"the pre-activations are not Gaussian (their 5-95% range is off the Gaussian "
                   f"one by {fmt(100 * gm, 2)}% in the median layer): a few units or correlated "
                   "units carry the signal, where the theory assumes many independent ones")
    if len(cov) >= 2:
        out.append(_say_scatter(**_measure_scatter(record, ctx, cov)))
    return out


def _measure_scatter(record: Record, ctx: Any, cov: list[Transition]) -> dict[str, Any]:
    """How the per-layer residuals log(measured / predicted) scatter: their mean and spread over
    ``n`` layers, whether they have a direction, and the spread finite ``width`` explains."""
    r = np.log([t.measured / t.chi for t in cov]) / 2  # per-layer log residual, norm units
    n = len(r)
    mean, sd = float(np.mean(r)), float(np.std(r, ddof=1))
    width = _width(record, ctx, [t.layer for t in cov])
    # finite width N makes each layer's factor fluctuate by ~1/sqrt(N) (a norm over N
    # units); a scatter several times larger is not a width effect
    width_sd = WIDTH_SCATTER / math.sqrt(width) if width else math.inf
    # a random walk of independent per-layer errors explains the total when it is within
    # ~2.5 standard deviations; otherwise the error has a direction (systematic)
    return {"n": n, "mean": mean, "sd": sd, "width": width, "width_sd": width_sd,
            "systematic": abs(mean) * math.sqrt(n) > 2.5 * sd}


def _say_scatter(n: int, mean: float, sd: float, width: int | None, width_sd: float,
                 systematic: bool) -> str:
    """The scatter reason in words, from :func:`_measure_scatter`'s numbers."""
    unseen = ("a skip connection or other non-element-wise block the record does not show "
              "(x + f(x) adds 1 to a block's factor)")
    if not systematic and sd <= width_sd:
        return (f"narrow layers (width {width}): each layer's measured factor scatters by "
                f"~{fmt(100 * (math.exp(sd) - 1), 2)}% around the prediction, in both "
                f"directions, and the scatter accumulates over {n} layers; the mean-field "
                "limit assumes width >> depth")
    if not systematic:
        return (f"each layer's measured factor scatters by "
                f"~{fmt(100 * (math.exp(sd) - 1), 2)}% around the prediction, far more "
                f"than width {width} explains (~{fmt(100 * (math.exp(width_sd) - 1), 2)}%)"
                f": {unseen}, or heavy-tailed units")
    direction = "larger" if mean > 0 else "smaller"
    txt = (f"each layer's measured factor is systematically {direction} than "
           f"predicted (by {fmt(math.exp(abs(mean)), 3)}x on average): correlated "
           "units (the backward signal is not independent of the weights, as the "
           "mean-field limit assumes)")
    if mean > 0:
        txt += f", or {unseen}"
    return txt


# --- cause -------------------------------------------------------------------------------------
def _cause(ts: list[Transition], act_obj: Any) -> str:
    """Why the gradient shrinks or grows per layer, in words (:func:`_measure_cause` then
    :func:`_say_cause`)."""
    return _say_cause(_measure_cause(ts, act_obj))


def _geomean_chi(ts: list[Transition]) -> float:
    return float(np.exp(np.median(np.log([t.chi for t in ts]))))


def _measure_cause(ts: list[Transition], act_obj: Any) -> dict[str, Any]:
    """The numbers behind the cause sentence: per block kind, how many blocks and the median
    factor; for element-wise activations the medians of sigma_w^2, q, E[phi'^2] and the mean,
    and phi''s maximum."""
    el = [t for t in ts if t.block == "elementwise" and math.isfinite(t.chi)]
    bn = [t for t in ts if t.block == "batchnorm" and math.isfinite(t.chi)]
    rs = [t for t in ts if t.block == "residual" and math.isfinite(t.chi)]
    if rs and len(el) <= len(rs):  # a residual net: the chain factor is not the story
        el = []
    m: dict[str, Any] = {"n_residual": len(rs), "residual_rate": _geomean_chi(rs) if rs else None,
                         "n_elementwise": len(el), "n_batchnorm": len(bn)}
    if bn and not el:
        m.update(bn_rate=_geomean_chi(bn), bn_activation=bn[0].activation)
    if not el:
        return m
    grid = np.linspace(-12.0, 12.0, 4801)
    dmax = float(np.max(np.abs(act_obj.dphi(grid)))) if act_obj is not None else math.nan
    e2 = float(np.median([t.e_dphi2 for t in el]))
    m.update(sw2=float(np.median([t.sigma_w2 for t in el])), q=float(np.median([t.q for t in el])),
             e2=e2, chi=_geomean_chi(el), name=el[0].activation or "phi", dmax=dmax,
             frac=e2 / (dmax * dmax) if dmax > 0 else math.nan,
             mean=float(np.median([t.mean for t in el])))
    return m


def _say_cause(m: dict[str, Any]) -> str:
    """The cause sentence from :func:`_measure_cause`'s numbers."""
    skip = ""
    if m["n_residual"]:
        skip = (f" Skip connections (x + alpha phi(W x + b)): each of the {m['n_residual']} "
                f"residual blocks multiplies the squared gradient by 1 + alpha^2 sigma_w^2 "
                f"E[phi'^2] (median {fmt(m['residual_rate'], 3)}), so it cannot vanish through "
                "them.")
    if not m["n_elementwise"] and not m["n_batchnorm"]:
        if m["n_residual"]:
            return "Why (mean-field theory at the measured init):" + skip
        return ("The mean-field theory covers none of this model's blocks (no element-wise "
                "activation between weight layers).")
    if not m["n_elementwise"]:
        rate = m["bn_rate"]
        return skip.strip() + (" " if skip else "") + (
            f"Why (mean-field theory, Yang et al. 2019): batch norm before {m['bn_activation']} "
            f"multiplies the squared gradient by lambda_G = {fmt(rate, 3)} per layer "
            f"(a factor {fmt(math.sqrt(rate), 3)} on the norm) whatever sigma_w is.")
    return _say_chi(m) + skip


def _say_chi(m: dict[str, Any]) -> str:
    """The element-wise part of the cause: chi, its factors, and saturation or scale."""
    sw2, q, e2, chi, name, dmax, frac = (m[k] for k in ("sw2", "q", "e2", "chi", "name", "dmax",
                                                         "frac"))
    near = NEAR_CRITICAL[0] <= chi <= NEAR_CRITICAL[1]
    verb = "keeps" if near else ("shrinks" if chi < 1 else "grows")
    where = f"z ~ N(0, q), measured q = {fmt(q, 2)}"
    if abs(m["mean"]) > 0.5 * math.sqrt(q):
        where = (f"z ~ N(m, q - m^2) as measured, m = {fmt(m['mean'], 2)}, q = {fmt(q, 2)}: the "
                 "biases shift every unit the same way")
    txt = (f"Why (mean-field theory at the measured init, Schoenholz et al. 2017): each layer "
           f"{verb} the squared gradient by chi = sigma_w^2 E[{name}'(z)^2] = {fmt(sw2, 3)} x "
           f"{fmt(e2, 2)} = {fmt(chi, 2)} ({where}), a factor "
           f"{fmt(math.sqrt(chi), 3)} per layer on the gradient norm.")
    if not math.isfinite(frac):
        return txt
    sat = (f" {name}' <= {fmt(dmax, 3)} and E[{name}'^2] is {fmt(100 * frac, 2)}% of its "
           f"maximum {fmt(dmax * dmax, 3)}")
    if near:
        sat += ": chi is near 1, the edge of chaos (gradients keep their scale)."
    elif chi < 1 and frac >= 0.8:
        sat += (f", so the cause is {name}' <= {fmt(dmax, 3)} times sigma_w^2 = "
                f"{fmt(sw2, 3)}, not saturation.")
    elif chi < 1 and frac <= 0.3:
        sat += ": the cause is saturation (most pre-activations sit where the derivative "\
               "is small)."
    elif chi > 1:
        sat += f": the cause is sigma_w^2 = {fmt(sw2, 3)} too large for {name}."
    else:
        sat += "."
    return txt + sat


# --- prescription --------------------------------------------------------------------------------
def _prescribe(record: Record, ctx: Any, blocks: list, step: int) -> tuple[Prescription | None,
                                                                             str]:
    act, why = _single_activation(blocks)
    if act is None:
        return None, why
    sb2 = _bias_scale(record, step, ctx.weight_layers[:-1])
    note = ""
    try:
        cp = critical_point(act, sb2)
    except NoCriticalPoint as e:
        if sb2 == 0.0:
            return None, str(e)
        try:  # the model's bias scale rules a critical point out; zero biases may not
            cp = critical_point(act, 0.0)
        except NoCriticalPoint:
            return None, str(e)
        note = f"none at the model's sigma_b^2 = {fmt(sb2)} ({e.reason}); biases set to 0. "
        sb2 = 0.0
    L = ctx.weight_layers
    xm, xs = record.get(step, MODEL, "input_mean"), record.get(step, MODEL, "input_std")
    ex2 = xm * xm + xs * xs if math.isfinite(xm) and math.isfinite(xs) else math.nan
    sw2, scale_note = _critical_scales(record, ctx, blocks, step, cp, sb2, ex2)
    note += scale_note
    if any(b[0] != "elementwise" for b in blocks):
        note += ("; " if note else "") + "layers after batch-norm, residual or unknown blocks " \
            "keep their scale (chi = sigma_w^2 E[phi'^2] does not set their factor)"
    ratio = _predicted_ratio(record, blocks, L, step, sw2, sb2, ex2, cp)
    # keyed by module (a module called at several sites has one set of weights: its first
    # site's value)
    by_module: dict[str, float] = {}
    for m in L:
        info = record.layers.get(m)
        by_module.setdefault((info.module if info is not None and info.module else m), sw2[m])
    return Prescription(by_module, sb2, float(cp.q_star), float(ex2), ratio, act.name, note), ""


def _single_activation(blocks: list) -> tuple[Any, str]:
    """The one element-wise activation between the weight layers, or ``None`` and why not."""
    acts = [b[2] for b in blocks if b[0] == "elementwise"]
    if not acts:
        if any(b[0] == "batchnorm" for b in blocks):
            return None, ("batch norm sets the gradient rate whatever sigma_w is (Yang et al. "
                          "2019, Theorem 9): tuning sigma_w, sigma_b cannot remove it.")
        return None, "no element-wise activation between weight layers."
    names = {a.name for a in acts}
    if len(names) > 1:
        return None, f"several activations ({', '.join(sorted(names))}); one critical point " \
                     "per model is computed only for a single activation."
    return acts[0], ""


def _critical_scales(record: Record, ctx: Any, blocks: list, step: int, cp: Any, sb2: float,
                     ex2: float) -> tuple[dict[str, float], str]:
    """Per-layer sigma_w^2 at the critical point (layer 1 scaled for the measured input; the
    layers after blocks the theory does not cover keep theirs), and a note on layer 1."""
    L = ctx.weight_layers
    note = ""
    sw2 = {m: cp.sigma_w2 for m in L}
    # layer 1 sees the data, not phi(h): choose its scale so that q_1 = q* (the fixed point)
    if blocks[0][0] == "elementwise" and math.isfinite(cp.q_star) and cp.q_star > 0 \
            and math.isfinite(ex2) and ex2 > 0 and cp.q_star > sb2:
        sw2[L[0]] = (cp.q_star - sb2) / ex2
        note += "layer 1 scaled so that its pre-activations start at q* for the measured input"
    # keep BN / unknown blocks' next layers as they are: chi does not apply there
    if blocks[0][0] != "elementwise":  # layer 1 feeds a block the theory does not cover
        sw2[L[0]] = _weight_scale(record, step, ctx.weight_params[L[0]], cp.sigma_w2)
    for j, b in enumerate(blocks):
        if b[0] != "elementwise":
            sw2[L[j + 1]] = _weight_scale(record, step, ctx.weight_params[L[j + 1]], cp.sigma_w2)
    return sw2, note


def _predicted_ratio(record: Record, blocks: list, L: list[str], step: int,
                     sw2: dict[str, float], sb2: float, ex2: float, cp: Any) -> float:
    """The end-to-end gradient-norm ratio after the change: the length map iterated from the
    measured input scale."""
    q = sw2[L[0]] * ex2 + sb2 if math.isfinite(ex2) else (
        cp.q_star if math.isfinite(cp.q_star) else 1.0)
    log_r = 0.0
    for j, b in enumerate(blocks):
        if b[0] != "elementwise":
            # no length map through this block: restart from the next layer's measured scale
            # (its weights are kept; its input is an approximation)
            q = _second_moment(record, step, L[j + 1])
            continue
        m = length_moments(b[2], q)
        log_r += 0.5 * math.log(sw2[L[j + 1]] * float(m[1]))
        q = sw2[L[j + 1]] * float(m[0]) + sb2
    return float(math.exp(log_r))


# --- entry point ---------------------------------------------------------------------------------
def explain(
    record: Record,
    model: Any = None,
    *,
    batch_size: int | None = None,
    tolerance: float = DISAGREEMENT_FACTOR,
) -> Explanation | None:
    """Mean-field prediction of the record's per-layer gradient norms, beside the measurement.

    Args:
        record: A probe record with ``out_grad_norm``, ``out_mean``/``out_std`` of the weight
            layers and ``weight_norm`` of their parameters (the doctor's defaults).
        model: The model the record is of (optional): activation modules are then resolved from
            the modules themselves, so any callable activation gets its exact phi'.
        batch_size: Training batch size (needed for batch-norm blocks; default
            ``record.meta["batch_size"]``).
        tolerance: Factor on the end-to-end gradient-norm ratio beyond which prediction and
            measurement "disagree" and the reasons are given.

    Returns:
        An :class:`Explanation`, or ``None`` when the record lacks what it needs (fewer than two
        weight layers, no gradient or forward statistics).
    """
    if not (math.isfinite(tolerance) and tolerance >= 1):
        raise ValueError(f"tolerance must be a finite factor >= 1, got {tolerance}")
    ctx = context_of(record)
    if ctx.depth < 2:
        return None
    L = ctx.weight_layers
    s0 = _first_finite_step(record, L, last=False)
    s1 = _first_finite_step(record, L, last=True)
    if s0 is None or s1 is None:
        return None
    if batch_size is None:
        batch_size = _meta_batch_size(record)
    blocks, res = _blocks(record, model, ctx)
    init = _transitions(record, ctx, blocks, s0, batch_size, res)
    end = _transitions(record, ctx, blocks, s1, batch_size, res)
    pred, n = _ratio(init, "chi")
    meas, _ = _ratio(init, "measured")
    pred_e, _ = _ratio(end, "chi")
    meas_e, _ = _ratio(end, "measured")
    off, off_e = _off_by(pred, meas), _off_by(pred_e, meas_e)
    reasons = _reasons(record, init, s0, ctx, False, s0) if not off <= tolerance else []
    reasons_end = _reasons(record, end, s1, ctx, True, s0) if not off_e <= tolerance else []
    act_obj = next((b[2] for b in blocks if b[0] == "elementwise"), None)
    rx, note = _prescribe(record, ctx, blocks, s0)
    g0, p0 = _norms(record, L, init, s0)
    g1, p1 = _norms(record, L, end, s1)
    return Explanation(
        layers=list(L), step_init=s0, step_end=s1, init=init, end=end,
        predicted_ratio=pred, measured_ratio=meas,
        predicted_factor=pred ** (1 / n) if n and pred == pred else math.nan,
        measured_factor=meas ** (1 / n) if n and meas == meas else math.nan,
        predicted_ratio_end=pred_e, measured_ratio_end=meas_e, covered=n, tolerance=tolerance,
        disagreement=off, disagreement_end=off_e, reasons=reasons, reasons_end=reasons_end,
        cause=_cause(init, act_obj), prescription=rx, prescription_note=note,
        norms={"measured_init": g0, "predicted_init": p0, "measured_end": g1,
               "predicted_end": p1},
    )


def _meta_batch_size(record: Record) -> int | None:
    b = record.meta.get("batch_size")
    return int(b) if isinstance(b, (int, float)) and b == b else None


def _norms(record: Record, L: list[str], ts: list[Transition], step: int
           ) -> tuple[list[float], list[float]]:
    """Measured ||dL/dh|| per weight layer at ``step`` and the prediction, anchored at the
    output side and carried towards the input by sqrt(chi)."""
    g = [record.get(step, m, "out_grad_norm") for m in L]
    p = [math.nan] * len(L)
    p[-1] = g[-1]  # anchored at the output side, predicted towards the input
    for j in range(len(L) - 2, -1, -1):
        c = ts[j].chi
        p[j] = p[j + 1] * math.sqrt(c) if math.isfinite(c) and math.isfinite(p[j + 1]) \
            else math.nan
    return g, p


def attach(findings: list[Any], explanation: Explanation | None) -> None:
    """Add the explanation to the gradient findings (evidence sentence and numbers), in place."""
    if explanation is None:
        return
    for f in findings:
        if f.kind not in ("vanishing_gradients", "exploding_gradients"):
            continue
        f.evidence = f"{f.evidence} {explanation.sentence()}"
        f.numbers["predicted_ratio"] = explanation.predicted_ratio
        f.numbers["predicted_per_layer_factor"] = explanation.predicted_factor
        f.numbers["measured_ratio_init"] = explanation.measured_ratio
        f.numbers["theory_disagreement"] = explanation.disagreement
        if explanation.prescription is not None:
            ws = list(explanation.prescription.sigma_w.values())
            f.numbers["critical_sigma_w"] = float(np.median(ws))


def critical_remedy(explanation: Explanation | None) -> Any:
    """The ``critical_init`` remedy with this model's prescribed per-layer sigma_w^2 and sigma_b^2
    (the plain registered remedy when there is no prescription)."""
    if explanation is None or explanation.prescription is None:
        return get_remedy("critical_init")
    p = explanation.prescription
    return get_remedy("critical_init", sigma_w2=p.sigma_w2, sigma_b2=p.sigma_b2)


def explain_or_skip(record: Record, model: Any = None, **kwargs: Any) -> Explanation | None:
    """:func:`explain` for the doctor: a model the theory cannot read must not cost the user the
    rest of the diagnosis, so an unexpected error becomes a warning and
    ``record.meta["explanation_skipped"]`` (with the error) instead of an exception."""
    try:
        return explain(record, model, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported, not swallowed: warning + record.meta
        why = f"{type(e).__name__}: {e}"
        record.meta["explanation_skipped"] = why
        warnings.warn(f"mean-field explanation skipped ({why})", stacklevel=2)
        return None
