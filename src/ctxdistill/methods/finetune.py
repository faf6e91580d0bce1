"""ft: supervised few-shot fine-tuning on the k labelled demonstrations, without context."""

from __future__ import annotations

from ctxdistill.encoding import answer_logits, encode
from ctxdistill.losses import answer_cross_entropy
from ctxdistill.methods.base import Method


class Finetune(Method):
    def __init__(self, name: str, finetune: str = "lora"):
        super().__init__(name)
        self.adapter = finetune

    def train_examples(self, task):
        return task.demos

    def collate(self, tokenizer, task, examples):
        answers = [tokenizer(task.answer_text(e), add_special_tokens=False).input_ids for e in examples]
        return encode(tokenizer, [task.student_prompt(e) for e in examples], answers)

    def loss(self, handle, batch):
        logits = answer_logits(handle.student, batch)
        return answer_cross_entropy(logits, batch["answer_ids"].to(logits.device),
                                    batch["answer_mask"].to(logits.device)), {}
