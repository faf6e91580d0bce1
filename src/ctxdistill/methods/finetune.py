"""ft and pbft: supervised few-shot fine-tuning on k labelled examples, without context.

``ft`` trains a LoRA adapter on the context's k demonstrations; ``pbft`` is llmft's pattern-based
fine-tuning (Mosbach et al. 2023): every weight, on k training queries drawn at random (as llmft's ft.py
draws them with ``dataset.context.draw=llmft``), scored by the argmax over the whole vocabulary. Both minimise the
cross-entropy of the answer token over the whole vocabulary. On a free-text task, ``target=worked``
trains on the worked solutions the demonstrations show (e.g. a scratchpad and the answer), as Snell
et al. 2022 fine-tuned their scratchpad teacher; the model is then evaluated on the answer its
worked solution ends with.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from omegaconf import DictConfig

from ctxdistill.config import MethodConfig, one_of, require
from ctxdistill.encoding import answer_logits, encode
from ctxdistill.losses import answer_cross_entropy
from ctxdistill.methods.base import Method


@dataclass
class FinetuneConfig(MethodConfig):
    _target_: str = "ctxdistill.methods.finetune.Finetune"
    finetune: str = one_of("lora", "full", default="lora")  # the adapter model.adapter selects, or every weight
    # demonstrations: the context's k demonstrations (balanced); labelled_queries: the task's training
    # queries with their labels (drawn at random; dataset.context.draw=llmft draws llmft's examples)
    train_on: str = one_of("demonstrations", "labelled_queries", default="demonstrations")
    objective: str = "eval/accuracy"  # what a sweeper optimises; llmft scores fine-tuning by eval/vocab_accuracy
    # answer: the label word or the free-text answer; worked: a free-text task's worked solution
    # (dataset.generation.demo_target, e.g. the scratchpad and the answer), as Snell et al. trained their teacher
    target: str = one_of("answer", "worked", default="answer")
    schema_name: ClassVar[str] = "base_finetune"

    @classmethod
    def check(cls, m: DictConfig, cfg: DictConfig) -> None:
        require(
            m.target == "answer" or cfg.dataset.kind == "generation",
            "method.target",
            f"worked needs a dataset whose examples carry worked solutions; dataset={cfg.dataset.name} "
            f"is {cfg.dataset.kind}",
            "use method.target=answer, or a dataset with a generation block, e.g. dataset=addition",
        )


class Finetune(Method):
    def __init__(self, name: str, finetune: str, train_on: str, objective: str, target: str):
        super().__init__(name)
        self.trained_weights = "adapter" if finetune == "lora" else "all"
        self.train_on, self.objective, self.worked = train_on, objective, target == "worked"

    def train_examples(self, task):
        if self.train_on == "labelled_queries":  # a free-text task's label is its target text
            return [
                replace(q, target=label) if task.generation else replace(q, label=label)
                for q, label in zip(task.train_queries, task.train_query_labels)
            ]
        return task.demos

    def evaluator(self, handle, tokenizer, task, batch_size):
        evaluator = super().evaluator(handle, tokenizer, task, batch_size)
        evaluator.answers_worked = self.worked  # read the answer its worked solution ends with
        return evaluator

    def collate(self, tokenizer, task, examples):
        texts = [task.generation.worked_text(e) if self.worked else task.answer_text(e) for e in examples]
        answers = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
        return encode(tokenizer, [task.student_prompt(e) for e in examples], answers)

    def loss(self, handle, batch):
        logits = answer_logits(handle.student, batch)
        return answer_cross_entropy(
            logits, batch["answer_ids"].to(logits.device), batch["answer_mask"].to(logits.device)
        ), {}
