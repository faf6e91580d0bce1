"""Mean and 95% interval over seeds of a sweep's runs, one row per method, model and the config values given.

    python sweeps/seed_intervals.py SWEEP_DIR [SWEEP_DIR ...] --by method.aux_weight [--metrics eval/accuracy ...]

Runs are grouped by method, model, dataset and the ``--by`` keys of their resolved config (config.yaml beside
metrics.json); each metric is printed as ``mean [low, high]``, Student's t 95% interval of the mean. Without
``--metrics``: the ranking metrics (MRR, Hits@1/3/10) of knowledge-graph runs, else accuracy.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from ctxdistill.results.stats import t_interval

RANKING = re.compile(r"eval/(?:sampled\d+_)?(?:mrr|hits@(\d+))")


def runs_with_config(paths: list[Path]) -> list[tuple[dict, dict]]:
    """(metrics.json, config.yaml) of every complete run under the paths."""
    found = []
    for path in paths:
        for file in sorted(path.rglob("metrics.json")):
            record = json.loads(file.read_text())
            if record.get("status") == "complete":
                found.append((record, OmegaConf.load(file.parent / "config.yaml")))
    return found


def interval_text(values: list[float], proportion: bool) -> str:
    """``mean [low, high]``: the 95% t-interval over seeds (the mean alone for one seed), cut to [0, 1] for a
    proportion (Hits@k, accuracy) as the results tables cut it."""
    interval = t_interval(values)
    if interval and proportion:
        interval = (max(interval[0], 0.0), min(interval[1], 1.0))
    mean = f"{statistics.fmean(values):.3f}"
    return mean + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def table(paths: list[Path], by: list[str], metrics: list[str] | None) -> str:
    runs = runs_with_config(paths)
    if not runs:
        raise SystemExit(f"no complete run under {', '.join(map(str, paths))}")
    keys = {k for record, _ in runs for k in record["metrics"]}
    ranking = sorted((k for k in keys if RANKING.fullmatch(k)), key=lambda k: int(RANKING.fullmatch(k)[1] or 0))
    metrics = metrics or ranking or ["eval/accuracy"]  # MRR first, then Hits@k by k
    groups: dict[tuple, dict[str, list[float]]] = {}
    seeds: dict[tuple, list[int]] = {}
    for record, cfg in runs:
        group = (record["method"], record["model"], record["dataset"], *(OmegaConf.select(cfg, k) for k in by))
        seeds.setdefault(group, []).append(record["seed"])
        for metric in metrics:
            groups.setdefault(group, {}).setdefault(metric, []).append(record["metrics"][metric])
    header = ["method", "model", "dataset", *by, "seeds", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in sorted(groups, key=str):
        cells = [*map(str, group), ",".join(map(str, sorted(seeds[group])))]
        cells += [interval_text(groups[group][m], "hits@" in m or m.endswith("accuracy")) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--by", nargs="*", default=[], help="config keys that tell rows apart, e.g. method.aux_weight")
    parser.add_argument("--metrics", nargs="*", help="metric keys (default: ranking metrics, else eval/accuracy)")
    args = parser.parse_args()
    print(table(args.paths, args.by, args.metrics))


if __name__ == "__main__":
    main()
