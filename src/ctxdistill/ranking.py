"""Link-prediction evaluation: filtered ranking, MRR and Hits@k, head and tail prediction.

For a test triple (h, r, t), tail prediction ranks t among candidate entities e by the model's
score of (h, r, e); head prediction ranks h among e for (e, r, t). Every other entity that makes
a known true triple (train, valid or test) is filtered out of the candidates (Bordes et al. 2013's
"filtered" setting). Ties count half (the mean of the optimistic and pessimistic rank), so a model
that scores everything alike gets the expected rank of a random guess, not rank 1.

``candidates=None`` ranks against every entity. A number ranks against that many entities drawn
(seeded, per query) from those that are not true answers: cheap enough for a CPU, but a different
and easier number, so its metrics are named ``sampled<N>_mrr`` etc.
"""

from __future__ import annotations

import random
from typing import Callable, Optional, Sequence

import torch

from ctxdistill.data.kg import KGTask, Triple
from ctxdistill.evaluation import EvaluatorBase
from ctxdistill.progress import progress_bar
from ctxdistill.results.metrics import COMPANIONS, EXAMPLES, Metric, MetricSet

#: score(queries, candidates) -> one score tensor per query; a query is (triple, direction) with
#: direction "tail" (rank candidate tails for (h, r, ?)) or "head" (heads for (?, r, t)).
Scorer = Callable[[Sequence[tuple[Triple, str]], Sequence[Sequence[str]]], list[torch.Tensor]]
HITS = (1, 3, 10)


def ranking_prefix(candidates: Optional[int]) -> str:
    """Metric-name prefix of the ranking mode: none for every entity, ``sampledN_`` for N sampled ones."""
    return f"sampled{candidates}_" if candidates else ""


def filtered_rank(scores: torch.Tensor, target: int, filtered: torch.Tensor) -> float:
    """Rank of ``scores[target]`` among the candidates that ``filtered`` does not remove; ties count half.

    A NaN score (a diverged model) counts as the lowest: compared with anything it is neither above nor equal,
    so a NaN target would otherwise rank first."""
    scores = torch.where(scores.isnan(), float("-inf"), scores)
    keep = ~filtered.clone()
    keep[target] = False
    others = scores[keep]
    greater = (others > scores[target]).sum().item()
    ties = (others == scores[target]).sum().item()
    return 1 + greater + ties / 2


def ranking_metrics(ranks: Sequence[float], prefix: str = "") -> dict[str, float]:
    """MRR and Hits@k over one rank per triple (a direction's queries)."""
    ranks_t = torch.tensor(list(ranks), dtype=torch.float64)
    metrics = {f"{prefix}mrr": (1 / ranks_t).mean().item()}
    metrics.update({f"{prefix}hits@{k}": (ranks_t <= k).double().mean().item() for k in HITS})
    return metrics


def triple_metrics(head_ranks: Sequence[float], tail_ranks: Sequence[float], prefix: str = "") -> dict[str, float]:
    """MRR and Hits@k over the head and tail queries of the triples, each the mean over the triples of the mean of
    a triple's two values (its queries' reciprocal ranks, or hits), with those per-triple values' sample standard
    deviation (``{metric}_sd``, for two or more triples): the triples are the examples, the two rankings of one
    triple are not independent."""
    head, tail = (torch.tensor(list(r), dtype=torch.float64) for r in (head_ranks, tail_ranks))
    per_triple = {f"{prefix}mrr": (1 / head + 1 / tail) / 2}
    per_triple.update({f"{prefix}hits@{k}": ((head <= k).double() + (tail <= k).double()) / 2 for k in HITS})
    metrics = {name: values.mean().item() for name, values in per_triple.items()}
    if len(head) > 1:
        [spread] = COMPANIONS["mean"]
        metrics.update({f"{name}{spread}": values.std().item() for name, values in per_triple.items()})
    return metrics


def link_prediction_metrics(prefix: str = "") -> MetricSet:
    """MRR and Hits@k over the head and tail queries of each set, named with the ranking mode's prefix: means over
    the set's triples (its ``examples``) of each triple's mean over its two queries."""
    return MetricSet(
        "link_prediction",
        (
            EXAMPLES,
            Metric(
                f"{prefix}mrr",
                f"{prefix}MRR".replace("_", " "),
                kind="mean",
                lowest=0,
                highest=1,
                headline=True,
                example_score="reciprocal_rank",  # each triple's: the mean of its head and tail query's (MRR's terms)
            ),
            *(
                Metric(f"{prefix}hits@{k}", f"{prefix}Hits@{k}".replace("_", " "), kind="mean", lowest=0, highest=1)
                for k in HITS
            ),
        ),
    )


class TrueAnswers:
    """Every known answer of every (h, r, ?) and (?, r, t) query, over all splits."""

    def __init__(self, triples: set[Triple]):
        self.tails: dict[tuple[str, str], set[str]] = {}
        self.heads: dict[tuple[str, str], set[str]] = {}
        for h, r, t in triples:
            self.tails.setdefault((h, r), set()).add(t)
            self.heads.setdefault((r, t), set()).add(h)

    def of(self, triple: Triple, direction: str) -> set[str]:
        h, r, t = triple
        return self.tails[(h, r)] if direction == "tail" else self.heads[(r, t)]


class LinkPredictionEvaluator(EvaluatorBase):
    """Ranks every eval triple's head and tail with a method's scorer; metrics ``{set}/{prefix}{metric}``."""

    def __init__(self, task: KGTask, scorer: Scorer, queries_per_batch: int = 1):
        self.task, self.scorer, self.candidates, self.seed = task, scorer, task.eval_candidates, task.seed
        self.queries_per_batch = queries_per_batch
        self.entities = task.graph.entities
        self.index = {e: i for i, e in enumerate(self.entities)}
        self.answers = TrueAnswers(task.graph.true_triples())
        self.prefix = ranking_prefix(self.candidates)
        self.metric_set = link_prediction_metrics(self.prefix)

    def prepare(self) -> None:
        """Nothing to do before training: there is no teacher to score."""

    def _query(self, triple: Triple, direction: str, number: int) -> tuple[list[str], int, torch.Tensor]:
        """Candidates, the target's position among them, and which of them are filtered."""
        target = triple[2] if direction == "tail" else triple[0]
        true = self.answers.of(triple, direction)
        if self.candidates is None:
            filtered = torch.zeros(len(self.entities), dtype=torch.bool)
            filtered[[self.index[e] for e in true if e != target]] = True
            return self.entities, self.index[target], filtered
        rng = random.Random(f"{self.seed}-{number}-{direction}")
        pool = [
            e for e in rng.sample(self.entities, min(len(self.entities), self.candidates + len(true))) if e not in true
        ][: self.candidates]
        return [target, *pool], 0, torch.zeros(len(pool) + 1, dtype=torch.bool)

    def rank_all(self, triples: list[Triple], desc: str) -> dict[str, list[float]]:
        ranks: dict[str, list[float]] = {"head": [], "tail": []}
        queries = [(i, t, d) for i, t in enumerate(triples) for d in ("tail", "head")]
        for start in progress_bar(range(0, len(queries), self.queries_per_batch), desc=desc, leave=False):
            chunk = queries[start : start + self.queries_per_batch]
            built = [self._query(triple, direction, number) for number, triple, direction in chunk]
            scores = self.scorer([(triple, direction) for _, triple, direction in chunk], [b[0] for b in built])
            for (_, _, direction), (_, target, filtered), row in zip(chunk, built, scores):
                ranks[direction].append(filtered_rank(row.float().cpu(), target, filtered))
        return ranks

    def evaluate(self, names: Optional[list[str]] = None) -> tuple[dict[str, float], dict[str, list[dict]]]:
        metrics, rows = {}, {}
        for name in names or list(self.task.eval_sets):
            triples = self.task.eval_sets[name]
            ranks = self.rank_all(triples, f"rank {name}")
            # the examples are the triples, not their 2 queries (the same triple, ranked both ways)
            result = {**triple_metrics(ranks["head"], ranks["tail"], self.prefix), EXAMPLES.name: len(triples)}
            for direction in ("head", "tail"):
                result.update(ranking_metrics(ranks[direction], f"{self.prefix}{direction}_"))
            metrics.update({f"{name}/{key}": value for key, value in result.items()})
            rows[name] = [
                {
                    **{"uid": "|".join(t), "head": t[0], "relation": t[1], "tail": t[2]},
                    **{"head_rank": hr, "tail_rank": tr, "reciprocal_rank": (1 / hr + 1 / tr) / 2},
                }
                for t, hr, tr in zip(triples, ranks["head"], ranks["tail"])
            ]
        return metrics, rows
