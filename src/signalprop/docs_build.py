"""Build the documentation site offline: the API reference from docstrings (pdoc) plus the
Markdown guides in ``docs/`` rendered as pages, under one index.

Usage (``make docs``)::

    python -m signalprop.docs_build site          # -> site/index.html
    python -m signalprop.docs_build OUT --no-api   # guides only (fast)

Layout of the output folder::

    index.html            links to every guide and to the API reference
    guide/<name>.html     one page per docs/<name>.md (links between .md files rewritten)
    api/signalprop.html   pdoc's reference of every public module, with search

Docstrings are read as Google style (``Args:``/``Returns:``/``Raises:``). Nothing is fetched
from the network: pdoc's pages inline their CSS and search index, and maths/mermaid rendering
(the only features that load scripts from a CDN) stay off.

Needs the ``[docs]`` extra (``pip install pdoc``).
"""

from __future__ import annotations

import argparse
import html
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: The package documented by default (pdoc walks its public sub-modules).
DEFAULT_MODULES: tuple[str, ...] = ("signalprop",)

#: Sub-modules left out of the reference: ``__main__`` would run the CLI on import.
EXCLUDE: tuple[str, ...] = (r"signalprop\.__main__",)

_MD_LINK = re.compile(r'href="([^":#]+)\.md(#[^"]*)?"')

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 52rem;
       margin: 2rem auto; padding: 0 1rem; line-height: 1.55; color: #1f2328; }}
pre, code {{ font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
             font-size: 0.92em; }}
pre {{ background: #f6f8fa; padding: 0.8rem 1rem; overflow-x: auto; border-radius: 6px; }}
code {{ background: #f6f8fa; padding: 0.1em 0.3em; border-radius: 4px; }}
pre code {{ background: none; padding: 0; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #d0d7de; padding: 0.3rem 0.6rem; }}
nav {{ font-size: 0.9em; margin-bottom: 1.5rem; }} a {{ color: #0969da; }}
</style>
</head>
<body>
<nav>{nav}</nav>
{body}
</body>
</html>
"""


def _require_pdoc() -> None:
    try:
        import pdoc  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "building the docs needs pdoc: pip install 'signalprop[docs]'"
        ) from e


def find_docs_dir() -> Path | None:
    """The repository's ``docs/`` folder (source checkout), or ``None`` when installed from a
    wheel without it."""
    here = Path(__file__).resolve()
    for parent in here.parents[:4]:
        cand = parent / "docs"
        if cand.is_dir() and any(cand.glob("*.md")):
            return cand
    return None


def _title(md: str, fallback: str) -> str:
    for line in md.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return fallback


def render_markdown(text: str) -> str:
    """Markdown -> HTML with pdoc's renderer (markdown2 with fenced code, tables, anchors);
    links to sibling ``.md`` files become links to their ``.html`` pages."""
    from pdoc.render_helpers import to_html

    return _MD_LINK.sub(lambda m: f'href="{m.group(1)}.html{m.group(2) or ""}"', to_html(text))


def build_guides(docs_dir: Path, out_dir: Path, api_link: str | None) -> list[tuple[str, Path]]:
    """Render every ``docs_dir/*.md`` to ``out_dir/guide/<name>.html``.

    Returns:
        ``[(title, path)]`` sorted by file name.
    """
    guide_dir = out_dir / "guide"
    guide_dir.mkdir(parents=True, exist_ok=True)
    pages = []
    for md_path in sorted(docs_dir.glob("*.md")):
        text = md_path.read_text(encoding="utf-8")
        title = _title(text, md_path.stem)
        nav = '<a href="../index.html">signalprop docs</a>'
        if api_link:
            nav += f' &middot; <a href="../{api_link}">API reference</a>'
        page = _PAGE.format(title=html.escape(title), nav=nav, body=render_markdown(text))
        path = guide_dir / f"{md_path.stem}.html"
        path.write_text(page, encoding="utf-8")
        pages.append((title, path))
    return pages


def public_modules(package: str) -> list[str]:
    """Every public module of ``package`` found on disk, without importing any of them.

    pdoc alone follows a package's ``__all__``, which in signalprop names lazily imported
    functions rather than sub-modules, so the sub-modules are listed explicitly. A module or
    package whose name starts with ``_`` is private and left out.
    """
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ValueError(f"cannot find the module {package!r} to document")
    if not spec.submodule_search_locations:
        return [package]
    out = [package]
    for root in spec.submodule_search_locations:
        base = Path(root)
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
                if not parts:
                    continue
            if any(p.startswith("_") for p in parts) or any(
                not (base.joinpath(*parts[:i]) / "__init__.py").exists()
                for i in range(1, len(parts))
            ):
                continue  # private, or not inside a package
            name = ".".join([package, *parts])
            if not any(re.fullmatch(x, name) for x in EXCLUDE):
                out.append(name)
    return sorted(set(out))


def build_api(
    out_dir: Path, modules: Sequence[str] = DEFAULT_MODULES, *, show_source: bool = True
) -> tuple[Path, list[str], dict[str, str]]:
    """pdoc's API reference of ``modules`` and all their public sub-modules into
    ``out_dir/api``.

    Each module is imported first; one that fails to import (a missing optional dependency, a
    bug) is left out and reported instead of failing the whole build.

    Returns:
        ``(pdoc's index page, documented module names, {skipped module: error line})``.
    """
    _require_pdoc()
    import importlib

    import pdoc
    import pdoc.render

    api_dir = out_dir / "api"
    api_dir.mkdir(parents=True, exist_ok=True)
    pdoc.render.configure(
        docformat="google",
        math=False,  # would load MathJax from a CDN
        mermaid=False,
        search=True,
        show_source=show_source,
        footer_text="signalprop",
    )
    names: list[str] = []
    skipped: dict[str, str] = {}
    for m in modules:
        for n in public_modules(m):
            if n in names or n in skipped:
                continue
            try:
                importlib.import_module(n)
            except Exception as e:  # any import failure: report it, document the rest
                skipped[n] = f"{type(e).__name__}: {e}".splitlines()[0]
            else:
                names.append(n)
    if not names:
        raise ValueError(f"none of the modules {list(modules)} could be imported: {skipped}")
    with warnings.catch_warnings():
        # a package whose __all__ names a sub-module adds it twice: harmless
        warnings.filterwarnings("ignore", message=".*has already been added.*")
        warnings.filterwarnings("ignore", message=".*does not resolve.*")
        pdoc.pdoc(*names, *(f"!{p}" for p in EXCLUDE), output_directory=api_dir)
    return api_dir / "index.html", names, skipped


@dataclass
class Site:
    """What :func:`build` produced.

    Attributes:
        index: The site's ``index.html``.
        guides: ``[(title, page)]`` of the rendered Markdown guides.
        modules: Modules in the API reference.
        skipped: Modules left out of the reference because they failed to import, with the
            first line of the error.
    """

    index: Path
    guides: list[tuple[str, Path]] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def build(
    out_dir: str | Path = "site",
    *,
    docs_dir: str | Path | None = None,
    api: bool = True,
    modules: Sequence[str] = DEFAULT_MODULES,
    show_source: bool = True,
) -> Site:
    """Build the whole site (``index.html``, guides, API reference).

    Args:
        out_dir: Output folder (created; existing files are overwritten).
        docs_dir: Folder of Markdown guides (default: the checkout's ``docs/``).
        api: Build the API reference (the slow part: it imports every module).
        modules: Top-level modules for the reference.
        show_source: Include each function's highlighted source (about half the build time).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ddir = Path(docs_dir) if docs_dir is not None else find_docs_dir()
    if ddir is not None and not ddir.is_dir():
        raise FileNotFoundError(f"no docs folder at {ddir}")
    api_page, names, skipped = build_api(out, modules, show_source=show_source) if api else (None, [], {})
    api_link = api_page.relative_to(out).as_posix() if api_page else None
    guides = build_guides(ddir, out, api_link) if ddir is not None else []

    items = [
        f'<li><a href="{p.relative_to(out).as_posix()}">{html.escape(t)}</a></li>'
        for t, p in guides
    ]
    body = ["<h1>signalprop</h1>",
            "<p>Measure, diagnose and cure vanishing and exploding gradients in PyTorch.</p>"]
    if items:
        body += ["<h2>Guides</h2>", "<ul>", *items, "</ul>"]
    if api_link:
        body += [
            "<h2>API reference</h2>",
            f'<p><a href="{api_link}">All modules</a> (with search), generated from the '
            "docstrings: shapes, formulas and the papers they come from.</p>",
            "<ul>",
            *(
                f'<li><a href="api/{n.replace(".", "/")}.html"><code>{n}</code></a></li>'
                for n in names
            ),
            "</ul>",
        ]
    index = out / "index.html"
    index.write_text(
        _PAGE.format(title="signalprop documentation", nav="", body="\n".join(body)),
        encoding="utf-8",
    )
    return Site(index, guides, names, skipped)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m signalprop.docs_build OUT [--docs DIR] [--no-api]``."""
    ap = argparse.ArgumentParser(prog="python -m signalprop.docs_build", description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default="site", help="output folder (default: site)")
    ap.add_argument("--docs", default=None, help="folder of Markdown guides (default: docs/)")
    ap.add_argument("--no-api", action="store_true", help="skip the API reference")
    ap.add_argument(
        "--strict", action="store_true", help="fail when a module cannot be imported"
    )
    args = ap.parse_args(argv)
    try:
        site = build(args.out, docs_dir=args.docs, api=not args.no_api)
    except (ImportError, FileNotFoundError, ValueError) as e:
        print(f"docs_build: error: {e}", file=sys.stderr)
        return 2
    for name, err in site.skipped.items():
        print(f"docs_build: warning: {name} left out (import failed: {err})", file=sys.stderr)
    print(
        f"Docs: {site.index} ({len(site.guides)} guides, {len(site.modules)} modules in the API "
        "reference)"
    )
    return 1 if site.skipped and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
