"""W&B in and out for comparisons: runs read back as run records, tables and plots logged, reports built.

Runs come from W&B two ways, converted by one function (:func:`record_from_wandb`):
- offline run directories (``RUN_DIR/wandb/offline-run-*``), read from W&B's own run file;
- the public API (``wandb.Api().runs``), for runs that were synced or logged online.
"""

from __future__ import annotations

import json
import logging
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

if TYPE_CHECKING:
    from ctxdistill.compare import Table

log = logging.getLogger(__name__)

# W&B's run file (.wandb) is a LevelDB-style log: a 7-byte file header, then records in 32 KiB
# blocks, each chunk with a header of CRC-32 (seeded with the chunk type), length and type;
# a record split across blocks comes as FIRST, MIDDLE..., LAST chunks.
_FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK = 32768
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _run_file_records(path: Path) -> Iterator[bytes]:
    """The serialised records of a .wandb file, up to the first damaged or cut-off chunk."""
    data = path.read_bytes()
    if not data.startswith(_FILE_HEADER):
        raise ValueError(f"{path} is not a W&B run file (no ':W&B' header)")
    pos, parts = len(_FILE_HEADER), []
    while pos + _CHUNK_HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _CHUNK_HEADER:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        checksum, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + _CHUNK_HEADER : pos + _CHUNK_HEADER + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != checksum:
            return  # a run killed mid-write: what came before is intact
        pos += _CHUNK_HEADER + length
        parts.append(chunk)
        if kind in (_FULL, _LAST):
            yield b"".join(parts)
            parts = []


def _update(target: dict[str, Any], items) -> None:
    """Apply config/summary/history items; a nested key (a logged table's fields) becomes a nested dict."""
    for item in items:
        if not item.value_json:
            continue
        *parents, key = [item.key] if item.key else list(item.nested_key)
        node = target
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = json.loads(item.value_json)


@dataclass
class WandbRun:
    """What the public API's Run offers (config, summary, state, group, tags), read from disk."""

    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    finished: bool = False
    group: str = ""
    tags: list[str] = field(default_factory=list)


def read_offline_run(run_dir: Path) -> WandbRun:
    """A W&B run directory (``offline-run-*``) read from its run file."""
    from wandb.proto import wandb_internal_pb2 as pb

    run = WandbRun()
    for raw in _run_file_records(next(Path(run_dir).glob("*.wandb"))):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _update(run.config, record.run.config.update)
            run.group, run.tags = record.run.run_group, list(record.run.tags)
        elif kind == "config":
            _update(run.config, record.config.update)
        elif kind == "history":  # a logged value is the summary until something overrides it
            _update(run.summary, record.history.item)
        elif kind == "summary":
            _update(run.summary, record.summary.update)
        elif kind == "exit":
            run.finished = record.exit.exit_code == 0
    run.config.pop("_wandb", None)
    return run


def record_from_wandb(config: dict[str, Any], summary: dict[str, Any], *, finished: bool) -> Optional[dict[str, Any]]:
    """A run record like metrics.json from a W&B run's config and summary; None for other runs."""
    try:
        identity = {
            "method": config["method"]["name"],
            "model": config["model"]["name"],
            "dataset": config["dataset"]["name"],
            "seed": config["seed"],
            "paper": config.get("paper"),
        }
    except (KeyError, TypeError):
        return None  # not a ctxdistill run (e.g. a compare run in the same group)
    metrics = {
        k: float(v)
        for k, v in summary.items()
        if "/" in k
        and not k.startswith(("_", "train/", "model/"))
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
    }
    if not finished or "eval/accuracy" not in metrics:
        return None
    last_logged = summary.get("_timestamp")
    return {
        **identity,
        "status": "complete",
        "metrics": metrics,
        "model_parameters": summary.get("model/parameters"),
        "finished_at": datetime.fromtimestamp(last_logged, timezone.utc).isoformat(timespec="seconds")
        if last_logged
        else "",
    }


def offline_records(path: Path) -> list[dict[str, Any]]:
    """The finished ctxdistill runs among the W&B run directories under ``path``."""
    records = []
    for run_file in sorted(Path(path).rglob("*.wandb")):
        try:
            run = read_offline_run(run_file.parent)
        except ValueError as e:
            log.warning("skipping %s: %s", run_file, e)
            continue
        record = record_from_wandb(run.config, run.summary, finished=run.finished)
        if record:
            records.append(record)
    return records


def api_records(project_path: str, group: Optional[str] = None) -> list[dict[str, Any]]:
    """The finished ctxdistill runs of a W&B project (``entity/project``), optionally of one group."""
    import wandb

    runs = wandb.Api().runs(project_path, filters={"group": group} if group else None, lazy=False)
    records = [record_from_wandb(run.config, run.summary_metrics, finished=run.state == "finished") for run in runs]
    return [r for r in records if r]


# ---------------------------------------------------------------- out: tables, plots, reports
def table_rows(table: Table) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows for a wandb.Table: one numeric mean and std column per metric."""
    columns = ["method", "model", "dataset", "seeds", "model_parameters"]
    columns += [f"{k}_{s}" for k in table.columns for s in ("mean", "std")]
    rows = []
    for row in table.rows:
        values: list[Any] = [row.method, row.model, row.dataset, len(row.seeds), row.size]
        for key in table.columns:
            stat = row.stats.get(key)
            values += [None, None] if stat is None else [stat.mean, stat.std]
        rows.append(values)
    return columns, rows


def log_results(
    table: Table,
    *,
    entity: Optional[str],
    project: str,
    group: Optional[str],
    mode: str = "auto",
    directory: Optional[Path] = None,
    tables: Optional[dict[str, tuple[list[str], list[list[Any]]]]] = None,
) -> Optional[str]:
    """Log the table (``comparison``), the plots and any further ``tables`` (name -> columns, rows; e.g. the
    scorecard) to a new W&B run with job_type=compare.

    The run's files go under ``directory`` (W&B's default: ./wandb); returns the run's directory.
    """
    import wandb

    from ctxdistill.plots import write_plots
    from ctxdistill.tracking import resolve_mode

    mode = resolve_mode(mode)
    if mode == "disabled":
        return None
    columns, rows = table_rows(table)
    with tempfile.TemporaryDirectory() as tmp:
        plots = write_plots(table, Path(tmp))
        run = wandb.init(
            entity=entity,
            project=project,
            group=group,
            job_type="compare",
            mode=mode,
            dir=str(directory) if directory else None,
            name=f"compare-{group}" if group else "compare",
            reinit="finish_previous",
            settings=wandb.Settings(silent=True),
        )
        run.log(
            {
                "comparison": wandb.Table(columns=columns, data=rows),
                **{name: wandb.Table(columns=cols, data=data) for name, (cols, data) in (tables or {}).items()},
                **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots},
            }
        )
        run_dir = str(Path(run.dir).parent)
        run.finish()
    print(f"logged the comparison table and {len(plots)} plots to W&B ({run_dir})")
    return run_dir


def build_report(table: Table, *, entity: str, project: str, group: str):
    """A W&B report for a sweep's group: one section per dataset, panels comparing methods across model sizes.

    Only building happens here (offline); ``.save()`` on the result publishes it.
    """
    import wandb_workspaces.reports.v2 as wr

    blocks: list[Any] = [
        wr.P(
            f"Runs of the W&B group '{group}', grouped by method and model; bars and lines "
            "show the mean over seeds with the standard deviation."
        )
    ]
    for dataset in table.datasets:
        sets = ["eval", *table.ood_sets(dataset)]
        accuracies = [f"{name}/accuracy" for name in sets]
        runset = wr.Runset(
            entity=entity,
            project=project,
            name=f"{dataset} runs",
            filters=f"Group = '{group}' and Config('dataset.name') = '{dataset}'",
            groupby=["config.method.name", "config.model.name"],
        )
        panels = [
            wr.BarPlot(
                title=f"{dataset}: accuracy by method and model",
                metrics=accuracies,
                orientation="v",
                groupby_aggfunc="mean",
                groupby_rangefunc="stddev",
            ),
            *(
                wr.ScatterPlot(
                    title=f"{dataset}: {name} accuracy vs model size",
                    x=wr.SummaryMetric("model/parameters"),
                    y=wr.SummaryMetric(f"{name}/accuracy"),
                    log_x=True,
                )
                for name in sets
            ),
            wr.BarPlot(
                title=f"{dataset}: teacher vs student (in-domain)",
                metrics=["eval/teacher_accuracy", "eval/accuracy"],
                orientation="v",
                groupby_aggfunc="mean",
                groupby_rangefunc="stddev",
            ),
            wr.LinePlot(
                title=f"{dataset}: training loss",
                x="Step",
                y=["train/loss"],
                groupby_aggfunc="mean",
                groupby_rangefunc="stddev",
            ),
        ]
        blocks += [wr.H2(dataset), wr.PanelGrid(runsets=[runset], panels=panels)]
    return wr.Report(
        entity=entity,
        project=project,
        title=f"ctxdistill: {group}",
        description=f"Method comparison for the sweep '{group}'",
        blocks=blocks,
        width="fluid",
    )
