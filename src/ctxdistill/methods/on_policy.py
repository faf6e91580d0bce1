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
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from omegaconf import DictConfig

from ctxdistill.config import MethodConfig, one_of, require
from ctxdistill.encoding import SharedPrefix, answer_logits, encode
from ctxdistill.generation import generate
from ctxdistill.losses import distillation_loss, sampled_reverse_kl, teacher_distribution
from ctxdistill.methods.base import Method


@dataclass
class OnPolicySampling:
    """The on-policy settings that the methods sampling from the student share (this one, and OPCD in
    ctxdistill.methods.opcd); a schema mixes them in."""

    # At every sampled position: reverse_kl | jsd | forward_kl over the full vocabulary (GKD), or
    # sampled_reverse_kl, the sampled token's log-ratio as a policy gradient (on-policy distillation, SDFT).
    divergence: str = one_of("reverse_kl", "jsd", "forward_kl", "sampled_reverse_kl", default="reverse_kl")
    beta: float = 0.5  # JSD mixture weight (TRL semantics: 0 = forward KL, 1 = reverse KL)
    temperature: float = 1.0  # sampling only; the loss is taken at temperature 1, as in GKD
    top_k: Optional[int] = None  # sample among the k most likely tokens
    lmbda: float = 1.0  # GKD's lambda: the fraction of batches the student samples; the teacher samples the rest

    @staticmethod
    def check_sampling(m: DictConfig) -> None:
        require(0 <= m.beta <= 1, "method.beta", f"must be in [0, 1], got {m.beta}", "")
        require(0 <= m.lmbda <= 1, "method.lmbda", f"must be in [0, 1], got {m.lmbda}", "")
        require(
            m.temperature > 0,
            "method.temperature",
            f"must be positive, got {m.temperature}",
            "Sampling needs a positive temperature, e.g. method.temperature=1.0",
        )
        require(m.top_k is None or m.top_k >= 1, "method.top_k", f"must be >= 1, got {m.top_k}", "")
        require(
            m.top_k is None or m.divergence != "sampled_reverse_kl",
            "method.top_k",
            "top-k sampling never draws the tokens outside the k, so the sampled reverse KL cannot estimate "
            "the student's mass there (its gradient would be biased)",
            "Set method.top_k=null, or method.divergence=reverse_kl (exact at every sampled position)",
        )


@dataclass
class OnPolicyConfig(OnPolicySampling, MethodConfig):
    _target_: str = "ctxdistill.methods.on_policy.OnPolicyDistillation"
    max_new_tokens: int = 8
    stop: Optional[str] = "\n"  # a sample ends with the first token containing it (or end-of-sequence)
    seed: int = 0  # the sampling generator and the lambda draws
    schema_name: ClassVar[str] = "base_on_policy"

    @classmethod
    def check(cls, m: DictConfig, cfg: DictConfig) -> None:
        cls.check_sampling(m)
        require(m.max_new_tokens >= 1, "method.max_new_tokens", f"must be >= 1, got {m.max_new_tokens}", "")


class OnPolicyDistillation(Method):
    trained_weights = "adapter"
    teacher_during_training = True  # it scores every step's samples

    def __init__(
        self,
        name: str,
        divergence: str,
        beta: float,
        lmbda: float,
        temperature: float,
        top_k: Optional[int],
        max_new_tokens: int,
        stop: Optional[str],
        seed: int,
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
        self.start(handle, tokenizer, [task.teacher_prompt(e) for e in examples])

    def start(self, handle, tokenizer, teacher_prompts: list[str]) -> None:
        """Seeds the sampling and the lambda draws, and runs the teacher prompts' shared context once."""
        self.tokenizer = tokenizer
        self.draws = random.Random(self.seed)
        device = next(handle.base.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(self.seed)
        with handle.teacher() as teacher:
            self.prefix = SharedPrefix(teacher, tokenizer, teacher_prompts)

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
