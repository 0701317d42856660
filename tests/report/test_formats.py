"""report/formats.py: how figures are written, and "n/a" for a missing one."""

from __future__ import annotations

import pytest

from mathtune.report.formats import fmt_ci, fmt_md, fmt_num, fmt_p, fmt_p_is, fmt_pct, fmt_pct_points


@pytest.mark.parametrize("fmt", [fmt_pct, fmt_pct_points, fmt_num, fmt_p])
def test_missing_figures_read_n_a(fmt):
    assert fmt(None) == "n/a" and fmt(float("nan")) == "n/a"


def test_figures():
    assert fmt_pct(0.24) == "24.0%" and fmt_pct_points(-12.5) == "-12.5%"
    assert fmt_num(True) == "yes" and fmt_num(1234567) == "1,234,567" and fmt_num(0.5) == "0.500"
    assert fmt_num(2e-4) == "0.0002" and fmt_num(12345.6) == "1.23e+04"
    assert fmt_p(0.0004) == "< 0.001" and fmt_p(0.0312) == "0.031"
    assert fmt_p_is(0.0004) == "< 0.001" and fmt_p_is(0.0312) == "= 0.031" and fmt_p_is(None) == "n/a"
    assert fmt_ci([0.14297, 0.37413]) == "14.3–37.4%" and fmt_ci(None) == "n/a"


def test_markdown_cells_escape_untrusted_text():
    assert fmt_md("a <b>|c</b> `d`\n e & f") == "a &lt;b&gt;\\|c&lt;/b&gt; \\`d\\` e &amp; f"
    assert fmt_md(None) == ""
