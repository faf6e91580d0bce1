"""Tables as text: aligned for the terminal, Markdown, CSV and LaTeX.

Text, Markdown and LaTeX show one block per eval set (in-domain first), each cell as
``mean [95% interval]`` and the set's n, and mark a metric whose lower values are better with ``↓`` in its
heading; CSV is one flat table with every figure in its own column. Where rows are judged by different metrics
(their methods' objectives), a ``headline`` column names each row's, and each paired test names its metric. A
figure that is not a number (a NaN a run reported) shows as ``nan``; a metric a row lacks, as ``-``.
"""

from __future__ import annotations

import csv
import io
import math
import re
from typing import Optional

from ctxdistill.results.metrics import EXAMPLES
from ctxdistill.results.stats import fewest_examples
from ctxdistill.results.table import Cell, Column, Row, Table, headlines_of

IDENTITY = ["method", "model", "dataset", "seeds"]
LOWER_IS_BETTER = "↓"  # after the heading of a metric whose lower values are better (a KL, a cost, a gap)


def number(x: float) -> str:
    if not math.isfinite(x):
        return str(x)  # nan, inf, -inf
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.1f}" if abs(x) >= 100 else f"{x:.3f}"


def heading(column: Column) -> str:
    """A column's heading: the metric's display name, marked when lower is better."""
    return column.metric.label + ("" if column.metric.higher_is_better else f" {LOWER_IS_BETTER}")


def cell_text(cell: Optional[Cell], runs: Optional[int] = None) -> str:
    """``mean [95% interval]``; ``runs``: the row's runs of the cell's eval set, said where fewer report the
    metric (the row's seeds column would overstate what the figure is over)."""
    if cell is None:
        return "-"
    if cell.metric == EXAMPLES:
        return "/".join(dict.fromkeys(f"{v:g}" for v in cell.values))  # the n of each seed's set, once if equal
    if cell.metric.kind == "count":  # a count the runs share is whole; else its mean over them, as the CSV's
        text = f"{cell.values[0]:g}" if len(set(cell.values)) == 1 else number(cell.mean)
    else:
        interval = cell.interval
        text = number(cell.mean) + (f" [{number(interval[0])}, {number(interval[1])}]" if interval else "")
    return text + (f" ({len(cell.values)}/{runs} seeds)" if runs and len(cell.values) < runs else "")


def p_text(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _block(table: Table, set_name: str) -> tuple[list[str], list[list[str]]]:
    """Header and body of one eval set's block: the rows' headlines where they differ, its columns, then the paired
    test's when there is one (naming its metric per row where the rows' tests differ in it)."""
    columns = [c for c in table.columns if c.set == set_name]
    headlines = table.headlines
    named = len(headlines) > 1 and any(table.column(set_name, h.name) for h in headlines)
    tests = [r.tests[set_name] for r in table.rows if set_name in r.tests]
    tested_on = list(dict.fromkeys(t.metric.label for t in tests))
    header = [*IDENTITY, *(["headline"] if named else []), *map(heading, columns)]
    if tests:
        kinds = " / ".join(sorted({t.test for t in tests}))
        delta = f"Δ {tested_on[0]} vs {table.baseline}" if len(tested_on) == 1 else f"Δ vs {table.baseline}"
        header += [*(["Δ of"] if len(tested_on) > 1 else []), delta, f"p ({kinds})", "pairs"]
    body = []
    for row in table.rows:
        figures = [cell_text(row.cells.get(c.key), len(row.seeds_of(set_name))) for c in columns]
        if tests:
            test = row.tests.get(set_name)
            of = ([test.metric.label if test else "-"]) if len(tested_on) > 1 else []
            figures += of + ([f"{test.delta:+.3f}", p_text(test.p_value), str(test.pairs)] if test else ["-"] * 3)
        if any(c != "-" for c in figures):
            identity = [row.method, row.model, row.dataset, str(len(row.seeds_of(set_name)))]
            body.append([*identity, *([row.headline.label] if named else []), *figures])
    return header, body


def markdown_cell(cell: str) -> str:
    """A Markdown table cell: a pipe would end the cell, a line break the row, a ``<`` start HTML."""
    return cell.replace("\\", "\\\\").replace("|", r"\|").replace("<", r"\<").replace("\n", " ")


def _aligned(header: list[str], body: list[list[str]], markdown: bool) -> list[str]:
    lines = [header, *body]
    if markdown:
        lines = [[markdown_cell(c) for c in line] for line in lines]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    lines.insert(1, ["-" * w for w in widths])
    if markdown:
        return ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]


#: LaTeX's special characters in text (a method, model or dataset name, a heading), in one pass
TEX_TEXT = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"$<$",
    ">": r"$>$",
    "|": r"$|$",
    "Δ": r"$\Delta$",
    LOWER_IS_BETTER: r"$\downarrow$",
    "\n": " ",
}
TEX_SPECIAL = re.compile("|".join(map(re.escape, TEX_TEXT)))
_NUMBER = r"(?:nan|-?inf|[-+]?[\d,]+(?:\.\d+)?)"
NUMBER_TEXT = re.compile(rf"<?{_NUMBER}|-")  # a count, a Δ, a p-value (<0.001), or "-" for none
FIGURE = re.compile(rf"({_NUMBER} \[{_NUMBER}, {_NUMBER}\])( \(\d+/\d+ seeds\))?")  # cell_text's, with an interval


def tex_text(text: str) -> str:
    """``text`` as LaTeX prints it literally."""
    return TEX_SPECIAL.sub(lambda m: TEX_TEXT[m[0]], text)


def _tex(cell: str) -> str:
    """A table cell in LaTeX: a figure with its interval in math mode (a space kept before the bracket, the
    thousands' commas without math's punctuation space), any other text escaped."""
    figure = FIGURE.fullmatch(cell)
    if figure:
        math = re.sub(r"(?<=\d),(?=\d)", "{,}", figure[1]).replace(" [", r"\ [")
        return f"${math}$" + (figure[2] or "")
    return tex_text(cell)


def tex_alignment(cells: tuple[str, ...]) -> str:
    """A column's LaTeX alignment: figures right, names (a method, the headline, the metric a test is of) left."""
    return "r" if all(FIGURE.fullmatch(c) or NUMBER_TEXT.fullmatch(c) for c in cells) else "l"


def render(tables: list[Table], fmt: str = "text") -> str:
    """The tables as aligned text, Markdown, CSV or LaTeX (booktabs)."""
    if fmt == "csv":
        return render_csv(tables)
    out: list[str] = []
    for table in tables:
        if len(tables) > 1:
            labels = [h.label for h in table.headlines]
            judged = f"headline: {labels[0]}" if len(labels) == 1 else f"headline by row: {', '.join(labels)}"
            name = f"{table.family.family} ({judged})"
            out += [{"markdown": f"### {name}", "latex": f"% {name}"}.get(fmt, f"== {name} =="), ""]
        for set_name in table.sets:
            header, body = _block(table, set_name)
            if not body:
                continue
            title = table.title(set_name)
            if fmt == "latex":
                out += [
                    f"% {title}",
                    r"\begin{tabular}{" + "".join(map(tex_alignment, zip(*body))) + "}",
                    r"\toprule",
                    " & ".join(map(_tex, header)) + r" \\",
                    r"\midrule",
                    *(" & ".join(map(_tex, line)) + r" \\" for line in body),
                    r"\bottomrule",
                    r"\end{tabular}",
                    "",
                ]
            else:
                out += [f"**{title}**", ""] if fmt == "markdown" else [title]
                out += [*_aligned(header, body, fmt == "markdown"), ""]
    return "\n".join(out).rstrip("\n")


def csv_columns(column: Column) -> list[str]:
    if column.metric.kind == "count":
        return [column.key]
    return [f"{column.key}_{part}" for part in ("mean", "std", "low", "high", "runs")]


def csv_values(cell: Cell) -> list[Optional[float]]:
    """Mean, sample std over seeds, the 95% interval and the runs it is over (fewer than the row's seeds where some
    do not report the metric; one: the interval is that run's over its examples); a count is its mean alone, but a
    set's examples are the number its Wilson intervals are over (the fewest any seed was evaluated on), a whole
    number."""
    if cell.metric == EXAMPLES:
        return [fewest_examples(cell.values)]
    if cell.metric.kind == "count":
        return [cell.mean]
    interval = cell.interval or (None, None)
    return [cell.mean, cell.std, *interval, len(cell.values)]


TEST_PARTS = ("metric", "delta", "p", "pairs")  # the metric compared, the difference in it, its p-value, the pairs


def test_columns(table: Table) -> list[str]:
    sets = [s for s in table.sets if any(s in r.tests for r in table.rows)]
    return [f"{s}/{part}_vs_{table.baseline}" for s in sets for part in TEST_PARTS]


def test_values(table: Table, row: Row) -> dict[str, Optional[float | str]]:
    values = {}
    for set_name, test in row.tests.items():
        parts = {"metric": test.metric.name, "delta": test.delta, "p": test.p_value, "pairs": test.pairs}
        values |= {f"{set_name}/{part}_vs_{table.baseline}": value for part, value in parts.items()}
    return values


def flat_rows(tables: list[Table]) -> tuple[list[str], list[list]]:
    """Every table in one: identity, model parameters, each row's headline where the rows' differ, then each
    column's figures (None where a row has none)."""
    named = len(headlines_of([row for t in tables for row in t.rows])) > 1
    columns = list(dict.fromkeys(name for t in tables for c in t.columns for name in csv_columns(c)))
    columns += list(dict.fromkeys(name for t in tables for name in test_columns(t)))
    rows = []
    for table in tables:
        for row in table.rows:
            values: dict[str, Optional[float]] = {}
            for column in table.columns:
                cell = row.cells.get(column.key)
                figures = csv_values(cell) if cell else [None] * len(csv_columns(column))
                values |= dict(zip(csv_columns(column), figures))
            values |= test_values(table, row)
            # a parameter count is a whole number: not cut to the floats' 6 digits (3219776, not 3.21978e+06)
            size = int(row.size) if row.size is not None and row.size.is_integer() else row.size
            headline = [row.headline.name] if named else []
            rows.append(
                [row.method, row.model, row.dataset, len(row.seeds), size, *headline, *map(values.get, columns)]
            )
    return [*IDENTITY, "model_parameters", *(["headline"] if named else []), *columns], rows


def render_csv(tables: list[Table]) -> str:
    return csv_text(*flat_rows(tables))


def csv_text(header: list[str], rows: list[list]) -> str:
    """CSV with floats at 6 significant digits and missing values empty."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else f"{v:.6g}" if isinstance(v, float) else v for v in row])
    return out.getvalue().rstrip("\n")
