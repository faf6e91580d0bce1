"""Run records: what one finished run reports, read from its metrics.json or from W&B.

A record is a dict in the shape of metrics.json (``method``, ``model``, ``dataset``, ``seed``,
``metrics``, ``metric_set``, ``model_parameters``, ``finished_at``); records read from disk also
carry ``run_dir``, where the run's predictions.jsonl and config.yaml are; records read from W&B carry
``config``; records labelled by ``split_by`` carry ``by`` (the run's own method, and the setting the label adds).
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from ctxdistill.results.metrics import MetricSet, undeclared
from ctxdistill.results.run_files import files_under
from ctxdistill.results.wandb_runs import offline_records

if TYPE_CHECKING:
    from omegaconf import DictConfig

PREDICTIONS = "predictions.jsonl"
FAILURE_FILE = "failure.json"  # a sweep cell's failed attempt: its error and traceback
RUN_CONFIG = "config.yaml"  # written as a run starts, so a run directory without results still has it
EVALUATIONS = "evaluations"  # ctxdistill-eval writes a run's re-evaluations to RUN_DIR/evaluations/NAME/
MODEL_SIZE = re.compile(r"(\d+(?:\.\d+)?)([mb])\b", re.IGNORECASE)


def metric_set(record: dict[str, Any]) -> MetricSet:
    """The run's declared metrics; a run from before declarations gets every metric it reports.

    The headline is the run's objective (``metric_set.objective``, the figure the run is judged by).

    A family whose headline is a mean of scores per example (``example_score``: link prediction's MRR) declared
    no mean over examples (``kind: mean``) before its runs reported the spread of their values per example: its
    headline and its proportions (Hits@k, each the mean of a triple's two hits; over the ranked queries, 2 per
    triple, before 6 Dec 2026) are read as means without a spread (no interval over one run's examples, named by
    :func:`ctxdistill.results.table.spreadless_notes`) instead of a value without one and shares of ``examples``."""
    if not record.get("metric_set"):
        return undeclared(list(record["metrics"]))
    declared = MetricSet.from_dict(record["metric_set"])
    if declared.objective and declared.declares(declared.objective):  # its headline, also where a run before 7 Dec
        declared = declared.with_objective(declared.objective)  # 2026 recorded the evaluator's (pbft's accuracy)
    if any(m.example_score for m in declared.metrics) and all(m.kind != "mean" for m in declared.metrics):
        means = tuple(
            replace(m, kind="mean", lowest=0.0, highest=1.0) if m.example_score or m.kind == "proportion" else m
            for m in declared.metrics
        )
        return replace(declared, metrics=means)
    return declared


def model_size(record: dict[str, Any]) -> Optional[float]:
    """Parameters of the run's base model: recorded by the run, else read from a name like opt-1.3b."""
    if record.get("model_parameters"):
        return float(record["model_parameters"])
    match = MODEL_SIZE.search(record["model"])
    return float(match[1]) * (1e6 if match[2].lower() == "m" else 1e9) if match else None


# Keys that may differ between a stored run and its re-run without changing its results: logging,
# force, and where things are kept (output_dir, and the caches: cache_dir and what follows it, such as
# method.teacher_cache_dir, GenPI's and the contexts' method.stage_dir, the cheat sheets' method.sheet_dir).
UNCOMPARED = ("logger", "force", "output_dir")
CACHE_LOCATIONS = ("cache_dir", "stage_dir", "sheet_dir")
# Settings whose runs one row averages, as repetitions of one setting: the seed, and the data seed that draws the
# demonstrations and training examples (Mosbach et al. report the mean over data seeds at seed 0,
# docs/papers/mosbach2023.md). Every other setting that differs makes rows of its own.
REPETITIONS = ("seed", "dataset.context.data_seed", "dataset.data_seed")
# What a W&B run's config holds besides the run's settings: its record, the config groups chosen and the W&B run a
# forced re-run replaced (run.py and tracking.py log them there).
RECORDED_IN_WANDB_CONFIG = ("identity", "metric_set", "provenance", "hydra_choices", "supersedes_wandb_run")


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def compared(key: str) -> bool:
    """Whether a dotted config key can change a run's results (see UNCOMPARED)."""
    return not key.startswith(UNCOMPARED) and not key.endswith(CACHE_LOCATIONS)


def run_location(record: dict[str, Any]) -> Optional[str]:
    """Where the run wrote its results: its directory (read from disk) or the output_dir its W&B config names."""
    where = record.get("run_dir") or (record.get("config") or {}).get("output_dir")
    return str(Path(where).resolve()) if where else None


def distinct_runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run once, the first record of it: a directory given twice (or inside another given), a run's directory
    beside its W&B run, or --wandb beside the runs' directories would otherwise count a run as another seed."""
    kept, seen = [], set()
    for record in records:
        where = run_location(record)
        if where is not None and where in seen:
            print(
                f"warning: {where} was given more than once (a path, its W&B run or --wandb): counted once",
                file=sys.stderr,
            )
            continue
        seen.add(where)
        kept.append(record)
    return kept


def collect(paths: Iterable[Path], unreadable: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """Every complete run under ``paths``.

    A directory is read through its metrics.json files, but for its runs' re-evaluations (``evaluations/``,
    the same runs again: given themselves, they are read); W&B run directories are read only where no
    metrics.json is found (they are the same runs). A metrics.json that cannot be read (cut short, not a
    run's), or a W&B run file that is cut short or damaged, is named in a warning and listed in ``unreadable``.
    """
    records = []
    for path in map(Path, paths):
        if path.is_file():
            files = [path]
        else:
            files = [f for f in files_under(path, "metrics.json") if EVALUATIONS not in f.relative_to(path).parts]
        if not files:
            records += offline_records(path, unreadable)
        for file in files:
            try:
                result = json.loads(file.read_text())
                why = not_a_run(result)
            except (OSError, ValueError) as e:
                why = f"unreadable ({e})"
            if why:
                print(f"warning: skipping {file}: {why}", file=sys.stderr)
                if unreadable is not None:
                    unreadable.append(str(file))
                continue
            if result.get("status") == "complete":
                # a metric recorded as null is one the run does not have, as in its W&B summary (numbers only)
                metrics = {key: value for key, value in result["metrics"].items() if value is not None}
                records.append({**result, "metrics": metrics, "run_dir": str(file.parent)})
    return records


#: what every complete run's metrics.json names: the table's row and the run's numbers
RUN_KEYS = ("method", "model", "dataset", "seed", "metrics")


def not_a_run(result: Any) -> Optional[str]:
    """Why a parsed metrics.json cannot be read as a run (None when it can, or when it is not complete)."""
    if not isinstance(result, dict):
        return f"unreadable (a JSON {type(result).__name__}, not a run's record)"
    if result.get("status") != "complete":
        return None
    missing = [key for key in RUN_KEYS if key not in result]
    if missing:
        return f"not a run's metrics.json (it has no {', '.join(missing)})"
    if not isinstance(result["metrics"], dict):
        return f"its metrics are a {type(result['metrics']).__name__}, not a mapping of names to numbers"
    for key, value in result["metrics"].items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"its metric {key} is {value!r}, not a number"
    return None


def complete(metrics_file: Path) -> bool:
    try:
        return json.loads(metrics_file.read_text()).get("status") == "complete"
    except (OSError, ValueError, AttributeError):
        return False


def failed_runs(directory: Path) -> dict[str, str]:
    """Run directory (its path under ``directory``) -> error, for the runs whose latest attempt failed.

    A failure.json older than a complete metrics.json was made good since; a newer one was not, even beside a
    complete metrics.json: that is a run of another config the sweep refused, or one that failed once written.
    """
    failures = {}
    for file in files_under(directory, FAILURE_FILE):
        done = file.parent / "metrics.json"
        if done.is_file() and done.stat().st_mtime_ns > file.stat().st_mtime_ns and complete(done):
            continue
        failures[str(file.parent.relative_to(directory))] = json.loads(file.read_text())["error"].splitlines()[0]
    return failures


def unfinished_runs(directory: Path) -> dict[str, str]:
    """Run directory (its path under ``directory``) -> why it has no results: its latest attempt failed, or it
    stopped (or is still running) before writing a complete metrics.json. Re-evaluations, Hydra's record of a
    run (``.hydra/config.yaml``) and W&B's (``wandb/*/files/config.yaml``) are not runs."""
    unfinished = {
        cell: f"failed ({error}; its traceback is in {FAILURE_FILE})" for cell, error in failed_runs(directory).items()
    }
    for config in files_under(directory, RUN_CONFIG):
        run_dir = config.parent
        cell = str(run_dir.relative_to(directory))
        if (
            cell in unfinished
            or {EVALUATIONS, ".hydra"} & set(Path(cell).parts)
            or any(run_dir.parent.glob("*.wandb"))
            or complete(run_dir / "metrics.json")
        ):
            continue
        unfinished[cell] = "no complete metrics.json: it stopped before it finished, or is still running"
    return unfinished


def predictions(record: dict[str, Any]) -> Optional[list[dict[str, Any]]]:
    """The run's prediction rows (predictions.jsonl), or None when it has none at hand (a W&B run)."""
    path = Path(record["run_dir"]) / PREDICTIONS if record.get("run_dir") else None
    if path is None or not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_config(record: dict[str, Any]) -> Optional[DictConfig]:
    """The run's resolved config (its W&B config, or its config.yaml) as a DictConfig; None where it has neither."""
    from omegaconf import OmegaConf

    if record.get("config") is not None:
        return OmegaConf.create(record["config"])
    if record.get("run_dir") and (Path(record["run_dir"]) / "config.yaml").is_file():
        return OmegaConf.load(Path(record["run_dir"]) / "config.yaml")
    return None


def config_value(record: dict[str, Any], key: str) -> Any:
    """A dotted key of the run's resolved config; None where unset or the run has no config at hand."""
    from omegaconf import OmegaConf

    config = run_config(record)
    return None if config is None else OmegaConf.select(config, key)


class UnknownConfigKeyError(ValueError):
    """--by names a key that no run's config has."""


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return []
    return [k for key, value in node.items() for k in [f"{prefix}{key}", *_dotted_keys(value, f"{prefix}{key}.")]]


def split_by(records: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Records whose method names carry the values of ``keys`` (``kgbert_cd aux_weight=0.5``), so runs that
    differ in those settings become rows of their own instead of being averaged as if they were seeds. A run
    whose config lacks a key shows None for it; a key that no run's config has (a misspelling) is an error."""
    from omegaconf import OmegaConf

    if not keys:
        return records
    configs = [run_config(r) for r in records]
    absent = object()
    for key in keys:
        if all(c is None or OmegaConf.select(c, key, default=absent) is absent for c in configs):
            known = {k for c in configs if c is not None for k in _dotted_keys(OmegaConf.to_container(c))}
            nearest = difflib.get_close_matches(key, sorted(known), n=1)
            raise UnknownConfigKeyError(
                f"--by {key}: no run's config has this key"
                + (f"; did you mean {nearest[0]}?" if nearest else " (give a dotted key of the runs' config.yaml)")
            )
    labelled = []
    for record, config in zip(records, configs):
        values = " ".join(
            f"{key.rsplit('.', 1)[-1]}={None if config is None else OmegaConf.select(config, key)}" for key in keys
        )
        # "by" keeps what the label joins: --vs pairs a row with its baseline's row of the same setting
        labelled.append(
            {
                **record,
                "method": f"{record['method']} {values}",
                "by": {"method": record["method"], "setting": values},
            }
        )
    return labelled
