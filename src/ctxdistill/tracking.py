"""Experiment tracking: Weights & Biases, or nothing.

W&B is online when the user is logged in and offline otherwise (a real run directory
under the run's output dir, uploadable later with ``wandb sync``). Any W&B failure
becomes a warning: tracking never costs a run its results. The run id is kept in the
output dir (``wandb_run_id``), so a resumed run (preemption, requeue) continues the same
W&B run instead of starting a new one; a run that starts from step 0 (force=true over a
complete run, a restart with no checkpoint) gets a new id, since W&B drops every step a
continued run logs below its last one, and the W&B run it replaces is set aside (offline: its directories
move to ``wandb/superseded``; online: tagged ``superseded`` and out of its group), so that neither
``wandb sync --sync-all`` nor a group's averages count a run twice.
"""

from __future__ import annotations

import functools
import logging
import netrc
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Optional

from ctxdistill.results.metrics import MetricSet
from ctxdistill.results.wandb_runs import SHADOWED_BY_SWEEP, SUPERSEDED, read_offline_run

log = logging.getLogger(__name__)


class Tracker:
    """No tracking: every call is a no-op (``logger=none``)."""

    run_dir: Optional[str] = None
    # why W&B could not start, where it could not (the run's metrics.json keeps it: a sweep's summary names the cells)
    start_error: Optional[str] = None

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def summary(self, metrics: dict[str, Any]) -> None: ...

    def add_config(self, values: dict[str, Any]) -> None: ...

    def declare(self, metric_set: MetricSet) -> None:
        """The run's declared metrics, into its config (a run read back knows its columns); a tracker
        with run summaries also keeps the objective's best value over the run."""
        self.add_config({"metric_set": metric_set.to_dict()})

    def predictions(self, rows: dict[str, list[dict]]) -> None: ...

    def finish(self, exit_code: int = 0) -> None:
        """End the run; a non-zero ``exit_code`` records it as failed (interrupted, crashed)."""


def _warn_on_failure(fn):
    """A W&B call that fails is warned of, once a run for each call (``log`` is called at every logging step: W&B
    unreachable was a warning per step); later calls are still made, in case W&B comes back."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never kill a run
            failed = self.__dict__.setdefault("_failed_calls", set())
            if fn.__name__ in failed:
                log.debug("W&B %s failed again: %s", fn.__name__, e)
                return None
            failed.add(fn.__name__)
            log.warning("W&B %s failed, continuing without it: %s (said once for this run)", fn.__name__, e)

    return wrapper


def logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    return os.environ.get("WANDB_MODE") or ("online" if logged_in() else "offline")


def persistent_run_id(output_dir: Path, resumes: bool) -> tuple[str, Optional[str]]:
    """The W&B run id of this output dir, and the id of the run it replaces (None: none): read back by a run
    that ``resumes`` from where an earlier one stopped, made anew by one that starts over (which supersedes
    the W&B run of the results it overwrites)."""
    from wandb.sdk.lib.runid import generate_id

    path = output_dir / "wandb_run_id"
    earlier = path.read_text().strip() if path.is_file() else None
    if resumes and earlier:
        return earlier, None
    run_id = generate_id()
    keep_run_id(output_dir, run_id)
    return run_id, earlier


def keep_run_id(output_dir: Path, run_id: str) -> None:
    """Records ``run_id`` as the output dir's W&B run (written whole, never half)."""
    path = output_dir / "wandb_run_id"
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(run_id + "\n")
    os.replace(staging, path)


def set_aside_offline_runs(wandb_dir: Path, run_id: Optional[str]) -> list[Path]:
    """Moves the offline directories of W&B run ``run_id`` (every attempt; None: every run there) into
    ``wandb_dir/superseded``, out of what ``wandb sync --sync-all`` uploads and of the dashboards' averages; nothing
    is deleted."""
    moved = []
    # W&B adds "-1", "-2" ... to an attempt's folder when it starts within the same second as the one before
    run = r"[a-z0-9]+" if run_id is None else re.escape(run_id)
    attempt_folder = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{run}(-\d+)?")
    for attempt in sorted(d for d in wandb_dir.glob("offline-run-*") if attempt_folder.fullmatch(d.name)):
        (wandb_dir / SUPERSEDED).mkdir(exist_ok=True)
        moved.append(Path(shutil.move(str(attempt), wandb_dir / SUPERSEDED / attempt.name)))
    return moved


def mark_superseded_online(api_run, group: str) -> None:
    """Tags a W&B run a later run of the same output dir replaced and moves it out of ``group``, so that the
    group's panels average the current runs only."""
    api_run.tags = sorted({*api_run.tags, SUPERSEDED})
    api_run.group = f"{SUPERSEDED}:{group}"
    api_run.update()


class WandbTracker(Tracker):
    def __init__(
        self,
        *,
        project: str,
        entity: Optional[str],
        mode: str,
        group: str,
        name: str,
        tags: list[str],
        job_type: str,
        config: dict[str, Any],
        output_dir: str,
        log_predictions: bool,
        resumes: bool,
        in_sweep: bool = False,
    ):
        import wandb

        self._wandb = wandb
        self._log_predictions = log_predictions
        mode = resolve_mode(mode)
        run_id, superseded = persistent_run_id(Path(output_dir), resumes)
        # silent: no banner, no footer of one-point sparklines; the one line below says where the run is
        self.run = wandb.init(
            project=project,
            entity=entity,
            mode=mode,
            group=group,
            name=name,
            tags=tags,
            job_type=job_type,
            config=config,
            dir=output_dir,
            reinit="finish_previous",
            id=run_id,
            resume="allow",
            settings=wandb.Settings(silent=True),
        )
        if self.run.id != run_id:  # a W&B sweep agent's run: W&B takes the agent's id, not the one asked for
            keep_run_id(Path(output_dir), self.run.id)
        if superseded == self.run.id:  # the agent runs this output dir's earlier W&B run again: nothing to set aside
            log.warning(
                "W&B: a sweep agent fixes the run id, so this run continues W&B run %s from step 0; W&B keeps the "
                "steps it logged before and drops the new ones up to them",
                self.run.id,
            )
        elif superseded is not None:
            self._set_aside(superseded, Path(output_dir) / "wandb", group, mode)
        # A sweep agent's parameters replace and lock the entries of the same name (method: cd over the method
        # section); the sweep needs them to track its grid, and reading the run back needs the sections.
        shadowed = {
            key: value
            for key, value in config.items()
            if isinstance(value, dict) and not isinstance(self.run.config.get(key), dict)
        }
        if shadowed:
            self.run.config.update({SHADOWED_BY_SWEEP: shadowed})
        self.run_dir = str(Path(self.run.dir).parent)  # the offline-run-* directory `wandb sync` takes
        self.offline = mode == "offline"
        if self.offline and not in_sweep:  # a sweep's summary gives one command for all its cells
            log.info("W&B is offline; upload later with:  wandb sync %s", self.run_dir)
        elif self.offline:
            log.debug("W&B is offline: %s", self.run_dir)
        else:
            log.info("W&B run: %s", self.run.url)

    @_warn_on_failure
    def declare(self, metric_set: MetricSet) -> None:
        super().declare(metric_set)
        if metric_set.objective is None:
            return
        name = metric_set.objective.rpartition("/")[2]
        better = next((m.higher_is_better for m in metric_set.metrics if m.name == name), True)
        self.run.define_metric(metric_set.objective, summary="max" if better else "min")

    @_warn_on_failure
    def _set_aside(self, run_id: str, wandb_dir: Path, group: str, mode: str) -> None:
        """The W&B run of the results this run overwrites (force=true, a restart from step 0) stops counting:
        its offline directories are moved aside, and online it is tagged and leaves the group."""
        self.run.config.update({"supersedes_wandb_run": run_id})
        moved = set_aside_offline_runs(wandb_dir, run_id)
        if moved:
            log.info("W&B: this run replaces %s; its offline directories are now under %s", run_id, moved[0].parent)
        if mode == "online":
            try:
                earlier = self._wandb.Api().run(f"{self.run.entity}/{self.run.project}/{run_id}")
            except ValueError:  # wandb's RunNotFoundError: never uploaded (an offline run not synced), nothing to mark
                return
            mark_superseded_online(earlier, group)
            log.info("W&B: run %s, which this run replaces, is tagged %r and left group %s", run_id, SUPERSEDED, group)

    @_warn_on_failure
    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    @_warn_on_failure
    def summary(self, metrics):
        # the last step's row first: W&B writes an open row out later (at the next log or at finish) and updates
        # the summary from it, over these (a selected checkpoint's figures by the last epoch's evaluation)
        self.run.log({}, commit=True)
        self.run.summary.update(metrics)

    @_warn_on_failure
    def add_config(self, values):
        self.run.config.update(values, allow_val_change=True)

    @_warn_on_failure
    def predictions(self, rows):
        if not self._log_predictions:
            return
        first = next((r[0] for r in rows.values() if r), None)
        if first is None:
            return
        # Scalar fields of a row (per-class lists stay in predictions.jsonl); tasks differ in which.
        columns = [key for key, value in first.items() if not isinstance(value, (list, dict))]
        table = self._wandb.Table(columns=["set", *columns])
        for name, set_rows in rows.items():
            for r in set_rows:
                table.add_data(name, *(r[c] for c in columns))
        self.run.log({"predictions": table})

    @_warn_on_failure
    def finish(self, exit_code=0):
        self.run.finish(exit_code=exit_code)
        if self.offline:
            wait_for_run_file(Path(self.run_dir))


def exit_code(error: BaseException) -> int:
    """The exit code a run stopped by ``error`` ends with: SystemExit's own (128 + signal for a checkpointed
    stop), 130 for Ctrl-C, else 1; never 0, since a run stopped early is not finished."""
    if isinstance(error, SystemExit) and isinstance(error.code, int) and error.code:
        return error.code
    return 128 + signal.SIGINT if isinstance(error, KeyboardInterrupt) else 1


def wait_for_run_file(run_dir: Path, timeout: float = 30.0) -> None:
    """Returns once an offline run's file holds its exit record: W&B's service writes the file after
    ``finish`` returns, and a table or ``wandb sync`` right after the run would otherwise read it cut short."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if read_offline_run(run_dir).ended:
                return
        except (StopIteration, ValueError, OSError):  # not created, or no header yet
            pass
        time.sleep(0.05)
    log.warning("W&B has not finished writing %s after %.0f s; `wandb sync` it once it has", run_dir, timeout)


def create_tracker(
    logger_cfg,
    *,
    group: str,
    name: str,
    tags: list[str],
    config: dict[str, Any],
    output_dir: str,
    resumes: bool,
    sweep_dir: Optional[Path] = None,
) -> Tracker:
    """W&B as ``logger_cfg`` sets it (or nothing); ``resumes``: the run continues one that stopped in
    ``output_dir`` (its W&B run continues too); ``sweep_dir``: the sweep of a cell, whose offline run the sweep's
    summary names (``offline_sync_command``) instead of the cell, and which says once for the sweep that W&B could
    not start."""
    in_sweep = sweep_dir is not None
    if logger_cfg.backend == "none" or resolve_mode(logger_cfg.mode) == "disabled":
        return Tracker()
    try:
        return WandbTracker(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            mode=logger_cfg.mode,
            group=logger_cfg.group or group,
            name=name,
            tags=[*tags, *logger_cfg.tags],
            job_type=logger_cfg.job_type,
            config=config,
            output_dir=str(Path(output_dir)),
            log_predictions=logger_cfg.log_predictions,
            resumes=resumes,
            in_sweep=in_sweep,
        )
    except Exception as e:  # noqa: BLE001 - a W&B outage must not stop the run
        if not in_sweep:
            log.warning("W&B could not start (%s); the run continues and its results stay on disk.", e)
        # an outage fails every cell alike: said at the sweep's first, summed up by its summary
        elif first_to_say(Path(sweep_dir) / WANDB_COULD_NOT_START_SAID):
            log.warning(
                "W&B could not start (%s); the sweep goes on without it and its results stay on disk "
                "(said once: the sweep's summary counts the cells it missed).",
                e,
            )
        else:
            log.debug("W&B could not start: %s", e)
        tracker = Tracker()
        tracker.start_error = str(e).splitlines()[0] if str(e) else type(e).__name__
        return tracker


#: in a sweep's directory once one of its cells has said that W&B could not start (removed as the sweep starts)
WANDB_COULD_NOT_START_SAID = ".wandb_could_not_start_said"


def first_to_say(marker: Path) -> bool:
    """Whether this process is the first to create ``marker``: one warning for a sweep whose cells run in several
    processes (a joblib or SLURM launcher's workers), not one per worker."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.open("x").close()
    except FileExistsError:
        return False
    except OSError:  # a sweep directory this process cannot write: better said twice than never
        return True
    return True


def offline_sync_command(sweep_dir: Path) -> str:
    """The one command that uploads a sweep's offline W&B runs: every cell's attempts and the comparison's
    (those set aside under ``wandb/superseded/`` stay out)."""
    import shlex

    quoted = shlex.quote(str(sweep_dir))
    return f"wandb sync {quoted}/*/wandb/offline-run-* {quoted}/wandb/offline-run-*"
