"""Stage 2 of contextualization distillation (Li et al. 2024): KGC students with an auxiliary task.

- ``kgbert`` / ``kgbert_cd`` (discriminative, KG-BERT): an encoder scores ``[CLS] h [SEP] r [SEP] t [SEP]``
  as true or corrupted (binary cross-entropy). As released, each positive gets ``negatives`` corruptions of
  its head or of its tail (a coin flip per positive), drawn once; positives and negatives are shuffled
  together into batches of rows (``training_rows=drawn_once``). ``aux_weight`` > 0 adds *reconstruction*,
  masked-LM on the context of each row's positive (15% of its tokens, 80% [MASK] / 10% random / 10% kept):
  L = kgc_weight * L_KGC + aux_weight * L_MLM.
- ``kgs2s`` / ``kgs2s_cd`` (generative, KG-S2S): a seq2seq model fills T5's sentinel in the released
  query, ``h [description] | r | <extra_id_0>`` (tails) or ``<extra_id_0> | r | t [description]`` (heads),
  with ``<extra_id_0>name[description]<extra_id_1>``; ``aux_weight`` > 0 prefixes ``predict: `` and adds
  *contextualization*, generating the context from the query (``context_input=query``, the released code)
  or from ``contextualize: h | r | t`` (``triple``). The released code: 0.5 * L_KGC + 0.5 * L_ctx.

Both rank candidates with the scorer they hand to :class:`ctxdistill.ranking.LinkPredictionEvaluator`:
KG-BERT by its triple score (a cross-encoder: every (query, candidate) pair is one forward pass; the
entities' token ids are cached), KG-S2S by the log-likelihood of each candidate's target, with the
query encoded once and its encoder states reused by every candidate.
"""

from __future__ import annotations

import logging
import math
import random
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Hashable, Iterable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import MISSING, DictConfig
from transformers.modeling_outputs import BaseModelOutput

from ctxdistill.config import ConfigError, MethodConfig, model_label, one_of, require
from ctxdistill.data.kg import KGTask, Triple, build_kg_task, missing_contexts
from ctxdistill.methods.base import Method
from ctxdistill.models import WrappedModel, evaluation_mode
from ctxdistill.ranking import LinkPredictionEvaluator, ranking_prefix

log = logging.getLogger(__name__)


@dataclass
class KGCStudentConfig(MethodConfig):
    """Stage 2: a KGC student trained on the triples, with an auxiliary task on the contexts."""

    _target_: str = MISSING
    aux_weight: float = 1.0  # weight of the auxiliary loss on the contexts; 0: the baseline without it
    kgc_weight: float = 1.0
    max_length: int = 64  # tokens of a triple's input
    context_max_length: int = 128  # tokens of a context
    dataset_kinds: ClassVar[tuple[str, ...]] = ("knowledge_graph",)
    dataset_example: ClassVar[str] = "dataset=kg_synthetic, wn18rr or fb15k237n"

    @classmethod
    def check(cls, m: DictConfig, cfg: DictConfig) -> None:
        require(
            m.aux_weight >= 0 and m.kgc_weight >= 0,
            "method.aux_weight / method.kgc_weight",
            "must be >= 0",
            "Set method.aux_weight=0 for the baseline without the auxiliary task",
        )
        for key in ("max_length", "context_max_length"):
            require(m[key] >= 2, f"method.{key}", f"must be >= 2 tokens, got {m[key]}", "It counts special tokens")

    @classmethod
    def unread(cls, m: DictConfig) -> dict[str, str]:
        """The contexts' settings where no auxiliary task reads the contexts."""
        if m.aux_weight > 0 or m.get("reconstruction_weight", 0) > 0:
            return {}
        return {"method.context_max_length": "method.aux_weight=0 trains without the contexts"}


@dataclass
class KGBertConfig(KGCStudentConfig):
    """Discriminative (KG-BERT): triple classification plus masked-LM reconstruction of the context."""

    _target_: str = "ctxdistill.methods.kgc.KGBert"
    negatives: int = 5  # corrupted triples per positive: all its heads or all its tails (a coin flip per positive)
    # drawn_once (the released code): the positives and their negatives are rows drawn once before training,
    # shuffled together into batches of trainer.batch_size rows, each row with its own masked copy of its
    # positive's context (masked once too). fresh_per_batch: a batch is trainer.batch_size positives, each with
    # negatives drawn anew and one masked copy of its context (more distinct negatives, 1/(1+negatives) of
    # the reconstruction cost).
    training_rows: str = one_of("drawn_once", "fresh_per_batch", default="drawn_once")
    # A training triple without a context: random (another triple's context, drawn once; the released code)
    # or error (stop before training). With no context at all the auxiliary task always stops.
    missing_context: str = one_of("random", "error", default="random")
    mlm_probability: float = 0.15  # of which 80% [MASK], 10% random, 10% kept
    use_descriptions: bool = True  # entity text = name + description, as KG-BERT
    schema_name: ClassVar[str] = "base_kgbert"
    architectures: ClassVar[tuple[str, ...]] = ("masked_lm",)  # an encoder scores the triple, its MLM head masks

    @classmethod
    def check(cls, m: DictConfig, cfg: DictConfig) -> None:
        super().check(m, cfg)
        require(
            0 < m.mlm_probability < 1,
            "method.mlm_probability",
            f"must be in (0, 1), got {m.mlm_probability}",
            "The paper masks 0.15",
        )
        require(m.negatives >= 1, "method.negatives", f"must be >= 1, got {m.negatives}", "")

    @classmethod
    def unread(cls, m: DictConfig) -> dict[str, str]:
        reason = "method.aux_weight=0 trains without reconstructing the contexts"
        keys = ("mlm_probability", "missing_context") if m.aux_weight == 0 else ()
        return super().unread(m) | {f"method.{key}": reason for key in keys}


@dataclass
class KGS2SConfig(KGCStudentConfig):
    """Generative (KG-S2S): generate the missing entity (name and description), plus generating the context."""

    _target_: str = "ctxdistill.methods.kgc.KGS2S"
    max_target_length: int = 512
    # Entity descriptions in the query and in the target, as the released -src_descrip_max_length /
    # -tgt_descrip_max_length: N keeps the first N - 1 tokens (N counts T5's end-of-sequence token); 0: none.
    source_description_tokens: int = 40
    target_description_tokens: int = 10
    # What the contextualization task generates the context from: query (the link-prediction query, as the
    # released code does by mistake) or triple ("contextualize: h | r | t", its intent; easier, as it holds
    # the answer).
    context_input: str = one_of("query", "triple", default="query")
    # The released -seq_dropout: while training, each token of a link-prediction query is hidden from attention
    # with this probability, except the separators "|" and the sentinel (0.1 on WN18RR, 0.2 on FB15k-237N).
    source_token_dropout: float = 0.0
    # The released -use_soft_prompt -use_rel_prompt_emb: four trained embeddings per relation in the encoder's
    # input, one before and one after the known entity's text and the relation's text.
    relation_prompts: bool = False
    # The released -reconstruction: T5 span corruption of the triple's context (3-token spans hidden behind
    # sentinels until 15% of its tokens are), generated back; this is its loss weight (0.5 in the released loss;
    # 0: off). The released FB15k-237N run had it on.
    reconstruction_weight: float = 0.0
    # What the reconstruction target spells after each sentinel: tokens (the hidden tokens, T5's objective) or
    # id_digits (their token ids written out as decimal numbers: the released code's target, by mistake).
    reconstruction_target: str = one_of("tokens", "id_digits", default="tokens")
    schema_name: ClassVar[str] = "base_kgs2s"
    architectures: ClassVar[tuple[str, ...]] = ("seq2seq_lm",)  # the decoder fills the encoder's sentinel

    @classmethod
    def check(cls, m: DictConfig, cfg: DictConfig) -> None:
        super().check(m, cfg)
        for key in ("source_description_tokens", "target_description_tokens"):
            require(m[key] >= 0, f"method.{key}", f"must be >= 0, got {m[key]}", "0 leaves descriptions out")
        require(
            0 <= m.source_token_dropout < 1,
            "method.source_token_dropout",
            f"must be in [0, 1), got {m.source_token_dropout}",
            "It is the probability of hiding each query token; 0 hides none",
        )
        require(
            m.reconstruction_weight >= 0,
            "method.reconstruction_weight",
            f"must be >= 0, got {m.reconstruction_weight}",
            "0 leaves the reconstruction task out",
        )
        require(
            m.max_target_length >= 2,
            "method.max_target_length",
            f"must be >= 2 tokens, got {m.max_target_length}",
            "It counts the end-of-sequence token",
        )

    @classmethod
    def unread(cls, m: DictConfig) -> dict[str, str]:
        unread = super().unread(m)
        if m.aux_weight == 0:
            unread["method.context_input"] = "method.aux_weight=0 trains without generating the contexts"
        if m.reconstruction_weight == 0:
            unread["method.reconstruction_target"] = "method.reconstruction_weight=0 leaves the reconstruction out"
        return unread


def mask_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: each maskable token is chosen with ``probability``; of those 80% become [MASK],
    10% a random token, 10% stay. Returns (inputs, labels) with labels -100 where nothing is predicted.
    A row with no token chosen gets one, so every context contributes to the loss."""
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & maskable
    for row in torch.nonzero(~chosen.any(-1) & maskable.any(-1)).flatten().tolist():
        candidates = torch.nonzero(maskable[row]).flatten()
        chosen[row, candidates[torch.randint(len(candidates), (1,), generator=generator)]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    roll = torch.rand(input_ids.shape, generator=generator)
    inputs = input_ids.clone()
    inputs[chosen & (roll < 0.8)] = mask_token_id
    randomised = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[randomised] = torch.randint(vocab_size, input_ids.shape, generator=generator)[randomised]
    return inputs, labels


def pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def count_shared(values: Iterable) -> int:
    """How many items have a value that another item has too."""
    counts = Counter(values)
    return sum(n for n in counts.values() if n > 1)


DIRECTIONS = ("tail", "head")  # the two queries of a triple: its missing tail, its missing head
RECONSTRUCTION_SPAN, RECONSTRUCTION_FRACTION = 3, 0.15  # KG-S2S/data.py, build_reconstruction


def span_count(length: int) -> int:
    """The spans that hide 15% of ``length`` tokens (rounded down) or a little more."""
    return math.ceil(int(length * RECONSTRUCTION_FRACTION) / RECONSTRUCTION_SPAN)


def sentinel_tokens(count: int) -> list[str]:
    return [f"<extra_id_{i}>" for i in range(count)]


def corrupt_spans(ids: list[int], sentinels: Sequence[int], rng: random.Random) -> tuple[list[int], list[list[int]]]:
    """T5 span corruption as KG-S2S's reconstruction does it: 3-token spans, none in the last two tokens (the
    end-of-sequence token and the one before), until 15% of ``ids`` (rounded down) are hidden; each span is
    replaced by a sentinel, numbered in reading order. Spans never overlap (the released code lets a span swallow
    an earlier sentinel). Returns the corrupted ids and the hidden spans in reading order."""
    starts: list[int] = []
    for _ in range(span_count(len(ids))):
        free = [s for s in range(len(ids) - 4) if all(abs(s - t) >= RECONSTRUCTION_SPAN for t in starts)]
        if not free:
            break
        starts.append(rng.choice(free))
    corrupted, spans, position = [], [], 0
    for number, start in enumerate(sorted(starts)):
        corrupted += [*ids[position:start], sentinels[number]]
        spans.append(ids[start : start + RECONSTRUCTION_SPAN])
        position = start + RECONSTRUCTION_SPAN
    return corrupted + ids[position:], spans


class KGCStudent(Method):
    """What both students share: training triples, the context check, the ranking evaluation."""

    trained_weights = "all"
    #: a training triple without a context: "error" stops before training, "random" lends it another's
    missing_context = "error"

    def __init__(
        self,
        name: str,
        aux_weight: float,
        kgc_weight: float,
        max_length: int,
        context_max_length: int,
    ):
        super().__init__(name)
        self.aux_weight, self.kgc_weight = aux_weight, kgc_weight
        self.max_length, self.context_max_length = max_length, context_max_length
        self.generator = torch.Generator()

    def build_task(self, dataset, seed):
        task = build_kg_task(dataset, seed)
        self.objective = f"eval/{ranking_prefix(task.eval_candidates)}mrr"
        return task

    def train_examples(self, task):
        return task.train_triples

    @property
    def context_weights(self) -> dict[str, float]:
        """The loss weights of the training tasks that read the triples' contexts, by setting."""
        return {"aux_weight": self.aux_weight}

    @property
    def uses_contexts(self) -> bool:
        return any(weight > 0 for weight in self.context_weights.values())

    def check_inputs(self, task, tokenizer, cfg):
        if not self.uses_contexts:
            return
        missing = missing_contexts(task)
        where = task.contexts_file or "(dataset.contexts_file is null)"
        if 2 * len(missing) > len(task.train_triples) and task.contexts:  # most would train on another's context
            raise ConfigError(
                f"{len(missing)} of the {len(task.train_triples)} training triples have no context in {where}: it "
                "holds the contexts of another training set (a subsample's, dataset.num_train, which writes the "
                "same default file), and method.missing_context=random fills gaps, not most of the set. Write "
                f"this set's contexts first (ctxdistill method=contextualization dataset={task.name} with the same "
                "dataset settings; the contexts written before are reused) or point dataset.contexts_file at a "
                "file that has them"
            )
        if missing and self.missing_context == "random" and task.contexts:
            log.warning(
                "%d of the %d training triples have no context; each gets another triple's context, drawn "
                "once (method.missing_context=random, as the released code)",
                len(missing),
                len(task.train_triples),
            )
        elif missing:
            raise ConfigError(
                f"{len(missing)} of the {len(task.train_triples)} training triples have no context in {where} "
                f"(e.g. {missing[0]}). Write them first with the same dataset settings: ctxdistill "
                f"method=contextualization dataset={cfg.dataset.name} ..., point dataset.contexts_file at a file "
                f"that has them, or train the baseline without the contexts: "
                + " ".join(f"method.{key}=0" for key, weight in self.context_weights.items() if weight > 0)
            )

    def prepare(self, handle, tokenizer, task, examples, batch_size):
        # The run has seeded torch with its seed; masking and negative sampling follow it.
        self.generator.manual_seed(torch.initial_seed() % 2**63)
        self.rng = random.Random(torch.initial_seed())

    def state_dict(self):
        return {"generator": self.generator.get_state(), "rng": self.rng.getstate()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.rng.setstate(state["rng"])

    def evaluator(self, handle, tokenizer, task, batch_size):
        return LinkPredictionEvaluator(
            task, lambda queries, candidates: self.score(handle, tokenizer, task, queries, candidates, batch_size)
        )

    #: the auxiliary task's name in the logged losses
    aux_name = "aux"

    def loss(self, handle, batch):
        model = handle.student
        device = next(model.parameters()).device
        kgc = self.kgc_loss(model, batch, device)
        loss, extra = self.kgc_weight * kgc, {"kgc_loss": kgc.item()}
        if self.aux_weight > 0:
            aux = self.aux_loss(model, batch, device)
            loss = loss + self.aux_weight * aux
            extra[f"{self.aux_name}_loss"] = aux.item()
        return loss, extra

    def kgc_loss(self, model, batch, device) -> torch.Tensor:
        raise NotImplementedError

    def aux_loss(self, model, batch, device) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score(
        self,
        handle,
        tokenizer,
        task: KGTask,
        queries: Sequence[tuple[Triple, str]],
        candidates: Sequence[Sequence[str]],
        batch_size: int,
    ) -> list[torch.Tensor]:
        """One score per candidate entity of each query (higher: more plausible), ``batch_size`` candidates per
        forward pass (trainer.eval_batch_size)."""
        model = handle.base
        device = next(model.parameters()).device
        with evaluation_mode(model):
            return [
                self.score_distinct(model, tokenizer, task, triple, direction, names, batch_size, device)
                for (triple, direction), names in zip(queries, candidates)
            ]

    def score_distinct(
        self,
        model,
        tokenizer,
        task: KGTask,
        triple: Triple,
        direction: str,
        names: Sequence[str],
        batch_size: int,
        device,
    ) -> torch.Tensor:
        """:meth:`score_query` of each distinct candidate input once. Entities the student cannot tell apart
        (they share a name) must tie, and scored apart they would not: a batch's padding changes a score's last
        bits, so one of them would rank above the other by chance."""
        inputs = [self.candidate_input(tokenizer, task, entity) for entity in names]
        first: dict = {}  # input -> the first candidate that has it
        for entity, candidate_input in zip(names, inputs):
            first.setdefault(candidate_input, entity)
        position = {candidate_input: i for i, candidate_input in enumerate(first)}
        candidates = list(first.values())
        scores = self.score_query(model, tokenizer, task, triple, direction, candidates, batch_size, device)
        return scores[[position[candidate_input] for candidate_input in inputs]]

    def candidate_input(self, tokenizer, task: KGTask, entity: str) -> Hashable:
        """What the student reads of a candidate entity: equal for two candidates it cannot tell apart."""
        raise NotImplementedError

    def score_query(self, model, tokenizer, task, triple, direction, names, batch_size: int, device) -> torch.Tensor:
        """One score per entity in ``names`` for ``triple``'s ``direction``, ``batch_size`` candidates a pass."""
        raise NotImplementedError


def save_wrapped(
    model, model_key: str, part: torch.nn.Module, part_key: str, part_file: Path, state_dict: Optional[dict]
) -> None:
    """Saves a wrapper of a pretrained ``model`` (the wrapper's attribute ``model_key``) and its own ``part``
    (attribute ``part_key``): the model as from_pretrained reads it, the part to ``part_file`` beside it."""
    if state_dict is None:
        model.save_pretrained(part_file.parent)
        torch.save(part.state_dict(), part_file)
        return
    own = {key.split(".", 1)[0]: {} for key in state_dict}
    for key, value in state_dict.items():
        prefix, _, rest = key.partition(".")
        own[prefix][rest] = value
    model.save_pretrained(part_file.parent, state_dict=own[model_key])
    torch.save(own[part_key], part_file)


# ---------------------------------------------------------------- discriminative
class TripleScorer(WrappedModel):
    """A masked-LM encoder with a triple-plausibility head on its first ([CLS]) position."""

    def __init__(self, mlm: torch.nn.Module):
        super().__init__()
        self.mlm = mlm
        hidden = mlm.config.hidden_size
        self.dropout = torch.nn.Dropout(getattr(mlm.config, "hidden_dropout_prob", 0.1))
        self.head = torch.nn.Linear(hidden, 1)
        # The MLM head alone (transform + decoder), so masked positions are projected to the vocabulary
        # and the rest are not; architectures with a split head fall back to the whole forward pass.
        heads = [m for _, m in mlm.named_children() if m is not mlm.base_model]
        self.mlm_head = heads[0] if len(heads) == 1 else None

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        hidden = self.mlm.base_model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        return self.head(self.dropout(hidden[:, 0])).squeeze(-1)

    def mlm_loss(self, input_ids, attention_mask, labels) -> torch.Tensor:
        if self.mlm_head is None:
            return self.mlm(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        hidden = self.mlm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        chosen = labels != -100
        if not chosen.any():  # contexts without a single maskable token
            return hidden.sum() * 0
        return F.cross_entropy(self.mlm_head(hidden[chosen]).float(), labels[chosen])

    def save_pretrained(self, path: Path, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        save_wrapped(self.mlm, "mlm", self.head, "head", Path(path) / "triple_head.pt", state_dict)

    def load_trained(self, path: Path) -> None:  # in place: the MLM head stays the one referenced
        self.mlm.load_state_dict(type(self.mlm).from_pretrained(path).state_dict())
        self.head.load_state_dict(torch.load(Path(path) / "triple_head.pt", weights_only=True))


class TrainingRow(NamedTuple):
    """One scored triple of KG-BERT's training: a positive (label 1) or a corruption of it (label 0)."""

    triple: Triple
    label: float
    positive: Triple  # whose context the row carries
    number: Optional[int] = None  # its place among rows drawn once: seeds its context's masking


def fit_triple(lengths: Sequence[int], budget: int) -> list[int]:
    """KG-BERT's truncation of (head, relation, tail) token counts: while they exceed the budget, the strictly
    longest loses its last token; without a strictly longest one, the tail does."""
    lengths = list(lengths)
    while sum(lengths) > budget:
        h, r, t = lengths
        if h > r and h > t:
            lengths[0] -= 1
        elif r > h and r > t:
            lengths[1] -= 1
        elif t > 0:
            lengths[2] -= 1
        else:  # head and relation tie over an empty tail (KG-BERT would crash here)
            lengths[0] -= 1
    return lengths


class KGBert(KGCStudent):
    aux_name = "mlm"

    def __init__(
        self,
        name: str,
        negatives: int,
        training_rows: str,
        missing_context: str,
        mlm_probability: float,
        use_descriptions: bool,
        **kwargs,
    ):
        super().__init__(name, **kwargs)
        self.negatives, self.training_rows, self.missing_context = negatives, training_rows, missing_context
        self.mlm_probability, self.use_descriptions = mlm_probability, use_descriptions
        self._tokens: dict[str, list[int]] = {}

    def check_inputs(self, task, tokenizer, cfg):
        super().check_inputs(task, tokenizer, cfg)
        if self.uses_contexts and tokenizer.mask_token_id is None:
            raise ConfigError(
                f"{model_label(cfg.model)}: its tokenizer has no mask token, which reconstruction (method.aux_weight "
                "> 0) hides context tokens behind. Use a BERT-like encoder's (model=minilm-l6), or method.aux_weight=0"
            )

    def wrap_model(self, model, tokenizer):
        scorer = TripleScorer(model)
        self._with_segments = self.segments(scorer)
        return scorer

    def tokens(self, tokenizer, text: str) -> list[int]:
        """Token ids of an entity or relation text, cached (every candidate entity recurs in every query)."""
        if text not in self._tokens:
            self._tokens[text] = tokenizer(text, add_special_tokens=False).input_ids
        return self._tokens[text]

    def encode_triples(self, tokenizer, task: KGTask, triples: Sequence[Triple], segments: bool):
        """[CLS] h [SEP] r [SEP] t [SEP] with segments 0 / 1 / 0, cut to max_length as KG-BERT cuts it."""
        cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
        rows, types = [], []
        for h, r, t in triples:
            texts = (
                task.entity_text(h, self.use_descriptions),
                task.relation_text(r),
                task.entity_text(t, self.use_descriptions),
            )
            parts = [self.tokens(tokenizer, text) for text in texts]
            head, rel, tail = (p[:n] for p, n in zip(parts, fit_triple(list(map(len, parts)), self.max_length - 4)))
            rows.append([cls, *head, sep, *rel, sep, *tail, sep])
            types.append([0] * (len(head) + 2) + [1] * (len(rel) + 1) + [0] * (len(tail) + 1))
        batch = {"input_ids": pad_rows(rows, pad), "attention_mask": pad_rows([[1] * len(r) for r in rows], 0)}
        if segments:
            batch["token_type_ids"] = pad_rows(types, 0)
        return batch

    def corrupt(self, triple: Triple, entities: list[str], known: set[Triple], rng: random.Random) -> list[Triple]:
        """``negatives`` corruptions of a positive: all of its head or all of its tail (a coin flip, as the
        released code), each a random entity that makes no triple of the training split (the released code
        trains on the whole split; a subsample's left-out triples are true as well)."""
        h, r, t = triple
        head_side = rng.random() <= 0.5
        corrupted = []
        for _ in range(self.negatives):
            for _ in range(100):  # a tiny graph may have no unknown corruption left
                e = entities[rng.randrange(len(entities))]
                candidate = (e, r, t) if head_side else (h, r, e)
                if candidate not in known:
                    break
            corrupted.append(candidate)
        return corrupted

    def train_examples(self, task):
        if self.training_rows == "fresh_per_batch":
            return task.train_triples
        rng = random.Random(f"{task.seed}|negatives")  # drawn once: the same rows every epoch and on resuming
        known, entities = task.known_triples, task.graph.entities
        rows: list[TrainingRow] = []
        for positive in task.train_triples:
            for triple, label in ((positive, 1.0), *((n, 0.0) for n in self.corrupt(positive, entities, known, rng))):
                rows.append(TrainingRow(triple, label, positive, len(rows)))
        return rows

    def prepare(self, handle, tokenizer, task, examples, batch_size):
        super().prepare(handle, tokenizer, task, examples, batch_size)
        self._known, self._entities = task.known_triples, task.graph.entities
        # A triple without a context borrows one of the file's, drawn once (the released code).
        pool, draw = list(task.contexts.values()), random.Random(f"{task.seed}|contexts")
        self._contexts = (
            {t: task.contexts[t] if t in task.contexts else draw.choice(pool) for t in task.train_triples}
            if self.aux_weight > 0
            else {}
        )

    def masked_contexts(
        self, tokenizer, texts: list[str], generators: list[torch.Generator]
    ) -> dict[str, torch.Tensor]:
        """[CLS] context [SEP] cut to context_max_length tokens, each masked with its own generator."""
        enc = tokenizer(texts, truncation=True, max_length=self.context_max_length, return_special_tokens_mask=True)
        inputs, labels = [], []
        for ids, special, generator in zip(enc["input_ids"], enc["special_tokens_mask"], generators):
            masked, chosen = mask_tokens(
                torch.tensor([ids]),
                torch.tensor([special]) == 0,
                tokenizer.mask_token_id,
                len(tokenizer),
                self.mlm_probability,
                generator,
            )
            inputs.append(masked[0].tolist())
            labels.append(chosen[0].tolist())
        return {
            "input_ids": pad_rows(inputs, tokenizer.pad_token_id),
            "attention_mask": pad_rows([[1] * len(i) for i in inputs], 0),
            "labels": pad_rows(labels, -100),
        }

    def collate(self, tokenizer, task, examples):
        if self.training_rows == "drawn_once":  # rows; every one carries its own copy of its positive's context
            rows = carriers = examples
            generators = [
                torch.Generator().manual_seed(zlib.crc32(f"{task.seed}|{row.number}".encode())) for row in rows
            ]  # the same masks in every epoch
        else:  # positives; their negatives are drawn now, and each positive's context is masked once
            carriers = [TrainingRow(t, 1.0, t) for t in examples]
            rows = carriers + [
                TrainingRow(n, 0.0, t) for t in examples for n in self.corrupt(t, self._entities, self._known, self.rng)
            ]
            generators = [self.generator] * len(carriers)
        batch = {
            "triples": self.encode_triples(tokenizer, task, [row.triple for row in rows], self._with_segments),
            "labels": torch.tensor([row.label for row in rows]),
        }
        if self.aux_weight > 0:
            batch["context"] = self.masked_contexts(
                tokenizer, [self._contexts[row.positive] for row in carriers], generators
            )
        return batch

    @staticmethod
    def segments(scorer: TripleScorer) -> bool:
        """Whether the encoder has a second segment embedding (BERT does, RoBERTa does not)."""
        return getattr(scorer.mlm.config, "type_vocab_size", 1) > 1

    def kgc_loss(self, model, batch, device):
        logits = model(**{k: v.to(device) for k, v in batch["triples"].items()})
        return F.binary_cross_entropy_with_logits(logits.float(), batch["labels"].to(device))

    def aux_loss(self, model, batch, device):
        scorer = model.module if hasattr(model, "module") else model  # unwrap DistributedDataParallel
        return scorer.mlm_loss(**{k: v.to(device) for k, v in batch["context"].items()})

    def candidate_input(self, tokenizer, task, entity):
        return task.entity_text(entity, self.use_descriptions)

    def score_query(self, model, tokenizer, task, triple, direction, names, batch_size, device):
        h, r, t = triple
        pairs = [(h, r, e) if direction == "tail" else (e, r, t) for e in names]
        scores = []
        for start in range(0, len(pairs), batch_size):
            batch = self.encode_triples(tokenizer, task, pairs[start : start + batch_size], self.segments(model))
            scores.append(model(**{k: v.to(device) for k, v in batch.items()}).float().cpu())
        return torch.cat(scores)


# ---------------------------------------------------------------- generative
# T5's first two sentinel tokens: the released query marks the missing entity with the first, and the
# target is the entity between the two.
MISSING, END = "<extra_id_0>", "<extra_id_1>"
#: the relation prompts of each relation, as KG-S2S numbers its embeddings: rel_embed1, 2 around the relation's
#: text, rel_embed3, 4 around the known entity's
RELATION_BEFORE, RELATION_AFTER, ENTITY_BEFORE, ENTITY_AFTER = range(4)


class RelationPrompted(WrappedModel):
    """A seq2seq model whose encoder reads four trained embeddings per relation among the query's tokens
    (KG-S2S's soft prompts): a batch's ``prompt_mask`` marks their positions, ``prompt_ids`` (row by row, in
    position order) say which; the token ids at those positions are placeholders."""

    def __init__(self, model: torch.nn.Module, num_relations: int):
        super().__init__()
        self.model = model
        self.config = model.config
        self.prompts = torch.nn.Embedding(4 * num_relations, model.config.d_model)

    def embed(self, input_ids, prompt_mask, prompt_ids) -> torch.Tensor:
        tokens = self.model.get_input_embeddings()(input_ids)
        return tokens.masked_scatter(prompt_mask.unsqueeze(-1), self.prompts(prompt_ids).to(tokens.dtype))

    def encoder_states(self, input_ids, attention_mask, prompt_mask, prompt_ids) -> torch.Tensor:
        embeds = self.embed(input_ids, prompt_mask, prompt_ids)
        return self.model.get_encoder()(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids=None, attention_mask=None, prompt_mask=None, prompt_ids=None, **kwargs):
        if prompt_ids is None:  # the contextualization task's input, or the decoder alone after ranking's encoder
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        embeds = self.embed(input_ids, prompt_mask, prompt_ids)
        return self.model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    def save_pretrained(self, path: Path, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        save_wrapped(self.model, "model", self.prompts, "prompts", Path(path) / "relation_prompts.pt", state_dict)

    def load_trained(self, path: Path) -> None:
        self.model.load_state_dict(type(self.model).from_pretrained(path).state_dict())
        self.prompts.load_state_dict(torch.load(Path(path) / "relation_prompts.pt", weights_only=True))


def prompt_positions(direction: str, sep1: int, sep2: int, end: int) -> dict[int, int]:
    """Where KG-S2S puts a query's four relation prompts (KG-S2S/helper.py, get_soft_prompt_pos): token position
    -> the prompt inserted before it, for a query whose separators are tokens ``sep1`` and ``sep2`` and whose
    text ends before token ``end`` (its end-of-sequence token, if any)."""
    if direction == "tail":  # [E1] entity [E2] | [R1] relation [R2] | <extra_id_0>
        return {0: ENTITY_BEFORE, sep1: ENTITY_AFTER, sep1 + 1: RELATION_BEFORE, sep2: RELATION_AFTER}
    # <extra_id_0> | [R1] relation [R2] | [E1] entity [E2]
    return {sep1 + 1: RELATION_BEFORE, sep2: RELATION_AFTER, sep2 + 1: ENTITY_BEFORE, end: ENTITY_AFTER}


def encoder_states(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The encoder's output for a batch of queries, with relation prompts where the batch places them."""
    if "prompt_ids" in batch:
        return model.encoder_states(**batch)
    return model.get_encoder()(**batch).last_hidden_state


class KGS2S(KGCStudent):
    aux_name = "context"
    #: what marks the missing entity in a query (its position gives the direction)
    missing_marker = MISSING

    def __init__(
        self,
        name: str,
        max_target_length: int,
        source_description_tokens: int,
        target_description_tokens: int,
        context_input: str,
        source_token_dropout: float,
        relation_prompts: bool,
        reconstruction_weight: float,
        reconstruction_target: str,
        **kwargs,
    ):
        super().__init__(name, **kwargs)
        self.max_target_length = max_target_length
        self.source_description_tokens = source_description_tokens
        self.target_description_tokens = target_description_tokens
        self.context_input = context_input
        self.source_token_dropout = source_token_dropout
        self.relation_prompts = relation_prompts
        self.reconstruction_weight, self.reconstruction_target = reconstruction_weight, reconstruction_target
        self.relation_index: dict[str, int] = {}
        self._targets: dict[str, list[int]] = {}
        self._descriptions: dict[tuple[str, int], str] = {}

    def wrap_model(self, model, tokenizer):
        return RelationPrompted(model, len(self.relation_index)) if self.relation_prompts else model

    def build_task(self, dataset, seed):
        task = super().build_task(dataset, seed)
        self.relation_index = {r: i for i, r in enumerate(sorted(task.graph.relation_names))}
        return task

    @property
    def context_weights(self) -> dict[str, float]:
        return {**super().context_weights, "reconstruction_weight": self.reconstruction_weight}

    def check_inputs(self, task, tokenizer, cfg):
        super().check_inputs(task, tokenizer, cfg)
        described = {
            f"method.{key}={tokens}"
            for key in ("source_description_tokens", "target_description_tokens")
            if (tokens := getattr(self, key))
        }
        if described and not task.graph.entity_descriptions:  # every query and target would hold an empty "[]"
            raise ConfigError(
                f"{' and '.join(sorted(described))} ask for entity descriptions, and the {task.name} files give "
                "none (the kgs2s layout reads entityid2description.txt; the kgbert layout entity2textlong.txt or "
                "the text after dataset.source.name_separator). Point dataset.source.data_dir at files that have "
                "them, or rank by names alone: method.source_description_tokens=0 method.target_description_tokens=0"
            )
        if self.reconstruction_weight > 0:
            needed = span_count(self.context_max_length) + 1
            absent = [
                s
                for s in sentinel_tokens(needed)
                if tokenizer.convert_tokens_to_ids(s) in (None, tokenizer.unk_token_id)
            ]
            if absent:
                raise ConfigError(
                    f"method.reconstruction_weight: the reconstruction task hides spans behind T5's sentinels "
                    f"<extra_id_0> ... <extra_id_{needed - 1}>, and the tokenizer of {model_label(cfg.model)} lacks "
                    f"{absent[0]}. Use a T5 model (model=t5-base), or method.reconstruction_weight=0"
                )
        if self.queries_must_fit:
            self.check_query_lengths(task, tokenizer)
        entities = task.graph.entities
        shared = count_shared(tuple(self.entity_target(tokenizer, task, e)) for e in entities)
        if shared:
            log.warning(
                "%d of the %d entities (%.1f%%) share their target with another entity, so their ranks tie. "
                "Descriptions in the target (method.target_description_tokens) tell most apart; WN18RR's "
                "KG-S2S files name its entities 'lemma , POS , sense', unique as the released code has them "
                "(dataset.source.layout=kgs2s dataset.source.name_separator=null)",
                shared,
                len(entities),
                100 * shared / len(entities),
            )

    @property
    def queries_must_fit(self) -> bool:
        """Whether a query longer than method.max_length is refused instead of cut: the relation prompts sit
        around the query's separators, which a cut can remove (the released code fails on such a query)."""
        return self.relation_prompts

    @staticmethod
    def prompt(source: str) -> str:
        """The text the model reads for a query's :meth:`source`."""
        return source

    def check_query_lengths(self, task: KGTask, tokenizer) -> None:
        queries = [
            (t, d) for triples in (task.train_triples, *task.eval_sets.values()) for t in triples for d in DIRECTIONS
        ]
        texts = [self.prompt(self.source(tokenizer, task, t, d)) for t, d in queries]
        longest, (triple, _) = max(zip(map(len, tokenizer(texts).input_ids), queries), default=(0, (None, None)))
        if longest > self.max_length:
            raise ConfigError(
                f"a query of {longest} tokens (triple {triple}) exceeds method.max_length={self.max_length}: "
                f"raise it or shorten the descriptions (method.source_description_tokens)"
            )

    def train_examples(self, task):
        """Each training triple twice, as a tail query and a head query, batched as separate rows (as released)."""
        return [(triple, direction) for triple in task.train_triples for direction in DIRECTIONS]

    def description(self, tokenizer, task: KGTask, entity: str, tokens: int) -> str:
        """``[description]`` cut to tokens - 1 tokens (the released flag counts T5's end-of-sequence token);
        nothing when tokens is 0."""
        if tokens == 0:
            return ""
        if (entity, tokens) not in self._descriptions:
            ids = tokenizer(task.graph.entity_descriptions.get(entity, ""), add_special_tokens=False).input_ids
            self._descriptions[entity, tokens] = f"[{tokenizer.decode(ids[: tokens - 1])}]"
        return self._descriptions[entity, tokens]

    def source(self, tokenizer, task: KGTask, triple: Triple, direction: str) -> str:
        """The released query: the known entity and its description, the relation, the sentinel where the
        missing entity goes; ``predict: `` in front when a task on the contexts shares the model."""
        h, r, t = triple
        known = h if direction == "tail" else t
        described = self.description(tokenizer, task, known, self.source_description_tokens)
        entity = f"{task.graph.entity_names[known]} {described}"
        if direction == "tail":
            query = f"{entity} | {task.relation_text(r)} | {self.missing_marker}"
        else:
            query = f"{self.missing_marker} | {task.relation_text(r)} | {entity}"
        return f"predict: {query}" if self.uses_contexts else query

    def context_source(self, tokenizer, task: KGTask, triple: Triple, direction: str) -> str:
        if self.context_input == "query":  # the released code passes the link-prediction query by mistake
            return self.source(tokenizer, task, triple, direction)
        h, r, t = triple
        return f"contextualize: {task.graph.entity_names[h]} | {task.relation_text(r)} | {task.graph.entity_names[t]}"

    def target(self, tokenizer, text: str, max_length: int) -> list[int]:
        ids = tokenizer(text, add_special_tokens=False).input_ids[: max_length - 1]
        return [*ids, tokenizer.eos_token_id]

    def entity_text(self, tokenizer, task: KGTask, entity: str) -> str:
        """``<extra_id_0>name[description]<extra_id_1>``: T5 fills the query's sentinel."""
        described = self.description(tokenizer, task, entity, self.target_description_tokens)
        return f"{MISSING}{task.graph.entity_names[entity]}{described}{END}"

    def entity_target(self, tokenizer, task: KGTask, entity: str) -> list[int]:
        """The token ids the model generates for an entity and ranking scores (cached)."""
        if entity not in self._targets:
            self._targets[entity] = self.target(
                tokenizer, self.entity_text(tokenizer, task, entity), self.max_target_length
            )
        return self._targets[entity]

    def pair_batch(self, tokenizer, sources: list[str], targets: list[list[int]], max_length: int):
        enc = tokenizer(sources, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": pad_rows(targets, -100),
        }

    def encode_queries(self, tokenizer, task: KGTask, queries: Sequence[tuple[Triple, str]], training: bool):
        """The link-prediction queries as the encoder reads them: token ids and attention mask, with the relation
        prompts' positions and ids where they are on, and while ``training`` each token hidden from attention with
        probability ``source_token_dropout`` (the released -seq_dropout), except the separators, the sentinel
        and the prompts (the released code keeps T5's "|" and <extra_id_0>, ids 1820 and 32099)."""
        sources = [self.source(tokenizer, task, t, d) for t, d in queries]
        enc = tokenizer(sources, truncation=True, max_length=self.max_length, return_offsets_mapping=True)
        rows, kept, prompt_rows, prompt_ids = [], [], [], []
        for (triple, direction), source, ids, spans in zip(queries, sources, enc["input_ids"], enc["offset_mapping"]):
            bars = [m.start() for m in re.finditer(r"\|", source)]
            marks = [(b, b + 1) for b in bars] + [m.span() for m in re.finditer(re.escape(self.missing_marker), source)]
            marked = [any(s < mark_end and mark_start < e for mark_start, mark_end in marks) for s, e in spans]
            if self.relation_prompts:
                # the query's own separators: a tail query's last two bars, a head query's first two
                separators = [next(i for i, (s, e) in enumerate(spans) if s <= bar < e) for bar in bars]
                separators = separators[-2:] if direction == "tail" else separators[:2]
                end = len(ids) - (ids[-1] == tokenizer.eos_token_id)
                before = prompt_positions(direction, *separators, end)
                prompted = [False] * len(ids)
                for position in sorted(before, reverse=True):  # from the back: earlier positions stay put
                    ids = ids[:position] + [tokenizer.pad_token_id] + ids[position:]
                    marked = marked[:position] + [True] + marked[position:]
                    prompted = prompted[:position] + [True] + prompted[position:]
                prompt_ids.append([4 * self.relation_index[triple[1]] + before[p] for p in sorted(before)])
                prompt_rows.append(prompted)
            rows.append(ids)
            kept.append(marked)
        input_ids = pad_rows(rows, tokenizer.pad_token_id)
        attention_mask = pad_rows([[1] * len(r) for r in rows], 0)
        if training and self.source_token_dropout > 0:
            drawn = torch.rand(attention_mask.shape, generator=self.generator) >= self.source_token_dropout
            attention_mask = attention_mask * (drawn | pad_rows(kept, False))
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.relation_prompts:
            batch["prompt_mask"] = pad_rows(prompt_rows, False)
            batch["prompt_ids"] = torch.tensor(prompt_ids)
        return batch

    def collate(self, tokenizer, task, queries):
        targets = [self.entity_target(tokenizer, task, t[2] if d == "tail" else t[0]) for t, d in queries]
        if self.source_token_dropout > 0 or self.relation_prompts:
            queries_read = self.encode_queries(tokenizer, task, queries, training=True)
            batch = {"kgc": {**queries_read, "labels": pad_rows(targets, -100)}}
        else:
            sources = [self.source(tokenizer, task, t, d) for t, d in queries]
            batch = {"kgc": self.pair_batch(tokenizer, sources, targets, self.max_length)}
        if self.aux_weight > 0:
            sources = [self.context_source(tokenizer, task, t, d) for t, d in queries]
            targets = [self.target(tokenizer, task.contexts[t], self.context_max_length) for t, _ in queries]
            batch["context"] = self.pair_batch(tokenizer, sources, targets, self.max_length)
        if self.reconstruction_weight > 0:
            batch["reconstruction"] = self.reconstruction_batch(tokenizer, [task.contexts[t] for t, _ in queries])
        return batch

    def reconstruction_batch(self, tokenizer, contexts: list[str]) -> dict[str, torch.Tensor]:
        """Each context with spans hidden behind sentinels (:func:`corrupt_spans`, drawn from the method's
        generator) and its target: each sentinel followed by what it hides, then one more sentinel."""
        sources, targets = [], []
        for context in contexts:
            ids = self.target(tokenizer, context, self.context_max_length)
            sentinels = tokenizer.convert_tokens_to_ids(sentinel_tokens(span_count(len(ids))))
            corrupted, spans = corrupt_spans(ids, sentinels, self.rng)
            sources.append(corrupted)
            targets.append(self.reconstruction_ids(tokenizer, spans))
        return {
            "input_ids": pad_rows(sources, tokenizer.pad_token_id),
            "attention_mask": pad_rows([[1] * len(r) for r in sources], 0),
            "labels": pad_rows(targets, -100),
        }

    def reconstruction_ids(self, tokenizer, spans: list[list[int]]) -> list[int]:
        sentinels = sentinel_tokens(len(spans) + 1)
        if self.reconstruction_target == "id_digits":  # the released target: the ids' decimal digits as text
            text = "".join(f"{s} " + " ".join(map(str, span)) + " " for s, span in zip(sentinels, spans))
            return tokenizer(text + sentinels[-1]).input_ids
        ids = tokenizer.convert_tokens_to_ids(sentinels)
        return [i for sentinel, span in zip(ids, spans) for i in (sentinel, *span)] + [ids[-1], tokenizer.eos_token_id]

    def loss(self, handle, batch):
        loss, extra = super().loss(handle, batch)
        if self.reconstruction_weight > 0:
            model = handle.student
            reconstruction = self.pair_loss(model, batch["reconstruction"], next(model.parameters()).device)
            loss = loss + self.reconstruction_weight * reconstruction
            extra["reconstruction_loss"] = reconstruction.item()
        return loss, extra

    def pair_loss(self, model, pairs: dict[str, torch.Tensor], device) -> torch.Tensor:
        """Mean cross-entropy of the target tokens of a :meth:`pair_batch`."""
        return model(**{k: v.to(device) for k, v in pairs.items()}).loss

    def kgc_loss(self, model, batch, device):
        return self.pair_loss(model, batch["kgc"], device)

    def aux_loss(self, model, batch, device):
        return self.pair_loss(model, batch["context"], device)

    def candidate_input(self, tokenizer, task, entity):
        return tuple(self.entity_target(tokenizer, task, entity))

    def score_query(self, model, tokenizer, task, triple, direction, names, batch_size, device):
        """Summed log-likelihood of each candidate's target; the query's encoder states are computed once."""
        enc = {k: v.to(device) for k, v in self.encode_queries(tokenizer, task, [(triple, direction)], False).items()}
        states = encoder_states(model, enc)
        scores = []
        for start in range(0, len(names), batch_size):
            labels = pad_rows(
                [self.entity_target(tokenizer, task, e) for e in names[start : start + batch_size]], -100
            ).to(device)
            n = labels.shape[0]
            logits = model(
                encoder_outputs=BaseModelOutput(last_hidden_state=states.expand(n, -1, -1)),
                attention_mask=enc["attention_mask"].expand(n, -1),
                labels=labels,
            ).logits
            picked = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scores.append((picked * (labels != -100)).sum(-1).cpu())
        return torch.cat(scores)
