"""cd: context distillation (Snell et al. 2022; Upadhayaya et al. 2024).

Teacher: the base model with the adapter disabled, in eval mode, given context + query.
Student: the LoRA-adapted model given the query alone. Loss: a divergence between their
next-token distributions (the whole vocabulary, or the teacher's top k) at the answer
positions, which are either the single position after the answer cue (Upadhayaya: where
the label word is predicted) or the teacher's own greedy answer span (Snell). Queries are
unlabelled.

The teacher is frozen, so by default its targets are computed once in :meth:`prepare` (the
shared context run once as a key/value prefix) and reused by every epoch through the
teacher cache, on disk for later runs too (``teacher_cache=disk``), or for this run only
(``memory``). ``teacher_cache=none`` runs the frozen teacher at every step instead.
``teacher="live"`` reproduces Upadhayaya et al.'s released code, whose teacher is the
adapted model itself in train mode; its targets move with training, so they are computed
at every step.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from tqdm.auto import tqdm

from ctxdistill.encoding import SharedPrefix, answer_logits, encode
from ctxdistill.generation import generate, strip_stop
from ctxdistill.losses import distillation_loss, teacher_distribution
from ctxdistill.methods.base import Method
from ctxdistill.teacher_cache import TeacherCache, TeacherTargets, stack_targets


class ContextDistillation(Method):
    adapter = "lora"

    def __init__(
        self,
        name: str,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_k_rest: str = "renormalize",
        answer: str = "label_position",
        max_answer_tokens: int = 8,
        teacher: str = "frozen",
        teacher_cache: str = "disk",
        teacher_cache_dir: Optional[str] = None,
    ):
        super().__init__(name)
        self.divergence, self.beta, self.temperature = divergence, beta, temperature
        self.top_k, self.top_k_rest = top_k, top_k_rest
        self.answer, self.max_answer_tokens, self.live_teacher = answer, max_answer_tokens, teacher == "live"
        self.teacher_cache, self.teacher_cache_dir = teacher_cache, teacher_cache_dir
        self.answer_tokens = max_answer_tokens if answer == "teacher_generation" else 1
        self.teacher_during_training = teacher_cache == "none" and not self.live_teacher
        self._spans: dict[str, list[int]] = {}
        self._targets: dict[str, TeacherTargets] = {}
        self._prefix: Optional[SharedPrefix] = None  # the frozen teacher's context, for per-step targets
        self.teacher_forwards = 0  # teacher forward passes over training queries (batches), for benchmarks and tests

    def train_examples(self, task):
        return task.train_queries

    @torch.no_grad()
    def prepare(self, handle, tokenizer, task, examples, batch_size):
        if self.live_teacher:
            self._spans = {e.uid: [tokenizer.pad_token_id] for e in examples}
            return
        prompts = [task.teacher_prompt(e) for e in examples]
        settings = {
            "answer": self.answer,
            "max_answer_tokens": self.max_answer_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
        }
        cache = TeacherCache(
            self.teacher_cache_dir if self.teacher_cache == "disk" else None,
            handle.identity,
            settings,
            os.path.commonprefix(prompts),
        )
        if self.teacher_cache == "none":  # targets come at every step; only the spans and the prefix now
            with handle.teacher() as teacher:
                self._prefix = SharedPrefix(teacher, tokenizer, prompts)
                spans = self._answer_spans(teacher, tokenizer, prompts, batch_size, self._prefix)
            self._spans = {e.uid: span for e, span in zip(examples, spans)}
            return
        todo = [i for i, prompt in enumerate(prompts) if cache.get(prompt) is None]
        if todo:
            todo_prompts = [prompts[i] for i in todo]
            with handle.teacher() as teacher:
                prefix = SharedPrefix(teacher, tokenizer, todo_prompts)
                spans = self._answer_spans(teacher, tokenizer, todo_prompts, batch_size, prefix)
                for start in tqdm(range(0, len(todo), batch_size), desc="teacher targets", leave=False):
                    chunk = slice(start, start + batch_size)
                    batch = encode(tokenizer, todo_prompts[chunk], spans[chunk], prefix_length=prefix.length)
                    logprobs, indices = teacher_distribution(
                        answer_logits(teacher, batch, prefix).cpu(), self.temperature, self.top_k
                    )
                    self.teacher_forwards += 1
                    for j, (prompt, span) in enumerate(zip(todo_prompts[chunk], spans[chunk])):
                        keep = slice(logprobs.shape[1] - len(span), None)  # right-aligned span positions
                        cache.put(
                            prompt,
                            TeacherTargets(
                                span, logprobs[j, keep].clone(), None if indices is None else indices[j, keep].clone()
                            ),
                        )
            cache.save()
        for example, prompt in zip(examples, prompts):
            self._targets[example.uid] = cache.get(prompt)
            self._spans[example.uid] = self._targets[example.uid].span

    def _answer_spans(self, teacher, tokenizer, prompts, batch_size, prefix):
        if self.answer == "teacher_generation":  # the greedy answer, up to the end of its line
            return [
                strip_stop(tokenizer, c) or c
                for c in generate(
                    teacher,
                    tokenizer,
                    prompts,
                    self.max_answer_tokens,
                    prefix=prefix,
                    batch_size=batch_size,
                    desc="teacher answers",
                )
            ]
        return [[tokenizer.pad_token_id]] * len(prompts)  # one position: the one that predicts the label word

    def collate(self, tokenizer, task, examples):
        spans = [self._spans[e.uid] for e in examples]
        batch = encode(tokenizer, [task.student_prompt(e) for e in examples], spans)
        if not self._targets:  # targets at every step, from the teacher's own inputs
            prefix_length = self._prefix.length if self._prefix else 0
            batch["teacher_inputs"] = encode(
                tokenizer, [task.teacher_prompt(e) for e in examples], spans, prefix_length=prefix_length
            )
            return batch
        batch["teacher_logprobs"], batch["teacher_indices"] = stack_targets(
            [self._targets[e.uid] for e in examples], batch["answer_ids"].shape[1], right_aligned=True
        )
        return batch

    def _teacher_now(self, handle, inputs):
        """Teacher targets computed at this step: the frozen base (with the context prefix) or the live model."""
        self.teacher_forwards += 1
        if self.live_teacher:
            with torch.no_grad():
                logits = answer_logits(handle.student, inputs)
        else:
            with handle.teacher() as teacher:
                logits = answer_logits(teacher, inputs, self._prefix)
        return teacher_distribution(logits, self.temperature, self.top_k)

    def loss(self, handle, batch):
        student = answer_logits(handle.student, batch)
        if "teacher_inputs" in batch:
            logprobs, indices = self._teacher_now(handle, batch["teacher_inputs"])
        else:
            logprobs, indices = batch["teacher_logprobs"], batch["teacher_indices"]
        loss = distillation_loss(
            student,
            logprobs.to(student.device),
            batch["answer_mask"].to(student.device),
            self.divergence,
            self.beta,
            self.temperature,
            indices,
            self.top_k_rest,
        )
        return loss, {}
