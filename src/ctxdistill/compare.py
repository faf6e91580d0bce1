"""Compare runs: read every metrics.json under the given directories and tabulate.

    ctxdistill-compare outputs/multirun/2026-11-23/10-00-00 [--format markdown|csv|text]

Rows are method x model x dataset, values are mean ± std over seeds. A Hydra
multirun prints this table for its own sweep directory when it ends.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

COLUMNS = {
    "eval/accuracy": "accuracy",
    "eval/teacher_agreement": "agree w/ teacher",
    "eval/kl_to_teacher": "KL to teacher",
    "eval/teacher_accuracy": "teacher acc",
    "eval/majority_rate": "majority",
}


def collect(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every complete run under ``paths``, oldest first (the order a sweep ran them)."""
    runs = []
    for path in paths:
        files = [path] if path.is_file() else sorted(Path(path).rglob("metrics.json"))
        for file in files:
            result = json.loads(file.read_text())
            if result.get("status") == "complete":
                runs.append(result)
    return sorted(runs, key=lambda r: r.get("finished_at", ""))


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def summarise(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per (method, model, dataset), metric cells aggregated over seeds."""
    ood = sorted({k for r in runs for k in r["metrics"] if k.endswith("/accuracy") and not k.startswith("eval/")})
    metric_keys = [*COLUMNS, *ood]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["model"], r["dataset"]), []).append(r)
    header = ["method", "model", "dataset", "seeds", *COLUMNS.values(), *(k.replace("/accuracy", " acc") for k in ood)]
    rows = []
    for (method, model, dataset), members in groups.items():
        cells = [_cell([m["metrics"][k] for m in members if k in m["metrics"]]) for k in metric_keys]
        rows.append([method, model, dataset, str(len(members)), *cells])
    return header, rows


def render(header: list[str], rows: list[list[str]], fmt: str = "text") -> str:
    if fmt == "csv":
        return "\n".join(",".join(f'"{c}"' if "," in c else c for c in line) for line in [header, *rows])
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    if fmt == "markdown":
        lines = [header, ["-" * w for w in widths], *rows]
        return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines)
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


class PrintTableCallback(Callback):
    """Prints the comparison table of a multirun's directory when the sweep ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = collect([sweep_dir])
        if runs:
            print(f"\nComparison ({len(runs)} runs in {sweep_dir}):\n" + render(*summarise(runs)), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run or sweep directories (or metrics.json files)")
    parser.add_argument("--format", choices=["text", "markdown", "csv"], default="text")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        parser.error(f"no such path: {', '.join(missing)}")
    runs = collect(args.paths)
    if not runs:
        print(f"no complete runs (metrics.json with status 'complete') under {', '.join(map(str, args.paths))}",
              file=sys.stderr)
        return 1
    print(render(*summarise(runs), args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
