"""icl_distill, icl_d, ict: in-context learning distillation (Huang et al. 2022).

A larger frozen teacher (``method.teacher``) and a smaller student read the same prompt: an
instance of a task mixture, k demonstrations of one task followed by a query of that task
(in-context tuning's format). The student is trained (LoRA or, with ``model.adapter=full``,
every weight) to minimise, per batch,

    L = w_ih * L_ICL_hard + w_is * T^2 * L_ICL_soft + w_lh * L_LM_hard + w_ls * T^2 * L_LM_soft

- L_ICL_hard: cross-entropy of the gold answer word after the prompt (mean over its tokens);
- L_ICL_soft: KL(p_T^T || p_S^T) at the same positions, the teacher's and student's next-token
  distributions at temperature T (Hinton's soft labels; T^2 keeps the gradient scale of T=1);
- L_LM_hard: cross-entropy of every demonstration token given the tokens before it (the
  demonstrations' text with their answer words; not the task instruction, not the query),
  mean over those tokens in the batch;
- L_LM_soft: the KL of L_ICL_soft at each of those positions.

The w are ``method.icl_hard_weight``, ``icl_soft_weight``, ``lm_hard_weight`` and
``lm_soft_weight``: 0.5 each for ICL-D(LM) (``method=icl_distill``), the LM pair 0 for ICL-D
(``method=icl_d``), and w_ih = 1 alone, with no teacher, for ICT (``method=ict``).

The teacher's targets are its top-k tokens (``method.top_k``) plus one bucket for the rest of its
mass, which the student's distribution is lumped into as well; at each answer and demonstration
position of every training instance they are computed once, before the first step (every
instance keeps its demonstrations across epochs), so training runs no teacher forward pass. They are
kept in the teacher cache (``method.teacher_cache=disk``, the default), so later runs on the same
prompts (the other variants of a sweep, a rerun) run none either.

Where the paper is ambiguous: the exact formula, the weights and T are not given in the material
available here (the abstract and secondary summaries: the student learns from soft and hard
labels under both objectives). The equal weights, T = 1, the T^2 factor and the KL direction are
this suite's choices; each is one override.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ctxdistill.config import MethodConfig, ModelConfig, one_of, require
from ctxdistill.data import Example
from ctxdistill.data.mixture import TaskMixture
from ctxdistill.encoding import answer_and_column_logits, answer_logits, encode
from ctxdistill.losses import answer_cross_entropy, distillation_loss, teacher_distribution
from ctxdistill.methods.base import Method
from ctxdistill.progress import progress_bar
from ctxdistill.teacher_cache import TeacherCache, TeacherTargets, saved_on_exit, stack_targets

TERMS = ("icl_hard", "icl_soft", "lm_hard", "lm_soft")


@dataclass
class ICLDistillConfig(MethodConfig):
    """In-context learning distillation (Huang et al. 2022); the loss is written out in the module
    docstring. A weight of 0 switches its term off; ICT is the hard ICL term alone."""

    _target_: str = "ctxdistill.methods.icl_distill.ICLDistillation"
    icl_hard_weight: float = 0.5  # cross-entropy of the gold answer after the k demonstrations
    icl_soft_weight: float = 0.5  # T^2 * KL(teacher || student) at the answer position
    lm_hard_weight: float = 0.0  # cross-entropy of the demonstration tokens (language modelling)
    lm_soft_weight: float = 0.0  # T^2 * KL(teacher || student) at every demonstration token
    temperature: float = 1.0
    top_k: int = 64  # the teacher's targets are kept as its k most likely tokens plus one bucket for the rest
    teacher: Optional[ModelConfig] = None  # the teacher's model config (a larger LM); null: no teacher (ICT)
    # the teacher's targets: kept on disk for later runs on the same prompts (disk), or for this run only (memory)
    teacher_cache: str = one_of("disk", "memory", default="disk")
    teacher_cache_dir: str = "${cache_dir}/teacher_targets"
    schema_name: ClassVar[str] = "base_icl_distill"
    dataset_kinds: ClassVar[tuple[str, ...]] = ("mixture",)
    dataset_example: ClassVar[str] = "experiment=huang2022/multitask_ict or huang2022/meta_ict"
    refused_adapters: ClassVar[dict[str, str]] = {
        "prefix": "a trainable prefix stands for one fixed context, and in-context tuning draws new "
        "demonstrations for every prompt"
    }

    @classmethod
    def check(cls, m: DictConfig, cfg: DictConfig) -> None:
        weights = {k: m[k] for k in ("icl_hard_weight", "icl_soft_weight", "lm_hard_weight", "lm_soft_weight")}
        require(
            all(w >= 0 for w in weights.values()) and sum(weights.values()) > 0,
            "method",
            f"the loss weights must be >= 0 and not all 0, got {weights}",
            "",
        )
        require(m.temperature > 0, "method.temperature", f"must be positive, got {m.temperature}", "")
        require(m.top_k >= 1, "method.top_k", f"must be >= 1, got {m.top_k}", "")
        require(
            m.teacher is not None or (m.icl_soft_weight == 0 and m.lm_soft_weight == 0),
            "method.teacher",
            "the soft (distillation) terms need a teacher model",
            "Use method=ict, or give method.teacher (e.g. model@method.teacher=smollm2-135m)",
        )


def icl_distillation_loss(
    answer: torch.Tensor,
    demonstrations: Optional[torch.Tensor],
    batch: dict[str, Any],
    weights: dict[str, float],
    temperature: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted loss and each term's value (see the module docstring).

    ``answer`` [B, P, V] and ``demonstrations`` [B, M, V] are the student's logits at the answer and
    demonstration positions; ``batch`` holds the gold tokens and masks (answer_ids/answer_mask,
    lm_ids/lm_mask) and the teacher's top-k targets (teacher_answer_*, teacher_lm_*)."""
    device = answer.device
    terms: dict[str, torch.Tensor] = {}

    def soft(student: torch.Tensor, kind: str, mask: torch.Tensor) -> torch.Tensor:
        indices = batch[f"teacher_{kind}_indices"]  # None: a top_k of the whole vocabulary keeps every token
        return temperature**2 * distillation_loss(
            student,
            batch[f"teacher_{kind}_logprobs"].to(device),
            mask,
            "forward_kl",
            temperature=temperature,
            teacher_indices=None if indices is None else indices.to(device),
            top_k_rest="bucket",
        )

    answer_mask = batch["answer_mask"].to(device)
    if weights["icl_hard"]:
        terms["icl_hard"] = answer_cross_entropy(answer, batch["answer_ids"].to(device), answer_mask)
    if weights["icl_soft"]:
        terms["icl_soft"] = soft(answer, "answer", answer_mask)
    if weights["lm_hard"] or weights["lm_soft"]:
        lm_mask = batch["lm_mask"].to(device)
        if weights["lm_hard"]:
            terms["lm_hard"] = answer_cross_entropy(demonstrations, batch["lm_ids"].to(device), lm_mask)
        if weights["lm_soft"]:
            terms["lm_soft"] = soft(demonstrations, "lm", lm_mask)
    loss = sum(weights[name] * value for name, value in terms.items())
    return loss, {name: value.item() for name, value in terms.items()}


class ICLDistillation(Method):
    trained_weights = "adapter"  # what model.adapter selects: lora or full
    teacher_key = "method.teacher"
    eval_with_context = True  # the student is judged by its few-shot (in-context) accuracy

    def __init__(
        self,
        name: str,
        icl_hard_weight: float,
        icl_soft_weight: float,
        lm_hard_weight: float,
        lm_soft_weight: float,
        temperature: float,
        top_k: int,
        teacher: Optional[dict],
        teacher_cache: str,
        teacher_cache_dir: Optional[str],
    ):
        super().__init__(name)
        self.weights = dict(zip(TERMS, (icl_hard_weight, icl_soft_weight, lm_hard_weight, lm_soft_weight)))
        self.temperature, self.top_k = temperature, top_k
        self.teacher_model = None if teacher is None else OmegaConf.create(teacher)
        self.teacher_cache_dir = teacher_cache_dir if teacher_cache == "disk" else None
        # the teacher's targets per instance uid: at the answer positions, and at the demonstration tokens
        self._targets: dict[str, dict[str, TeacherTargets]] = {"answer": {}, "lm": {}}
        self.teacher_forwards = 0  # teacher forward passes (batches), for tests

    @property
    def models_demonstrations(self) -> bool:
        return bool(self.weights["lm_hard"] or self.weights["lm_soft"])

    def train_examples(self, task: TaskMixture) -> list[Example]:
        return task.instances

    def encode_instances(
        self, tokenizer, task: TaskMixture, examples: list[Example], demonstrations: bool
    ) -> dict[str, torch.Tensor]:
        """Prompts with their gold answers (:func:`encode`); with ``demonstrations``, also the row positions
        whose logits predict each demonstration token (``lm_columns`` [B, M]), those tokens (``lm_ids``)
        and ``lm_mask``, left-aligned and padded."""
        parts = [task.task_of(e) for e in examples]
        contexts = [part.context_of(e) for part, e in zip(parts, examples)]
        prompts = [part.teacher_prompt(e) for part, e in zip(parts, examples)]
        answers = [
            tokenizer(part.answer_text(e), add_special_tokens=False).input_ids for part, e in zip(parts, examples)
        ]
        batch = encode(tokenizer, prompts, answers)
        if not demonstrations:
            return batch
        width = batch["input_ids"].shape[1]
        tokenized = tokenizer(prompts, return_offsets_mapping=True)
        columns, ids = [], []
        for part, context, prompt_ids, offsets, answer in zip(
            parts, contexts, tokenized.input_ids, tokenized.offset_mapping, answers
        ):
            start, end = part.demo_sampler.instruction_chars, len(context)
            pad = width - (len(prompt_ids) + len(answer) - 1)
            # token j sits at column pad + j and is predicted by the logits at column pad + j - 1
            demo_tokens = [j for j, (a, b) in enumerate(offsets) if j > 0 and a < b and a >= start and b <= end]
            columns.append([pad + j - 1 for j in demo_tokens])
            ids.append([prompt_ids[j] for j in demo_tokens])
        longest = max(map(len, columns))
        batch["lm_columns"] = torch.tensor([c + [width - 1] * (longest - len(c)) for c in columns])
        batch["lm_ids"] = torch.tensor([i + [tokenizer.pad_token_id] * (longest - len(i)) for i in ids])
        batch["lm_mask"] = torch.tensor([[True] * len(c) + [False] * (longest - len(c)) for c in columns])
        return batch

    def _logits(self, model, batch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if "lm_columns" in batch:
            return answer_and_column_logits(model, batch, batch["lm_columns"])
        return answer_logits(model, batch), None

    @torch.no_grad()
    def prepare(self, handle, tokenizer, task, examples, batch_size):
        kinds = [kind for kind, weight in (("answer", "icl_soft"), ("lm", "lm_soft")) if self.weights[weight]]
        if not kinds:
            return None
        settings = {"method": "icl_distill", "temperature": self.temperature, "top_k": self.top_k}
        caches = {
            kind: TeacherCache(self.teacher_cache_dir, handle.identity, {**settings, "positions": kind}, task.name)
            for kind in kinds
        }
        # the teacher's whole input: the prompt and the gold answer after it, apart (each is tokenised on its own, so
        # where the one ends decides the answer's tokens: "Sentiment:\n" + "foo" is not "Sentiment:" + "\nfoo")
        inputs = {
            e.uid: json.dumps([task.task_of(e).teacher_prompt(e), task.task_of(e).answer_text(e)]) for e in examples
        }
        todo = [e for e in examples if any(cache.get(inputs[e.uid]) is None for cache in caches.values())]
        if todo:
            with saved_on_exit(*caches.values()), handle.teacher() as teacher:
                for start in progress_bar(range(0, len(todo), batch_size), desc="teacher targets", leave=False):
                    chunk = todo[start : start + batch_size]
                    batch = self.encode_instances(tokenizer, task, chunk, "lm" in caches)
                    logits = dict(zip(("answer", "lm"), self._logits(teacher, batch)))
                    self.teacher_forwards += 1
                    for kind, cache in caches.items():
                        ids = batch["answer_ids" if kind == "answer" else "lm_ids"]
                        mask = batch["answer_mask" if kind == "answer" else "lm_mask"]
                        logprobs, indices = teacher_distribution(logits[kind].cpu(), self.temperature, self.top_k)
                        for row, example in enumerate(chunk):  # answers are right-aligned, demonstrations left
                            at = mask[row].nonzero().squeeze(-1)
                            cache.put(
                                inputs[example.uid],
                                TeacherTargets(
                                    ids[row, at].tolist(),
                                    logprobs[row, at].clone(),
                                    None if indices is None else indices[row, at].clone(),
                                ),
                            )
        for kind, cache in caches.items():
            self._targets[kind] = {e.uid: cache.get(inputs[e.uid]) for e in examples}
        return {"teacher_forwards": self.teacher_forwards}

    def collate(self, tokenizer, task, examples):
        batch = self.encode_instances(tokenizer, task, examples, self.models_demonstrations)
        for kind, width_of, right_aligned in (("answer", "answer_ids", True), ("lm", "lm_ids", False)):
            if self._targets[kind]:
                batch[f"teacher_{kind}_logprobs"], batch[f"teacher_{kind}_indices"] = stack_targets(
                    [self._targets[kind][e.uid] for e in examples], batch[width_of].shape[1], right_aligned
                )
        return batch

    def loss(self, handle, batch):
        answer, demonstrations = self._logits(handle.student, batch)
        return icl_distillation_loss(answer, demonstrations, batch, self.weights, self.temperature)
