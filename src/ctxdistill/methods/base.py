"""The interface between a method and the shared trainer and evaluator."""

from __future__ import annotations

from typing import Any, Optional

import torch
from omegaconf import DictConfig

from ctxdistill.config import ConfigError
from ctxdistill.data import Example, Task, build_task
from ctxdistill.data.mixture import TaskMixture, build_mixture
from ctxdistill.evaluation import (
    check_answer_tokenization,
    check_generation_budget,
    check_prompt_lengths,
    make_evaluator,
)
from ctxdistill.models import ModelHandle, check_shared_vocabulary, context_window
from ctxdistill.results.metrics import MetricSet


def build_method(config) -> "Method":
    """The method a method config describes (a composed ``cfg.method``, or a schema instance)."""
    from hydra.utils import instantiate

    return instantiate(config, _convert_="all")


def check_context_to_distil(task: Task, queries: list[Example], teacher_model: Optional[DictConfig]) -> None:
    """The teacher must read something the student does not: a context, or be another model. Otherwise its
    targets are the student's own outputs and the loss is 0 from the first step."""
    # compared without the blanks around them: llmft's query ends with a space after a context, an empty one too
    reads_more = any(task.teacher_prompt(e).strip() != task.student_prompt(e).strip() for e in queries)
    if teacher_model is None and queries and not reads_more:
        raise ConfigError(
            f"the teacher's prompts are the student's: {task.name}'s context is empty (no demonstrations, no "
            "instruction), so there is nothing to distil. Give the teacher a context (dataset.context.num_demos "
            "or an instruction) or another model (method.teacher_model)"
        )


class Method:
    """Defaults describe an evaluation-only method on a classification task; others override them."""

    #: what training changes: "adapter", the one model.adapter selects (LoRA, a trainable prefix, or every
    #: weight with model.adapter=full); "all", every weight whatever model.adapter says; None, nothing.
    trained_weights: Optional[str] = None
    #: whether the evaluated model sees the teacher's context (ICL) or the bare input.
    eval_with_context: bool = False
    #: the metric a Hydra sweeper (e.g. Optuna) optimises; the run returns it. One of the evaluator's
    #: declared metrics (:meth:`metric_set`).
    objective: str = "eval/accuracy"
    #: tokens after the prompt that must fit the model's window.
    answer_tokens: int = 1
    #: a separate frozen teacher's model config (a larger model); None: the base weights are the teacher.
    teacher_model: Optional[DictConfig] = None
    #: the setting that holds it, as messages name it
    teacher_key: str = "method.teacher_model"
    #: whether the frozen teacher is asked after :meth:`prepare` (at training steps); full-weight training
    #: then keeps a frozen copy of the initial weights for it.
    teacher_during_training: bool = False

    def __init__(self, name: str):
        self.name = name

    @property
    def trains(self) -> bool:
        return self.trained_weights is not None

    def demonstrations_used(self, num_demos: int, num_contexts: int) -> int:
        """The demonstrations a run learns from or reads (the learning curve's x): every context's when it trains
        (each query is taught by one of them), the one context each query reads when it is evaluated with its
        context (ICL), none otherwise."""
        if self.trains:
            return num_demos * num_contexts
        return num_demos if self.eval_with_context else 0

    def settings_evaluation_ignores(self, keys: list[str]) -> list[str]:
        """Those of ``keys`` (method.*) that evaluating this method's trained model never reads: all but its separate
        teacher's, where it trains and evaluates, builds its inputs and wraps its model as every method does by
        default (its settings then shape training alone)."""
        if not self.trains or any(
            getattr(type(self), step) is not getattr(Method, step) for step in ("evaluator", "build_task", "wrap_model")
        ):
            return []
        teacher = self.teacher_key
        return [k for k in keys if k.startswith("method.") and not (k == teacher or k.startswith(f"{teacher}."))]

    def build_task(self, dataset, seed: int) -> Task | TaskMixture:
        """The inputs the run trains and evaluates on: by default the dataset's task, or its task mixture
        (which kinds a method accepts its schema declares, and validation checks)."""
        return build_mixture(dataset, seed) if dataset.kind == "mixture" else build_task(dataset, seed)

    def evaluator(self, handle: ModelHandle, tokenizer, task: Task, batch_size: int):
        """What scores the model: an object with ``prepare()`` (run before training) and
        ``evaluate(names=None) -> (metrics, prediction rows per set)``. By default label-word scoring
        against the frozen teacher with the context (exact match of generated answers for a task with
        free-text answers)."""
        return make_evaluator(
            handle,
            tokenizer,
            task,
            self.eval_with_context,
            batch_size,
            model_is_teacher=self.eval_with_context and not self.trains,
        )

    def metric_set(self, evaluator) -> MetricSet:
        """What this method's runs report: its evaluator's declared metrics, with the objective among them."""
        declared: MetricSet = evaluator.metric_set
        if not declared.declares(self.objective):
            raise ConfigError(
                f"method.objective: {self.objective} is not a metric method={self.name} reports ({declared.family}: "
                f"{declared.described()}; * is any eval set). Use one of them, e.g. eval/{declared.headline.name}"
            )
        return declared.with_objective(self.objective)

    def train_examples(self, task: Task) -> list[Example]:
        return []

    def check_inputs(self, task: Task, tokenizer, cfg: DictConfig) -> None:
        """Cheap checks before the model loads: by default, every teacher prompt fits the model's window and
        prompt + answer tokenises as the prompt's tokens followed by the answer's."""
        generation = task.generation
        answer_tokens = max(self.answer_tokens, generation.max_new_tokens if generation else 1)
        check_prompt_lengths(task, tokenizer, context_window(cfg.model, cfg.cache_dir), answer_tokens)
        if generation:
            check_generation_budget(task, tokenizer)
        if cfg.dataset.kind == "mixture" or cfg.dataset.check_answer_tokens:
            check_answer_tokenization(task, tokenizer)

    def check_teacher(self, cfg: DictConfig, task: Task, tokenizer, teacher_tokenizer) -> None:
        """Cheap checks of the separate teacher (``teacher_model``) before either model loads: by default it
        must share the student's vocabulary, since distillation over logits compares them token by token."""
        check_shared_vocabulary(
            cfg.model, self.teacher_model, cfg.cache_dir, tokenizer, teacher_tokenizer, teacher_key=self.teacher_key
        )

    def wrap_model(self, model: torch.nn.Module, tokenizer) -> torch.nn.Module:
        """The module that is trained and evaluated, built around the loaded model (e.g. with a scoring head)."""
        return model

    def prepare(
        self, handle: ModelHandle, tokenizer, task: Task, examples: list[Example], batch_size: int
    ) -> Optional[dict[str, float]]:
        """Work done once before the first step (e.g. the frozen teacher's targets); may return
        statistics of it, which join the run's training statistics."""

    def rounds(self, task: Task) -> int:
        """How many times the training loop runs, one round after another on the weights the last one left
        (Snell et al.'s sequential distillation); each round resumes on its own and is evaluated."""
        return 1

    def begin_round(self, index: int) -> None:
        """Called before round ``index`` (from 0) is prepared and trained, or skipped as already finished."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run must restore besides the weights, optimiser and data order: e.g. the state of
        the method's own random generators, so the steps after a resume draw what an uninterrupted run
        draws. Saved in every checkpoint; empty when the method keeps none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` (after :meth:`prepare`, which seeded the method afresh)."""

    def trains_on(self, example: Example) -> bool:
        """Whether a prepared example has a training target (e.g. an answer could be extracted)."""
        return True

    def collate(self, tokenizer, task: Task, examples: list[Example]) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, handle: ModelHandle, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError
