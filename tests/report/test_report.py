"""Report figures (declared requirements, clean skips) and the self-contained HTML helpers."""

from __future__ import annotations

import base64
import re
from typing import Any

import matplotlib
import numpy as np
import pytest
import torch
from markupsafe import Markup
from torch import nn

from signalprop.diagnosis import Finding, Prescription
from signalprop.doctor import Report, doctor
from signalprop.record import LayerInfo, Record
from signalprop.report import figures as F
from signalprop.report.html import (
    figure_to_base64,
    figure_to_data_uri,
    fmt_number,
    render_page,
    render_string,
)

matplotlib.use("Agg")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report() -> Report:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    x, y = torch.randn(96, 8), torch.randint(0, 3, (96,))
    return doctor(model, (x, y), nn.CrossEntropyLoss(), steps=12, progress=False, name="tiny")


def test_every_figure_draws_from_a_probe_record(report: Report) -> None:
    rec = report.record
    names = F.available(rec)
    assert {"loss_curve", "gradient_flow", "activation_percentiles", "saturation_heatmap",
            "dead_heatmap", "update_ratios"} <= set(names)
    for name in names:
        fig = F.FIGURES.get(name)(rec)
        assert fig is not None, name
        assert figure_to_png_ok(fig)


def figure_to_png_ok(fig: Any) -> bool:
    raw = base64.b64decode(figure_to_base64(fig, dpi=40))
    return raw.startswith(PNG)


def test_figures_declare_requirements_and_skip_cleanly() -> None:
    rec = Record()
    rec.add_scalar(0, "loss", 2.0)
    rec.add_scalar(1, "loss", 1.0)
    assert F.available(rec) == ["loss_curve"]
    for name in F.FIGURES.names():
        fn = F.FIGURES.get(name)
        assert isinstance(fn.requires, tuple) and fn.requires, name
        if name != "loss_curve":
            assert fn(rec) is None, name
    assert F.loss_curve(rec) is not None
    assert F.loss_curve(Record()) is None
    assert F.trial_losses([]) is None


def test_gradient_flow_plots_the_recorded_values() -> None:
    # the drawn line must be the record's numbers, with exact zeros marked (not plotted on log)
    rec = Record()
    for i in range(3):
        rec.add_layer(LayerInfo(f"l{i}", "Linear", depth=i))
        rec.add_layer(LayerInfo(f"l{i}.weight", "Parameter", "param", i, None, f"l{i}", [4, 4]))
    vals = [0.0, 1e-3, 1.0]
    for i, v in enumerate(vals):
        rec.add(0, f"l{i}.weight", "grad_norm", v)
    fig = F.gradient_flow(rec)
    ax = fig.axes[0]
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "step 0"]
    y = np.asarray(line.get_ydata(), dtype=float)
    assert np.isnan(y[0]) and y[1:].tolist() == [1e-3, 1.0]
    assert ax.get_yscale() == "log"
    assert any(c.get_label() == "exactly 0" for c in ax.collections)


def test_pick_steps_spreads_log_uniformly() -> None:
    steps = list(range(300))
    got = F.pick_steps(steps, 5)
    assert got[0] == 0 and got[-1] == 299 and got == sorted(set(got))
    assert len(got) <= 5
    assert F.pick_steps([3, 5], 5) == [3, 5]


def test_html_escapes_user_strings_and_embeds_png() -> None:
    import matplotlib.figure

    fig = matplotlib.figure.Figure(figsize=(2, 1))
    fig.subplots().plot([0, 1], [0, 1])
    html = render_page(
        "<b>title</b>",
        [{"title": "<script>alert(1)</script>", "text": "a < b\n\nsecond & para",
          "figures": [fig, None], "captions": ['say "hi"'],
          "table": {"columns": ["k", "<v>"], "rows": [["<x>", 1.5e-9]]}}],
        subtitle="<i>sub</i>",
    )
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;title&lt;/b&gt;" in html and "a &lt; b" in html
    assert "second &amp; para" in html and "&lt;x&gt;" in html
    assert "1.50e-09" in html
    assert html.count("<img") == 1  # the None figure is skipped
    m = re.search(r'src="data:image/png;base64,([^"]+)"', html)
    assert m and base64.b64decode(m.group(1)).startswith(PNG)
    # self-contained: no external resources
    assert "http://" not in html and "https://" not in html and "<script" not in html
    with pytest.raises(TypeError, match="Markup"):
        render_page("t", [{"html": "<b>raw</b>"}])
    ok = render_page("t", [{"html": Markup("<b>trusted</b>")}])
    assert "<b>trusted</b>" in ok
    assert figure_to_data_uri(fig).startswith("data:image/png;base64,")
    assert render_string("{{ x }}", x="<y>") == "&lt;y&gt;"


def test_fmt_number() -> None:
    assert fmt_number(None) == "–" and fmt_number(float("nan")) == "–"
    assert fmt_number(3) == "3" and fmt_number(0.1234) == "0.123"
    assert fmt_number(2e-7) == "2.00e-07" and fmt_number(float("inf")) == "∞"


def test_doctor_html_report(report: Report, tmp_path: Any) -> None:
    # a finding with hostile strings: everything from the user must be escaped
    report.findings.append(Finding("saturation", ["<layer>"], "evidence <b>bold</b>", "warning",
                                   [Prescription(1, "batchnorm", "why <i>not</i>")]))
    report.meta["name"] = "<script>x</script>"
    try:
        html = report.to_html(tmp_path / "r.html").read_text()
    finally:
        report.findings.pop()
    for section in ("Diagnosis", "Prescriptions", "Figures", "Gradient flow",
                    "Activation percentiles", "Saturation (layer x step)", "Training loss",
                    "Thresholds"):
        assert section in html, section
    assert "evidence &lt;b&gt;bold&lt;/b&gt;" in html and "why &lt;i&gt;not&lt;/i&gt;" in html
    assert "<script>x</script>" not in html
    assert html.count("data:image/png;base64,") >= 5
    assert "http://" not in html and "https://" not in html


def test_healthy_report_says_so(tmp_path: Any) -> None:
    rec = Record()
    rec.add_scalar(0, "loss", 1.0)
    r = Report([], [], rec, meta={"name": "m"}, losses=[1.0])
    html = r.to_html(tmp_path / "h.html").read_text()
    assert "healthy" in html and "No finding" in html
    # figures whose metrics are absent are listed as not drawn, not crashed on
    assert "Not drawn" in html and "Gradient flow" in html
