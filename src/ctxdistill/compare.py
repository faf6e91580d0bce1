"""Compare runs: method x model x dataset, mean ± std over seeds, as tables, plots and a W&B report.

    ctxdistill-compare outputs/multirun/2026-11-23/10-00-00            # terminal table
    ctxdistill-compare SWEEP_DIR --format markdown|csv|latex
    ctxdistill-compare SWEEP_DIR --out SWEEP_DIR                      # README.md + results/ (tables, PNGs)
    ctxdistill-compare --wandb ENTITY/PROJECT --group GROUP            # the same table from W&B
    ctxdistill-compare SWEEP_DIR --wandb-log --group GROUP             # log it as a W&B Table + plots
    ctxdistill-compare --wandb ENTITY/PROJECT --group GROUP --wandb-report

Inputs are run or sweep directories (every metrics.json under them), W&B run directories
(``RUN_DIR/wandb/offline-run-*``, read from W&B's own run file) or a W&B project read
through the public API; all become the same run records.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

# In-domain columns: metric key -> column label. Each out-of-domain set adds "<set> acc",
# "<set> teacher acc" and "<set> majority"; columns no run reports are left out.
IN_DOMAIN = {
    "eval/accuracy": "accuracy",
    "eval/teacher_accuracy": "teacher acc",
    "eval/teacher_student_gap": "teacher - student",
    "eval/majority_rate": "majority",
    "eval/teacher_agreement": "agree w/ teacher",
    "eval/kl_to_teacher": "KL to teacher",
    "train_queries/context_accuracy": "ctx acc (train queries)",
}
RESULTS_DIR = "results"
RANKING = re.compile(r"eval/((?:sampled\d+_)?(?:mrr|hits@\d+))")


def with_derived_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """The teacher-student gap of each eval set: the teacher's accuracy minus the model's."""
    metrics = dict(record["metrics"])
    for key in [k for k in metrics if k.endswith("/teacher_accuracy")]:
        prefix = key.rsplit("/", 1)[0]
        if f"{prefix}/accuracy" in metrics:
            metrics[f"{prefix}/teacher_student_gap"] = metrics[key] - metrics[f"{prefix}/accuracy"]
    return {**record, "metrics": metrics}


def collect(paths: Iterable[Path], unreadable: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """Every complete run under ``paths``.

    A directory is read through its metrics.json files; W&B run directories are read only
    where no metrics.json is found (they are the same runs). A metrics.json that cannot be read
    (cut short, not a run's) is skipped with a warning naming it, and listed in ``unreadable``.
    """
    from ctxdistill.wandb_results import offline_records

    runs = []
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(path.rglob("metrics.json"))
        if not files:
            runs += offline_records(path)
        for file in files:
            try:
                result = json.loads(file.read_text())
                complete = result.get("status") == "complete"
            except (OSError, ValueError, AttributeError) as e:
                print(f"warning: skipping {file}: unreadable ({e})", file=sys.stderr)
                if unreadable is not None:
                    unreadable.append(str(file))
                continue
            if complete:
                runs.append(result)
    return runs


# ---------------------------------------------------------------- the table
MODEL_SIZE = re.compile(r"(\d+(?:\.\d+)?)([mb])\b", re.IGNORECASE)


def model_size(run: dict[str, Any]) -> Optional[float]:
    """Parameters of the run's base model: recorded by the run, else read from a name like opt-1.3b."""
    if run.get("model_parameters"):
        return float(run["model_parameters"])
    match = MODEL_SIZE.search(run["model"])
    return float(match[1]) * (1e6 if match[2].lower() == "m" else 1e9) if match else None


# Student's t quantile t(0.975, df) for df = 1..10: a 95% interval of a mean over a few seeds.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


@dataclass
class Stat:
    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> Optional[float]:
        """Sample standard deviation over seeds; None for a single seed."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def half_width95(self) -> Optional[float]:
        """Half the width of the 95% t-interval of the mean (up to 11 seeds); None for a single seed."""
        n = len(self.values)
        if n < 2:
            return None
        if n - 1 > len(T_975):
            raise ValueError(f"95% intervals are tabulated for up to {len(T_975) + 1} seeds, got {n}")
        return T_975[n - 2] * self.std / math.sqrt(n)

    def text(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f}" + (f" ± {self.std:.{digits}f}" if self.std is not None else "")

    def interval_text(self, digits: int = 3) -> str:
        """``mean [low, high]``, the 95% interval over seeds."""
        h = self.half_width95
        return f"{self.mean:.{digits}f}" + (
            f" [{self.mean - h:.{digits}f}, {self.mean + h:.{digits}f}]" if h is not None else ""
        )


@dataclass
class Row:
    method: str
    model: str
    dataset: str
    size: Optional[float]
    seeds: list[int] = field(default_factory=list)
    stats: dict[str, Stat] = field(default_factory=dict)


@dataclass
class Table:
    columns: dict[str, str]  # metric key -> label
    rows: list[Row]

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(r.dataset for r in self.rows))

    def ood_sets(self, dataset: str) -> list[str]:
        return [
            k.split("/")[0]
            for k in self.columns
            if k.endswith("/accuracy")
            and not k.startswith("eval/")
            and any(k in r.stats for r in self.rows if r.dataset == dataset)
        ]


def ranking_columns(keys: Iterable[str]) -> list[str]:
    """Link-prediction metrics (knowledge-graph runs) among ``keys``: MRR, then Hits@k by k."""
    return sorted((k for k in keys if RANKING.fullmatch(k)), key=lambda k: int(k.rsplit("@", 1)[1]) if "@" in k else 0)


def summarise(runs: list[dict[str, Any]]) -> Table:
    """One row per (dataset, model, method): each metric's values over the seeds.

    Rows are ordered by dataset, then model size, then the order the methods first ran.
    """
    runs = [with_derived_metrics(r) for r in sorted(runs, key=lambda r: r.get("finished_at") or "")]
    keys = {k for r in runs for k in r["metrics"]}
    ood = sorted({k.split("/")[0] for k in keys if k.endswith("/accuracy")} - {"eval"})
    columns = {k: label for k, label in IN_DOMAIN.items() if k in keys}
    for name in ood:
        columns |= {
            f"{name}/{m}": f"{name} {label}"
            for m, label in [("accuracy", "acc"), ("teacher_accuracy", "teacher acc"), ("majority_rate", "majority")]
            if f"{name}/{m}" in keys
        }
    columns |= {k: RANKING.fullmatch(k).group(1) for k in ranking_columns(keys)}
    rows: dict[tuple, Row] = {}
    for r in runs:
        row = rows.setdefault(
            (r["dataset"], r["model"], r["method"]), Row(r["method"], r["model"], r["dataset"], model_size(r))
        )
        row.seeds.append(r["seed"])
        for key in columns:
            if key in r["metrics"]:
                row.stats.setdefault(key, Stat([])).values.append(r["metrics"][key])
    method_order = list(dict.fromkeys(r["method"] for r in runs))
    ordered = sorted(
        rows.values(), key=lambda row: (row.dataset, row.size or math.inf, row.model, method_order.index(row.method))
    )
    return Table(columns, ordered)


def render(table: Table, fmt: str = "text") -> str:
    """The table as aligned text, Markdown, CSV (separate mean and std columns) or LaTeX (booktabs)."""
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(
            ["method", "model", "dataset", "seeds", *(f"{k}_{s}" for k in table.columns for s in ("mean", "std"))]
        )
        for row in table.rows:
            cells = []
            for key in table.columns:
                stat = row.stats.get(key)
                cells += (
                    ["", ""] if stat is None else [f"{stat.mean:.6g}", "" if stat.std is None else f"{stat.std:.6g}"]
                )
            writer.writerow([row.method, row.model, row.dataset, len(row.seeds), *cells])
        return out.getvalue().rstrip("\n")
    header = ["method", "model", "dataset", "seeds", *table.columns.values()]
    body = [
        [
            r.method,
            r.model,
            r.dataset,
            str(len(r.seeds)),
            *(r.stats[k].text() if k in r.stats else "-" for k in table.columns),
        ]
        for r in table.rows
    ]
    if fmt == "latex":

        def tex(cell: str) -> str:
            cell = cell.replace("_", r"\_").replace("&", r"\&").replace("%", r"\%")
            return "$" + cell.replace("±", r"\pm") + "$" if "±" in cell else cell

        lines = [
            r"\begin{tabular}{" + "lll" + "r" * (len(header) - 3) + "}",
            r"\toprule",
            " & ".join(tex(c) for c in header) + r" \\",
            r"\midrule",
            *(" & ".join(tex(c) for c in line) + r" \\" for line in body),
            r"\bottomrule",
            r"\end{tabular}",
        ]
        return "\n".join(lines)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *body]
    if fmt == "markdown":
        return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines)
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


# ---------------------------------------------------------------- results directory
def write_results(
    directory: Path,
    runs: list[dict[str, Any]],
    *,
    title: str,
    failures: Optional[dict[str, str]] = None,
    command: Optional[str] = None,
) -> Path:
    """README.md with the table and plot links, and results/ with the table as .md/.csv/.tex and the PNGs."""
    from ctxdistill.plots import write_plots

    table = summarise(runs)
    results = directory / RESULTS_DIR
    results.mkdir(parents=True, exist_ok=True)
    for fmt, suffix in (("markdown", "md"), ("csv", "csv"), ("latex", "tex")):
        (results / f"table.{suffix}").write_text(render(table, fmt) + "\n")
    plots = write_plots(table, results)
    lines = [f"# {title}", "", f"{len(runs)} complete runs; mean ± sample std over seeds (the `seeds` column).", ""]
    if command:
        lines += ["Produced by:", "", "```bash", command, "```", ""]
    if failures:
        lines += [f"**{len(failures)} failed cells** (re-run the same command to retry only them):", ""]
        lines += [f"- `{cell}`: {error}" for cell, error in failures.items()] + [""]
    lines += [
        render(table, "markdown"),
        "",
        f"Tables: [Markdown]({RESULTS_DIR}/table.md), [CSV]({RESULTS_DIR}/table.csv), "
        f"[LaTeX]({RESULTS_DIR}/table.tex).",
        "",
    ]
    for plot in plots:
        lines += [f"![{plot.stem}]({RESULTS_DIR}/{plot.name})", ""]
    lines += [
        "Columns: `accuracy` in-domain; `teacher acc` the base model with the context; `teacher - student` "
        "their difference; `majority` the majority-class rate; `<set> acc` out-of-domain sets. "
        f"Regenerate with `ctxdistill-compare {directory} --out {directory}`.",
        "",
    ]
    readme = directory / "README.md"
    readme.write_text("\n".join(lines))
    return readme


# ---------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[1:]),
    )
    parser.add_argument(
        "paths", nargs="*", type=Path, help="run or sweep directories, metrics.json files, or W&B run directories"
    )
    parser.add_argument("--format", choices=["text", "markdown", "csv", "latex"], default="text")
    parser.add_argument("--out", type=Path, help="write README.md and results/ (tables, plots) here")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from W&B (public API)")
    parser.add_argument("--group", help="only the W&B runs of this group (a sweep); also the group logged to")
    parser.add_argument(
        "--wandb-log", action="store_true", help="log the table and plots to a W&B run (job_type=compare) in --group"
    )
    parser.add_argument(
        "--wandb-report",
        action="store_true",
        help="create a W&B report for --group in --wandb's project (needs network)",
    )
    parser.add_argument("--project", default="ctxdistill", help="W&B project for --wandb-log without --wandb")
    parser.add_argument("--strict", action="store_true", help="exit non-zero when any metrics.json is unreadable")
    args = parser.parse_args(argv)
    if not args.paths and not args.wandb:
        parser.error("give run or sweep directories, or --wandb ENTITY/PROJECT")
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        parser.error(f"no such path: {', '.join(missing)}")
    if args.wandb_report and not (args.wandb and "/" in args.wandb and args.group):
        parser.error("--wandb-report needs --wandb ENTITY/PROJECT and --group")

    from ctxdistill import wandb_results

    unreadable: list[str] = []
    runs = collect(args.paths, unreadable)
    if args.wandb:
        runs += wandb_results.api_records(args.wandb, args.group)
    if not runs:
        where = ", ".join([*map(str, args.paths), *([args.wandb] if args.wandb else [])])
        print(
            f"no complete runs (metrics.json with status 'complete', or finished W&B runs) in {where}", file=sys.stderr
        )
        return 1
    table = summarise(runs)
    print(render(table, args.format))
    if args.out:
        readme = write_results(args.out, runs, title=f"Results: {args.group or args.out.name}")
        print(f"\nwrote {readme} and {args.out / RESULTS_DIR}/", file=sys.stderr)
    if args.wandb_log:
        project = args.wandb or args.project
        entity, project = project.split("/", 1) if "/" in project else (None, project)
        wandb_results.log_results(table, entity=entity, project=project, group=args.group)
    if args.wandb_report:
        entity, project = args.wandb.split("/", 1)
        report = wandb_results.build_report(table, entity=entity, project=project, group=args.group)
        try:
            print(f"W&B report: {report.save().url}")
        except Exception as e:  # noqa: BLE001 - the tables and files above are already done
            print(f"could not publish the W&B report ({e}); it needs network and `wandb login`", file=sys.stderr)
            return 1
    if unreadable:
        print(f"{len(unreadable)} unreadable metrics.json skipped (listed above)", file=sys.stderr)
    return 1 if unreadable and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
