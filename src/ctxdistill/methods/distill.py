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

``teacher_model`` makes another model the teacher (a larger one, or one from another family).
When its tokenizer differs from the student's, the two next-token distributions cannot be compared
token by token; ``distil_over="verbalizers"`` compares them where both vocabularies meet: each model's
probability of each answer word (one token in its own tokenizer) and of anything else. For a generated
answer, ``divergence="uld"`` is Universal Logit Distillation (Boizard et al. 2024, with the text-offset
alignment of TRL's GOLD): the student learns the teacher's answer text in its own tokens (cross-entropy)
and, at each piece of text both tokenizations end on, the teacher's sorted probabilities (L1 distance);
``uld_hybrid`` is GOLD's hybrid, which compares the tokens both vocabularies spell alike directly (JSD).

``sequential=true`` (``method=sequential_cd``) is Snell et al.'s sequential distillation (eq. 3):
one round per context (``dataset.context.num_contexts``). Round 1 distils context 1 from the frozen
base model, as ``cd`` does; round k distils context k from the student that round k-1 left, with
context k, frozen for the round (its targets are computed before the round's first step). Every
round trains on all the training queries. The cached targets of rounds after the first are keyed
by the teacher's trainable weights too.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
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
from ctxdistill.generation import end_tokens, generate, strip_stop
from ctxdistill.losses import (
    answer_cross_entropy,
    answer_word_distribution,
    distillation_loss,
    teacher_distribution,
    uld_distance,
    uld_teacher_targets,
)
from ctxdistill.methods.base import Method, check_context_to_distil
from ctxdistill.models import ModelLoadError, evaluation_mode
from ctxdistill.progress import progress_bar
from ctxdistill.teacher_cache import TeacherCache, TeacherTargets, saved_on_exit, stack_targets

log = logging.getLogger(__name__)


@dataclass
class DistillConfig(SeparateTeacher, MethodConfig):
    _target_: str = "ctxdistill.methods.distill.ContextDistillation"
    # uld: L1 between sorted probability vectors (no shared vocabulary needed; answer=teacher_generation)
    divergence: str = one_of("forward_kl", "reverse_kl", "jsd", "uld", default="forward_kl")
    beta: float = 0.5  # JSD mixture weight (TRL semantics: 0 = forward KL, 1 = reverse KL)
    temperature: float = 1.0
    top_k: Optional[int] = None  # distil (and cache) only the teacher's k most likely tokens
    # what happens to the rest of the teacher's mass with top_k: renormalize the teacher over its k (forward_kl
    # only; the student keeps its full-vocabulary log-probabilities, where TRL's SDFT renormalises both over the
    # student's top k) or bucket (one extra category for teacher and student, any divergence, TRL SDFT's tail)
    top_k_rest: str = one_of("renormalize", "bucket", default="renormalize")
    # the single position that predicts the label word (Upadhayaya), or the teacher's greedy answer span (Snell)
    answer: str = one_of("label_position", "teacher_generation", default="label_position")
    max_answer_tokens: int = 8  # span length for answer=teacher_generation
    # frozen: base weights, adapter disabled, eval mode (the papers' description). live: the adapted
    # model itself in train mode, as Upadhayaya et al.'s released code effectively does.
    teacher: str = one_of("frozen", "live", default="frozen")
    # the frozen teacher's targets: computed once and kept on disk for later runs too (disk), for
    # this run only (memory), or recomputed at every step (none). A live teacher is always per step.
    teacher_cache: str = one_of("disk", "memory", "none", default="disk")
    teacher_cache_dir: str = "${cache_dir}/teacher_targets"
    # what the divergence compares: every token of the shared vocabulary, or the answer words (verbalizers)
    # and one category for the rest, each model with its own tokenizer (a teacher from another family)
    distil_over: str = one_of("vocabulary", "verbalizers", default="vocabulary")
    # one round per context, each taught by the previous round's student with that context (Snell eq. 3)
    sequential: bool = False
    schema_name: ClassVar[str] = "base_distill"

    @classmethod
    def unread(cls, m: DictConfig) -> dict[str, str]:
        unread = unread_beta(m)
        if m.top_k is None:
            unread["method.top_k_rest"] = "method.top_k_rest is the rest of a top-k teacher (method.top_k=null)"
        if m.answer != "teacher_generation":
            unread["method.max_answer_tokens"] = (
                f"method.max_answer_tokens is answer=teacher_generation's (method.answer={m.answer})"
            )
        if m.teacher == "live":
            unread["method.teacher_cache"] = "a live teacher is the student at every step (method.teacher=live)"
        if m.teacher == "live" or m.teacher_cache != "disk":
            unread["method.teacher_cache_dir"] = "only a frozen teacher's targets cached on disk are kept there"
        return unread

    @classmethod
    def check(cls, m: DictConfig, cfg: DictConfig) -> None:
        require(0 <= m.beta <= 1, "method.beta", f"must be in [0, 1], got {m.beta}", "")
        require(m.temperature > 0, "method.temperature", f"must be positive, got {m.temperature}", "")
        require_count(m.top_k, "method.top_k", "null: the whole vocabulary")
        require(
            m.max_answer_tokens >= 1,
            "method.max_answer_tokens",
            f"must be >= 1, got {m.max_answer_tokens}",
            "It is the length of the teacher's generated answer span (method.answer=teacher_generation)",
        )
        if m.divergence == "uld":
            require(
                m.answer == "teacher_generation",
                "method.divergence",
                "uld aligns the teacher's generated answer with the student's tokens of the same text; at the "
                "label position, compare the answer words instead",
                "Set method.answer=teacher_generation, or method.distil_over=verbalizers with another divergence",
            )
            require(
                m.distil_over == "vocabulary" and m.teacher == "frozen" and m.teacher_cache != "none",
                "method.divergence",
                "uld compares each model's whole (sorted) distribution from a frozen teacher's targets computed "
                f"before training (got distil_over={m.distil_over}, teacher={m.teacher}, "
                f"teacher_cache={m.teacher_cache})",
                "Set method.distil_over=vocabulary, method.teacher=frozen and method.teacher_cache=disk or memory",
            )
        require(
            m.top_k is None or m.top_k_rest == "bucket" or m.divergence == "forward_kl",
            "method.top_k",
            "a renormalised top-k teacher leaves zero-probability tokens, which only forward KL tolerates",
            "Set method.top_k_rest=bucket, method.divergence=forward_kl or method.top_k=null",
        )
        require(
            m.teacher == "frozen" or m.answer == "label_position",
            "method.teacher",
            "a live teacher is supported with answer=label_position only",
            "Set method.answer=label_position",
        )
        require(
            m.teacher == "frozen" or m.teacher_model is None,
            "method.teacher",
            "a live teacher is the student itself, so it cannot be another model (method.teacher_model)",
            "Set method.teacher=frozen, or method.teacher_model=null",
        )
        cls.check_separate_teacher(m)
        if m.distil_over == "verbalizers":
            require(
                cfg.dataset.kind == "classification",
                "method.distil_over",
                f"verbalizers are the answer words of a classification dataset; dataset={cfg.dataset.name} is of "
                f"kind {cfg.dataset.kind}",
                "Use a classification dataset (e.g. dataset=synthetic), or method.distil_over=vocabulary",
            )
            require(
                m.answer == "label_position",
                "method.distil_over",
                "the answer words are compared at the position that predicts the label word; a generated answer "
                "(answer=teacher_generation) is distilled across tokenizers by the sorted comparison of ULD",
                "Set method.answer=label_position, or method.distil_over=vocabulary method.divergence=uld",
            )
            require(
                m.teacher == "frozen" and m.top_k is None,
                "method.distil_over",
                "verbalizers need a frozen teacher and no top_k (the answer words and the rest are the whole support)",
                "Set method.teacher=frozen and method.top_k=null",
            )
        require(
            cfg.dataset.kind != "generation" or m.answer == "teacher_generation",
            "method.answer",
            f"label_position distils the one token after the prompt, and dataset={cfg.dataset.name}'s answers are "
            "free text of several tokens (kind generation): with a scratchpad context that token opens the "
            "teacher's scratchpad, not its answer",
            "Set method.answer=teacher_generation (the teacher's generated answer), or use method=scratchpad",
        )

    @classmethod
    def check_training(cls, m: DictConfig, cfg: DictConfig) -> None:
        # the rounds of sequential distillation are training's: its trained student is evaluated on any task
        if m.sequential:
            contexts = cfg.dataset.context.num_contexts
            require(
                contexts >= 2,
                "dataset.context.num_contexts",
                f"is {contexts}, and method.sequential=true (method={m.name}) distils one context per round: with one "
                "context it is plain cd",
                "Give two or more contexts (dataset.context.num_contexts=2), or use method=cd",
            )
            require(
                m.teacher == "frozen" and m.teacher_cache != "none",
                "method.sequential",
                "each round's teacher is the previous round's student frozen for the round, its targets computed "
                f"before the round (got method.teacher={m.teacher}, method.teacher_cache={m.teacher_cache})",
                "Set method.teacher=frozen and method.teacher_cache=disk or memory",
            )
            require(
                m.teacher_model is None,
                "method.teacher_model",
                "sequential rounds after the first are taught by the student itself (its own tokenizer), not by "
                "another model",
                "Set method.teacher_model=null with method.sequential=true",
            )
            require(
                cfg.model.adapter != "prefix",
                "model.adapter",
                "a trained prefix cannot teach with another context after it in the prompt",
                "Use model.adapter=lora or full with method.sequential=true",
            )


@contextlib.contextmanager
def frozen_as_is(model: torch.nn.Module):
    """``model`` with its adapter on, in eval mode and without gradients (a teacher that is a trained student)."""
    with evaluation_mode(model), torch.no_grad():
        yield model


def trainable_digest(model: torch.nn.Module) -> str:
    """A hash of the trainable weights' values: the key of targets that a trained student computed."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def uld_alignment(tokenizer, teacher_tokenizer, span: list[int]) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """The student's tokens of the teacher's answer ``span`` (the same ids when the tokenizer is the same) and
    the groups of (student, teacher) positions that write the same piece of its text."""
    student_span = span if teacher_tokenizer is tokenizer else retokenized(teacher_tokenizer, span, tokenizer)
    return student_span, tokenization_groups(tokenizer, student_span, teacher_tokenizer, span)


class ContextDistillation(Method):
    trained_weights = "adapter"

    def __init__(
        self,
        name: str,
        divergence: str,
        beta: float,
        temperature: float,
        top_k: Optional[int],
        top_k_rest: str,
        answer: str,
        max_answer_tokens: int,
        teacher: str,
        teacher_cache: str,
        teacher_cache_dir: Optional[str],
        teacher_model: Optional[dict],
        distil_over: str,
        sequential: bool,
        uld_crossentropy_weight: float,
        uld_hybrid: bool,
        uld_hybrid_weights: Optional[list[float]],
    ):
        super().__init__(name)
        self.teacher_model = None if teacher_model is None else OmegaConf.create(teacher_model)
        self.over_verbalizers = distil_over == "verbalizers"
        self.uld, self.uld_crossentropy_weight = divergence == "uld", uld_crossentropy_weight
        # per query, uld's (student positions, teacher positions) groups that write the same piece of the answer
        self._groups: dict[str, list[tuple[list[int], list[int]]]] = {}
        self.uld_hybrid, self.uld_hybrid_weights = uld_hybrid, uld_hybrid_weights
        # with uld_hybrid: (student ids, teacher ids) of the shared tokens, and the [shared, other] weights
        self._shared: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._hybrid_weights: Optional[tuple[float, float]] = None
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
        self.sequential = sequential
        self.round = 0

    def rounds(self, task):
        return len(task.contexts) if self.sequential else 1

    def begin_round(self, index):
        self.round = index
        self._spans, self._targets, self._groups = {}, {}, {}

    def train_examples(self, task):
        return task.train_queries

    def trains_on(self, example):
        return not self.uld or bool(self._groups.get(example.uid))

    def check_inputs(self, task, tokenizer, cfg):
        super().check_inputs(task, tokenizer, cfg)
        check_context_to_distil(task, self.train_examples(task), self.teacher_model)

    def check_teacher(self, cfg, task, tokenizer, teacher_tokenizer):
        if self.uld:  # sorted probabilities need no shared vocabulary
            return
        if not self.over_verbalizers:
            try:
                return super().check_teacher(cfg, task, tokenizer, teacher_tokenizer)
            except ModelLoadError as e:
                raise ModelLoadError(
                    f"{e} For a classification dataset, distil over the answer words instead: "
                    "method.distil_over=verbalizers"
                ) from e
        for who, tok in (("model", tokenizer), ("method.teacher_model", teacher_tokenizer)):
            ids = [tok(v, add_special_tokens=False).input_ids for v in task.verbalizers]
            if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != len(ids):
                raise ModelLoadError(
                    f"method.distil_over=verbalizers: {who}'s tokenizer writes the answer words {task.verbalizers} "
                    f"as {ids}; each must be one token of its own. Choose single-token answer words "
                    "(dataset.verbalizers)"
                )

    def _word_ids(self, tokenizer, task) -> list[int]:
        return [tokenizer(v, add_special_tokens=False).input_ids[0] for v in task.verbalizers]

    def _targets_from_logits(self, logits: torch.Tensor, answer_ids: torch.Tensor):
        """The teacher's targets from its logits at the answer positions, as the batched fields of
        :class:`TeacherTargets` after the span: its distribution over the vocabulary (or top k), over the answer
        words and the rest, or (uld) its sorted log-probabilities (the first k; with uld_hybrid, of the tokens
        the student's vocabulary does not share), the log-probability of each answer token and (uld_hybrid)
        the log-probabilities of the shared tokens."""
        if self.uld:
            shared = None if self._shared is None else self._shared[1]
            ordered, token_logprobs, shared_logprobs = uld_teacher_targets(
                logits, answer_ids, self.temperature, self.top_k, shared
            )
            return ordered, None, token_logprobs, shared_logprobs
        if self.over_verbalizers:
            return answer_word_distribution(logits, self._teacher_word_ids, self.temperature), None, None, None
        return *teacher_distribution(logits, self.temperature, self.top_k), None, None

    @torch.no_grad()
    def prepare(self, handle, tokenizer, task, examples, batch_size):
        if self.live_teacher:
            self._spans = {e.uid: [tokenizer.pad_token_id] for e in examples}
            return
        self._teacher_tokenizer = teacher_tokenizer = handle.teacher_tokenizer or tokenizer
        if self.over_verbalizers:
            self._student_word_ids = self._word_ids(tokenizer, task)
            self._teacher_word_ids = self._word_ids(teacher_tokenizer, task)
        if self.uld_hybrid:
            self._shared, self._hybrid_weights = gold_shared_tokens(
                handle.base,
                handle.separate_teacher or handle.base,
                tokenizer,
                teacher_tokenizer,
                self.uld_hybrid_weights,
            )
        # sequential: every query with this round's context; else each query's own
        context = task.contexts[self.round] if self.sequential else None
        prompts = [task.teacher_prompt(e, context) for e in examples]
        settings = {
            "answer": self.answer,
            "max_answer_tokens": self.max_answer_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            # the answer words' tokens in the teacher's tokenizer (the teacher's identity covers its tokenizer)
            **({"verbalizers": list(task.verbalizers)} if self.over_verbalizers else {}),
            **({"targets": "sorted"} if self.uld else {}),
            # the shared tokens, which the student's vocabulary decides too
            **({"shared": hashlib.sha256(self._shared[1].numpy().tobytes()).hexdigest()[:16]} if self._shared else {}),
        }
        cache = TeacherCache(
            self.teacher_cache_dir if self.teacher_cache == "disk" else None,
            handle.identity + (f"+trained:{trainable_digest(handle.base)}" if self.round else ""),
            settings,
            os.path.commonprefix(prompts),
        )
        if self.teacher_cache == "none":  # targets come at every step; only the spans and the prefix now
            with handle.teacher() as teacher:
                self._prefix = SharedPrefix(teacher, teacher_tokenizer, prompts)
                spans = self._answer_spans(teacher, teacher_tokenizer, prompts, batch_size, self._prefix)
            self._spans = {e.uid: span for e, span in zip(examples, spans)}
            return
        todo = [i for i, prompt in enumerate(prompts) if cache.get(prompt) is None]
        if todo:
            todo_prompts = [prompts[i] for i in todo]
            with saved_on_exit(cache), self._round_teacher(handle) as teacher:
                prefix = SharedPrefix(teacher, teacher_tokenizer, todo_prompts)
                spans = self._answer_spans(teacher, teacher_tokenizer, todo_prompts, batch_size, prefix)
                for start in progress_bar(range(0, len(todo), batch_size), desc="teacher targets", leave=False):
                    chunk = slice(start, start + batch_size)
                    batch = encode(teacher_tokenizer, todo_prompts[chunk], spans[chunk], prefix_length=prefix.length)
                    logits = answer_logits(teacher, batch, prefix).cpu()
                    fields = self._targets_from_logits(logits, batch["answer_ids"])
                    self.teacher_forwards += 1
                    for j, (prompt, span) in enumerate(zip(todo_prompts[chunk], spans[chunk])):
                        keep = slice(logits.shape[1] - len(span), None)  # right-aligned span positions
                        cache.put(
                            prompt, TeacherTargets(span, *(f if f is None else f[j, keep].clone() for f in fields))
                        )
        for example, prompt in zip(examples, prompts):
            self._targets[example.uid] = cache.get(prompt)
            # the teacher's span tokens; the student's span is the same single position with its own tokenizer
            self._spans[example.uid] = [tokenizer.pad_token_id] if self.over_verbalizers else cache.get(prompt).span
            if self.uld:
                self._spans[example.uid], self._groups[example.uid] = uld_alignment(
                    tokenizer, teacher_tokenizer, cache.get(prompt).span
                )
        unaligned = sum(not groups for groups in self._groups.values())
        if unaligned:
            log.warning(
                "method.divergence=uld: %d of %d teacher answers have no piece of text that both tokenizations "
                "end on (an empty answer, or text one tokenizer decodes differently); they are not trained on",
                unaligned,
                len(examples),
            )

    def _round_teacher(self, handle):
        """The frozen base model; in a sequential round after the first, the student as the last round left it."""
        return frozen_as_is(handle.base) if self.round else handle.teacher()

    def _answer_spans(self, teacher, tokenizer, prompts, batch_size, prefix):
        if self.answer == "teacher_generation":  # the greedy answer, up to the end of its line
            ends = end_tokens(teacher, tokenizer)
            return [
                strip_stop(tokenizer, c, ends=ends) or c
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
        if self.uld:  # rows' targets and groups differ in length; the loss takes them row by row
            batch["uld_targets"] = [(self._targets[e.uid], self._groups[e.uid]) for e in examples]
            return batch
        if not self._targets:  # targets at every step, from the teacher's own inputs
            prefix_length = self._prefix.length if self._prefix else 0
            teacher_tokenizer = tokenizer if self.live_teacher else self._teacher_tokenizer
            batch["teacher_inputs"] = encode(
                teacher_tokenizer,
                [task.teacher_prompt(e) for e in examples],
                [[teacher_tokenizer.pad_token_id]] * len(examples) if self.over_verbalizers else spans,
                prefix_length=prefix_length,
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
        return self._targets_from_logits(logits, inputs["answer_ids"])[:2]

    def _uld_loss(self, student: torch.Tensor, batch) -> tuple[torch.Tensor, dict]:
        """Cross-entropy on the teacher's answer in the student's tokens, plus the ULD distance of each aligned
        group's sorted probabilities (averaged over a row's groups, then over the rows, as TRL's GOLD does).
        With uld_hybrid, the distance is GOLD's: the weighted sum of the generalised JSD over the shared
        tokens' (unnormalised) probabilities and the sorted distance over the others'."""
        answer_ids, mask = batch["answer_ids"].to(student.device), batch["answer_mask"].to(student.device)
        crossentropy = answer_cross_entropy(student, answer_ids, mask)
        probs = (student / self.temperature).softmax(-1)
        token_probs = probs.gather(-1, answer_ids.unsqueeze(-1)).squeeze(-1)
        shared_ids = None if self._shared is None else self._shared[0].to(probs.device)
        distances, shared_terms, sorted_terms = [], [], []
        for row, (targets, groups) in enumerate(batch["uld_targets"]):
            at = slice(mask.shape[1] - int(mask[row].sum()), None)  # the row's right-aligned span
            teacher = (targets.logprobs, targets.span_logprobs, targets.shared_logprobs)
            distance, shared_term, sorted_term = uld_distance(
                probs[row, at],
                token_probs[row, at],
                groups,
                *(None if t is None else t.to(probs.device) for t in teacher),
                student_shared_ids=shared_ids,
                top_k=self.top_k,
                weights=self._hybrid_weights or (0.0, 1.0),
                beta=self.beta,
            )
            distances.append(distance)
            if shared_term is not None:
                shared_terms.append(shared_term.item())
                sorted_terms.append(sorted_term.item())
        distance = torch.stack(distances).mean()
        stats = {"uld_crossentropy": crossentropy.item(), "uld_distance": distance.item()}
        if shared_terms:
            stats |= {"uld_shared_jsd": sum(shared_terms) / len(shared_terms)}
            stats |= {"uld_sorted_distance": sum(sorted_terms) / len(sorted_terms)}
        return self.uld_crossentropy_weight * crossentropy + distance, stats

    def loss(self, handle, batch):
        student = answer_logits(handle.student, batch)
        if self.uld:
            return self._uld_loss(student, batch)
        if self.over_verbalizers:  # the same categories as the teacher's targets, at temperature T
            student = answer_word_distribution(student, self._student_word_ids, self.temperature)
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
            1.0 if self.over_verbalizers else self.temperature,  # already applied to both distributions
            indices,
            self.top_k_rest,
        )
        return loss, {}
