"""The interface between a method and the shared trainer and evaluator."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ctxdistill.data import Example, Task, build_task
from ctxdistill.evaluation import make_evaluator
from ctxdistill.models import ModelHandle


class Method:
    """Defaults describe an evaluation-only method; training methods override them."""

    #: "lora" trains the adapter model.adapter selects (LoRA by default), "full" every weight, None nothing.
    adapter: Optional[str] = None
    #: whether the evaluated model sees the teacher's context (ICL) or the bare input.
    eval_with_context: bool = False
    #: the metric a Hydra sweeper (e.g. Optuna) optimises; the run returns it.
    objective: str = "eval/accuracy"

    def __init__(self, name: str):
        self.name = name

    @property
    def trains(self) -> bool:
        return self.adapter is not None

    def build_task(self, dataset, seed: int) -> Task:
        """The inputs the run trains and evaluates on: by default the dataset config's classification task."""
        return build_task(dataset, seed)

    def evaluator(self, handle: ModelHandle, tokenizer, task: Task, batch_size: int):
        """What scores the model: an object with ``prepare()`` (run before training) and
        ``evaluate(names=None) -> (metrics, prediction rows per set)``. By default label-word scoring
        against the frozen teacher with the context (exact match of generated answers for a task with
        free-text answers)."""
        return make_evaluator(handle, tokenizer, task, self.eval_with_context, batch_size,
                              model_is_teacher=self.eval_with_context and not self.trains)

    def train_examples(self, task: Task) -> list[Example]:
        return []

    def prepare(self, handle: ModelHandle, tokenizer, task: Task, examples: list[Example],
                batch_size: int) -> Optional[dict[str, float]]:
        """Work done once before the first step (e.g. the frozen teacher's targets); may return
        statistics of it, which join the run's training statistics."""

    def trains_on(self, example: Example) -> bool:
        """Whether a prepared example has a training target (e.g. an answer could be extracted)."""
        return True

    def collate(self, tokenizer, task: Task, examples: list[Example]) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, handle: ModelHandle, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError
