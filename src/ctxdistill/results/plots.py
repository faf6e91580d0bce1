"""PNG plots of comparison tables, per metric family and dataset (matplotlib's Agg canvas: no display needed).

- ``<headline>_vs_size_<dataset>.png``: the headline metric (accuracy, MRR, task success ...) in-domain and
  on each other eval set against model size, one line per method, error bars = the cells' 95% intervals,
  the teacher and the chance level as references where the family declares them (the layout of
  Mosbach et al.'s ICL-vs-FT figures). Each method's line is its rows' own headline; where the methods' differ
  (pbft's vocab accuracy, icl's accuracy) the legend names each and the file is ``headline_vs_size_<dataset>.png``.
- ``teacher_gap_<dataset>.png``: the teacher's score minus the model's, per method and model.
- ``serving_cost_<dataset>.png``: each row's headline against serving cost per query (each declared cost), one
  point per method and model, the teacher with its context as the reference.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ctxdistill.results.metrics import IN_DOMAIN, Metric
from ctxdistill.results.table import Cell, Row, Table, headlines_of

GAP = "teacher_student_gap"


def _size_label(size: Optional[float]) -> str:
    if size is None:
        return ""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if size >= scale:
            return f"{size / scale:.3g}{unit}"
    return f"{size:.0f}"


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _error(cells: list[Cell]) -> list[list[float]]:
    """Asymmetric error bars from each cell's 95% interval (none where a cell has no interval)."""
    intervals = [c.interval or (c.mean, c.mean) for c in cells]
    return [
        [c.mean - lo for c, (lo, _) in zip(cells, intervals)],
        [hi - c.mean for c, (_, hi) in zip(cells, intervals)],
    ]


def _models(rows: list[Row]) -> tuple[list[str], dict[str, float], bool]:
    """Models in size order and their x positions: log-scaled sizes when every size is known and no two models
    share one (two models at one x would draw over each other, their ticks in one place), else one after another."""
    sizes = {r.model: r.size for r in rows}
    models = sorted(sizes, key=lambda m: (sizes[m] is None, sizes[m] or 0, m))
    by_size = all(sizes[m] for m in models) and len(set(sizes.values())) == len(models)
    return models, ({m: sizes[m] for m in models} if by_size else {m: i for i, m in enumerate(models)}), by_size


def _pooled(rows: list[Row], key: str) -> list[float]:
    return [v for r in rows if key in r.cells for v in r.cells[key].values]


def _judged_by(rows: list[Row]) -> str:
    """The axis label of the rows' headlines: the metric's, or what says each row's is in the legend."""
    labels = [h.label for h in headlines_of(rows)]
    return labels[0] if len(labels) == 1 else f"headline ({' / '.join(labels)}: see legend)"


def _reference(table: Table, name: str) -> str:
    """A reference line's legend: the teacher with its context, and the metric its score is."""
    metric: Optional[Metric] = table.family.metric_for(IN_DOMAIN, name)
    return f"teacher with context ({metric.label if metric else name})"


def headline_vs_size(table: Table, dataset: str, path: Path) -> Optional[Path]:
    of_dataset = [r for r in table.rows if r.dataset == dataset]
    headlines = headlines_of(of_dataset)
    sets = [s for s in table.sets if any(table.column(s, h.name) for h in headlines)]
    rows = [r for r in of_dataset if any(f"{s}/{r.headline.name}" in r.cells for s in sets)]
    if not rows:
        return None
    mixed = len(headlines_of(rows)) > 1
    methods = list(dict.fromkeys(r.method for r in rows))
    models, x, log_x = _models(rows)
    fig = Figure(figsize=(4.2 * len(sets) + 0.8, 4.0), layout="constrained")
    axes = fig.subplots(1, len(sets), squeeze=False)[0]
    legend: dict[str, object] = {}
    for ax, name in zip(axes, sets):
        for i, method in enumerate(methods):
            of_method = [r for r in rows if r.method == method]
            keys = {r.model: f"{name}/{r.headline.name}" for r in of_method}
            points = sorted(
                ((x[r.model], r.cells[keys[r.model]]) for r in of_method if keys[r.model] in r.cells),
                key=lambda p: p[0],
            )
            if not points:
                continue
            # methods side by side around each model so their error bars do not hide each other
            dodge = (i - (len(methods) - 1) / 2) * (0.06 if log_x else 0.08)
            label = f"{method} ({_judged_by(of_method)})" if mixed else method
            legend[label] = ax.errorbar(
                [p * 10**dodge if log_x else p + dodge for p, _ in points],
                [c.mean for _, c in points],
                yerr=_error([c for _, c in points]),
                marker="o",
                capsize=4,
                linewidth=1.5,
                color=f"C{i}",
            )
        if table.family.teacher:
            teacher = {m: _pooled([r for r in rows if r.model == m], f"{name}/{table.family.teacher}") for m in models}
            teacher = {m: v for m, v in teacher.items() if v}
            if teacher:
                (legend[_reference(table, table.family.teacher)],) = ax.plot(
                    [x[m] for m in teacher],
                    [statistics.fmean(v) for v in teacher.values()],
                    color="black",
                    linestyle="--",
                    marker="x",
                    markersize=8,
                )
        chance = _pooled(rows, f"{name}/{table.family.chance}") if table.family.chance else []
        if chance:  # a property of the eval set, the same for every model
            legend["chance (majority class)"] = ax.axhline(statistics.fmean(chance), color="grey", linestyle=":")
        if log_x:
            ax.set_xscale("log")
            ax.set_xlim(min(x.values()) / 2, max(x.values()) * 2)
        else:
            ax.set_xlim(-0.5, len(models) - 0.5)
        ax.set_xticks([x[m] for m in models], [f"{m}\n{_size_label(x[m]) if log_x else ''}".strip() for m in models])
        ax.minorticks_off()
        ax.set_xlabel("model (parameters)" if log_x else "model")
        ax.set_ylabel(_judged_by(rows))
        ax.set_title(table.title(name))
        ax.grid(alpha=0.3)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=min(len(legend), 6), frameon=False)
    fig.suptitle(f"{dataset}: {_judged_by(rows)} vs model size (mean, 95% interval)")
    return _save(fig, path)


def teacher_gap(table: Table, dataset: str, path: Path) -> Optional[Path]:
    key = f"{IN_DOMAIN}/{GAP}"
    rows = [r for r in table.rows if r.dataset == dataset and key in r.cells]
    if not rows:
        return None
    methods = list(dict.fromkeys(r.method for r in rows))
    models, _, _ = _models(rows)
    width = 0.8 / len(models)
    fig = Figure(figsize=(max(5.0, 1.3 * len(methods) * max(1, len(models) / 2)), 4.0), layout="constrained")
    ax = fig.subplots()
    for j, model in enumerate(models):
        cells = [
            (i, r.cells[key])
            for i, method in enumerate(methods)
            for r in rows
            if (r.method, r.model) == (method, model)
        ]
        ax.bar(
            [i + (j - (len(models) - 1) / 2) * width for i, _ in cells],
            [c.mean for _, c in cells],
            width,
            yerr=_error([c for _, c in cells]),
            capsize=4,
            label=model,
        )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_xlabel("method")
    gap = table.family.metric_for(IN_DOMAIN, GAP)  # its own label: a gap in the teacher's score, whatever the headline
    ax.set_ylabel(f"{gap.label if gap else GAP} (in-domain)")
    ax.set_title(f"{dataset}: teacher–student gap (mean, 95% interval over seeds)")
    ax.legend(title="model", frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def serving_cost(table: Table, dataset: str, path: Path) -> Optional[Path]:
    """Each row's in-domain headline against each declared serving cost per query: the model's cost for each
    method's row, the teacher's (the base model with the context) as the reference point."""
    teacher = table.family.teacher
    rows = [r for r in table.rows if r.dataset == dataset and f"{IN_DOMAIN}/{r.headline.name}" in r.cells]
    mixed = len(headlines_of(rows)) > 1
    costs = [c for c in table.family.costs if any(c[0] in r.cells for r in rows)]
    if not costs:
        return None
    fig = Figure(figsize=(4.6 * len(costs) + 0.8, 4.0), layout="constrained")
    axes = fig.subplots(1, len(costs), squeeze=False)[0]
    legend: dict[str, object] = {}
    for ax, (model_cost, teacher_cost, label) in zip(axes, costs):
        points = [r for r in rows if model_cost in r.cells]
        models = list(dict.fromkeys(r.model for r in points))
        for i, row in enumerate(points):
            name = ", ".join([*([row.model] if len(models) > 1 else []), *([row.headline.label] if mixed else [])])
            headline = row.cells[f"{IN_DOMAIN}/{row.headline.name}"]
            legend[f"{row.method} ({name})" if name else row.method] = ax.errorbar(
                [row.cells[model_cost].mean],
                [headline.mean],
                yerr=_error([headline]),
                marker="o",
                capsize=4,
                linestyle="none",
                color=f"C{i}",
            )
        for j, model in enumerate(models):  # the teacher of each model: the base model with the context
            of_model = [r for r in points if r.model == model]
            teacher_x = _pooled(of_model, teacher_cost)
            teacher_y = _pooled(of_model, f"{IN_DOMAIN}/{teacher}") if teacher else []
            if teacher_x and teacher_y:
                name = _reference(table, teacher) + (f", {model}" if len(models) > 1 else "")
                (legend[name],) = ax.plot(
                    [statistics.fmean(teacher_x)],
                    [statistics.fmean(teacher_y)],
                    marker="xP^sv"[j % 5],
                    color="black",
                    markersize=9,
                    linestyle="none",
                )
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xlabel(label)
        ax.set_ylabel(_judged_by(rows))
        ax.grid(alpha=0.3)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=min(len(legend), 5), frameon=False)
    fig.suptitle(f"{dataset}: {_judged_by(rows)} vs serving cost per query (mean, 95% interval)")
    return _save(fig, path)


def write_plots(tables: list[Table], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    plots = []
    for table in tables:
        for dataset in table.datasets:
            slug = re.sub(r"[^\w.-]+", "_", dataset)
            headlines = headlines_of([r for r in table.rows if r.dataset == dataset])
            headline = re.sub(r"[^\w.-]+", "_", headlines[0].name if len(headlines) == 1 else "headline")
            plots.append(headline_vs_size(table, dataset, directory / f"{headline}_vs_size_{slug}.png"))
            plots.append(teacher_gap(table, dataset, directory / f"teacher_gap_{slug}.png"))
            plots.append(serving_cost(table, dataset, directory / f"serving_cost_{slug}.png"))
    return [p for p in plots if p is not None]
