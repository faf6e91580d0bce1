"""Accuracy against the number of demonstrations a method used: a table and a plot from a sweep's runs.

    python -m ctxdistill.learning_curve SWEEP_DIR --out DIR [--window-demos N] [--before RUN_DIR]

Every run under SWEEP_DIR (its metrics.json and config.yaml) is one point: its series is the method's
name, with the trained adapter when it is not LoRA (``cd (prefix)``); its x is the demonstrations it used
(:meth:`~ctxdistill.methods.base.Method.demonstrations_used`: ``dataset.context.num_demos`` x ``num_contexts``
where it trains on them or writes a cheat sheet from them, ``num_demos`` for ICL, which reads one context per
query, 0 for zero-shot). Points are the mean over seeds with the suite's 95% interval of a proportion
(Student's t over seeds that differ, Wilson's over the examples where they agree), cut to [0, 1]; two runs of
the same point (a cell run again into another directory) are refused, not averaged.
``--window-demos`` marks how many demonstrations the capped window holds; a run's
``evaluations/forgetting/`` (made by ctxdistill-eval on another task) is its forgetting column, and
``--before`` the untrained model's accuracy on that task. Writes learning_curve.png, learning_curve.md
and learning_curve.csv.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from ctxdistill.methods import Method, build_method
from ctxdistill.results.records import EVALUATIONS
from ctxdistill.results.stats import mean_interval

FORGETTING = "forgetting"  # the evaluation directory (ctxdistill-eval --name) holding the other task's accuracy


#: a point's mean accuracy and the low and high ends of its 95% interval (None where it has none)
Summary = tuple[float, Optional[float], Optional[float]]


def summarise_accuracy(runs: list[dict[str, float]], set_name: str) -> Optional[Summary]:
    """The mean accuracy on ``set_name`` over the runs (their metrics) that report it, with its 95% interval: a
    proportion's (:func:`ctxdistill.results.stats.mean_interval`), so seeds that agree get Wilson's over the
    fewest examples a run records (``{set}/examples``), not a width of 0; no interval where a run records none."""
    scored = [run for run in runs if f"{set_name}/accuracy" in run]
    if not scored:
        return None
    accuracies = [run[f"{set_name}/accuracy"] for run in scored]
    interval = mean_interval(accuracies, [run.get(f"{set_name}/examples") for run in scored], "proportion")
    if interval is None:
        return statistics.fmean(accuracies), None, None
    # an accuracy lies in [0, 1] whatever a t-interval over a few seeds says (the tables cut theirs in
    # results/table.py by the metric's range; stats.mean_interval stays the bare statistic)
    return statistics.fmean(accuracies), max(interval[0], 0.0), min(interval[1], 1.0)


def series_name(config: dict[str, Any], trainable: int) -> str:
    adapter = config["model"]["adapter"]
    return config["method"]["name"] + (f" ({adapter})" if trainable and adapter != "lora" else "")


@functools.cache
def method_defaults(name: str) -> DictConfig:
    """``method=name`` as conf/ composes it now."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ctxdistill.cli import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=[f"method={name}"]).method


def recorded_method(recorded: dict[str, Any]) -> Method:
    """The method a run's config.yaml records, over its config's defaults now (a run saved before a setting existed
    has none of it)."""
    return build_method(OmegaConf.merge(method_defaults(recorded["name"]), recorded))


def read_points(root: Path) -> list[dict[str, Any]]:
    """One point per finished run under ``root`` (never an evaluation's copy)."""
    points = []
    for path in sorted(root.rglob("metrics.json")):
        if EVALUATIONS in path.relative_to(root).parts:
            continue
        run = json.loads(path.read_text())
        config = yaml.safe_load((path.parent / "config.yaml").read_text())
        context = config["dataset"]["context"]
        forgetting = path.parent / EVALUATIONS / FORGETTING / "metrics.json"
        points.append(
            {
                "run": path.parent,
                "series": series_name(config, run.get("trainable_parameters", 0)),
                "demos": recorded_method(config["method"]).demonstrations_used(
                    context["num_demos"], context["num_contexts"]
                ),
                "seed": run["seed"],
                "metrics": run["metrics"],
                "trainable": run.get("trainable_parameters", 0),
                "context_tokens": run.get("context_tokens_per_query", 0.0),
                "forgetting": json.loads(forgetting.read_text())["metrics"] if forgetting.is_file() else None,
            }
        )
    return points


def repeated_seeds(points: list[dict[str, Any]]) -> list[str]:
    """Runs that are the same point as an earlier one (series, demonstrations and seed): a cell run again into
    another directory (other settings, a renamed cell). Averaged in, its seed would count twice."""
    first: dict[tuple[str, int, int], Path] = {}
    repeats = []
    for point in points:
        key = (point["series"], point["demos"], point["seed"])
        if key in first:
            repeats.append(f"{point['run']} repeats {first[key]} ({key[0]}, {key[1]} demonstrations, seed {key[2]})")
        first.setdefault(key, point["run"])
    return repeats


def summarise(points: list[dict[str, Any]], sets: list[str]) -> list[dict[str, Any]]:
    """One row per series and number of demonstrations: means and 95% intervals over seeds."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for point in points:
        groups[(point["series"], point["demos"])].append(point)
    rows = []
    for (series, demos), members in sorted(groups.items()):
        row = {"series": series, "demos": demos, "seeds": len(members)}
        for name in sets:
            row[name] = summarise_accuracy([m["metrics"] for m in members], name)
        row["forgetting"] = summarise_accuracy([m["forgetting"] for m in members if m["forgetting"]], "eval")
        row["context_tokens"] = statistics.fmean(m["context_tokens"] for m in members)
        row["trainable"] = members[0]["trainable"]
        rows.append(row)
    return rows


def _cell(summary: Optional[Summary]) -> str:
    if summary is None:
        return "-"
    mean, low, high = summary
    return f"{mean:.3f}" if low is None else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def write_table(rows: list[dict], sets: list[str], before: Optional[float], out: Path) -> None:
    forgetting = f"other task after (before: {before:.3f})" if before is not None else "other task after"
    header = ["method", "demos", "seeds", *sets, "context tokens/query", "trainable params", forgetting]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    with (out / "learning_curve.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["method", "demos", "seeds"]
            + [f"{s}_{k}" for s in sets for k in ("mean", "low", "high")]
            + ["context_tokens", "trainable", "forgetting_mean", "forgetting_low", "forgetting_high"]
        )
        for row in rows:
            cells = [row["series"], str(row["demos"]), str(row["seeds"]), *(_cell(row[s]) for s in sets)]
            cells += [f"{row['context_tokens']:.0f}", f"{row['trainable']:,}", _cell(row["forgetting"])]
            lines.append("| " + " | ".join(cells) + " |")
            writer.writerow(
                [row["series"], row["demos"], row["seeds"]]
                + [v for s in sets for v in (row[s] or ("", "", ""))]  # csv writes an interval's None as ""
                + [row["context_tokens"], row["trainable"], *(row["forgetting"] or ("", "", ""))]
            )
    (out / "learning_curve.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], sets: list[str], window_demos: Optional[int], out: Path) -> Path:
    fig = Figure(figsize=(5.0 * len(sets) + 1.5, 4.2), layout="constrained")
    axes = fig.subplots(1, len(sets), squeeze=False)[0]
    series = list(dict.fromkeys(r["series"] for r in rows))
    xs = sorted({r["demos"] for r in rows})
    for ax, name in zip(axes, sets):
        for index, label in enumerate(series):
            mine = [r for r in rows if r["series"] == label and r[name] is not None]
            if not mine:
                continue
            x = [r["demos"] * (1 + 0.02 * (index - len(series) / 2)) for r in mine]  # a small dodge per series
            ax.errorbar(
                x,
                [r[name][0] for r in mine],
                yerr=[  # below and above the mean: the interval of a proportion is not symmetric
                    [r[name][0] - r[name][1] if r[name][1] is not None else 0.0 for r in mine],
                    [r[name][2] - r[name][0] if r[name][2] is not None else 0.0 for r in mine],
                ],
                marker="o",
                capsize=3,
                label=label,
                color=f"C{index}",
            )
        if window_demos:
            ax.axvspan(window_demos * 1.35, max(xs) * 1.3, color="0.9", zorder=0)
            ax.text(
                window_demos * 1.4, 0.02, "past the window", fontsize=8, va="bottom", transform=ax.get_xaxis_transform()
            )
        ax.axhline(0.5, color="0.5", linestyle=":", linewidth=1)  # chance on the balanced binary sets
        ax.set_ylim(0, 1.02)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("demonstrations")
        ax.set_ylabel("accuracy")
        ax.set_title("in-domain" if name == "eval" else f"out-of-domain ({name})")
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    path = out / "learning_curve.png"
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="a sweep directory (every run under it is a point)")
    parser.add_argument("--out", type=Path, required=True, help="where learning_curve.{png,md,csv} go")
    parser.add_argument("--window-demos", type=int, help="the most demonstrations the capped window holds")
    parser.add_argument("--before", type=Path, help="a run of the untrained model on the forgetting task")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = argument_parser()
    args = parser.parse_args(argv)
    points = read_points(args.root)
    if not points:
        parser.error(f"no finished run (metrics.json) under {args.root}")
    if repeats := repeated_seeds(points):
        parser.error("two runs of the same point; remove the one that should not count:\n  " + "\n  ".join(repeats))
    before = None
    if args.before is not None:  # the untrained model on the forgetting task (a run outside the sweep)
        before = json.loads((args.before / "metrics.json").read_text())["metrics"]["eval/accuracy"]
    sets = list(dict.fromkeys(k.split("/")[0] for p in points for k in p["metrics"] if k.endswith("/accuracy")))
    rows = summarise(points, sets)
    args.out.mkdir(parents=True, exist_ok=True)
    write_table(rows, sets, before, args.out)
    print(plot(rows, sets, args.window_demos, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
