"""What a run's metrics are: declared by the evaluator that computes them, carried with the run's results.

A :class:`MetricSet` names a family of metrics (``classification``, ``link_prediction``, ...) and lists
each :class:`Metric`: its name within an eval set, its display name, whether higher is better, the sets
it applies to, whether it is a share of examples (accuracy-like: it gets a Wilson interval over the
examples), a mean of a value per example (a triple's hits or reciprocal rank: a t-interval over the examples, from
the spread the run reports beside it) or a statistic the run bootstraps (F1) and which one is the headline. The
declaration is written into ``metrics.json`` and the W&B run config (``metric_set``), so a run read back from
either knows its own columns.

This module depends on nothing else in the package: every other results module builds on it.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

EVERY_SET = "*"  # a metric every eval set reports (in-domain ``eval`` and each out-of-domain set)
IN_DOMAIN = "eval"
#: what a run reports beside a metric of a kind for its one-run interval, as ``{set}/{name}{suffix}``: a mean's
#: standard deviation of its values per example, a bootstrapped statistic's interval
COMPANIONS = {"mean": ("_sd",), "bootstrap": ("_bootstrap_low", "_bootstrap_high")}


@dataclass(frozen=True)
class Metric:
    name: str  # the key within a set: ``{set}/{name}``
    label: str  # the column's display name
    higher_is_better: bool = True
    sets: tuple[str, ...] = (EVERY_SET,)
    #: "proportion": a share of the set's examples (Wilson interval for one run); "mean": the mean over the set's
    #: examples of a value per example in [lowest, highest] (a triple's mean hit of its head and tail query, its
    #: mean reciprocal rank), reported with the values' sample standard deviation as ``{set}/{spread_name}``
    #: (Student's t interval over the examples for one run); "bootstrap": a statistic of the whole set that is no
    #: mean over its examples (F1), reported with its 95% percentile-bootstrap interval over the examples as
    #: ``{set}/{name}_bootstrap_low`` and ``_high`` (one run's interval); "count": a number of examples
    #: (``examples``, shown as n); "value": anything else (KL, latency)
    kind: str = "proportion"
    headline: bool = False
    #: the least and greatest values it can take (0 for a cost or a KL), where a t-interval over a few seeds is
    #: cut; a proportion lies in [0, 1] whatever these say
    lowest: Optional[float] = None
    highest: Optional[float] = None
    #: each example's outcome in the prediction rows (predictions.jsonl), which the paired test
    #: (ctxdistill-compare --vs) reads: one field that is true or false, or two fields that must be equal
    #: (``("prediction", "label")``); empty: the rows hold no outcome of this metric
    outcome: tuple[str, ...] = ()
    #: for a metric that is not a share of successes: the prediction rows' field whose mean over a set's rows
    #: is the metric (``"reciprocal_rank"`` for MRR), which the paired test reads instead
    example_score: Optional[str] = None

    @property
    def paired_test(self) -> Optional[str]:
        """The paired test of two methods' per-example values: McNemar's on successes, a sign-flip
        (randomisation) test on scores; None when the rows hold neither."""
        return "McNemar" if self.outcome else "sign-flip" if self.example_score else None

    def example_value(self, row: dict[str, Any]) -> float:
        """A prediction row's contribution to the metric: 1 or 0 for a success, else its score."""
        if not self.outcome:
            return float(row[self.example_score])
        first, *second = self.outcome
        return float(row[first] == row[second[0]] if second else bool(row[first]))

    @property
    def value_range(self) -> tuple[Optional[float], Optional[float]]:
        return (0.0, 1.0) if self.kind == "proportion" else (self.lowest, self.highest)

    @property
    def companions(self) -> tuple[str, ...]:
        """The keys (within a set) a run reports beside the metric for one run's interval: a mean's standard
        deviation per example, a bootstrapped statistic's interval; none for other kinds."""
        return tuple(f"{self.name}{suffix}" for suffix in COMPANIONS.get(self.kind, ()))

    def applies_to(self, set_name: str) -> bool:
        return set_name in self.sets or EVERY_SET in self.sets


#: the number of examples a set's proportions are over; every evaluator reports it as ``{set}/examples``
EXAMPLES = Metric("examples", "n", kind="count")


@dataclass(frozen=True)
class MetricSet:
    family: str
    metrics: tuple[Metric, ...]
    #: what the headline is compared with, names of metrics in the same set: the teacher's score (the
    #: model with the context) and the chance level (majority class); None when the family has none
    teacher: Optional[str] = None
    chance: Optional[str] = None
    #: serving costs per query to plot the headline against: (the model's key, the teacher's key, axis label)
    costs: tuple[tuple[str, str, str], ...] = ()
    #: what a set other than the in-domain one is, for table headings (``{"serving": "serving cost..."}``)
    set_titles: dict[str, str] = field(default_factory=dict)
    #: the metric key a Hydra sweeper optimises (``Method.objective``); it must be a declared column
    objective: Optional[str] = None

    def __post_init__(self):
        headlines = [m.name for m in self.metrics if m.headline]
        if len(headlines) != 1:
            raise ValueError(f"metric set {self.family!r} must declare one headline metric, got {headlines}")

    @property
    def headline(self) -> Metric:
        return next(m for m in self.metrics if m.headline)

    def declares(self, key: str) -> bool:
        """Whether ``{set}/{name}`` is one of the declared metrics."""
        set_name, _, name = key.rpartition("/")
        return self.metric_for(set_name, name) is not None

    def metric_for(self, set_name: str, name: str) -> Optional[Metric]:
        """The metric ``name`` of the set: one declared for the set by name wins over one declared for every set."""
        named = [m for m in self.metrics if m.name == name and set_name in m.sets]
        return (named or [m for m in self.metrics if m.name == name and EVERY_SET in m.sets] or [None])[0]

    def per_example(self, name: str) -> Optional[Metric]:
        """The metric ``name`` as the prediction rows hold it per example (its outcome or score); None where they
        hold no value of it."""
        return next((m for m in self.metrics if m.name == name and m.paired_test), None)

    def described(self) -> str:
        """The declared keys, for messages (``*`` standing for any eval set)."""
        return ", ".join(f"{s}/{m.name}" for m in self.metrics for s in m.sets)

    def with_objective(self, objective: str) -> "MetricSet":
        """The declaration of a run that optimises ``objective`` (a declared ``{set}/{name}``): its metric is the
        headline, the figure every results view judges the run by (pbft's ``vocab_accuracy``, as llmft scores
        fine-tuning)."""
        chosen = self.metric_for(*objective.rpartition("/")[::2])
        if chosen is None:
            raise ValueError(f"objective {objective} is not a metric of {self.family} ({self.described()})")
        metrics = tuple(replace(m, headline=m is chosen) for m in self.metrics)
        return replace(self, metrics=metrics, objective=objective)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MetricSet":
        # before 7 Dec 2026 the set, not each metric, declared the prediction rows' value per example: the headline's
        data = dict(data)
        outcome, example_score = tuple(data.pop("outcome", None) or ()), data.pop("example_score", None)
        metrics = tuple(
            Metric(**{**m, "sets": tuple(m["sets"]), "outcome": tuple(m.get("outcome") or ())}) for m in data["metrics"]
        )
        if outcome or example_score:
            metrics = tuple(
                replace(m, outcome=outcome, example_score=example_score) if m.headline else m for m in metrics
            )
        return cls(**{**data, "metrics": metrics, "costs": tuple(tuple(c) for c in data.get("costs") or ())})


def undeclared(metric_keys: list[str]) -> MetricSet:
    """A run written before metrics were declared: every metric it reports, under its own name, as a
    plain value, so nothing it holds is lost (``eval/accuracy`` stays the headline when it is there)."""
    # by name: a W&B summary does not keep the order its keys were logged in; the headline a declaration would name
    names = sorted({k.rpartition("/")[2] for k in metric_keys})
    headline = next((n for n in ("accuracy", "task_success", "mrr", "written") if n in names), names[0])
    names.sort(key=lambda n: n != headline)
    return MetricSet(
        "undeclared",
        tuple(Metric(n, n, kind="value", headline=n == headline) for n in names),
    )


def float32_rounded(value: Any) -> Any:
    """The shortest decimal that reads back as the same float32: what a metric computed in float32
    holds (0.54, not 0.5400000214576721). Integers and other values pass through."""
    if not isinstance(value, float) or not abs(value) <= 3.4e38:  # ints, inf, nan and beyond float32's range
        return value
    single = struct.unpack("f", struct.pack("f", value))[0]
    for digits in range(1, 10):
        text = f"{single:.{digits}g}"
        if struct.unpack("f", struct.pack("f", float(text)))[0] == single:
            return float(text)
    return single
