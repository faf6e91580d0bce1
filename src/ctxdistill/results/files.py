"""A comparison written to a directory: README.md with the tables and plots, and results/ with each format."""

from __future__ import annotations

import contextlib
import re
import shlex
from pathlib import Path
from typing import Any, Optional

from ctxdistill.results.plots import write_plots
from ctxdistill.results.render import render
from ctxdistill.results.table import Table, summarise
from ctxdistill.results.versions import versions_markdown

RESULTS_DIR = "results"


def write_results(
    directory: Path,
    records: list[dict[str, Any]],
    *,
    title: str,
    failures: Optional[dict[str, str]] = None,
    command: Optional[str] = None,
    appendix: str = "",
    tables: Optional[list[Table]] = None,
    sources: Optional[str] = None,
) -> Path:
    """README.md with the tables and plot links (and ``appendix``, Markdown, after them), and results/ with the
    tables as .md/.csv/.tex and the PNGs. ``tables``: the records' tables as already summarised (with their
    paired tests, ``--vs``); by default summarised here. ``sources``: what ctxdistill-compare reads to make them
    again (its arguments before ``--out``; by default ``directory``, a sweep's own)."""
    sources = sources or shlex.quote(str(directory))
    tables = tables if tables is not None else summarise(records)
    results = directory / RESULTS_DIR
    results.mkdir(parents=True, exist_ok=True)
    for fmt, suffix in (("markdown", "md"), ("csv", "csv"), ("latex", "tex")):
        (results / f"table.{suffix}").write_text(render(tables, fmt) + "\n")
    plots = write_plots(tables, results)
    lines = [
        f"# {title}",
        "",
        f"{len(records)} complete runs. Each cell: the mean and its 95% interval, Student's t over the seeds "
        "(the `seeds` column) when there are several that differ, else one run's over the set's examples (`n`; the "
        "fewest where the seeds differ in it): Wilson's for an accuracy-like figure, Student's t over a knowledge "
        "graph's test triples for MRR and Hits@k (each triple's mean of its head and tail query), the run's "
        "percentile bootstrap for F1.",
        "",
    ]
    if command:
        lines += ["Produced by:", "", "```bash", command, "```", ""]
    if failures:
        lines += [
            f"**{len(failures)} failed cells** (run their ctxdistill command again to retry only them: it skips "
            "complete runs):",
            "",
        ]
        lines += [f"- `{cell}`: {error}" for cell, error in failures.items()] + [""]
    lines += [
        render(tables, "markdown"),
        "",
        f"Tables: [Markdown]({RESULTS_DIR}/table.md), [CSV]({RESULTS_DIR}/table.csv), "
        f"[LaTeX]({RESULTS_DIR}/table.tex).",
        "",
    ]
    for plot in plots:
        lines += [f"![{plot.stem}]({RESULTS_DIR}/{plot.name})", ""]
    if appendix:  # e.g. the scorecard
        lines += [appendix, ""]
    lines += [*versions_markdown(records), ""]
    lines += [
        "Columns are the metrics each run's evaluator declares (`metric_set` in its metrics.json). "
        f"Regenerate with `ctxdistill-compare {sources} --out {shlex.quote(str(directory))}`; "
        f"`ctxdistill-compare {sources} --vs METHOD` adds a paired test against METHOD.",
        "",
    ]
    readme = directory / "README.md"
    readme.write_text("\n".join(lines))
    return readme


def sweep_command_in(readme: Path) -> Optional[str]:
    """The command a sweep's README gives as what produced it (and resumes it), so that a comparison written
    over a sweep's own directory (``ctxdistill-compare SWEEP --out SWEEP``) keeps it."""
    text = readme.read_text() if readme.is_file() else ""
    found = re.search(r"^Produced by:\n\n```bash\n(.+?)\n```$", text, flags=re.MULTILINE | re.DOTALL)
    return found.group(1) if found else None


def remove_results(directory: Path) -> None:
    """Remove the README.md and results/ files an earlier :func:`write_results` wrote to ``directory`` (its README
    names each): a README or file of the user's own stays, and so does results/ if anything else is in it."""
    readme = directory / "README.md"
    text = readme.read_text() if readme.is_file() else ""
    if "Regenerate with `ctxdistill-compare" not in text:
        return
    written = set(re.findall(rf"\]\(({RESULTS_DIR}/[^)/]+)\)", text))
    if f"{RESULTS_DIR}/scorecard.csv" in written:
        written.add(f"{RESULTS_DIR}/scorecard.md")  # written beside it, linked only as the README's appendix
    for name in written:
        (directory / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: something of the user's is in it
        (directory / RESULTS_DIR).rmdir()
    readme.unlink()
