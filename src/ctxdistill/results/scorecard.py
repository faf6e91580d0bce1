"""The reproduction scorecard: each number a paper reports next to the runs that reproduce it.

A paper's reported numbers are data, ``ctxdistill/papers/<paper>.yaml`` (the format: docs/scorecard.md),
named by an experiment's ``paper:``. Each cell says how it maps onto runs (method, model, dataset,
shots, the run metric); the scorecard puts the reproduced mean, its 95% interval and n next to it
and a verdict: ``consistent`` (the paper's value is inside our interval), ``above`` / ``below``
(our interval lies above / below it), ``not run``, ``not measured`` (runs without that metric) or
``no interval`` (one run, or runs that all agree, of a metric that is not a rate or of unknown size).

This module depends only on run records (``ctxdistill.results.records``, their declarations), the intervals of
``ctxdistill.results.stats`` and plain data.
"""

from __future__ import annotations

import statistics
import string
from dataclasses import MISSING, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from ctxdistill.results import stats
from ctxdistill.results.records import metric_set, predictions
from ctxdistill.results.render import csv_text, markdown_cell

PAPERS_PACKAGE = "ctxdistill"
PAPERS_DIR = "papers"


# ---------------------------------------------------------------- the papers' numbers
@dataclass(frozen=True)
class Cell:
    """One reported number and the runs it compares with."""

    paper: str
    table: str
    row: str
    column: str
    metric: str  # what the paper reports, in words
    value: float  # as printed in the paper
    runs: Optional[int]  # how many runs the paper averages; None where it does not say
    source: str  # table or figure (and page) it was read from; a citing paper, named as such
    method: str
    model: str  # the paper's model; --model-as maps a run's model onto it
    dataset: str
    run_metric: str  # the metrics.json key compared with
    proportion: bool  # a rate over examples (accuracy, Hits@k): one run gets a Wilson interval
    shots: Optional[int] = None  # demonstrations in the context; None matches any
    percent: bool = False  # the paper prints percentages; runs report fractions
    approximate: bool = False  # read off a plot
    note: str = ""

    @property
    def scale(self) -> float:
        """Run values times this are in the paper's units."""
        return 100.0 if self.percent else 1.0


CELL_FIELDS = {f.name for f in fields(Cell)} - {"paper"}
REQUIRED = {f.name for f in fields(Cell) if f.default is MISSING} - {"paper"}
TABLE_KEYS = {"defaults", "columns", "rows"}
PAPER_KEYS = {"paper", "citation", "tables", "left_out"}


@dataclass
class Paper:
    name: str
    citation: str
    cells: list[Cell]
    left_out: list[dict[str, str]]  # cells that could not be sourced, and why


def known_papers() -> list[str]:
    folder = resources.files(PAPERS_PACKAGE) / PAPERS_DIR
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_paper(name: str) -> Paper:
    """The cells of ``papers/<name>.yaml``: each table's defaults, then its column's, then its row's fields."""
    known = known_papers()
    if name not in known:
        raise ValueError(f"no reported numbers for paper {name!r}; known papers: {', '.join(known)}")
    where = f"{PAPERS_DIR}/{name}.yaml"
    data = yaml.safe_load((resources.files(PAPERS_PACKAGE) / PAPERS_DIR / f"{name}.yaml").read_text())
    unknown = set(data) - PAPER_KEYS
    if unknown or data.get("paper") != name:
        raise ValueError(f"{where}: keys must be {sorted(PAPER_KEYS)} with paper: {name} (found {sorted(data)})")
    cells = [cell for i, table in enumerate(data["tables"]) for cell in table_cells(name, table, f"{where} table {i}")]
    return Paper(name, data["citation"], cells, data.get("left_out") or [])


def table_cells(paper: str, table: dict[str, Any], where: str) -> list[Cell]:
    if set(table) != TABLE_KEYS:
        raise ValueError(f"{where}: a table has exactly the keys {sorted(TABLE_KEYS)} (found {sorted(table)})")
    columns = table["columns"]
    cells = []
    for row in table["rows"]:
        values = row.get("values")
        here = f"{where} row {row.get('row')!r}"
        if not isinstance(values, list) or len(values) != len(columns):
            raise ValueError(f"{here}: give one value per column ({len(columns)}: {list(columns)})")
        row_fields = {k: v for k, v in row.items() if k != "values"}
        merged = [
            {**table["defaults"], **column_fields, **row_fields, "column": column, "value": value}
            for (column, column_fields), value in zip(columns.items(), values)
        ]
        # Keys that are not fields fill the fields' {placeholders}, e.g. a row's {ood} in a column's run metric.
        context = {k: v for m in merged for k, v in m.items() if k not in CELL_FIELDS}
        named = {
            name
            for m in merged
            for v in m.values()
            if isinstance(v, str)
            for _, name, _, _ in string.Formatter().parse(v)
        }
        if set(context) - named:
            raise ValueError(f"{here}: unknown fields {sorted(set(context) - named)}; fields: {sorted(CELL_FIELDS)}")
        for m in merged:
            try:
                cell = {k: v.format(**context) if isinstance(v, str) else v for k, v in m.items() if k in CELL_FIELDS}
            except KeyError as e:
                raise ValueError(f"{here}: {{{e.args[0]}}} names no key of the table, column or row") from None
            missing = REQUIRED - set(cell)
            if missing:
                raise ValueError(f"{here} column {m['column']!r}: missing {sorted(missing)}")
            if not isinstance(cell["value"], (int, float)) or isinstance(cell["value"], bool):
                raise ValueError(f"{here} column {m['column']!r}: value {cell['value']!r} is not a number")
            cells.append(Cell(paper=paper, **cell))
    return cells


# ---------------------------------------------------------------- cells against runs
@dataclass
class Score:
    cell: Cell
    run_model: Optional[str] = None  # the model the runs used (differs from the cell's under --model-as)
    setting: Optional[str] = None  # the --by values the runs share ("lr=0.0001"); None without --by
    values: list[float] = field(default_factory=list)  # the run metric per run, in the paper's units
    examples: list[Optional[int]] = field(default_factory=list)  # eval examples of each run with a value
    #: the kind of the metric the runs declare (a proportion, a mean over examples such as MRR, a bootstrapped
    #: statistic, a value without one-run interval), with what each run reports for its own interval
    #: (``Metric.companions``); None where no run declares the metric (the cell's ``proportion`` says)
    declared: Optional[tuple[str, list[tuple[Optional[float], ...]]]] = None
    matched_runs: int = 0  # runs of the cell, with or without the metric
    #: the bounds the runs declare for the metric (MRR in [0, 1]); a cell with ``proportion`` is in [0, 1] anyway
    value_range: tuple[Optional[float], Optional[float]] = (None, None)

    @property
    def mean(self) -> Optional[float]:
        return statistics.fmean(self.values) if self.values else None

    @property
    def difference(self) -> Optional[float]:
        """Ours minus the paper's."""
        return None if self.mean is None else self.mean - self.cell.value

    @property
    def interval(self) -> Optional[tuple[float, float]]:
        """95% interval in the paper's units: t over runs that differ, or over the runs' fewest examples (Wilson's
        for a rate, t from the spread per example for a mean over examples)."""
        scale = self.cell.scale
        kind, reported = self.declared or ("proportion" if self.cell.proportion else "value", None)
        interval = stats.mean_interval([v / scale for v in self.values], self.examples, kind, reported)
        if interval is None:
            return None
        low, high = interval
        # a mean of rates lies in [0, 1], a declared metric in its declared range, whatever few runs suggest
        lowest, highest = (0.0, 1.0) if self.cell.proportion else self.value_range
        return (
            (low if lowest is None else max(low, lowest)) * scale,
            (high if highest is None else min(high, highest)) * scale,
        )

    @property
    def verdict(self) -> str:
        if not self.matched_runs:
            return "not run"
        if not self.values:
            return "not measured"
        interval = self.interval
        if interval is None:
            return "no interval"
        low, high = interval
        tolerance = 1e-9 * self.cell.scale  # the paper's value on a bound counts as inside
        if low - tolerance <= self.cell.value <= high + tolerance:
            return "consistent"
        return "above" if low > self.cell.value else "below"


def run_shots(record: dict[str, Any]) -> Optional[int]:
    """The demonstrations in a run's context: metrics.json lists them; a run read from W&B has its config's
    count (every context draws num_demos); None for a run that says neither."""
    if "demos" in record:
        return len(record["demos"])
    try:
        context = record["config"]["dataset"]["context"]
        return context["num_demos"] * context["num_contexts"]
    except (KeyError, TypeError):  # no config, or a dataset without demonstrations
        return None


def run_examples(record: dict[str, Any], run_metric: str) -> Optional[int]:
    """How many examples the metric's eval set has: the run's ``<set>/examples`` metric, else its rows in
    predictions.jsonl (runs from before the metric was recorded)."""
    eval_set = run_metric.split("/", 1)[0]
    if record["metrics"].get(f"{eval_set}/examples"):
        return int(record["metrics"][f"{eval_set}/examples"])
    rows = [row for row in predictions(record) or [] if row.get("set") == eval_set]
    return len(rows) or None


def run_declarations(records: list[dict[str, Any]], run_metric: str) -> dict[str, Any]:
    """What the runs declare of the metric, as :class:`Score` fields: its value range and its kind, with what each
    run reports for its own interval; nothing where no run declares it (the cell's ``proportion`` says)."""
    set_name, _, name = run_metric.rpartition("/")
    # the declaration the table reads for the set (one for the set by name wins over one for every set); a run from
    # before declarations declares nothing (its metrics are plain values only for want of one)
    declared = [
        m for r in records if r.get("metric_set") and (m := metric_set(r).metric_for(set_name, name)) is not None
    ]
    if not declared:
        return {}
    metric = next((m for m in declared if m.companions), declared[0])
    reported = [tuple(r["metrics"].get(f"{set_name}/{c}") for c in metric.companions) for r in records]
    return {"value_range": metric.value_range, "declared": (metric.kind, reported)}


def score(cells: list[Cell], records: list[dict[str, Any]], model_as: Optional[dict[str, str]] = None) -> list[Score]:
    """Each cell against the runs that map onto it: one score per run model, or one "not run" score.

    ``model_as`` maps a run's model onto a paper's model (``{"smollm2-135m": "opt-125m"}``).
    A cell with ``shots`` takes only runs with that many demonstrations (runs that do not list theirs count).
    Records split by settings (``--by``, results.records.split_by) are scored per setting, never averaged as seeds.
    """
    model_as = model_as or {}
    scores = []
    for cell in cells:
        by_model: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for record in records:
            shots, split = run_shots(record), record.get("by") or {}
            method = split.get("method", record["method"])
            if (method, model_as.get(record["model"], record["model"]), record["dataset"]) == (
                cell.method,
                cell.model,
                cell.dataset,
            ) and (cell.shots is None or shots is None or shots == cell.shots):
                by_model.setdefault((record["model"], split.get("setting", "")), []).append(record)
        if not by_model:
            scores.append(Score(cell))
        for (run_model, setting), runs in sorted(by_model.items()):
            measured = [r for r in runs if cell.run_metric in r["metrics"]]
            scores.append(
                Score(
                    cell,
                    run_model,
                    values=[r["metrics"][cell.run_metric] * cell.scale for r in measured],
                    examples=[run_examples(r, cell.run_metric) for r in measured],
                    setting=setting or None,
                    matched_runs=len(runs),
                    **run_declarations(measured, cell.run_metric),
                )
            )
    return scores


def papers_of(records: list[dict[str, Any]]) -> list[str]:
    """The papers the runs' experiments name (``paper:``), in first-seen order."""
    return list(dict.fromkeys(r["paper"] for r in records if r.get("paper")))


# ---------------------------------------------------------------- rendering
COLUMNS = [
    "table",
    "row",
    "column",
    "paper",
    "runs (paper)",
    "ours: model",
    "mean",
    "95% interval",
    "n",
    "diff",
    "verdict",
]


def number(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def cell_digits(cell: Cell) -> int:
    return 1 if cell.percent else 3


def text_rows(scores: list[Score]) -> list[list[str]]:
    rows = []
    for s in scores:
        cell, digits = s.cell, cell_digits(s.cell)
        if s.run_model is None:
            ours = "-"
        elif s.run_model != cell.model:
            ours = f"{s.run_model} as {cell.model}"
        else:
            ours = s.run_model
        if s.setting:
            ours += f" ({s.setting})"
        interval = s.interval
        n = str(len(s.values)) if s.values else "-"
        if len(s.values) == 1:
            n += f" run, {s.examples[0]} ex." if s.examples[0] else " run"
        rows.append(
            [
                cell.table,
                cell.row,
                cell.column,
                ("≈" if cell.approximate else "") + f"{cell.value:.{digits}f}",
                "?" if cell.runs is None else str(cell.runs),
                ours,
                number(s.mean, digits),
                "-" if interval is None else f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]",
                n,
                "-" if s.difference is None else f"{s.difference:+.{digits}f}",
                s.verdict,
            ]
        )
    return rows


def aligned(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        header, rows = [markdown_cell(c) for c in header], [[markdown_cell(c) for c in row] for row in rows]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    if markdown:
        return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines)
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def verdict_counts(scores: list[Score]) -> str:
    counts: dict[str, int] = {}
    for s in scores:
        counts[s.verdict] = counts.get(s.verdict, 0) + 1
    return ", ".join(f"{n} {verdict}" for verdict, n in counts.items())


def render(papers: list[Paper], scores: list[Score], model_as: dict[str, str], fmt: str = "text") -> str:
    """The scorecard as aligned text or Markdown: per paper its cells, then where each value came from."""
    if fmt == "csv":
        return render_csv(scores)
    markdown = fmt == "markdown"
    out = []
    for paper in papers:
        mine = [s for s in scores if s.cell.paper == paper.name]
        heading = f"Scorecard: {paper.citation}"
        out += [f"### {heading}" if markdown else heading, ""]
        if mine:
            out += [
                f"{len({(s.cell.table, s.cell.row, s.cell.column) for s in mine})} cells: {verdict_counts(mine)}.",
                "",
            ]
            out += [aligned(COLUMNS, text_rows(mine), markdown), ""]
        bullet = "- " if markdown else "  "
        sources = dict.fromkeys((s.cell.table, s.cell.source) for s in mine)
        if sources:
            out += ["Sources:"] + [f"{bullet}{table}: {source}" for table, source in sources] + [""]
        mappings = dict.fromkeys(
            (s.cell.table, s.cell.column, s.cell.method, s.cell.run_metric, s.cell.metric) for s in mine
        )
        if mappings:
            out += ["Compared with:"]
            out += [f"{bullet}{t} / {c}: `{m}` runs' `{k}` ({what})" for t, c, m, k, what in mappings] + [""]
        notes = dict.fromkeys((s.cell.table, s.cell.note) for s in mine if s.cell.note)
        out += [f"Note ({table}): {note}" for table, note in notes] + ([""] if notes else [])
        if paper.left_out:
            out += ["Left out (could not be sourced):"]
            out += [f"{bullet}{item['cells']}: {item['reason']}" for item in paper.left_out] + [""]
    if model_as:
        out.append("Models standing in for the paper's: " + ", ".join(f"{k} as {v}" for k, v in model_as.items()))
    return "\n".join(out).rstrip()


CSV_COLUMNS = [
    "paper", "table", "row", "column", "metric", "paper_value", "paper_runs", "approximate", "percent", "source",
    "method", "model", "dataset", "shots", "run_metric", "run_model", "mean", "ci_low", "ci_high", "runs",
    "examples", "difference", "verdict", "setting",
]  # fmt: skip


def table_rows(scores: list[Score]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows with numbers as numbers (CSV, wandb.Table); values in the paper's units."""
    rows = []
    for s in scores:
        c, interval = s.cell, s.interval
        rows.append(
            [
                c.paper, c.table, c.row, c.column, c.metric, c.value, c.runs, c.approximate, c.percent, c.source,
                c.method, c.model, c.dataset, c.shots, c.run_metric, s.run_model, s.mean,
                interval[0] if interval else None, interval[1] if interval else None, len(s.values),
                stats.fewest_examples(s.examples), s.difference, s.verdict, s.setting,
            ]
        )  # fmt: skip
    return CSV_COLUMNS, rows


def render_csv(scores: list[Score]) -> str:
    return csv_text(*table_rows(scores))


def parse_model_as(pairs: list[str]) -> dict[str, str]:
    """``["smollm2-135m=opt-125m"]`` -> ``{"smollm2-135m": "opt-125m"}``."""
    mapping = {}
    for pair in pairs:
        run_model, _, paper_model = pair.partition("=")
        if not run_model or not paper_model:
            raise ValueError(f"--model-as {pair!r}: write RUN_MODEL=PAPER_MODEL, e.g. smollm2-135m=opt-125m")
        mapping[run_model] = paper_model
    return mapping


def write(directory: Path, papers: list[Paper], scores: list[Score], model_as: dict[str, str]) -> str:
    """``scorecard.md`` and ``scorecard.csv`` in ``directory``; returns the Markdown for a README."""
    markdown = render(papers, scores, model_as, "markdown")
    (directory / "scorecard.md").write_text(markdown + "\n")
    (directory / "scorecard.csv").write_text(render_csv(scores) + "\n")
    return markdown
