"""The doctor's HTML report: findings and prescriptions, trials, and the figures of the record."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from signalprop.diagnosis.context import context_of
from signalprop.report import figures as F
from signalprop.report.html import figure_to_data_uri, render

if TYPE_CHECKING:  # pragma: no cover
    from signalprop.diagnosis.report import Report

TITLES = {
    "nonfinite": "Non-finite values (NaN/Inf)",
    "divergence": "Divergence",
    "exploding_gradients": "Exploding gradients",
    "vanishing_gradients": "Vanishing gradients",
    "exploding_through_time": "Exploding gradients through time",
    "vanishing_through_time": "Vanishing gradients through time",
    "saturation": "Saturated units",
    "dead_units": "Dead units",
    "update_ratio": "Update/weight ratio out of range",
}

#: figure name -> caption telling the reader what to look for.
CAPTIONS = {
    "loss_curve": "Training loss per recorded step (right axis: batch accuracy). A flat loss at "
    "log(classes) means the net is not learning; red crosses mark non-finite losses.",
    "gradient_flow": "Gradient norm per layer (log scale) at several steps, input on the left. "
    "Healthy: roughly flat lines. Vanishing: lines rising steeply toward the output (early "
    "layers get orders of magnitude less gradient). Exploding: lines falling toward the output. "
    "Red triangles: layers whose gradient is exactly zero (not drawable on a log axis).",
    "time_profile": "Gradient of the loss with respect to each recurrent layer's hidden state "
    "h_t, per time step t (log scale), at several training steps. Healthy: roughly flat. "
    "Vanishing through time: the line rises steeply toward the last time step (early inputs get "
    "no learning signal). Exploding: it falls toward the last step.",
    "activation_percentiles": "Distribution of each layer's outputs (5-95% and 15-85% bands, "
    "median), at the first and last recorded step. Saturation shows as activation bands pinned "
    "at the activation's limits; collapse as bands shrinking to a line.",
    "saturation_heatmap": "Fraction of saturated units (|phi'(z)| below 0.1 of its maximum) per "
    "activation layer (rows, input at top) and step (columns). Bright = saturated.",
    "dead_heatmap": "Fraction of dead ReLU units (zero for every example of the batch) per layer "
    "and step. Bright = dead.",
    "theory_vs_measurement": "Mean-field prediction (dashed) against the measured gradient "
    "norm ||dL/dh|| at each weight layer's output (solid), at the first and the last recorded "
    "step. The prediction starts from the last layer's measured norm and multiplies by "
    "sqrt(chi) per layer, chi = sigma_w^2 E[phi'(z)^2] at each layer's measured pre-activation "
    "variance (batch norm: its gradient rate); lines apart mean an assumption fails (see the "
    "explanation).",
    "update_ratios": "Relative size of each optimiser step per weight matrix, "
    "||W_after - W_before|| / ||W_before||; the dashed line marks the usual ~1e-3.",
}

_FIGURE_ORDER = ("loss_curve", "gradient_flow", "time_profile", "activation_percentiles",
                 "saturation_heatmap", "dead_heatmap", "update_ratios")

#: Figures only some models can have (not listed as "not drawn" for the others).
_OPTIONAL_FIGURES = ("time_profile",)


#: Trial columns shown first, in this order (others follow as found).
_TRIAL_COLUMNS = ("remedy", "verdict", "loss_mean", "loss_std", "delta_loss", "rel_change",
                  "grad_ratio", "saturated_frac", "dead_frac", "diverged", "seeds", "wall_time",
                  "error")
_TRIAL_HIDDEN = {"description", "init_loss", "diverged_frac", "losses"}


def _trial_table(trials: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns for a trial table: the known ones in a readable order, then any other scalar
    field; columns empty in every row are dropped."""
    found: list[str] = []
    for t in trials:
        for k, v in t.items():
            if k not in found and k not in _TRIAL_HIDDEN and (
                    v is None or isinstance(v, (int, float, str, bool))):
                found.append(k)
    cols = [c for c in _TRIAL_COLUMNS if c in found] + [c for c in found
                                                        if c not in _TRIAL_COLUMNS]
    cols = [c for c in cols if any(t.get(c) not in (None, "") for t in trials)]
    return cols, [[t.get(c) for c in cols] for t in trials]


def _explanation_rows(expl: Any) -> dict[str, Any] | None:
    """The explanation section: the sentence, then a per-layer table (index, block, q,
    sigma_w^2, chi predicted vs measured at init)."""
    if expl is None:
        return None
    rows = [[t.index, t.activation or "+".join(t.modules) or "-", t.block, t.q, t.sigma_w2,
             t.chi, t.measured] for t in expl.init]
    rx = expl.prescription
    presc = [] if rx is None else [[name, v ** 0.5] for name, v in rx.sigma_w2.items()]
    return {"sentence": expl.sentence(), "rows": rows, "prescription": presc}


def render_report(report: Report, dpi: int = 100) -> str:
    """The self-contained HTML text of a doctor report."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless; figures below do not use pyplot anyway
    record = report.record
    figs, missing = _figures(report, dpi)
    meta = report.meta
    verdict = ("healthy" if report.healthy else
               f"{len(report.findings)} finding(s): " + ", ".join(report.kinds))
    subtitle = (f"{meta.get('name', '')}: {meta.get('model', '')} on {meta.get('data', '')}, "
                f"{meta.get('steps_run', '')} steps of {meta.get('optimizer', '')} "
                f"(lr {meta.get('lr', '')}). Verdict: {verdict}.")
    cols, rows = _trial_table(report.trials)
    return render(
        "doctor.html",
        title=f"signalprop doctor: {meta.get('name', 'model')}",
        subtitle=subtitle,
        findings=_finding_rows(report, context_of(record)),
        prescriptions=[p.to_dict() for p in report.prescriptions],
        trials=report.trials,
        trial_columns=cols,
        trial_rows=rows,
        trials_skipped=meta.get("trials_skipped", ""),
        figures=figs,
        missing_figures=missing,
        unchecked=sorted((record.meta.get("unchecked") or {}).items()),
        run=_run_rows(report),
        thresholds=meta.get("thresholds", {}),
        explanation=_explanation_rows(getattr(report, "explanation", None)),
        version=meta.get("signalprop", ""),
    )


def _figures(report: Report, dpi: int) -> tuple[list[dict[str, str]], list[str]]:
    """The page's figures (data URIs, titles, captions) and the titles of those missing."""
    record = report.record
    figs, missing = [], []
    for name in _FIGURE_ORDER:
        fn = F.FIGURES.get(name)
        fig = fn(record)
        if fig is None:
            if name not in _OPTIONAL_FIGURES:
                missing.append(fn.title)
            continue
        figs.append({"src": figure_to_data_uri(fig, dpi), "title": fn.title,
                     "caption": CAPTIONS.get(name, "")})
    expl = getattr(report, "explanation", None)
    if expl is not None:
        fig = F.theory_vs_measurement(record, expl)
        if fig is not None:
            figs.insert(min(2, len(figs)), {
                "src": figure_to_data_uri(fig, dpi), "title": F.theory_vs_measurement.title,
                "caption": CAPTIONS["theory_vs_measurement"]})
    if report.trials:
        fig = F.trial_losses(report.trials)
        if fig is not None:
            figs.insert(1, {"src": figure_to_data_uri(fig, dpi), "title": "Trials",
                            "caption": "Training loss of each remedy trial."})
    return figs, missing


def _finding_rows(report: Report, ctx: Any) -> list[dict[str, Any]]:
    """Each finding as a dict, with its title and the layers in words."""
    findings = []
    for f in report.findings:
        d = f.to_dict()
        d["title"] = TITLES.get(f.kind, f.kind)
        names = ", ".join(f.layers[:12]) + (f" … (+{len(f.layers) - 12})" if len(f.layers) > 12
                                             else "")
        d["layers_text"] = f"{ctx.label(f.layers)} (modules {names})"
        findings.append(d)
    return findings


_RUN_KEYS = ("name", "model", "num_parameters", "data", "data_nonfinite", "loss_fn",
             "steps", "steps_run", "optimizer", "lr", "batch_size", "device", "seed",
             "recorded_steps", "diverged", "diverged_step", "train_seconds", "signalprop",
             "torch", "python", "created")


def _run_rows(report: Report) -> list[tuple[str, Any]]:
    """The run's settings table: the first and final loss, then the settings in the meta."""
    summary = report.summary()
    meta = report.meta
    return [("initial loss", summary["initial_loss"]),
            ("final loss (mean of last 10)", summary["final_loss"]),
            *((k, meta.get(k)) for k in _RUN_KEYS if k in meta)]
