"""ft and pbft: supervised few-shot fine-tuning on k labelled examples, without context.

``ft`` trains a LoRA adapter on the context's k demonstrations; ``pbft`` is llmft's pattern-based
fine-tuning (Mosbach et al. 2023): every weight, on k training queries drawn at random apart from
the demonstrations, scored by the argmax over the whole vocabulary. Both minimise the
cross-entropy of the answer token over the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import replace

from ctxdistill.encoding import answer_logits, encode
from ctxdistill.losses import answer_cross_entropy
from ctxdistill.methods.base import Method


class Finetune(Method):
    def __init__(
        self, name: str, finetune: str = "lora", train_on: str = "demonstrations", objective: str = "eval/accuracy"
    ):
        super().__init__(name)
        self.adapter, self.train_on, self.objective = finetune, train_on, objective

    def train_examples(self, task):
        if self.train_on == "labelled_queries":  # a free-text task's label is its target text
            return [
                replace(q, target=label) if task.generation else replace(q, label=label)
                for q, label in zip(task.train_queries, task.train_query_labels)
            ]
        return task.demos

    def collate(self, tokenizer, task, examples):
        answers = [tokenizer(task.answer_text(e), add_special_tokens=False).input_ids for e in examples]
        return encode(tokenizer, [task.student_prompt(e) for e in examples], answers)

    def loss(self, handle, batch):
        logits = answer_logits(handle.student, batch)
        return answer_cross_entropy(
            logits, batch["answer_ids"].to(logits.device), batch["answer_mask"].to(logits.device)
        ), {}
