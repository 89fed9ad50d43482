"""The lab's HTML report: one self-contained page (figures embedded as base64 PNG, no scripts,
no external resources) that opens offline.

The page starts with an index (one line per study: verdict and finding), then one section per
study: the question, the claim tested, the set-up, the figures, the conclusion with its numbers,
the configuration, timings and the environment. Every string that came from a configuration or a
result is HTML-escaped (Jinja2 autoescape, through :mod:`signalprop.report.html`).
"""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from signalprop.lab import STUDY_NAMES, get_study
from signalprop.lab.base import fmt, read_json, to_jsonable, write_json
from signalprop.lab.study_dir import is_study_dir, load_study

# The page layout and the shared styles are the doctor's page's (report/templates/base.html);
# the lab adds its verdict badges.
_TEMPLATE = """{% extends "base.html" %}
{% block body %}
<style>
.verdict { font-weight: bold; padding: 1px 6px; border-radius: 3px; white-space: nowrap; }
.supports { background: #d8f0d8; color: #185c18; }
.contradicts { background: #f8d8d8; color: #8a1010; }
.inconclusive { background: #f3ecd0; color: #6a5510; }
.failed { background: #555; color: #fff; }
.question { font-size: 1.05em; font-style: italic; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 0.82em; }
.nowrap { white-space: nowrap; }
</style>
<h1>{{ title }}</h1>
<p class="muted">Built {{ built }} from <code>{{ out_dir }}</code>.
{{ n_studies }} stud{{ "y" if n_studies == 1 else "ies" }}; mode: {{ modes }}.
Each conclusion below is computed from the study's own measurements.</p>

<h2 id="index">Index</h2>
<table>
<tr><th>Study</th><th>Verdict</th><th>Finding</th><th>Time</th></tr>
{% for s in studies %}
<tr><td><a href="#{{ s.anchor }}">{{ s.name }}</a></td>
<td><span class="verdict {{ s.verdict_class }}">{{ s.verdict }}</span></td>
<td>{{ s.summary }}</td><td class="nowrap">{{ s.time }}</td></tr>
{% endfor %}
</table>

{% for s in studies %}
<section id="{{ s.anchor }}">
<h2>{{ s.title }} <span class="muted">(<code>{{ s.name }}</code>)</span></h2>
<p class="question">{{ s.question }}</p>
<p><b>Claim tested.</b> {{ s.claim }}</p>
<p><b>Set-up.</b> {{ s.setup }}</p>
{% if s.error %}
<p><span class="verdict failed">failed</span> {{ s.error }}</p>
<details><summary>traceback</summary><pre>{{ s.traceback }}</pre></details>
{% endif %}
{% if s.conclusion %}
<p><b>Conclusion</b> <span class="verdict {{ s.verdict_class }}">{{ s.verdict }}</span>:
{{ s.conclusion.sentence }}</p>
{% if s.conclusion.details %}<ul>{% for d in s.conclusion.details %}<li>{{ d }}</li>{% endfor %}</ul>{% endif %}
<table><tr><th>Measured quantity</th><th>Value</th></tr>
{% for k, v in s.numbers %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}
</table>
{% endif %}
{% for f in s.figures %}
<figure><img src="data:image/png;base64,{{ f.b64 }}" alt="{{ f.alt }}" width="{{ f.width }}" height="{{ f.height }}">
<figcaption>{{ f.caption }}</figcaption></figure>
{% endfor %}
{% if s.references %}<p class="muted">References: {{ s.references | join("; ") }}</p>{% endif %}
<details><summary>Configuration</summary><pre>{{ s.config_json }}</pre></details>
<details><summary>Timings and environment</summary>
<table>{% for k, v in s.timings %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}</table>
<pre>{{ s.env_json }}</pre></details>
<p class="muted"><a href="#index">back to the index</a></p>
</section>
{% endfor %}
{% endblock %}
"""


def _png_size(data: bytes) -> tuple[int, int]:
    # PNG: 8-byte signature, then the IHDR chunk: length, type, width, height (big-endian)
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (int, float)):
        return fmt(v) if isinstance(v, float) else str(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt_value(x) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_fmt_value(x)}" for k, x in v.items())
    return str(v)


def _anchor(name: str) -> str:
    return "study-" + "".join(c if c.isalnum() else "-" for c in name)


def _fmt_s(s: Any) -> str:
    try:
        s = float(s)
    except (TypeError, ValueError):
        return "n/a"
    return f"{s / 60:.1f} min" if s >= 90 else f"{s:.1f} s"


def build_report(
    out: str | Path, order: Sequence[str] | None = None, title: str = "signalprop lab report"
) -> Path:
    """(Re)build ``out/index.html`` from the study directories found in ``out``.

    Args:
        out: The lab's output directory.
        order: Preferred study order (others follow alphabetically).
        title: Page title.

    Returns:
        The path of the written page.

    Raises:
        FileNotFoundError: if ``out`` does not exist or holds no study results.
    """
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"no lab output directory at {out}")
    dirs = [p for p in sorted(out.iterdir()) if p.is_dir() and is_study_dir(p)]
    if not dirs:
        raise FileNotFoundError(
            f"{out} holds no study results (run 'signalprop lab run NAME --out {out}' first)"
        )
    rank = {n: i for i, n in enumerate(order or [])}
    dirs.sort(key=lambda p: (rank.get(p.name, len(rank)), p.name))
    for p in dirs:
        _reconclude(p)
    studies = [_study_view(load_study(p)) for p in dirs]
    modes = sorted({s["mode"] for s in studies})
    # the doctor's page helpers: the same Jinja2 environment (autoescape, strict undefined)
    from signalprop.report.html import render_string, write_page

    page = render_string(
        _TEMPLATE,
        title=title,
        built=time.strftime("%Y-%m-%d %H:%M"),
        out_dir=str(out),
        n_studies=len(studies),
        modes=", ".join(modes),
        studies=studies,
    )
    return write_page(out / "index.html", page)


def _reconclude(workdir: Path) -> None:
    """Recompute a study's conclusion from its stored measurements (cheap, and the report then
    reflects the current conclusion code); failed or foreign directories are left alone."""
    meta = read_json(workdir / "meta.json")
    name = str(meta.get("name", workdir.name))
    results = workdir / "results.json"
    if meta.get("status") == "failed" or name not in STUDY_NAMES or not results.exists():
        return
    stored = read_json(results)
    if stored.get("config_hash") != meta.get("config_hash"):
        return  # results of another configuration: do not mix them with this one's figures
    try:
        concl = get_study(name).conclude(stored["data"])
    except Exception:  # noqa: BLE001 - keep the stored conclusion rather than lose the page
        return
    write_json(workdir / "conclusion.json", concl.to_dict())


def _study_view(d: dict[str, Any]) -> dict[str, Any]:
    meta = d["meta"]
    name = str(meta.get("name", d["dir"].name))
    mod = get_study(name) if name in STUDY_NAMES else None
    failed = meta.get("status") == "failed"
    concl = None if failed else d["conclusion"]
    figs = []
    if not failed:
        captions = getattr(mod, "CAPTIONS", {}) if mod else {}
        for p in d["figures"]:
            raw = p.read_bytes()
            w, h = _png_size(raw)
            figs.append(
                {
                    "b64": base64.b64encode(raw).decode("ascii"),
                    "alt": f"{name}: {p.stem}",
                    "caption": captions.get(p.stem, p.stem.replace("_", " ")),
                    "width": w,
                    "height": h,
                }
            )
    timings = [
        ("status", meta.get("status", "?")),
        ("measurement time", _fmt_s(meta.get("run_s"))),
        ("figure time", _fmt_s(meta.get("figures_s"))),
        ("total (this invocation)", _fmt_s(meta.get("total_s"))),
        ("started", meta.get("started", "")),
        ("finished", meta.get("finished", "")),
        ("configuration hash", meta.get("config_hash", "")),
    ]
    verdict = "failed" if failed else (concl.verdict if concl else "n/a")
    return {
        "name": name,
        "anchor": _anchor(name),
        "title": getattr(mod, "TITLE", name) if mod else meta.get("title", name),
        "question": getattr(mod, "QUESTION", "") if mod else "",
        "claim": concl.claim if concl else getattr(mod, "CLAIM", ""),
        "setup": getattr(mod, "SETUP", "") if mod else "",
        "references": list(getattr(mod, "REFERENCES", [])) if mod else [],
        "conclusion": concl,
        "verdict": verdict,
        "verdict_class": verdict if verdict in ("supports", "contradicts", "inconclusive", "failed")
        else "inconclusive",
        "sentence": concl.sentence if concl else (meta.get("error") or ""),
        "summary": first_sentence(concl.sentence) if concl else (meta.get("error") or ""),
        "numbers": [(k, _fmt_value(v)) for k, v in (concl.numbers.items() if concl else [])],
        "figures": figs,
        "error": meta.get("error") if failed else None,
        "traceback": meta.get("traceback", ""),
        "config_json": json.dumps(to_jsonable(d["config"]), indent=1),
        "env_json": json.dumps(to_jsonable(meta.get("environment", {})), indent=1),
        "timings": timings,
        "time": _fmt_s(meta.get("run_s")),
        "mode": "quick" if meta.get("quick") else "full",
    }


def first_sentence(text: str, limit: int = 300) -> str:
    """The first sentence of ``text`` (for the one-line index), shortened to ``limit`` chars."""
    import re

    m = re.search(r"(?<=[.;:])\s+(?=[A-Z])", text)
    head = text[: m.start()] if m else text
    return head if len(head) <= limit else head[: limit - 1].rstrip() + "…"


def escape(s: str) -> str:
    """HTML-escape a string (exposed for callers composing their own snippets)."""
    return html.escape(s, quote=True)
