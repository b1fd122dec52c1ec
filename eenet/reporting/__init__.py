"""Reporting: the results file of a run, markdown tables, plots, W&B logging, experiment reports."""

from eenet.reporting.markdown import markdown_table, results_markdown
from eenet.reporting.results import RunResults, SplitResult, write_results

__all__ = ["RunResults", "SplitResult", "markdown_table", "results_markdown", "write_results"]
