"""Task mixtures for in-context tuning (Huang et al. 2022; Chen et al. 2022).

A mixture config (``conf/dataset/synthetic_mixture.yaml``) lists classification datasets.
Each contributes a few-shot *pool* of n labelled examples from its training split. A
training instance is a pool example as the query with k demonstrations drawn from the rest
of its pool; instances are spread over the training tasks by weight. Evaluation answers
held-out queries of the evaluated tasks (the training tasks under Multitask-ICT, other tasks
under Meta-ICT) with k demonstrations drawn from their own task's pool, m times each when
majority voting.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, replace

from omegaconf import DictConfig

from ctxdistill.data.tasks import (
    DataError,
    DemoSampler,
    Example,
    Task,
    load_records,
    render_context,
    select_demos,
    take,
    to_examples,
)


@dataclass
class TaskMixture:
    name: str
    paradigm: str  # multitask | meta
    train_tasks: dict[str, Task]  # train_queries: each task's training instances (labelled)
    eval_tasks: dict[str, Task]  # their eval_sets["eval"]: held-out queries, ``votes`` draws each
    context: str = ""  # no context is shared by every prompt; each draws its own demonstrations
    generation: None = None  # a mixture's tasks classify: no free-text answers

    @property
    def parts(self) -> list[Task]:
        """Every task once (a Multitask-ICT task trains and is evaluated)."""
        return list({id(t): t for t in [*self.train_tasks.values(), *self.eval_tasks.values()]}.values())

    @property
    def eval_sets(self) -> dict[str, list[Example]]:
        """The mixture's one eval set: the evaluated tasks' held-out queries."""
        return {"eval": [e for task in self.eval_tasks.values() for e in task.eval_sets.get("eval", [])]}

    @property
    def demos(self) -> list[Example]:
        return [d for task in self.parts for d in task.demos]

    @property
    def instances(self) -> list[Example]:
        return [e for task in self.train_tasks.values() for e in task.train_queries]

    def task_of(self, example: Example) -> Task:
        """The task an instance or held-out query belongs to (its id starts with the task's name)."""
        name = example.uid.split(":", 1)[0]
        return self.train_tasks.get(name) or self.eval_tasks[name]


def _task(
    name: str, spec: DictConfig, mixture: DictConfig, seed: int, num_instances: int, evaluated: bool, group: str
) -> Task:
    key = f"dataset.{group}.{name}.source"
    records, where = load_records(spec.source, spec.train_split, key)
    examples = to_examples(records, spec, spec.label_map, spec.drop_labels, where, f"{name}:train")
    rng = random.Random(f"{seed}:{name}")
    try:
        pool = select_demos(
            examples, mixture.pool_size, spec.context.balanced, len(spec.verbalizers), rng, key="dataset.pool_size"
        )
    except DataError as e:
        raise DataError(f"task {name}: {e}") from None
    # Instances cycle through the pool; the repeat index (#r) gives a repeated query other demonstrations.
    instances = [
        replace(pool[i % len(pool)], uid=f"{pool[i % len(pool)].uid}#r{i // len(pool)}") for i in range(num_instances)
    ]
    eval_sets = {}
    if evaluated:
        records, where = load_records(spec.source, spec.eval_split, key)
        held_out = to_examples(records, spec, spec.label_map, spec.drop_labels, where, f"{name}:eval")
        # as the task alone is evaluated (its eval_shuffle_seed): the same queries whatever the seed and the pool
        held_out = take(held_out, mixture.num_eval, spec.eval_shuffle_seed, "dataset.num_eval", f"task {name}")
        eval_sets["eval"] = [replace(e, uid=f"{e.uid}#v{j}") for e in held_out for j in range(mixture.num_votes)]
    return Task(
        name=name,
        template=spec.template,
        verbalizers=list(spec.verbalizers),
        student_instruction=spec.student_instruction,
        context="",
        separator=spec.context.separator,
        demos=pool,
        train_queries=instances,
        train_query_labels=[e.label for e in instances],
        eval_sets=eval_sets,
        demo_sampler=DemoSampler(
            pool,
            mixture.num_demos,
            spec.context.balanced,
            seed,
            functools.partial(render_context, spec),
            len(spec.context.instruction + spec.context.separator) if spec.context.instruction else 0,
        ),
        votes=mixture.num_votes,
        context_query_template=spec.context_query_template,
    )


def instance_counts(weights: dict[str, float], total: int) -> dict[str, int]:
    """``total`` instances split by weight, rounded so that they add up (largest remainders first)."""
    whole = sum(weights.values())
    exact = {name: total * w / whole for name, w in weights.items()}
    counts = {name: int(x) for name, x in exact.items()}
    for name in sorted(exact, key=lambda n: counts[n] - exact[n])[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def build_mixture(spec: DictConfig, seed: int) -> TaskMixture:
    data_seed = seed if spec.data_seed is None else spec.data_seed
    counts = instance_counts({name: spec.weights.get(name, 1.0) for name in spec.train_tasks}, spec.num_train_instances)
    multitask = spec.paradigm == "multitask"
    train = {
        name: _task(name, task, spec, data_seed, counts[name], evaluated=multitask, group="train_tasks")
        for name, task in spec.train_tasks.items()
    }
    evaluated = (
        train
        if multitask
        else {
            name: _task(name, task, spec, data_seed, 0, evaluated=True, group="eval_tasks")
            for name, task in spec.eval_tasks.items()
        }
    )
    return TaskMixture(spec.name, spec.paradigm, train, evaluated)
