"""report.html and report.md from a summary: the Jinja environment, its format filters, and the pages."""

from __future__ import annotations

from pathlib import Path

import jinja2

from mathtune.report.formats import fmt_ci, fmt_md, fmt_num, fmt_p, fmt_pct, fmt_pct_points

TEMPLATES = Path(__file__).parent / "templates"
PAGES = {"html": "report.html.j2", "md": "report.md.j2"}


def environment() -> jinja2.Environment:
    """Jinja with autoescape on for HTML: questions and generations are untrusted text."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2"), default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(pct=fmt_pct, pctp=fmt_pct_points, num=fmt_num, p=fmt_p, ci=fmt_ci, md=fmt_md)
    return env


def render(format: str, summary: dict, plots: dict[str, str], run_name: str) -> str:
    """The page in `format` ("html" or "md"); `plots` maps a plot name to what the page links: a data URI
    for HTML, a relative path for Markdown."""
    template = environment().get_template(PAGES[format])
    return template.render(s=summary, d=summary["definitions"], plots=plots, run=run_name)
