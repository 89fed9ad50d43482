"""Self-contained HTML pages: figures embedded as base64 PNG, no scripts, no external resources,
every user-supplied string escaped (Jinja2 autoescape).

    from signalprop.report.html import figure_to_data_uri, render_page, write_page
    html = render_page("My title", sections=[{"title": "Loss", "figures": [fig], "text": "..."}])
    write_page("out/report.html", html)

Templates live in ``signalprop/report/templates`` (shipped as package data); :func:`render`
renders one of them, :func:`render_string` an inline template, both with autoescape on.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from signalprop._format import fmt_number as _fmt_number
from signalprop.record import atomic_write_text

#: Default resolution of embedded figures (dots per inch).
DPI = 100


def figure_to_png(fig: Any, dpi: int = DPI) -> bytes:
    """PNG bytes of a matplotlib figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def figure_to_base64(fig: Any, dpi: int = DPI) -> str:
    """Base64 text of the figure's PNG."""
    return base64.b64encode(figure_to_png(fig, dpi)).decode("ascii")


def figure_to_data_uri(fig: Any, dpi: int = DPI) -> str:
    """``data:image/png;base64,...`` for an ``<img src>``."""
    return "data:image/png;base64," + figure_to_base64(fig, dpi)


def img_tag(fig: Any, alt: str = "", dpi: int = DPI) -> Markup:
    """An ``<img>`` element embedding the figure (``alt`` is escaped)."""
    alt_esc = Markup.escape(alt)
    return Markup(f'<img src="{figure_to_data_uri(fig, dpi)}" alt="{alt_esc}">')


def fmt_number(v: Any, digits: int = 3) -> str:
    """Compact number formatting for tables (``None``/NaN -> ``"–"``; see
    :func:`signalprop._format.fmt_number`)."""
    if v is not None and not isinstance(v, (bool, int, float)):
        return str(v)  # numpy scalars and the like stay as the table always showed them
    return _fmt_number(v, digits, missing="–", infinity=("∞", "-∞"), exact_ints=True)


def environment() -> jinja2.Environment:
    """The Jinja2 environment: package templates, autoescape always on, strict undefined."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("signalprop", "report/templates"),
        autoescape=True,  # every {{ value }} is escaped unless marked safe (Markup)
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = fmt_number
    return env


def render(template: str, **context: Any) -> str:
    """Render a packaged template (``templates/<template>``) with autoescape."""
    return environment().get_template(template).render(**context)


def render_string(source: str, **context: Any) -> str:
    """Render an inline template string with the same environment (autoescape on)."""
    return environment().from_string(source).render(**context)


def render_page(
    title: str,
    sections: Sequence[Mapping[str, Any]],
    subtitle: str = "",
    dpi: int = DPI,
) -> str:
    """A generic self-contained page.

    Args:
        title: Page title (escaped).
        sections: Each a mapping with optional keys ``title`` (str), ``text`` (str, escaped;
            blank lines separate paragraphs), ``figures`` (matplotlib figures or ``None``s, which
            are skipped), ``captions`` (one str per figure), ``table`` (``{"columns": [...],
            "rows": [[...], ...]}``, cells escaped) and ``html`` (``Markup`` only: trusted HTML).
        subtitle: A line under the title (escaped).
        dpi: Figure resolution.
    """
    rendered = []
    for s in sections:
        figs = []
        caps = list(s.get("captions", []))
        for i, f in enumerate(s.get("figures", []) or []):
            if f is not None:
                figs.append({"src": figure_to_data_uri(f, dpi),
                             "caption": caps[i] if i < len(caps) else ""})
        html = s.get("html")
        if html is not None and not isinstance(html, Markup):
            raise TypeError("section 'html' must be markupsafe.Markup (trusted); use 'text' for "
                            "plain strings")
        text = s.get("text", "") or ""
        rendered.append({
            "title": s.get("title", ""),
            "paragraphs": [p for p in text.split("\n\n") if p.strip()],
            "figures": figs,
            "table": s.get("table"),
            "html": html,
        })
    return render("page.html", title=title, subtitle=subtitle, sections=rendered)


def write_page(path: str | Path, html: str) -> Path:
    """Write a page atomically (UTF-8)."""
    path = Path(path)
    atomic_write_text(path, html)
    return path
