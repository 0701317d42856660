"""What report.html and report.md show, and in which order: the one list both page templates iterate.

Each section's body is written once per format, as templates/<id>.html.j2 and <id>.md.j2;
the pages, templates/report.html.j2 and report.md.j2, lay out the header, then every section
of `SECTIONS` shown in their format, each under its title. A part is a sub-section (a heading of its own under its
section). The Markdown is shorter by design, and only where a part says so: a part shown in
HTML alone lists in `note` where the Markdown shows its figures instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

FORMATS = ("html", "md")


@dataclass(frozen=True)
class Section:
    id: str  # names the body templates, templates/<id>.<format>.j2
    title: str
    formats: tuple[str, ...] = FORMATS
    parts: tuple[Section, ...] = ()
    note: str = ""  # for a section not shown in every format: where the others show its figures
    anchor: str | None = None  # the HTML id the page links to


SECTIONS = (
    Section("accuracy", "Accuracy", parts=(
        Section("paired", "Paired outcomes"),
        Section("by_steps", "By number of reasoning steps"),
        Section("arithmetic_slips", "Arithmetic slips", formats=("html",),
                note="Markdown: two rows of the accuracy table, one per model."),
        Section("regressions", "Regressions: solved by the base model, missed after tuning"),
    )),
    Section("examples", "What the model wrote"),
    Section("robustness", "Robustness"),
    Section("training", "Training", parts=(
        Section("final_phase", "Final phase", formats=("html",),
                note="Markdown: rows of the training table, then the forecast table."),
        Section("token_accuracy", "Token accuracy", formats=("html",), note="Markdown: rows of the training table."),
        Section("generalisation", "Generalisation", formats=("html",),
                note="Markdown: rows of the training table, then the loss/exact-match sentence."),
        Section("early_stopping", "Early stopping", formats=("html",), note="Markdown: rows of the training table."),
    )),
    Section("outliers", "Outliers"),
    Section("cost", "Cost"),
    Section("recommendations", "Recommendations"),
    Section("missing", "Missing and caveats", anchor="missing"),
)


def shown(format: str, sections: tuple[Section, ...] = SECTIONS) -> list[Section]:
    """The sections, and their parts, that a page in `format` shows, in order."""
    if format not in FORMATS:
        raise ValueError(f"unknown report format {format!r}; expected one of {FORMATS}")
    return [dataclasses.replace(section, parts=tuple(shown(format, section.parts)))
            for section in sections if format in section.formats]
