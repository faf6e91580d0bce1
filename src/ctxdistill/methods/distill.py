"""cd: context distillation (Snell et al. 2022; Upadhayaya et al. 2024).

Teacher: the base model with the adapter disabled, in eval mode, given context + query.
Student: the LoRA-adapted model given the query alone. Loss: a divergence between their
next-token distributions over the full vocabulary at the answer positions, which are
either the single position after the answer cue (Upadhayaya: where the label word is
predicted) or the teacher's own greedy answer span (Snell). Queries are unlabelled.

The teacher is frozen, so its targets are computed once in :meth:`prepare` and reused
by every epoch: training runs no teacher forward pass. ``teacher="live"`` reproduces
Upadhayaya et al.'s released code instead, whose teacher is the adapted model itself in
train mode; its targets move with training and are computed at every step.
"""

from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import tqdm

from ctxdistill.encoding import SharedPrefix, answer_logits, encode
from ctxdistill.losses import distillation_loss
from ctxdistill.methods.base import Method


def greedy_answer_spans(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """The model's greedy continuation of each prompt, cut before the first newline or end-of-sequence."""
    spans = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="teacher answers", leave=False):
        enc = encode(tokenizer, prompts[start:start + batch_size])
        device = next(model.parameters()).device
        out = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            span = []
            for token in row:
                if token == tokenizer.eos_token_id or "\n" in tokenizer.decode([token]):
                    break
                span.append(token)
            spans.append(span or row[:1])
    return spans


class ContextDistillation(Method):
    adapter = "lora"

    def __init__(self, name: str, divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                 top_k: Optional[int] = None, answer: str = "label_position", max_answer_tokens: int = 8,
                 teacher: str = "frozen"):
        super().__init__(name)
        self.divergence, self.beta, self.temperature, self.top_k = divergence, beta, temperature, top_k
        self.answer, self.max_answer_tokens, self.live_teacher = answer, max_answer_tokens, teacher == "live"
        self._spans: dict[str, list[int]] = {}
        self._teacher_logits: dict[str, torch.Tensor] = {}

    def train_examples(self, task):
        return task.train_queries

    @torch.no_grad()
    def prepare(self, handle, tokenizer, task, examples, batch_size):
        if self.live_teacher:
            self._spans = {e.uid: [tokenizer.pad_token_id] for e in examples}
            return
        prompts = [task.teacher_prompt(e) for e in examples]
        with handle.teacher() as teacher:
            if self.answer == "teacher_generation":
                spans = greedy_answer_spans(teacher, tokenizer, prompts, self.max_answer_tokens, batch_size)
            else:  # one position: the one that predicts the label word
                spans = [[tokenizer.pad_token_id]] * len(examples)
            prefix = SharedPrefix(teacher, tokenizer, prompts)
            for start in tqdm(range(0, len(examples), batch_size), desc="teacher targets", leave=False):
                chunk = slice(start, start + batch_size)
                batch = encode(tokenizer, prompts[chunk], spans[chunk], prefix_length=prefix.length)
                logits = answer_logits(teacher, batch, prefix).cpu()
                for example, span, row in zip(examples[chunk], spans[chunk], logits):
                    self._spans[example.uid] = span
                    self._teacher_logits[example.uid] = row[row.shape[0] - len(span):]

    def collate(self, tokenizer, task, examples):
        spans = [self._spans[e.uid] for e in examples]
        batch = encode(tokenizer, [task.student_prompt(e) for e in examples], spans)
        if self.live_teacher:
            batch["teacher_inputs"] = encode(tokenizer, [task.teacher_prompt(e) for e in examples], spans)
            return batch
        width = batch["answer_ids"].shape[1]
        vocab = self._teacher_logits[examples[0].uid].shape[-1]
        teacher = torch.zeros(len(examples), width, vocab)
        for i, e in enumerate(examples):  # right-aligned like the answer positions
            logits = self._teacher_logits[e.uid]
            teacher[i, width - logits.shape[0]:] = logits
        batch["teacher_logits"] = teacher
        return batch

    def loss(self, handle, batch):
        student = answer_logits(handle.student, batch)
        if self.live_teacher:
            with torch.no_grad():
                teacher = answer_logits(handle.student, batch["teacher_inputs"])
        else:
            teacher = batch["teacher_logits"]
        loss = distillation_loss(student, teacher.to(student.device),
                                 batch["answer_mask"].to(student.device), self.divergence, self.beta,
                                 self.temperature, self.top_k)
        return loss, {}
