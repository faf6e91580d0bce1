"""on_policy_cd: on-policy context distillation (GKD, Agarwal et al. 2023; on-policy distillation; SDFT).

At every step the student (LoRA-adapted, no context) samples a continuation of each
query; the teacher (the same base model with the adapter disabled, or with
``model.adapter=full`` a frozen copy of the initial weights, with the context) scores every
sampled token; the loss is a divergence between the two next-token
distributions at those positions: reverse KL by default (mode-seeking: the student is
corrected where it actually goes), generalised JSD with beta, or the sampled token's
log-ratio as a policy gradient (importance-weighted by the sampler's probability, so it stays
unbiased for teacher samples and any temperature). With GKD's lambda < 1 a batch is sampled from the
teacher instead (with probability 1 - lambda): sequence-level distillation.

The context's key/value cache is computed once and reused by every teacher pass.
Sampling and the lambda draws use their own seeded generators, so a run is reproducible.
"""

from __future__ import annotations

import random
from typing import Optional

import torch

from ctxdistill.encoding import SharedPrefix, answer_logits, encode
from ctxdistill.generation import generate
from ctxdistill.losses import distillation_loss, sampled_reverse_kl, teacher_distribution
from ctxdistill.methods.base import Method


class OnPolicyDistillation(Method):
    adapter = "lora"
    teacher_during_training = True  # it scores every step's samples

    def __init__(
        self,
        name: str,
        divergence: str = "reverse_kl",
        beta: float = 0.5,
        lmbda: float = 1.0,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        max_new_tokens: int = 8,
        stop: Optional[str] = "\n",
        seed: int = 0,
    ):
        super().__init__(name)
        self.divergence, self.beta, self.lmbda = divergence, beta, lmbda
        self.temperature, self.top_k, self.max_new_tokens, self.stop = temperature, top_k, max_new_tokens, stop
        self.seed = seed
        self.tokenizer = None
        self.prefix: Optional[SharedPrefix] = None

    def train_examples(self, task):
        return task.train_queries

    def prepare(self, handle, tokenizer, task, examples, batch_size):
        self.tokenizer = tokenizer
        self.draws = random.Random(self.seed)
        device = next(handle.base.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(self.seed)
        with handle.teacher() as teacher:
            self.prefix = SharedPrefix(teacher, tokenizer, [task.teacher_prompt(e) for e in examples])

    def collate(self, tokenizer, task, examples):
        return {
            "student_prompts": [task.student_prompt(e) for e in examples],
            "teacher_prompts": [task.teacher_prompt(e) for e in examples],
        }

    def sample(self, model, prompts: list[str], prefix: Optional[SharedPrefix] = None) -> list[list[int]]:
        return generate(
            model,
            self.tokenizer,
            prompts,
            self.max_new_tokens,
            self.temperature,
            self.top_k,
            self.stop,
            self.generator,
            prefix,
            batch_size=len(prompts),
        )

    def loss(self, handle, batch):
        on_policy = self.draws.random() < self.lmbda
        if on_policy:
            samples = self.sample(handle.student, batch["student_prompts"])
        else:
            with handle.teacher() as teacher:
                samples = self.sample(teacher, batch["teacher_prompts"], self.prefix)
        student_batch = encode(self.tokenizer, batch["student_prompts"], samples)
        student = answer_logits(handle.student, student_batch)
        with handle.teacher() as teacher:
            teacher_batch = encode(self.tokenizer, batch["teacher_prompts"], samples, prefix_length=self.prefix.length)
            teacher_logits = answer_logits(teacher, teacher_batch, self.prefix).to(student.device)
        mask = student_batch["answer_mask"].to(student.device)
        if self.divergence == "sampled_reverse_kl":
            # The importance weight needs log q(x) of the distribution each token was drawn from.
            tokens = student_batch["answer_ids"].to(student.device)
            sampler = student.detach() if on_policy else teacher_logits
            sampling_logprobs = (
                (sampler.float() / self.temperature).log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            )
            loss = sampled_reverse_kl(student, teacher_logits, tokens, mask, sampling_logprobs)
        else:
            loss = distillation_loss(student, teacher_distribution(teacher_logits)[0], mask, self.divergence, self.beta)
        return loss, {"on_policy": float(on_policy), "sample_tokens": sum(map(len, samples)) / len(samples)}
