"""How figures are written in the report and in the comparison table: "n/a" for a figure that is missing."""

from __future__ import annotations


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def fmt_pct(value, digits: int = 1) -> str:
    """A share (0.24) as a percentage ("24.0%")."""
    return "n/a" if _missing(value) else f"{value * 100:.{digits}f}%"


def fmt_pct_points(value, digits: int = 1) -> str:
    """A figure already in percent (12.5) with its sign kept when negative."""
    return "n/a" if _missing(value) else f"{value:.{digits}f}%"


def fmt_num(value, digits: int = 3) -> str:
    if _missing(value):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}" if value and (abs(value) < 1e-3 or abs(value) >= 1e4) else f"{value:.{digits}f}"


def fmt_p(value) -> str:
    if _missing(value):
        return "n/a"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def fmt_p_is(value) -> str:
    """A p-value after "p" in a sentence: "= 0.031" or "< 0.001" (fmt_p's figure with its relation)."""
    shown = fmt_p(value)
    return shown if shown.startswith("<") or shown == "n/a" else f"= {shown}"


def fmt_ci(ci95) -> str:
    """A 95% interval of a share as "14.3–37.4%"."""
    return "n/a" if not ci95 else f"{ci95[0] * 100:.1f}–{ci95[1] * 100:.1f}%"


def fmt_md(value) -> str:
    """Untrusted text for a Markdown table cell: HTML-escaped, pipes escaped, on one line."""
    text = "" if value is None else str(value)
    for raw, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|"), ("`", "\\`")):
        text = text.replace(raw, escaped)
    return " ".join(text.split())
