"""report.html and report.md from a summary: the Jinja environment, its format filters, and the pages.

Both pages iterate sections.SECTIONS, so what each shows is decided in one place; how a section
looks is its body template, one per format.
"""

from __future__ import annotations

from pathlib import Path

import jinja2

from mathtune.report import sections
from mathtune.report.formats import fmt_ci, fmt_md, fmt_num, fmt_p, fmt_p_is, fmt_pct, fmt_pct_points

TEMPLATES = Path(__file__).parent / "templates"
PAGES = {"html": "report.html.j2", "md": "report.md.j2"}


def environment() -> jinja2.Environment:
    """Jinja with autoescape on for HTML (every *.html.j2, section bodies included): questions and
    generations are untrusted text. Trailing newlines are kept so that a section body reads as if
    it were written in the page where it is included."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2"), default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(pct=fmt_pct, pctp=fmt_pct_points, num=fmt_num, p=fmt_p, p_is=fmt_p_is, ci=fmt_ci, md=fmt_md)
    return env


def render(format: str, summary: dict, plots: dict[str, str], run_name: str) -> str:
    """The page in `format` ("html" or "md"); `plots` maps a plot name to what the page links: a data URI
    for HTML, a relative path for Markdown."""
    template = environment().get_template(PAGES[format])
    return template.render(s=summary, d=summary["definitions"], plots=plots, run=run_name,
                           sections=sections.shown(format))
