"""Records -> tables: one table per metric family, one row per (dataset, model, method), one column per
declared metric and eval set, each cell the values over seeds with n and a 95% interval. Each row's headline is its
own runs' (their objective: pbft's ``vocab_accuracy`` beside icl's ``accuracy``), or one metric for every row
(``choose_headline``, ``--metric``).

The interval of a cell is Student's t over its seeds (n = seeds) when they differ; for one run, or seeds that all
agree, it is over the set's examples (n = examples; the fewest any of them was evaluated on, where they differ):
Wilson's for an accuracy-like metric, Student's t from the spread per example a mean over examples reports (a
knowledge graph's MRR and Hits@k over its triples), the percentile bootstrap a bootstrapped statistic reports (F1).
``paired_tests`` adds, per cell and eval set, a paired test against a baseline method on the examples both
were evaluated on, of the row's headline where both record it per example: McNemar's exact test on successes
(accuracy), a sign-flip randomisation test on scores (a reciprocal rank for MRR).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from ctxdistill.results.metrics import EVERY_SET, EXAMPLES, IN_DOMAIN, Metric, MetricSet
from ctxdistill.results.records import (
    RECORDED_IN_WANDB_CONFIG,
    REPETITIONS,
    compared,
    flatten,
    metric_set,
    model_size,
    predictions,
    run_config,
)
from ctxdistill.results.stats import mcnemar_exact, mean_interval, sign_flip_test


@dataclass(frozen=True)
class Column:
    set: str
    metric: Metric

    @property
    def key(self) -> str:
        return f"{self.set}/{self.metric.name}"


@dataclass
class Cell:
    """One metric of one row: a value per seed, the number of examples each was measured on and what each reports
    beside it for its own interval (``Metric.companions``: a mean's spread, a bootstrap's bounds; None where a run
    reports none)."""

    metric: Metric
    values: list[float] = field(default_factory=list)
    examples: list[Optional[int]] = field(default_factory=list)
    reported: list[tuple[Optional[float], ...]] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> Optional[float]:
        """Sample standard deviation over seeds; None for a single seed, NaN where a value is not finite."""
        if len(self.values) < 2:
            return None
        return statistics.stdev(self.values) if all(map(math.isfinite, self.values)) else math.nan

    @property
    def interval(self) -> Optional[tuple[float, float]]:
        """95%: Student's t over the seeds where they differ, else one run's over its examples: Wilson's for a
        proportion, Student's t from the values' spread for a mean, the run's own bootstrap for a bootstrapped
        statistic (:func:`stats.mean_interval`)."""
        if self.metric.kind == "count":
            return None
        interval = mean_interval(self.values, self.examples, self.metric.kind, self.reported)
        if interval is None:
            return None
        (low, high), (lowest, highest) = interval, self.metric.value_range  # whatever few seeds suggest
        return (low if lowest is None else max(low, lowest), high if highest is None else min(high, highest))


@dataclass
class PairedTest:
    """A method against the baseline on the examples both were evaluated on: each example's difference in the
    metric's per-example value (1 or 0 for a success, else the example's score), averaged over the seeds both
    ran, so that an example evaluated under several seeds is still one pair (the examples are the sample)."""

    baseline: str
    metric: Metric  # the row's headline, or the metric both record per example where the baseline lacks it
    test: str  # "McNemar" on one seed's successes, else "sign-flip" on the examples' (mean) differences
    differences: list[float]

    @property
    def pairs(self) -> int:
        return len(self.differences)

    @property
    def delta(self) -> float:
        """The method's metric minus the baseline's, over the pairs."""
        return statistics.fmean(self.differences)

    @property
    def p_value(self) -> float:
        if self.test == "McNemar":
            return mcnemar_exact(sum(d > 0 for d in self.differences), sum(d < 0 for d in self.differences))
        return sign_flip_test(self.differences)


@dataclass
class Row:
    method: str
    model: str
    dataset: str
    size: Optional[float]
    headline: Metric  # what the row is judged by: its first run's objective, or --metric's choice
    records: list[dict[str, Any]] = field(default_factory=list)
    cells: dict[str, Cell] = field(default_factory=dict)
    tests: dict[str, PairedTest] = field(default_factory=dict)  # eval set -> test against the baseline

    @property
    def seeds(self) -> list[int]:
        return [r["seed"] for r in self.records]

    def seeds_of(self, set_name: str) -> list[int]:
        """Seeds of the row's runs that report the eval set: the runs its cells' values and intervals are over."""
        return [r["seed"] for r in self.records if any(k.rpartition("/")[0] == set_name for k in r["metrics"])]

    @property
    def repeated_seeds(self) -> list[int]:
        """Seeds of more than one of the row's runs: runs that differ in a setting the row does not name."""
        return sorted(seed for seed, runs in Counter(self.seeds).items() if runs > 1)

    @property
    def unsplit(self) -> tuple[str, str]:
        """The row's method as its runs name it, and the ``--by`` setting its label adds ("" without one)."""
        by = self.records[0].get("by")
        return (by["method"], by["setting"]) if by else (self.method, "")


@dataclass
class Table:
    family: MetricSet
    columns: list[Column]
    rows: list[Row]
    baseline: Optional[str] = None  # the method of the paired tests, when they were run

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(r.dataset for r in self.rows))

    @property
    def sets(self) -> list[str]:
        return list(dict.fromkeys(c.set for c in self.columns))

    def column(self, set_name: str, metric_name: str) -> Optional[Column]:
        return next((c for c in self.columns if c.set == set_name and c.metric.name == metric_name), None)

    @property
    def headlines(self) -> list[Metric]:
        return headlines_of(self.rows)

    def title(self, set_name: str) -> str:
        if set_name == IN_DOMAIN:
            return "in-domain (eval)"
        return self.family.set_titles.get(set_name, set_name)


def headlines_of(rows: list[Row]) -> list[Metric]:
    """The rows' headline metrics, one per name, in the rows' order: several where the rows' methods optimise
    different metrics (pbft's vocab accuracy beside icl's accuracy)."""
    headlines: dict[str, Metric] = {}
    for row in rows:
        headlines.setdefault(row.headline.name, row.headline)
    return list(headlines.values())


def _merged(records: list[dict[str, Any]]) -> MetricSet:
    """One declaration for a family's runs, for its columns: the first run's, with any metric another run adds (as a
    plain column, e.g. ``mrr`` beside a sampled ranking's ``sampled50_mrr``; each row keeps its own headline)."""
    first, *others = [metric_set(r) for r in records]
    metrics = list(first.metrics)
    for declared in others:
        metrics += [
            replace(m, headline=False)
            for m in declared.metrics
            if all((m.name, m.sets) != (k.name, k.sets) for k in metrics)
        ]
    return MetricSet(**{**first.__dict__, "metrics": tuple(metrics), "objective": None})


def _columns(family: MetricSet, records: list[dict[str, Any]]) -> list[Column]:
    """The declared metrics the runs report: the in-domain set and the sets a declaration names, in
    declaration order, then every other set the runs report (out-of-domain sets, tasks of a mixture) by name:
    a W&B run's summary does not keep the order its keys were logged in. A metric declared for a named set
    wins over the same name declared for every set."""
    reported = {k for r in records for k in r["metrics"]}
    named = list(dict.fromkeys(s for m in family.metrics for s in m.sets if s not in (EVERY_SET, IN_DOMAIN)))
    columns: list[Column] = []
    for metric in family.metrics:
        for set_name in [IN_DOMAIN, *named] if EVERY_SET in metric.sets else metric.sets:
            column = Column(set_name, metric)
            if column.key in reported and family.metric_for(set_name, metric.name) is metric and column not in columns:
                columns.append(column)
    others = sorted({k.rpartition("/")[0] for r in records for k in r["metrics"]} - {*named, IN_DOMAIN})
    for set_name in others:
        columns += [
            Column(set_name, m)
            for m in family.metrics
            if EVERY_SET in m.sets and f"{set_name}/{m.name}" in reported and family.metric_for(set_name, m.name) is m
        ]
    sets = list(dict.fromkeys(c.set for c in columns))
    columns.sort(key=lambda c: sets.index(c.set))  # each set's columns together, as the blocks show them
    # a set whose only column is its n says nothing (equality: a declaration read back is a copy of EXAMPLES)
    return [c for c in columns if c.metric != EXAMPLES or any(o.set == c.set and o != c for o in columns)]


def summarise(records: list[dict[str, Any]]) -> list[Table]:
    """One table per metric family (by name); rows ordered by dataset, then model size, then the order the
    methods first ran."""
    # runs finished in the same second: in the same order whatever they were read from
    records = sorted(records, key=lambda r: (r.get("finished_at") or "", r["method"], r["model"], r["dataset"]))
    families: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        families.setdefault(metric_set(record).family, []).append(record)
    tables = []
    for _, members in sorted(families.items()):  # by family name: the same order from disk and from W&B
        family = _merged(members)
        columns = _columns(family, members)
        rows: dict[tuple, Row] = {}
        for r in members:
            row = rows.get((r["dataset"], r["model"], r["method"]))
            if row is None:
                row = Row(r["method"], r["model"], r["dataset"], model_size(r), metric_set(r).headline)
                rows[(r["dataset"], r["model"], r["method"])] = row
            row.records.append(r)
            for column in columns:
                if r["metrics"].get(column.key) is not None:
                    cell = row.cells.setdefault(column.key, Cell(column.metric))
                    cell.values.append(r["metrics"][column.key])
                    cell.examples.append(r["metrics"].get(f"{column.set}/{EXAMPLES.name}"))
                    cell.reported.append(tuple(r["metrics"].get(f"{column.set}/{c}") for c in column.metric.companions))
        order = list(dict.fromkeys(r["method"] for r in members))
        ordered = sorted(
            rows.values(), key=lambda row: (row.dataset, row.size or math.inf, row.model, order.index(row.method))
        )
        tables.append(Table(family, columns, ordered))
    return tables


def duplicate_seed_warnings(tables: list[Table]) -> list[str]:
    """A warning per row that averages runs sharing a seed: they differ in some setting besides method, model,
    dataset and seed, and their spread is not the spread over seeds."""
    return [
        f"warning: {row.method} / {row.model} / {row.dataset} averages {len(row.seeds)} runs over seeds "
        f"{sorted(row.seeds)}: runs with the same seed differ in some setting; tell them apart with "
        "ctxdistill-compare --by KEY (e.g. --by method.aux_weight)"
        for table in tables
        for row in table.rows
        if row.repeated_seeds
    ]


def moves_with_seed(key: str, values: list[Any], seeds: list[Any]) -> bool:
    """Whether a setting is the run's seed by another name: a seed (its name says so) that differs from each run's
    seed by one constant (a ``${seed}`` such as method.seed, or HANS's ``${add:${seed},1}`` shuffle), so its runs
    are seeds of one setting. Any other setting that differs is one (num_contexts 1 and 2 beside seeds 0 and 1)."""
    if not key.rpartition(".")[2].endswith("seed"):
        return False
    numbers = [*values, *seeds]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in numbers):
        return False
    return len({value - seed for value, seed in zip(values, seeds)}) == 1


def mixed_settings_warnings(tables: list[Table]) -> list[str]:
    """A warning per row whose runs differ in a setting that can change results besides their seeds (their configs
    compared as a sweep compares a re-run's): the row would average other settings as if they were seeds."""
    from omegaconf import OmegaConf

    warnings = []
    for table in tables:
        for row in table.rows:
            configs = [run_config(r) for r in row.records]
            if len(configs) < 2 or any(c is None for c in configs):
                continue
            settings = [
                {
                    k: v
                    for k, v in flatten(OmegaConf.to_container(c, resolve=True)).items()
                    if compared(k) and not k.startswith((*RECORDED_IN_WANDB_CONFIG, *REPETITIONS))
                }
                for c in configs
            ]
            differing = [
                k
                for k in dict.fromkeys(k for s in settings for k in s)
                if len({repr(s.get(k)) for s in settings}) > 1
                and not moves_with_seed(k, [s.get(k) for s in settings], row.seeds)
            ]
            if differing:
                values = "; ".join(
                    f"{k} {', '.join(dict.fromkeys(repr(s.get(k)) for s in settings))}" for k in differing[:3]
                )
                more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
                warnings.append(
                    f"warning: {row.method} / {row.model} / {row.dataset} averages {len(row.records)} runs that differ "
                    f"in {values}{more}: not seeds of one setting; tell them apart with --by {' '.join(differing[:3])}"
                )
    return warnings


def mixed_headline_warnings(tables: list[Table]) -> list[str]:
    """A warning per row whose runs optimise different metrics (``method.objective`` set differently): the row is
    judged by its first run's."""
    warnings = []
    for table in tables:
        for row in table.rows:
            names = list(dict.fromkeys(metric_set(r).headline.name for r in row.records))
            if len(names) > 1:
                warnings.append(
                    f"warning: {row.method} / {row.model} / {row.dataset}: its runs' headlines differ "
                    f"({', '.join(names)}); the row's is its first run's, {names[0]}: tell the runs apart with "
                    "--by method.objective, or judge every row by one metric with --metric NAME"
                )
    return warnings


class UnknownMetricError(ValueError):
    """--metric names a metric no run reports."""


def choose_headline(tables: list[Table], name: str) -> list[str]:
    """Make the metric ``name`` every row's headline (``--metric``); returns a note per table whose runs do not
    report it (its rows keep their own)."""
    reported = list(dict.fromkeys(c.metric.name for t in tables for c in t.columns if c.metric.kind != "count"))
    if name not in reported:
        raise UnknownMetricError(f"--metric {name}: no run reports it; give one the runs report: {', '.join(reported)}")
    notes = []
    for table in tables:
        metric = next((c.metric for c in table.columns if c.metric.name == name), None)
        if metric is None:
            notes.append(f"--metric {name}: the {table.family.family} runs do not report it; their rows keep their own")
            continue
        for row in table.rows:
            row.headline = metric
    return notes


def spreadless_notes(tables: list[Table]) -> list[str]:
    """A note per row whose runs report a mean over examples without the spread of its values per example
    (evaluated before runs reported it): one run of it gets no interval, and how to give it one."""
    notes = []
    for table in tables:
        for row in table.rows:
            lacking = sorted(  # a run of one example has no spread to report
                key
                for key, cell in row.cells.items()
                if cell.metric.kind == "mean"
                and any(None in r and (n or 0) > 1 for r, n in zip(cell.reported, cell.examples))
            )
            if lacking:
                notes.append(
                    f"note: {row.method} / {row.model} / {row.dataset}: {', '.join(lacking)} come from runs "
                    "evaluated before they reported the spread of their values per example, so one run of them has "
                    "no interval over its examples (an interval over seeds that differ is unchanged); "
                    "evaluate the runs again (ctxdistill-eval RUN_DIR) to give them one"
                )
    return notes


class PairedTestError(ValueError):
    """--vs cannot be done as asked (no such baseline, no predictions at hand, runs that share a seed)."""


def _records_per_example(rows: list[Row], name: str) -> bool:
    """Whether every run of the rows records the metric ``name`` per example (its prediction rows hold it)."""
    return all(metric_set(r).per_example(name) for row in rows for r in row.records)


def _outcomes(row: Row, name: str) -> tuple[dict[int, dict[tuple[str, str], float]], dict[int, dict[tuple, Any]]]:
    """Per seed, the row's run's per-example value of the metric ``name`` by (eval set, uid), and each example's
    label (None where its rows record none)."""
    if row.repeated_seeds:
        raise PairedTestError(
            f"--vs pairs one run per seed on each side; {row.method} / {row.model} / {row.dataset} has several "
            f"runs of seed {row.repeated_seeds[0]}, which differ in some setting: name it with --by KEY "
            "(e.g. --by dataset.context.data_seed) so that each row holds one run per seed"
        )
    outcomes, labels = {}, {}
    for record in row.records:
        rows = predictions(record)
        if rows is None:
            where = record.get("run_dir")
            raise PairedTestError(
                f"--vs needs each run's predictions.jsonl; {row.method} seed {record['seed']} has none "
                + (
                    f"in {where}: evaluate the run again (ctxdistill-eval {where}) to write it"
                    if where
                    else "(runs read from W&B have none): give the runs' directories instead"
                )
            )
        if any("uid" not in p for p in rows):
            raise PairedTestError(
                f"--vs pairs examples by their uid; the predictions.jsonl of {row.method} seed "
                f"{record['seed']} has rows without one (written by an older version): evaluate the run "
                f"again (ctxdistill-eval RUN_DIR) to write them"
            )
        metric = metric_set(record).per_example(name)
        outcomes[record["seed"]] = {(p["set"], p["uid"]): metric.example_value(p) for p in rows}
        labels[record["seed"]] = {(p["set"], p["uid"]): p.get("label") for p in rows}
    return outcomes, labels


def paired_tests(tables: list[Table], baseline: str) -> list[str]:
    """Fill each row's tests against the ``baseline`` method's row of the same dataset and model (and of the
    same ``--by`` setting, when the baseline's runs differ in it).

    Pairs are the examples (``uid``) of each eval set that both methods were evaluated on with the same
    seed, each example's difference averaged over the seeds both ran. The metric is the row's headline where both
    rows' runs record it per example, else the first metric the row declares that both record (a note names it).
    ``baseline`` may also be a row's whole label under ``--by`` (``"genpi sft_weight=1.0"``): the rows of that one
    setting are then the baseline of every other row, those of the same method included.
    Returns notes on what could not be tested as asked."""
    labels = {row.method for table in tables for row in table.rows}
    one_setting = baseline in labels and not any(row.unsplit[0] == baseline for t in tables for row in t.rows)
    if not one_setting and not any(row.unsplit[0] == baseline for table in tables for row in table.rows):
        methods = sorted({row.unsplit[0] for table in tables for row in table.rows})
        rows = sorted(labels - set(methods))
        also = f"; rows: {', '.join(rows)}" if rows else ""
        raise PairedTestError(
            f"--vs {baseline}: no run of method {baseline} here (methods: {', '.join(methods)}{also})"
        )
    notes = []
    for table in tables:
        if not any(m.paired_test for row in table.rows for r in row.records for m in metric_set(r).metrics):
            notes.append(f"--vs: {table.family.family} runs record no per-example outcome; not tested")
            continue
        table.baseline = baseline
        for row in table.rows:
            method, setting = row.unsplit
            if (row.method if one_setting else method) == baseline:
                continue
            # the baseline's row of the same setting, else its only one (a setting the baseline does not have)
            candidates = [
                b
                for b in table.rows
                if ((b.method if one_setting else b.unsplit[0]), b.dataset, b.model)
                == (baseline, row.dataset, row.model)
            ]
            if not candidates:
                notes.append(
                    f"--vs: {row.method} / {row.model} / {row.dataset}: no {baseline} run of this dataset and model; "
                    "not tested"
                )
                continue
            matches = [b for b in candidates if b.unsplit[1] == setting] or candidates
            if len(matches) > 1:
                names = ", ".join(b.method for b in matches)
                notes.append(f"--vs: {row.method} / {row.model} / {row.dataset}: which of {names}? not tested")
            if len(matches) != 1:
                continue
            pair, headline = [row, matches[0]], row.headline.name
            declared = [m.name for m in metric_set(row.records[0]).metrics]
            name = next((n for n in dict.fromkeys([headline, *declared]) if _records_per_example(pair, n)), None)
            where = f"--vs: {row.method} / {row.model} / {row.dataset}"
            if name is None:
                notes.append(f"{where}: its runs and {matches[0].method}'s record no metric per example; not tested")
                continue
            if name != headline:
                lacking = [r.method for r in pair if not _records_per_example([r], headline)]
                why = (
                    f"{lacking[0]}'s runs do not record it per example (evaluated before they did: "
                    "ctxdistill-eval RUN_DIR records it)"
                    if len(lacking) == 1
                    else "no run records it per example"
                )
                notes.append(f"{where}: tested on {name}, not on its headline {headline}: {why}")
            metric = metric_set(row.records[0]).per_example(name)
            (mine, my_labels), (theirs, their_labels) = _outcomes(row, name), _outcomes(matches[0], name)
            seeds = sorted(mine.keys() & theirs.keys())
            if not seeds:
                notes.append(
                    f"--vs: {row.method} / {row.model} / {row.dataset}: no seed in common with {matches[0].method} "
                    f"(seeds {sorted(mine)} and {sorted(theirs)}); not tested"
                )
                continue
            # an example id names the same example only where both runs read the same data (its label tells)
            other = next(
                (
                    (seed, key)
                    for seed in seeds
                    for key in sorted(mine[seed].keys() & theirs[seed].keys())
                    if None not in (my_labels[seed][key], their_labels[seed][key])
                    and my_labels[seed][key] != their_labels[seed][key]
                ),
                None,
            )
            if other:
                (seed, (set_name, uid)) = other
                notes.append(
                    f"--vs: {row.method} / {row.model} / {row.dataset}: example {uid} of {set_name} has label "
                    f"{my_labels[seed][(set_name, uid)]} here and {their_labels[seed][(set_name, uid)]} in "
                    f"{matches[0].method}'s run (seed {seed}): the two were evaluated on other data; not tested"
                )
                continue
            per_example: dict[tuple[str, str], list[float]] = defaultdict(list)
            for seed in seeds:
                for key in sorted(mine[seed].keys() & theirs[seed].keys()):
                    per_example[key].append(mine[seed][key] - theirs[seed][key])
            differences: dict[str, list[float]] = defaultdict(list)
            for (set_name, _), values in per_example.items():
                differences[set_name].append(statistics.fmean(values))
            # McNemar's exact test needs one success difference per example; means over seeds take the sign-flip
            row_test = metric.paired_test if len(seeds) == 1 else "sign-flip"
            row.tests = {s: PairedTest(baseline, metric, row_test, d) for s, d in differences.items()}
            if not row.tests:
                notes.append(
                    f"--vs: {row.method} / {row.model} / {row.dataset}: no eval example in common with "
                    f"{matches[0].method} (seeds {seeds}); not tested"
                )
    return notes
