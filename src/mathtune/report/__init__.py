"""The report of a run directory: summary.json, plots/*.png, report.md and report.html.

records reads the run into RunRecords; summary computes every figure from them, with stats
(answers; shared with evaluation), curves (training), hard_examples (outliers), cost,
recommendations and definitions; plots and pages (templates laid out by sections) draw the
figures; render writes it all; compare tabulates several runs.
"""
