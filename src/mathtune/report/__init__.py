"""The report: statistics, the summary, plots and rendering, all computed from a run directory's files."""
