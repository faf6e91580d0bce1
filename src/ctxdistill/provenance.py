"""What produced a run: the code, the libraries, the machine, the config, the data and the caches.

Every run's ``metrics.json`` (under ``provenance``) and its W&B config record:

- ``code``: the git commit of the ctxdistill source that ran and whether tracked files differed from it
  (``dirty``), or, for an installed copy, that it is not a git checkout;
- ``versions``: python and the libraries that shape the numbers (:data:`LIBRARIES`);
- ``device``: the CPU model, the GPUs (name and count), the device the run used and its process count;
- ``config_sha256``: a hash of the resolved config, without the keys that say where things are kept
  or how the run is logged (:func:`ctxdistill.results.records.compared`), so equal configs hash equal across sweeps;
- ``data``: every data file the run read (path, size, SHA-256), every Hub dataset (id, config, split,
  version, fingerprint) and every local model directory it loaded (path, each file's size and time);
- ``caches``: the teacher-cache and stage-cache keys the run used (and their files);
- ``eval_set_sizes``: each eval set's number of examples (queries; a query asked several times counts once).

Data and cache reads are noted where they happen (:func:`note_data`, :func:`note_cache`) into the
current run's record, which :func:`begin_run` starts afresh: the runs of a sweep share one process.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

#: The packages whose versions a run records (ctxdistill's own version beside its commit).
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets", "wandb", "ctxdistill")

_inputs: dict[str, dict[str, dict[str, Any]]] = {"data": {}, "caches": {}}


def begin_run() -> None:
    """Forget what an earlier run of this process read."""
    for noted in _inputs.values():
        noted.clear()


def data_file(path: Path) -> dict[str, Any]:
    """A local data file as provenance records it: its path, size and SHA-256."""
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's content (read once per size and modification time in a process: a sweep's cells
    read the same files)."""
    stat = path.stat()
    return _sha256(Path(path).resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_of(directory: Path) -> list[tuple[str, int, int]]:
    """Each file under ``directory`` with its size and time: a file moved in with an older time than the directory's
    newest still changes the list."""
    return sorted(
        (str(f.relative_to(directory)), f.stat().st_size, f.stat().st_mtime_ns)
        for f in directory.rglob("*")
        if f.is_file()
    )


def changed_data(recorded: dict[str, Any]) -> list[str]:
    """The data a run's recorded provenance lists whose content is another now (a contexts file stage 1 rewrote, a
    data file replaced at its path, a local dataset folder of another fingerprint, a local model's files): what the
    run's results no longer describe. A file that is not there (a relative path read from another directory) is not
    judged, nor a dataset on the Hub (its check would ask the network, minutes without one)."""
    changed = []
    for entry in recorded.get("data", []):
        if "sha256" in entry:
            path = Path(entry["path"])
            if path.is_file() and file_sha256(path) != entry["sha256"]:
                changed.append(entry["path"])
        elif "files" in entry:  # a model's files (their sizes and times), which may change in place
            path = Path(entry["path"])
            if path.is_dir() and [list(f) for f in files_of(path)] != entry["files"]:
                changed.append(entry["path"])
        elif "fingerprint" in entry and Path(entry["hub_id"]).is_dir():  # a local dataset folder
            now = hub_fingerprint(entry["hub_id"], entry["config"], entry["split"])
            if now not in (None, entry["fingerprint"]):
                changed.append(f"{entry['hub_id']} [{entry['split']}]")
    return changed


@functools.lru_cache(maxsize=None)
def hub_fingerprint(hub_id: str, config: Optional[str], split: str) -> Optional[str]:
    """The fingerprint of a dataset's split (a local folder) as ``datasets.load_dataset`` loads it now (as the run
    loaded it, in ``data.tasks.load_records``), or None where it does not load (once per process: a sweep's cells
    share it)."""
    import datasets

    try:
        return datasets.load_dataset(hub_id, config, split=split)._fingerprint
    except Exception:  # noqa: BLE001 - offline and not cached, removed, renamed: not judged
        return None


def hub_dataset(dataset, hub_id: str, config: Optional[str], split: str) -> dict[str, Any]:
    """A split loaded with ``datasets.load_dataset``: its id, config and split, the dataset's version and
    its fingerprint (which ``datasets`` derives from the prepared data files, so it changes with them)."""
    return {
        "hub_id": hub_id,
        "config": config,
        "split": split,
        "version": str(dataset.info.version) if dataset.info.version else None,
        "fingerprint": dataset._fingerprint,
        "rows": len(dataset),
    }


def note_data(origin: Optional[dict[str, Any]]) -> None:
    """Record that the current run read ``origin`` (:func:`data_file` or :func:`hub_dataset`; None: generated)."""
    if origin is not None:
        _inputs["data"][json.dumps(origin, sort_keys=True)] = origin


def note_data_file(path: Path) -> None:
    note_data(data_file(path))


def note_cache(kind: str, key: str, path: Optional[Path]) -> None:
    """Record a cache the current run used: ``kind`` (teacher, or stage:NAME), its key, and its file
    (None for a cache held in memory only)."""
    entry = {"cache": kind, "key": key, "path": str(path) if path is not None else None}
    _inputs["caches"][json.dumps(entry, sort_keys=True)] = entry


def inputs() -> dict[str, list[dict[str, Any]]]:
    """What the current run has read so far: data files and Hub datasets, and caches."""
    return {name: list(noted.values()) for name, noted in _inputs.items()}


# ---------------------------------------------------------------- code, libraries, machine
def git_state(directory: Path) -> dict[str, Any]:
    """The commit of the checkout ``directory``'s files belong to, and whether tracked files differ from it
    (untracked files do not count, as with ``git describe --dirty``). A directory git does not track (an
    installed package, even inside a repository) says so instead."""

    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    tracked = git("ls-files", "--", ".")
    if not commit or not tracked:
        return {"commit": None, "dirty": None, "checkout": f"not a git checkout ({directory} is not tracked by git)"}
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return {"commit": commit.strip(), "dirty": bool(status.strip()) if status is not None else None, "checkout": "git"}


@functools.cache
def code_state() -> dict[str, Any]:
    """:func:`git_state` of the ctxdistill source this process imported, asked once: the modules it runs do
    not change after import, whatever happens to the files later in a sweep."""
    import ctxdistill

    return git_state(Path(ctxdistill.__file__).resolve().parent)


def library_versions() -> dict[str, Optional[str]]:
    """python and each of :data:`LIBRARIES` (None: not installed), read from package metadata without importing."""

    def version(name: str) -> Optional[str]:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), **{name: version(name) for name in LIBRARIES}}


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_info(device: Any, processes: int) -> dict[str, Any]:
    import torch

    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {"cpu": cpu_model(), "gpus": gpus, "gpu_count": len(gpus), "used": str(device), "processes": processes}


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of the resolved config without where things are kept and how the run is logged."""
    from ctxdistill.results.records import compared, flatten

    kept = {key: value for key, value in flatten(config).items() if compared(key)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def eval_set_sizes(task) -> dict[str, int]:
    """Examples per eval set; a task mixture's as ``{task}/{set}``. A query asked ``votes`` times counts once."""
    from ctxdistill.data.mixture import TaskMixture

    if isinstance(task, TaskMixture):
        return {f"{name}/{s}": n for name, part in task.eval_tasks.items() for s, n in eval_set_sizes(part).items()}
    return {name: len(examples) // task.votes for name, examples in task.eval_sets.items()}


def with_made_sets(sizes: dict[str, int], predictions: dict[str, list]) -> dict[str, int]:
    """``sizes`` (:func:`eval_set_sizes`) with the eval sets a method made as it ran (GenPI's held-out pseudo
    inputs, generated after the run starts), counted from the run's prediction rows of each."""
    made = {
        name: len(rows)
        for name, rows in predictions.items()
        if rows and name not in sizes and not any(key.startswith(f"{name}/") for key in sizes)
    }
    return {**sizes, **made}


def describe(config: dict[str, Any], task, device: Any, processes: int) -> dict[str, Any]:
    """A run's provenance: everything above, with what it has read so far (see :func:`inputs`)."""
    return {
        "code": dict(code_state()),
        "versions": library_versions(),
        "device": device_info(device, processes),
        "config_sha256": config_hash(config),
        "eval_set_sizes": eval_set_sizes(task),
        **inputs(),
    }


# ---------------------------------------------------------------- a sweep's versions
