"""Sweeps that can be run again: complete cells are skipped, a failing cell does not stop the others.

Each cell of a multirun writes to ``SWEEP_DIR/<its overrides>``, so running the same command
with the same ``hydra.sweep.dir`` lands in the same directories: cells whose metrics.json is
complete are skipped (``force=true`` runs them again), failed cells leave ``failure.json`` and
are listed when the sweep ends, and the process then exits non-zero.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ctxdistill.config import ConfigError, loads_from
from ctxdistill.results.records import FAILURE_FILE, REPETITIONS, compared, failed_runs, flatten

log = logging.getLogger(__name__)

# Set when a sweep ended with failed cells; the command exits non-zero (cli.entry).
failed_cells: dict[str, str] = {}


def open_maps(cfg: DictConfig, path: str = "") -> set[str]:
    """The dotted paths of the config's open-ended maps: the dict-typed settings (label maps, file lists, the
    out-of-domain sets), whose entries are data rather than options of a schema."""
    import dataclasses

    found = set()
    for key in cfg.keys():
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not (node._is_none() or node._is_missing() or node._is_interpolation()):
            full = f"{path}{key}"
            if not dataclasses.is_dataclass(OmegaConf.get_type(node)):
                found.add(full)
            found |= open_maps(node, f"{full}.")
    return found


def config_changes(stored: dict[str, Any], current: dict[str, Any], maps: set[str] = frozenset()) -> list[str]:
    """Keys whose values differ. A key only one side has is a change where the other side holds a value at a
    key above it (a group of settings set on one side, null on the other: method.teacher_model), or where it is
    an entry of an open-ended map (``maps``: a label map's entries, the out-of-domain sets) that the other side
    lacks; anywhere else it is an option added to a schema since the stored run was made, at its default."""
    old, new = flatten(stored), flatten(current)
    changed = {k for k in old.keys() & new.keys() if old[k] != new[k]}
    for key in old.keys() ^ new.keys():
        other = new if key in old else old
        parts = key.split(".")
        for depth in range(1, len(parts)):
            parent, entry = ".".join(parts[:depth]), ".".join(parts[: depth + 1])
            if parent in other:
                changed.add(parent)
                break
            if parent in maps and not any(k == entry or k.startswith(f"{entry}.") for k in other):
                changed.add(entry)
                break
    return sorted(k for k in changed if compared(k))


def other_output_dir() -> str:
    """How to give a run or a sweep another output directory, whichever this is."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN:
        return "run another hydra.run.dir"
    return "sweep another hydra.sweep.dir"


def completed_run(cfg: DictConfig) -> Optional[dict[str, Any]]:
    """The complete result already in this run's output dir, unless force=true.

    A complete result made with a different config is an error rather than a skip: its numbers
    would be reported for a config that did not produce them.
    """
    if cfg.force or cfg.output_dir is None:
        return None
    out = Path(cfg.output_dir)
    try:
        result = json.loads((out / "metrics.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if result.get("status") != "complete":
        return None
    if (out / "config.yaml").is_file():
        stored = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"))
        try:
            requested = OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException:  # a config that does not resolve: the run's validation names what is wrong
            return None
        if "bundles" in cfg.model:  # the model's source as the run recorded it: where it loaded from
            requested["model"]["source"] = loads_from(cfg.model)  # (models.honour_name_or_path)
        changed = config_changes(stored, requested, open_maps(cfg))
        if changed:
            raise ConfigError(
                f"{out} holds a complete run made with a different config ({', '.join(changed[:6])}"
                f"{', ...' if len(changed) > 6 else ''}). Pass force=true to run it again and "
                f"overwrite it, or give the {other_output_dir()}."
            )
    from ctxdistill.provenance import changed_data

    changed = changed_data(result.get("provenance") or {})
    if changed:
        raise ConfigError(
            f"{out} holds a complete run made from data that changed since: {', '.join(changed[:3])}"
            f"{', ...' if len(changed) > 3 else ''} (another content at the same path, such as contexts stage 1 "
            f"wrote again). Pass force=true to run it again on the data as it is now, or give the {other_output_dir()}."
        )
    log.info("%s already holds a complete run: skipped (force=true runs it again)", out)
    return result


def run_cell(cfg: DictConfig, run: Callable[[DictConfig], dict[str, Any]]) -> Optional[dict[str, Any]]:
    """One cell of a multirun: its exception is logged and saved to failure.json instead of raised."""
    out = Path(cfg.output_dir)
    try:
        result = run(cfg)
    except Exception as error:  # noqa: BLE001 - one cell must not stop the sweep; it is reported at the end
        from ctxdistill.cli import user_errors

        if isinstance(error, user_errors()):  # its message says what to fix; the traceback stays in failure.json
            log.error("this cell failed; the sweep goes on: %s", error)
        else:
            log.exception("this cell failed; the sweep goes on")
        out.mkdir(parents=True, exist_ok=True)
        (out / FAILURE_FILE).write_text(
            json.dumps(
                {
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc(),
                    "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                },
                indent=2,
            )
            + "\n"
        )
        return None
    (out / FAILURE_FILE).unlink(missing_ok=True)
    return result


def cell_dir(overrides: str) -> str:
    """A sweep cell's directory name from its overrides: one path component (the '/' of a value such as
    experiment=huang2022/meta_ict becomes '-'), cut to 200 characters plus a hash of the whole past that."""
    name = overrides.replace("/", "-")
    if len(name) > 200:
        name = f"{name[:183]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return name


def group_name(sweep_dir: str | Path) -> str:
    """The W&B group of a sweep's runs: its directory's last two parts (e.g. 2026-11-23-10-00-00)."""
    return "-".join(Path(sweep_dir).parts[-2:])


def command_line_config_dirs(hydra: DictConfig) -> list[str]:
    """The directories given with --config-dir (Hydra records them as config sources of the command line)."""
    return [source.path for source in hydra.runtime.config_sources if source.provider == "command-line"]


def sweep_command(hydra: DictConfig, sweep_dir: Optional[str] = None) -> str:
    """The command that re-runs a sweep into the same directory (so only missing cells run), from the sweep's
    Hydra config (``hydra.sweep.dir`` unless ``sweep_dir`` gives it resolved), absolute as its config directories:
    the command resumes the sweep from any directory."""
    task = list(hydra.overrides.task)
    hydra_overrides = [o for o in hydra.overrides.hydra if not o.startswith(("hydra.sweep.dir=", "hydra.mode="))]
    config_dirs = [f"--config-dir={path}" for path in command_line_config_dirs(hydra)]
    arguments = [*task, *hydra_overrides, f"hydra.sweep.dir={Path(sweep_dir or hydra.sweep.dir).absolute()}"]
    return " ".join(["ctxdistill", *map(shlex.quote, config_dirs), "-m", *map(shlex.quote, arguments)])


def running_sweep_command() -> str:
    """From inside a cell: the command of its whole sweep. The cell's own Hydra config holds only the cell's
    overrides; the sweep's are in the multirun.yaml Hydra writes to the sweep dir before the first cell."""
    from hydra.core.hydra_config import HydraConfig

    sweep_dir = HydraConfig.get().sweep.dir  # resolved here, where the launch time is the sweep's
    return sweep_command(OmegaConf.load(Path(sweep_dir) / "multirun.yaml").hydra, sweep_dir)


# Swept choices a row names already (its method, model and dataset columns).
ROW_CHOICES = ("method", "model", "dataset")


def recorded_overrides(run_dir: Path) -> Optional[list[str]]:
    """The Hydra overrides the run was started with: its own overrides.yaml (any output_dir), else the one in
    Hydra's .hydra/ (a sweep cell, or an older run); None for a run started outside the ctxdistill command."""
    recorded = next(
        (p for p in (run_dir / "overrides.yaml", run_dir / ".hydra" / "overrides.yaml") if p.is_file()), None
    )
    return list(OmegaConf.load(recorded)) if recorded else None


def swept_keys(records: list[dict[str, Any]]) -> list[str]:
    """The keys whose overrides differ between the runs (a run leaving one at its default counts as differing),
    in the order they come; keys that cannot change results (``compared``) left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    settings = [
        {o.key_or_group: o.value() for o in parser.parse_overrides(recorded_overrides(Path(r["run_dir"])) or [])}
        for r in records
    ]
    keys = dict.fromkeys(key for setting in settings for key in setting)
    return [key for key in keys if compared(key) and len({repr(s.get(key)) for s in settings}) > 1]


def group_choice(key: str, records: list[dict[str, Any]]) -> bool:
    """Whether a swept key chooses a config group (experiment=..., ood=...) rather than setting a value."""
    from ctxdistill.results.records import config_value

    return "." not in key and any(
        config_value(r, key) is None or OmegaConf.is_config(config_value(r, key)) for r in records
    )


def split_settings(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """The runs with each setting of the swept keys in a row of its own (``results.records.split_by`` labels
    the method with it, e.g. ``cd lr=0.1``), warnings naming swept config-group choices no row tells apart, and
    the keys split by (ctxdistill-compare's --by)."""
    from ctxdistill.results.records import split_by

    settings = [key for key in swept_keys(records) if key not in (*REPETITIONS, *ROW_CHOICES)]
    choices = [key for key in settings if group_choice(key, records)]  # no config value split_by could read
    warnings = [
        f"warning: rows average over the values of {key}, a config-group choice the table does not tell apart; "
        "sweep each value into its own hydra.sweep.dir to compare them"
        for key in choices
    ]
    split = [key for key in settings if key not in choices]
    return split_by(records, split), warnings, split


def repetitions(records: list[dict[str, Any]]) -> str:
    """What a row averages: its number of runs and their seeds and data seeds (e.g. ``10 runs: seed 0;
    dataset.context.data_seed 0, 1, ..., 9``), warning when runs share them all."""
    from ctxdistill.results.records import config_value

    values = [
        {
            key: value
            for key in REPETITIONS
            if (value := r["seed"] if key == "seed" else config_value(r, key)) is not None
        }
        for r in records
    ]
    keys = [key for key in REPETITIONS if any(key in v for v in values)]
    text = f"{len(records)} run{'s' if len(records) > 1 else ''}: " + "; ".join(
        f"{key} {', '.join(map(str, sorted({v[key] for v in values if key in v})))}" for key in keys
    )
    if len({tuple(v.items()) for v in values}) < len(values):
        text += " (some with the same seeds: they differ in a setting no swept key names, and are averaged as seeds)"
    return text


def repetitions_text(tables: list[Any], markdown: bool = False) -> str:
    """What the rows average (``repetitions``), said once when every row averages the same, else row by row:
    the ``seeds`` column counts a row's runs, whatever they varied in."""
    described = {
        f"{row.method} / {row.model} / {row.dataset}": repetitions(row.records)
        for table in tables
        for row in table.rows
    }
    if len(set(described.values())) == 1:
        return f"Each row averages {next(iter(described.values()))} (the `seeds` column counts the runs)."
    lines = [f"- `{row}`: {text}" if markdown else f"  {row}: {text}" for row, text in described.items()]
    return "\n".join(
        ["What each row averages (the `seeds` column counts the runs):", *([""] if markdown else []), *lines]
    )


def ignored_settings_warnings(records: list[dict[str, Any]]) -> list[str]:
    """The settings of a sweep that some of its cells never read (``ctxdistill.run.unused_settings``, in each cell's
    metrics.json), said once for the sweep rather than in every such cell: one line for each set of settings, with
    how many cells ignored them and why (a method that does not train, another adapter)."""
    ignored: dict[tuple[str, ...], dict[str, int]] = {}  # the keys: each reason, with its number of cells
    for record in records:
        for entry in record.get("ignored_settings") or []:
            reasons = ignored.setdefault(tuple(entry["keys"]), {})
            reasons[entry["reason"]] = reasons.get(entry["reason"], 0) + 1
    return [
        f"warning: {', '.join(keys)}: "
        + (
            f"not read by {cells} of the {len(records)} cells, ignored there"
            if cells < len(records)
            else f"read by none of the {len(records)} cells, ignored"
        )
        + f" ({'; '.join(reasons)})"
        for keys, reasons in ignored.items()
        if (cells := sum(reasons.values()))
    ]


def wandb_outage_warnings(records: list[dict[str, Any]], sweep_dir: Path) -> list[str]:
    """The cells W&B could not start in (``wandb_could_not_start`` in each cell's metrics.json), said once for the
    sweep rather than in every cell: how many, why, and how to get their runs into W&B."""
    from ctxdistill.tracking import offline_sync_command

    missed = [r["wandb_could_not_start"] for r in records if r.get("wandb_could_not_start")]
    if not missed:
        return []
    why = "; ".join(dict.fromkeys(missed))
    return [
        f"warning: W&B could not start in {len(missed)} of the {len(records)} cells ({why}): their results are here "
        "but not in W&B. To log them, run this sweep again with logger.mode=offline "
        f"force=true and upload its runs with:  {offline_sync_command(sweep_dir)}"
    ]


def other_launches_failures(others: dict[str, str]) -> list[str]:
    """The warning naming the failed cells that another command's sweep left in this sweep's directory."""
    if not others:
        return []
    cells = "; ".join(f"{cell}: {error}" for cell, error in others.items())
    return [
        f"warning: {len(others)} failed cell(s) in this directory are not cells of this command (another command "
        f"launched them into the same hydra.sweep.dir); retry them with that command: {cells}"
    ]


def say(warning: str, readme: Path) -> None:
    """A warning of the sweep's summary: on the console and in the sweep's README, not through logging, which
    Hydra leaves writing to the last cell's log file."""
    print(warning, file=sys.stderr, flush=True)
    with readme.open("a") as file:
        file.write(f"\n{warning}\n")


class SweepSummaryCallback(Callback):
    """When a multirun ends: print the comparison table, write the sweep's README.md and results/,
    log the table and plots to the sweep's W&B group (with logger=wandb), and list the failed
    cells (the command then exits non-zero)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from ctxdistill.tracking import WANDB_COULD_NOT_START_SAID

        # each launch of the sweep (a resumed one too) says once that W&B could not start, if it cannot
        (Path(config.hydra.sweep.dir) / WANDB_COULD_NOT_START_SAID).unlink(missing_ok=True)
        self.launched_ns = time.time_ns()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ctxdistill.evaluate_run import run_dirs
        from ctxdistill.results.records import collect

        sweep_dir = Path(config.hydra.sweep.dir)
        failed = failed_runs(sweep_dir)
        # A launch retries every cell of its own that is not complete, so a failure left from before it is a cell of
        # another command's sweep into this directory: neither this command's to retry nor its failure.
        others = {
            cell: error
            for cell, error in failed.items()
            if (sweep_dir / cell / FAILURE_FILE).stat().st_mtime_ns < self.launched_ns
        }
        failures = {cell: error for cell, error in failed.items() if cell not in others}
        # the cells' runs: no evaluation (ctxdistill-eval) beside one, no result of a cell whose latest attempt failed
        runs = [
            r
            for r in collect([run_dir / "metrics.json" for run_dir in run_dirs(sweep_dir)])
            if str(Path(r["run_dir"]).relative_to(sweep_dir)) not in failed
        ]
        command = sweep_command(config.hydra)
        failed_cells.update(failures)  # the exit status says them, also if writing the summary fails
        try:
            self.write_summary(config, sweep_dir, runs, failures, others, command)
        finally:
            if failures:
                print(f"\n{len(failures)} cell(s) FAILED (details in each cell's {FAILURE_FILE} and log):", flush=True)
                for cell, error in failures.items():
                    print(f"  {cell}: {error}", flush=True)
                print(f"Re-run the same command to retry only these:\n  {command}", flush=True)

    @staticmethod
    def write_summary(config, sweep_dir: Path, runs: list, failures: dict, others: dict, command: str) -> None:
        """The comparison of the sweep's complete runs: printed, in README.md and results/, and logged to W&B."""
        from ctxdistill.results.files import remove_results, write_results
        from ctxdistill.results.render import render
        from ctxdistill.results.table import mixed_settings_warnings, summarise
        from ctxdistill.results.wandb_outputs import log_results
        from ctxdistill.tracking import offline_sync_command, resolve_mode, set_aside_offline_runs

        if runs:
            ignored = ignored_settings_warnings(runs) + wandb_outage_warnings(runs, sweep_dir)
            runs, warnings, split = split_settings(runs)
            tables = summarise(runs)
            warnings += mixed_settings_warnings(tables) + ignored + other_launches_failures(others)
            print(
                f"\nComparison ({len(runs)} runs in {sweep_dir}):\n"
                + "\n".join([render(tables), repetitions_text(tables), *warnings]),
                flush=True,
            )
            averaged = "\n\n".join(["## What each row averages", repetitions_text(tables, markdown=True), *warnings])
            readme = write_results(
                sweep_dir,
                runs,
                title=f"Sweep {sweep_dir.name}",
                failures=failures,
                command=command,
                appendix=averaged,
                tables=tables,
                sources=shlex.join([str(sweep_dir), *(["--by", *split] if split else [])]),
            )
            print(f"Summary, tables and plots: {readme}", flush=True)
            if config.logger.backend == "wandb":
                if resolve_mode(config.logger.mode) == "offline":  # an earlier launch's comparison: replaced
                    set_aside_offline_runs(sweep_dir / "wandb", None)
                try:
                    log_results(
                        tables,
                        entity=config.logger.entity,
                        project=config.logger.project,
                        group=config.logger.group or group_name(sweep_dir),
                        mode=resolve_mode(config.logger.mode),
                        directory=sweep_dir,
                    )
                except Exception as e:  # noqa: BLE001 - the tables are on disk already
                    why = (str(e) or type(e).__name__).splitlines()[0]
                    say(f"warning: W&B could not log this comparison ({why}); it is in {readme}", readme)
                if resolve_mode(config.logger.mode) == "offline":  # the cells did not say it, each for itself
                    print(
                        f"W&B is offline; upload the sweep's runs later with:  {offline_sync_command(sweep_dir)}",
                        flush=True,
                    )
        else:  # no complete run: an earlier launch's summary describes runs whose latest attempt failed
            remove_results(sweep_dir)
            if others:
                print("\n".join(other_launches_failures(others)), flush=True)
