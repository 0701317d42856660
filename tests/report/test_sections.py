"""report/sections.py: the one list of what report.html and report.md show, and the pages that follow it."""

from __future__ import annotations

import re

import pytest

from handmade import make_run
from mathtune.report.pages import TEMPLATES
from mathtune.report.render import write_report
from mathtune.report.sections import FORMATS, SECTIONS, shown


def _all(sections):
    for section in sections:
        yield section
        yield from _all(section.parts)


def test_every_section_shown_in_a_format_has_its_body_there():
    for fmt in FORMATS:
        for section in _all(shown(fmt)):
            assert section.id != "report"  # report.<format>.j2 is the page
            assert (TEMPLATES / f"{section.id}.{fmt}.j2").is_file(), (section.id, fmt)


def test_a_section_left_out_of_a_format_says_where_its_figures_are():
    for section in _all(SECTIONS):
        assert set(section.formats) <= set(FORMATS)
        if set(section.formats) != set(FORMATS):
            assert section.note, section.id


def test_markdown_leaves_out_only_the_parts_the_list_says():
    html, md = ({s.id for s in _all(shown(fmt))} for fmt in FORMATS)
    assert html == {s.id for s in _all(SECTIONS)}
    assert html - md == {"arithmetic_slips", "final_phase", "token_accuracy", "generalisation", "early_stopping"}
    with pytest.raises(ValueError, match="unknown report format"):
        shown("pdf")


def test_both_pages_show_the_sections_in_the_listed_order(tmp_path):
    run = make_run(tmp_path)
    write_report(run)
    pages = {"html": (run / "report.html").read_text(), "md": (run / "report.md").read_text()}
    headings = {"html": r"<h([23])[^>]*>(.*?)</h\1>", "md": r"^(#{2,3}) (.*)$"}
    for fmt, page in pages.items():
        found = [title for _, title in re.findall(headings[fmt], page, re.M)]
        expected = [s.title for s in _all(shown(fmt))]
        assert [t for t in found if any(t.startswith(e) for e in expected)] == found
        assert [next(e for e in expected if t.startswith(e)) for t in found] == expected, fmt
