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

``teacher_model`` makes another model the teacher. When its tokenizer differs from the student's,
``divergence="uld"`` is GOLD's on-policy distillation (TRL's GOLDTrainer): each sample is written again in
the other model's tokens (the student's samples in the teacher's, with lambda < 1 the teacher's in the
student's), the teacher scores that text after the context, and at each piece of text both tokenizations end
on the two sorted distributions are compared (ULD; ``uld_hybrid``: GOLD's hybrid, the tokens both
vocabularies spell alike compared directly), plus ``uld_crossentropy_weight`` times the student's
cross-entropy on the sampled text (GOLD's default 0: on its own samples it would reinforce them).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ctxdistill.config import MethodConfig, SeparateTeacher, one_of, require, require_count, unread_beta
from ctxdistill.encoding import (
    SharedPrefix,
    answer_logits,
    encode,
    gold_shared_tokens,
    retokenized,
    tokenization_groups,
)
from ctxdistill.generation import generate
from ctxdistill.losses import (
    answer_cross_entropy,
    distillation_loss,
    sampled_reverse_kl,
    teacher_distribution,
    uld_distance,
    uld_teacher_targets,
)
from ctxdistill.methods.base import Method, check_context_to_distil
from ctxdistill.models import ModelLoadError


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

    @classmethod
    def unread(cls, m: DictConfig) -> dict[str, str]:
        return unread_beta(m)

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
        require_count(m.top_k, "method.top_k", "null samples from the whole vocabulary")
        require(
            m.top_k is None or m.divergence != "sampled_reverse_kl",
            "method.top_k",
            "top-k sampling never draws the tokens outside the k, so the sampled reverse KL cannot estimate "
            "the student's mass there (its gradient would be biased)",
            "Set method.top_k=null, or method.divergence=reverse_kl (exact at every sampled position)",
        )


@dataclass
class OnPolicyConfig(OnPolicySampling, SeparateTeacher, MethodConfig):
    _target_: str = "ctxdistill.methods.on_policy.OnPolicyDistillation"
    # ... or uld: GOLD's on-policy distillation, for a teacher with another tokenizer (the sorted distributions
    # compared at each piece of text both tokenizations of a sample end on)
    divergence: str = one_of("reverse_kl", "jsd", "forward_kl", "sampled_reverse_kl", "uld", default="reverse_kl")
    uld_crossentropy_weight: float = 0.0  # GOLD's default: on the student's own samples it would reinforce them
    max_new_tokens: int = 8
    stop: Optional[str] = "\n"  # a sample ends with the first token containing it (or end-of-sequence)
    # the sampling generator and the lambda draws (the run's seed unless set)
    seed: int = "${seed}"  # type: ignore[assignment]
    schema_name: ClassVar[str] = "base_on_policy"

    @classmethod
    def check(cls, m: DictConfig, cfg: DictConfig) -> None:
        cls.check_sampling(m)
        require(m.max_new_tokens >= 1, "method.max_new_tokens", f"must be >= 1, got {m.max_new_tokens}", "")
        cls.check_separate_teacher(m)


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
        teacher_model: Optional[dict],
        uld_hybrid: bool,
        uld_hybrid_weights: Optional[list[float]],
        uld_crossentropy_weight: float,
    ):
        super().__init__(name)
        self.divergence, self.beta, self.lmbda = divergence, beta, lmbda
        self.temperature, self.top_k, self.max_new_tokens, self.stop = temperature, top_k, max_new_tokens, stop
        self.answer_tokens = max_new_tokens  # the teacher scores every sampled token: each needs a place in its window
        self.seed = seed
        self.teacher_model = None if teacher_model is None else OmegaConf.create(teacher_model)
        self.uld, self.uld_hybrid, self.uld_hybrid_weights = divergence == "uld", uld_hybrid, uld_hybrid_weights
        self.uld_crossentropy_weight = uld_crossentropy_weight
        # with uld_hybrid: (student ids, teacher ids) of the shared tokens, and the [shared, other] weights
        self._shared: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._hybrid_weights: Optional[tuple[float, float]] = None
        self.tokenizer = self.teacher_tokenizer = None
        self.prefix: Optional[SharedPrefix] = None

    def check_inputs(self, task, tokenizer, cfg):
        super().check_inputs(task, tokenizer, cfg)
        check_context_to_distil(task, self.train_examples(task), self.teacher_model)

    def check_teacher(self, cfg, task, tokenizer, teacher_tokenizer):
        if self.uld:  # the two tokenizations meet on the samples' text
            return
        try:
            super().check_teacher(cfg, task, tokenizer, teacher_tokenizer)
        except ModelLoadError as e:
            raise ModelLoadError(f"{e} On-policy distillation across tokenizers (GOLD): method.divergence=uld") from e

    def train_examples(self, task):
        return task.train_queries

    def prepare(self, handle, tokenizer, task, examples, batch_size):
        self.start(handle, tokenizer, [task.teacher_prompt(e) for e in examples])

    def start(self, handle, tokenizer, teacher_prompts: list[str]) -> None:
        """Seeds the sampling and the lambda draws, and runs the teacher prompts' shared context once."""
        self.tokenizer, self.teacher_tokenizer = tokenizer, handle.teacher_tokenizer or tokenizer
        self.draws = random.Random(self.seed)
        device = next(handle.base.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(self.seed)
        with handle.teacher() as teacher:
            self.prefix = SharedPrefix(teacher, self.teacher_tokenizer, teacher_prompts)
            if self.uld_hybrid:
                self._shared, self._hybrid_weights = gold_shared_tokens(
                    handle.base, teacher, tokenizer, self.teacher_tokenizer, self.uld_hybrid_weights
                )

    def state_dict(self):
        return {"generator": self.generator.get_state(), "draws": self.draws.getstate()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.draws.setstate(state["draws"])

    def collate(self, tokenizer, task, examples):
        return {
            "student_prompts": [task.student_prompt(e) for e in examples],
            "teacher_prompts": [task.teacher_prompt(e) for e in examples],
        }

    def sample(
        self, model, prompts: list[str], prefix: Optional[SharedPrefix] = None, tokenizer=None
    ) -> list[list[int]]:
        """Each prompt's sampled continuation, in the tokens of ``tokenizer`` (default: the student's)."""
        return generate(
            model,
            tokenizer or self.tokenizer,
            prompts,
            self.max_new_tokens,
            self.temperature,
            self.top_k,
            self.stop,
            self.generator,
            prefix,
            batch_size=len(prompts),
        )

    def _gold_loss(self, handle, batch, on_policy: bool):
        """GOLD on the student's samples (or, off-policy, the teacher's), each written in both tokenizers and
        scored by the teacher after the context: the ULD (or hybrid) distance of each row's aligned pieces of
        text, averaged over the rows that have one, plus the weighted cross-entropy of the student's tokens of
        the text (at temperature 1, as the other divergences)."""
        same = self.teacher_tokenizer is self.tokenizer

        def written_in(tokenizer, ids: list[int], into) -> list[int]:
            # a sample that ends at once writes no text: in the other tokenizer, that one's end of text
            return ids if same else retokenized(tokenizer, ids, into) or [into.eos_token_id]

        if on_policy:
            samples = self.sample(handle.student, batch["student_prompts"])
            spans = [written_in(self.tokenizer, s, self.teacher_tokenizer) for s in samples]
        else:
            with handle.teacher() as teacher:
                spans = self.sample(teacher, batch["teacher_prompts"], self.prefix, self.teacher_tokenizer)
            samples = [written_in(self.teacher_tokenizer, s, self.tokenizer) for s in spans]
        groups = [tokenization_groups(self.tokenizer, s, self.teacher_tokenizer, t) for s, t in zip(samples, spans)]
        student_batch = encode(self.tokenizer, batch["student_prompts"], samples)
        student = answer_logits(handle.student, student_batch)
        with handle.teacher() as teacher:
            teacher_batch = encode(
                self.teacher_tokenizer, batch["teacher_prompts"], spans, prefix_length=self.prefix.length
            )
            teacher_logits = answer_logits(teacher, teacher_batch, self.prefix)
        shared = (None, None) if self._shared is None else self._shared
        teacher_targets = uld_teacher_targets(
            teacher_logits,
            teacher_batch["answer_ids"].to(teacher_logits.device),
            shared_ids=None if shared[1] is None else shared[1].to(teacher_logits.device),
        )
        probs = student.float().softmax(-1)
        token_probs = probs.gather(-1, student_batch["answer_ids"].to(probs.device).unsqueeze(-1)).squeeze(-1)
        distances, shared_terms = [], []
        for row, row_groups in enumerate(groups):
            if not row_groups:  # an empty sample, or text the two tokenizers decode differently
                continue
            at = slice(probs.shape[1] - len(samples[row]), None)  # right-aligned spans
            teacher_at = slice(teacher_logits.shape[1] - len(spans[row]), None)
            distance, shared_term, _ = uld_distance(
                probs[row, at],
                token_probs[row, at],
                row_groups,
                *(None if t is None else t[row, teacher_at].to(probs.device) for t in teacher_targets),
                student_shared_ids=None if shared[0] is None else shared[0].to(probs.device),
                weights=self._hybrid_weights or (0.0, 1.0),
                beta=self.beta,
            )
            distances.append(distance)
            if shared_term is not None:
                shared_terms.append(shared_term.item())
        distance = torch.stack(distances).mean() if distances else student.sum() * 0
        mask = student_batch["answer_mask"].to(student.device)
        crossentropy = answer_cross_entropy(student, student_batch["answer_ids"].to(student.device), mask)
        stats = {
            "on_policy": float(on_policy),
            "sample_tokens": sum(map(len, samples)) / len(samples),
            "aligned_rows": len(distances) / len(samples),
            "uld_distance": distance.item(),
            "uld_crossentropy": crossentropy.item(),
        }
        if shared_terms:
            stats |= {"uld_shared_jsd": sum(shared_terms) / len(shared_terms)}
        return distance + self.uld_crossentropy_weight * crossentropy, stats

    def loss(self, handle, batch):
        on_policy = self.draws.random() < self.lmbda
        if self.uld:
            return self._gold_loss(handle, batch, on_policy)
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
