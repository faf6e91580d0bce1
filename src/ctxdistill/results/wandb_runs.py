"""Runs read back from W&B as run records: offline run directories and the public API.

Both are converted by one function (:func:`record_from_wandb`):
- offline run directories (``RUN_DIR/wandb/offline-run-*``), read from W&B's own run file;
- the public API (``wandb.Api().runs``), for runs that were synced or logged online.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from ctxdistill.results.run_files import files_under

# W&B's run file (.wandb) is a LevelDB-style log: a 7-byte file header, then records in 32 KiB
# blocks, each chunk with a header of CRC-32 (seeded with the chunk type), length and type;
# a record split across blocks comes as FIRST, MIDDLE..., LAST chunks.
_FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK = 32768
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _run_file_records(path: Path) -> tuple[list[bytes], Optional[str]]:
    """The serialised records of a .wandb file up to the first damaged or cut-off chunk, and where the file stops
    being readable (None when it is read to its end)."""
    data = path.read_bytes()
    if not data.startswith(_FILE_HEADER):
        raise ValueError(f"{path} is not a W&B run file (no ':W&B' header)")
    pos, parts, records = len(_FILE_HEADER), [], []
    while pos < len(data):
        if _BLOCK - pos % _BLOCK < _CHUNK_HEADER:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        if pos + _CHUNK_HEADER > len(data):
            break  # cut inside a chunk's header
        checksum, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + _CHUNK_HEADER : pos + _CHUNK_HEADER + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != checksum:
            break  # cut off, or written over
        pos += _CHUNK_HEADER + length
        parts.append(chunk)
        if kind in (_FULL, _LAST):
            records.append(b"".join(parts))
            parts = []
    if pos < len(data) or parts:  # parts: a record whose last chunk never came
        return records, f"cut off or damaged at byte {pos} of {len(data)}"
    return records, None


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
    """What the public API's Run offers (config, summary, state, name, group, tags), read from disk."""

    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    finished: bool = False
    ended: bool = False  # the file holds the run's exit record, whatever its exit code
    run_id: str = ""  # a resumed run's directories share it
    started: float = 0.0  # seconds since the epoch
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    damage: Optional[str] = None  # where the run file stops being readable: the records after it are lost


def read_offline_run(run_dir: Path) -> WandbRun:
    """A W&B run directory (``offline-run-*``) read from its run file."""
    from wandb.proto import wandb_internal_pb2 as pb

    run = WandbRun()
    raws, run.damage = _run_file_records(next(Path(run_dir).glob("*.wandb")))
    for raw in raws:
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _update(run.config, record.run.config.update)
            run.name, run.group, run.tags = record.run.display_name, record.run.run_group, list(record.run.tags)
            run.run_id, run.started = record.run.run_id, record.run.start_time.ToMicroseconds() / 1e6
        elif kind == "config":
            _update(run.config, record.config.update)
        elif kind == "history":  # a logged value is the summary until something overrides it
            _update(run.summary, record.history.item)
        elif kind == "summary":
            _update(run.summary, record.summary.update)
        elif kind == "exit":
            run.finished, run.ended = record.exit.exit_code == 0, True
    run.config.pop("_wandb", None)
    return run


#: The tag, group prefix and offline folder of a W&B run a later run in its directory replaced (force=true, or a
#: restart without a checkpoint): never read back, its results are no longer the directory's.
SUPERSEDED = "superseded"

#: The config entries a W&B sweep's parameters replaced (its agent locks ``method: cd`` over the run's ``method``
#: section), kept by the tracker under this key and put back when the run is read.
SHADOWED_BY_SWEEP = "config_shadowed_by_sweep"


#: summary keys that are not the run's final metrics: W&B's own, training statistics, the model's size and each
#: earlier round's evaluation (``round/eval/accuracy``, logged by a method of several rounds such as sequential_cd)
NOT_METRICS = ("_", "train/", "model/", "round/")


def record_from_wandb(config: dict[str, Any], summary: dict[str, Any], *, finished: bool) -> Optional[dict[str, Any]]:
    """A run record like metrics.json from a W&B run's config and summary; None for other runs.

    Only a finished run whose summary says ``status: complete`` (logged after its metrics.json was written)
    is one: an interrupted or failed run's summary may hold the numbers of a periodic evaluation. The run's
    metrics are its summary's ``{set}/{metric}`` numbers; which of them are its columns the config's
    ``metric_set`` says."""
    config = {key: value for key, value in config.items() if key != SHADOWED_BY_SWEEP} | config.get(
        SHADOWED_BY_SWEEP, {}
    )
    try:
        # what metrics.json names the run (its dataset is the task's: GenPI's prompt, not the dataset section);
        # runs logged before the config carried it, from the sections
        identity = config.get("identity") or {
            "method": config["method"]["name"],
            "model": config["model"]["name"],
            "dataset": config["dataset"]["name"],
            "seed": config["seed"],
            "paper": config.get("paper"),
        }
    except (KeyError, TypeError):
        return None  # not a ctxdistill run (e.g. a compare run in the same group)
    metrics = {
        k: v
        for k, v in summary.items()
        if "/" in k and not k.startswith(NOT_METRICS) and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    if not (finished and summary.get("status") == "complete" and metrics):
        return None
    last_logged = summary.get("_timestamp")  # for runs logged before metrics.json's finished_at was
    return {
        **identity,
        "status": "complete",
        "metrics": metrics,
        "metric_set": config.get("metric_set"),
        "config": config,
        "model_parameters": summary.get("model/parameters"),
        **({"provenance": config["provenance"]} if config.get("provenance") else {}),  # the versions line's
        "finished_at": summary.get("finished_at")
        or (datetime.fromtimestamp(last_logged, timezone.utc).isoformat(timespec="seconds") if last_logged else ""),
    }


def latest_per_run_dir(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last complete W&B run of each output dir: a run made again there (force=true) starts a W&B run of
    its own, and replaces the earlier one's metrics.json as it replaces it here."""
    latest: dict[Any, dict[str, Any]] = {}
    for index, record in enumerate(records):
        key = record["config"].get("output_dir") or index
        if key not in latest or record["finished_at"] >= latest[key]["finished_at"]:
            latest[key] = record
    return list(latest.values())


def offline_records(path: Path, unreadable: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """The complete ctxdistill runs among the W&B run directories under ``path``, the last of each output dir.

    A run interrupted and resumed leaves a directory per attempt under one run id: only the latest
    attempt says how the run ended. A run file that cannot be read, or that is cut off or damaged where it is the
    latest attempt of its run, is named in a warning saying what was lost, and listed in ``unreadable``."""
    latest: dict[str, tuple[Path, WandbRun]] = {}
    for run_file in files_under(Path(path), "*.wandb"):
        if SUPERSEDED in run_file.relative_to(path).parts[:-1]:
            continue
        try:
            run = read_offline_run(run_file.parent)
        except (OSError, ValueError) as e:
            _unreadable(run_file, f"unreadable ({e})", unreadable)
            continue
        key = run.run_id or str(run_file)  # a file cut before its run record is an attempt of its own
        if key not in latest or run.started >= latest[key][1].started:
            latest[key] = run_file, run
    records = []
    for run_file, run in latest.values():
        record = record_from_wandb(run.config, run.summary, finished=run.finished)
        if run.damage:
            _unreadable(
                run_file,
                f"{run.damage}, so the records after it are lost"
                + (
                    "; read as the complete run it was before that"
                    if record
                    else ": without its final summary or exit the run is not read as complete and is left out. "
                    "Copy the run file again if it was cut in copying, or give the run's output directory (its "
                    "metrics.json) instead"
                ),
                unreadable,
            )
        if record:
            records.append(record)
    return latest_per_run_dir(records)


def _unreadable(run_file: Path, why: str, unreadable: Optional[list[str]]) -> None:
    print(f"warning: {run_file}: {why}", file=sys.stderr)
    if unreadable is not None:
        unreadable.append(str(run_file))


class WandbReadError(RuntimeError):
    """W&B's API could not be read (no login, no network, no such project); the message says what to do instead."""


def api_records(project_path: str, group: Optional[str] = None) -> list[dict[str, Any]]:
    """The complete ctxdistill runs of a W&B project (``entity/project``), optionally of one group, the last of
    each output dir."""
    import requests
    import wandb

    try:
        runs = list(wandb.Api().runs(project_path, filters={"group": group} if group else None, lazy=False))
    except (wandb.errors.Error, requests.RequestException, ValueError) as e:  # ValueError: no such project
        raise WandbReadError(
            f"cannot read runs from W&B ({str(e).splitlines()[0]}); its API needs network and a login "
            "(`wandb login`, or WANDB_API_KEY). Without them, give the runs' directories instead: run or sweep "
            "directories, or RUN_DIR/wandb for runs logged offline"
        ) from None
    records = [
        record_from_wandb(run.config, run.summary_metrics, finished=run.state == "finished")
        for run in runs
        if SUPERSEDED not in run.tags
    ]
    return latest_per_run_dir([r for r in records if r])
