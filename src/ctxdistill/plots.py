"""PNG plots of a comparison table, per dataset (matplotlib's Agg canvas: no display needed).

- ``accuracy_vs_size_<dataset>.png``: in-domain and each out-of-domain accuracy against model
  size, one line per method, error bars = std over seeds, the teacher and the majority-class
  rate as references (the layout of Mosbach et al.'s ICL-vs-FT figures).
- ``teacher_gap_<dataset>.png``: the teacher's accuracy minus the model's, per method and model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ctxdistill.compare import Row, Stat, Table


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


def _models(rows: list[Row]) -> tuple[list[str], dict[str, float], bool]:
    """Models in size order and their x positions: log-scaled sizes when every size is known."""
    sizes = {r.model: r.size for r in rows}
    models = sorted(sizes, key=lambda m: (sizes[m] is None, sizes[m] or 0, m))
    by_size = all(sizes[m] for m in models)
    return models, ({m: sizes[m] for m in models} if by_size else {m: i for i, m in enumerate(models)}), by_size


def accuracy_vs_size(table: Table, dataset: str, path: Path) -> Optional[Path]:
    rows = [r for r in table.rows if r.dataset == dataset and "eval/accuracy" in r.stats]
    if not rows:  # link-prediction runs report MRR and Hits@k, not accuracy
        return None
    sets = ["eval", *table.ood_sets(dataset)]
    methods = list(dict.fromkeys(r.method for r in rows))
    models, x, log_x = _models(rows)
    fig = Figure(figsize=(4.2 * len(sets) + 0.8, 4.0), layout="constrained")
    axes = fig.subplots(1, len(sets), squeeze=False)[0]
    legend: dict[str, object] = {}
    for ax, name in zip(axes, sets):
        for i, method in enumerate(methods):
            points = sorted(
                (
                    (x[r.model], r.stats[f"{name}/accuracy"])
                    for r in rows
                    if r.method == method and f"{name}/accuracy" in r.stats
                ),
                key=lambda p: p[0],
            )
            if not points:
                continue
            # methods side by side around each model so their error bars do not hide each other
            dodge = (i - (len(methods) - 1) / 2) * (0.06 if log_x else 0.08)
            xs = [p[0] * 10**dodge if log_x else p[0] + dodge for p in points]
            legend[method] = ax.errorbar(
                xs,
                [s.mean for _, s in points],
                yerr=[s.std or 0.0 for _, s in points],
                marker="o",
                capsize=4,
                linewidth=1.5,
                color=f"C{i}",
            )
        teacher = {
            m: Stat(
                [
                    v
                    for r in rows
                    if r.model == m and f"{name}/teacher_accuracy" in r.stats
                    for v in r.stats[f"{name}/teacher_accuracy"].values
                ]
            )
            for m in models
        }
        teacher = {m: s for m, s in teacher.items() if s.values}
        if teacher:
            (legend["teacher (with context)"],) = ax.plot(
                [x[m] for m in teacher],
                [s.mean for s in teacher.values()],
                color="black",
                linestyle="--",
                marker="x",
                markersize=8,
            )
        majority = [
            v for r in rows if f"{name}/majority_rate" in r.stats for v in r.stats[f"{name}/majority_rate"].values
        ]
        if majority:  # a property of the eval set, the same for every model
            legend["majority class"] = ax.axhline(sum(majority) / len(majority), color="grey", linestyle=":")
        if log_x:
            ax.set_xscale("log")
            ax.set_xlim(min(x.values()) / 2, max(x.values()) * 2)
        else:
            ax.set_xlim(-0.5, len(models) - 0.5)
        ax.set_xticks([x[m] for m in models], [f"{m}\n{_size_label(x[m]) if log_x else ''}".strip() for m in models])
        ax.minorticks_off()
        ax.set_xlabel("model (parameters)" if log_x else "model")
        ax.set_ylabel("accuracy")
        ax.set_title("in-domain" if name == "eval" else f"out-of-domain: {name}")
        ax.grid(alpha=0.3)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=min(len(legend), 6), frameon=False)
    fig.suptitle(f"{dataset}: accuracy vs model size (mean ± std over seeds)")
    return _save(fig, path)


def teacher_gap(table: Table, dataset: str, path: Path) -> Optional[Path]:
    rows = [r for r in table.rows if r.dataset == dataset and "eval/teacher_student_gap" in r.stats]
    if not rows:
        return None
    methods = list(dict.fromkeys(r.method for r in rows))
    models, _, _ = _models(rows)
    width = 0.8 / len(models)
    fig = Figure(figsize=(max(5.0, 1.3 * len(methods) * max(1, len(models) / 2)), 4.0), layout="constrained")
    ax = fig.subplots()
    for j, model in enumerate(models):
        cells = [
            (i, r.stats["eval/teacher_student_gap"])
            for i, method in enumerate(methods)
            for r in rows
            if r.method == method and r.model == model
        ]
        ax.bar(
            [i + (j - (len(models) - 1) / 2) * width for i, _ in cells],
            [s.mean for _, s in cells],
            width,
            yerr=[s.std or 0.0 for _, s in cells],
            capsize=4,
            label=model,
        )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_xlabel("method")
    ax.set_ylabel("teacher acc − student acc (in-domain)")
    ax.set_title(f"{dataset}: teacher–student gap (mean ± std over seeds)")
    ax.legend(title="model", frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def write_plots(table: Table, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    plots = []
    for dataset in table.datasets:
        slug = re.sub(r"[^\w.-]+", "_", dataset)
        plots.append(accuracy_vs_size(table, dataset, directory / f"accuracy_vs_size_{slug}.png"))
        plots.append(teacher_gap(table, dataset, directory / f"teacher_gap_{slug}.png"))
    return [p for p in plots if p is not None]
