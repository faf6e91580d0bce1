"""Comparisons to W&B: the tables and plots logged to a run, and a report built from the declarations."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from ctxdistill.results.metrics import IN_DOMAIN
from ctxdistill.results.plots import write_plots
from ctxdistill.results.render import flat_rows
from ctxdistill.results.table import Table, headlines_of

TABLE_KEY = "comparison"


def log_results(
    tables: list[Table],
    *,
    entity: Optional[str],
    project: str,
    group: Optional[str],
    mode: str,
    directory: Optional[Path] = None,
    extra_tables: Optional[dict[str, tuple[list[str], list[list[Any]]]]] = None,
) -> Optional[str]:
    """Log the tables and the plots to a new W&B run with job_type=compare: ``comparison`` (one table) or
    ``comparison/<family>`` (several), with the CSV's columns, and ``extra_tables`` (key -> columns, rows;
    e.g. the scorecard). ``mode`` is W&B's (online, offline, disabled). The run's files go under
    ``directory`` (W&B's default: ./wandb); returns the run's directory."""
    import wandb

    if mode == "disabled":
        return None
    with tempfile.TemporaryDirectory() as tmp:
        plots = write_plots(tables, Path(tmp))
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
        logged: dict[str, Any] = {f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}
        for table in tables:
            columns, rows = flat_rows([table])
            key = TABLE_KEY if len(tables) == 1 else f"{TABLE_KEY}/{table.family.family}"
            logged[key] = wandb.Table(columns=columns, data=rows)
        for key, (columns, rows) in (extra_tables or {}).items():
            logged[key] = wandb.Table(columns=columns, data=rows)
        run.log(logged)
        run_dir = str(Path(run.dir).parent)
        run.finish()
    print(f"logged {len(tables)} comparison table(s) and {len(plots)} plots to W&B ({run_dir})")
    return run_dir


def build_report(tables: list[Table], *, entity: str, project: str, group: str, by: Sequence[str] = ()):
    """A W&B report for a sweep's group: one section per metric family and dataset, panels of its rows'
    headlines (each method's objective: every one where they differ; by method and model, against model size,
    teacher against model). Its runs are those the tables hold: complete ones, grouped as the rows are (method,
    model and the ``by`` settings: ctxdistill-compare --by).

    Only building happens here (offline); ``.save()`` on the result publishes it.
    """
    import wandb_workspaces.reports.v2 as wr

    grouped = ", ".join(["method", "model", *by])
    blocks: list[Any] = [
        wr.P(
            f"The complete runs of the W&B group '{group}', grouped by {grouped}; bars and lines "
            "show the mean over seeds with the standard deviation."
        )
    ]
    for table in tables:
        teacher = table.family.teacher
        for dataset in table.datasets:
            headlines = headlines_of([r for r in table.rows if r.dataset == dataset])
            label = " / ".join(h.label for h in headlines)
            shown = [(s, h) for s in table.sets for h in headlines if table.column(s, h.name)]
            keys = [f"{s}/{h.name}" for s, h in shown]
            runset = wr.Runset(
                entity=entity,
                project=project,
                name=f"{dataset} runs",
                # the run's identity, as its table row: GenPI's dataset is its prompt, a model its loaded path;
                # complete as the table's runs are (an attempt that stopped, or a run still going, is none)
                filters=f"Group = '{group}' and Config('identity.dataset') = '{dataset}' and State = 'finished' "
                "and SummaryMetric('status') = 'complete'",
                groupby=["config.identity.method", "config.identity.model", *(f"config.{key}" for key in by)],
            )
            panels = [
                wr.BarPlot(
                    title=f"{dataset}: {label} by method and model",
                    metrics=keys,
                    orientation="v",
                    groupby_aggfunc="mean",
                    groupby_rangefunc="stddev",
                ),
                *(
                    wr.ScatterPlot(
                        title=f"{dataset}: {table.title(s)} {h.label} vs model size",
                        x=wr.SummaryMetric("model/parameters"),
                        y=wr.SummaryMetric(key),
                        log_x=True,
                    )
                    for (s, h), key in zip(shown, keys)
                ),
            ]
            if teacher and table.column(IN_DOMAIN, teacher):
                panels.append(
                    wr.BarPlot(
                        title=f"{dataset}: teacher vs model (in-domain)",
                        metrics=[f"{IN_DOMAIN}/{teacher}", *(k for (s, _), k in zip(shown, keys) if s == IN_DOMAIN)],
                        orientation="v",
                        groupby_aggfunc="mean",
                        groupby_rangefunc="stddev",
                    )
                )
            panels.append(
                wr.LinePlot(
                    title=f"{dataset}: training loss",
                    x="Step",
                    y=["train/loss"],
                    groupby_aggfunc="mean",
                    groupby_rangefunc="stddev",
                )
            )
            heading = dataset if len(tables) == 1 else f"{dataset}: {table.family.family}"
            blocks += [wr.H2(heading), wr.PanelGrid(runsets=[runset], panels=panels)]
    return wr.Report(
        entity=entity,
        project=project,
        title=f"ctxdistill: {group}",
        description=f"Method comparison for the sweep '{group}'",
        blocks=blocks,
        width="fluid",
    )
