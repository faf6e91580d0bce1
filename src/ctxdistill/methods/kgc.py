"""Stage 2 of contextualization distillation (Li et al. 2024): KGC students with an auxiliary task.

- ``kgbert`` / ``kgbert_cd`` (discriminative, KG-BERT): an encoder scores ``[CLS] h [SEP] r [SEP] t [SEP]``
  as true or corrupted (binary cross-entropy, negatives by replacing the head or the tail);
  ``aux_weight`` > 0 adds *reconstruction*, masked-LM on the triple's context (15% of its tokens,
  80% [MASK] / 10% random / 10% kept): L = kgc_weight * L_KGC + aux_weight * L_MLM.
- ``kgs2s`` / ``kgs2s_cd`` (generative, KG-S2S): a seq2seq model generates the missing entity's name
  from ``h | r`` (tails) and ``t | reverse of r`` (heads); ``aux_weight`` > 0 adds *contextualization*,
  generating the context from ``contextualize: h | r | t``. The released code: 0.5 * L_KGC + 0.5 * L_ctx.

Both rank candidates with the scorer they hand to :class:`ctxdistill.ranking.LinkPredictionEvaluator`:
KG-BERT by its triple score (a cross-encoder: every (query, candidate) pair is one forward pass; the
entities' token ids are cached), KG-S2S by the log-likelihood of each candidate's name, with the
query encoded once and its encoder states reused by every candidate.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput

from ctxdistill.config import ConfigError
from ctxdistill.data.kg import KGTask, Triple, build_kg_task, missing_contexts
from ctxdistill.methods.base import Method
from ctxdistill.ranking import LinkPredictionEvaluator, ranking_prefix


def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, mask_token_id: int, vocab_size: int,
                probability: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
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


class KGCStudent(Method):
    """What both students share: training triples, the context check, the ranking evaluation."""

    adapter = "full"

    def __init__(self, name: str, aux_weight: float = 1.0, kgc_weight: float = 1.0, max_length: int = 64,
                 context_max_length: int = 128, eval_batch_size: int = 256):
        super().__init__(name)
        self.aux_weight, self.kgc_weight = aux_weight, kgc_weight
        self.max_length, self.context_max_length = max_length, context_max_length
        self.eval_batch_size = eval_batch_size
        self.generator = torch.Generator()

    def build_task(self, dataset, seed):
        task = build_kg_task(dataset, seed)
        self.objective = f"eval/{ranking_prefix(task.eval_candidates)}mrr"
        return task

    def train_examples(self, task):
        return task.train_triples

    def check_inputs(self, task, tokenizer, cfg):
        if self.aux_weight == 0:
            return
        missing = missing_contexts(task)
        if missing:
            where = task.contexts_file or "(dataset.contexts_file is null)"
            raise ConfigError(
                f"{len(missing)} of the {len(task.train_triples)} training triples have no context in {where} "
                f"(e.g. {missing[0]}). Write them first with the same dataset settings: ctxdistill "
                f"method=contextualization dataset={cfg.dataset.name} ..., point dataset.contexts_file at a file "
                f"that has them, or train the baseline without the auxiliary task: method.aux_weight=0")

    def prepare(self, handle, tokenizer, task, examples, batch_size):
        # The run has seeded torch with its seed; masking and negative sampling follow it.
        self.generator.manual_seed(torch.initial_seed() % 2**63)
        self.rng = random.Random(torch.initial_seed())

    def evaluator(self, handle, tokenizer, task, batch_size):
        return LinkPredictionEvaluator(task, lambda queries, candidates: self.score(handle, tokenizer, task, queries,
                                                                                    candidates))

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
    def score(self, handle, tokenizer, task: KGTask, queries: Sequence[tuple[Triple, str]],
              candidates: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        """One score per candidate entity of each query (higher: more plausible)."""
        model = handle.base
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            return [self.score_query(model, tokenizer, task, triple, direction, names, device)
                    for (triple, direction), names in zip(queries, candidates)]
        finally:
            model.train(was_training)  # a periodic evaluation must not switch dropout off for the rest of training

    def score_query(self, model, tokenizer, task: KGTask, triple: Triple, direction: str, names: Sequence[str],
                    device) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------- discriminative
class TripleScorer(torch.nn.Module):
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
        hidden = self.mlm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                     token_type_ids=token_type_ids).last_hidden_state
        return self.head(self.dropout(hidden[:, 0])).squeeze(-1)

    def mlm_loss(self, input_ids, attention_mask, labels) -> torch.Tensor:
        if self.mlm_head is None:
            return self.mlm(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        hidden = self.mlm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        chosen = labels != -100
        if not chosen.any():  # contexts without a single maskable token
            return hidden.sum() * 0
        return F.cross_entropy(self.mlm_head(hidden[chosen]).float(), labels[chosen])

    def save_pretrained(self, path: Path) -> None:
        self.mlm.save_pretrained(path)
        torch.save(self.head.state_dict(), Path(path) / "triple_head.pt")


class KGBert(KGCStudent):
    aux_name = "mlm"

    def __init__(self, name: str, negatives: int = 2, mlm_probability: float = 0.15, use_descriptions: bool = True,
                 **kwargs):
        super().__init__(name, **kwargs)
        self.negatives, self.mlm_probability, self.use_descriptions = negatives, mlm_probability, use_descriptions
        self._tokens: dict[str, list[int]] = {}

    def wrap_model(self, model, tokenizer):
        if tokenizer.mask_token_id is None or not hasattr(model, "base_model"):
            raise ConfigError("the discriminative student needs a masked-LM encoder with a [MASK] token: "
                              "model=minilm-l6, model=bert-base-uncased, or model.architecture=masked_lm")
        scorer = TripleScorer(model)
        self._with_segments = self.segments(scorer)
        return scorer

    def tokens(self, tokenizer, text: str) -> list[int]:
        """Token ids of an entity or relation text, cached (every candidate entity recurs in every query)."""
        if text not in self._tokens:
            self._tokens[text] = tokenizer(text, add_special_tokens=False).input_ids
        return self._tokens[text]

    def encode_triples(self, tokenizer, task: KGTask, triples: Sequence[Triple], segments: bool):
        """[CLS] h [SEP] r [SEP] t [SEP] with segments 0 / 1 / 0 (KG-BERT); entity texts share what the
        relation leaves of max_length."""
        cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
        rows, types = [], []
        for h, r, t in triples:
            rel = self.tokens(tokenizer, task.relation_text(r))[: self.max_length // 4]
            budget = max(1, (self.max_length - 4 - len(rel)) // 2)
            head = self.tokens(tokenizer, task.entity_text(h, self.use_descriptions))[:budget]
            tail = self.tokens(tokenizer, task.entity_text(t, self.use_descriptions))[:budget]
            rows.append([cls, *head, sep, *rel, sep, *tail, sep])
            types.append([0] * (len(head) + 2) + [1] * (len(rel) + 1) + [0] * (len(tail) + 1))
        width = max(map(len, rows))
        batch = {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
                 "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])}
        if segments:
            batch["token_type_ids"] = torch.tensor([t + [0] * (width - len(t)) for t in types])
        return batch

    def corrupt(self, task: KGTask, triple: Triple, number: int, known: set[Triple]) -> Triple:
        """Replace the tail (even ``number``) or the head (odd) by a random entity, avoiding known triples."""
        h, r, t = triple
        entities = task.graph.entities
        for _ in range(100):
            e = entities[self.rng.randrange(len(entities))]
            candidate = (h, r, e) if number % 2 == 0 else (e, r, t)
            if candidate not in known:
                return candidate
        return candidate

    def collate(self, tokenizer, task, triples):
        negatives = [self.corrupt(task, t, n, self._known) for t in triples for n in range(self.negatives)]
        batch = {"triples": self.encode_triples(tokenizer, task, [*triples, *negatives], self._with_segments),
                 "labels": torch.tensor([1.0] * len(triples) + [0.0] * len(negatives))}
        if self.aux_weight > 0:
            enc = tokenizer([task.contexts[t] for t in triples], truncation=True, max_length=self.context_max_length,
                            padding=True, return_tensors="pt", return_special_tokens_mask=True)
            maskable = (enc["special_tokens_mask"] == 0) & (enc["attention_mask"] == 1)
            inputs, labels = mask_tokens(enc["input_ids"], maskable, tokenizer.mask_token_id, len(tokenizer),
                                         self.mlm_probability, self.generator)
            batch["context"] = {"input_ids": inputs, "attention_mask": enc["attention_mask"], "labels": labels}
        return batch

    def prepare(self, handle, tokenizer, task, examples, batch_size):
        super().prepare(handle, tokenizer, task, examples, batch_size)
        self._known = set(task.train_triples)

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

    def score_query(self, model, tokenizer, task, triple, direction, names, device):
        h, r, t = triple
        pairs = [(h, r, e) if direction == "tail" else (e, r, t) for e in names]
        scores = []
        for start in range(0, len(pairs), self.eval_batch_size):
            batch = self.encode_triples(tokenizer, task, pairs[start:start + self.eval_batch_size],
                                        self.segments(model))
            scores.append(model(**{k: v.to(device) for k, v in batch.items()}).float().cpu())
        return torch.cat(scores)


# ---------------------------------------------------------------- generative
class KGS2S(KGCStudent):
    aux_name = "context"

    def __init__(self, name: str, max_target_length: int = 24, **kwargs):
        super().__init__(name, **kwargs)
        self.max_target_length = max_target_length
        self._targets: dict[str, list[int]] = {}

    def wrap_model(self, model, tokenizer):
        if not model.config.is_encoder_decoder:
            raise ConfigError("the generative student needs a seq2seq model: model=tiny-random-seq2seq, "
                              "model=t5-base, or model.architecture=seq2seq_lm")
        return model

    @staticmethod
    def source(task: KGTask, triple: Triple, direction: str) -> str:
        h, r, t = triple
        if direction == "tail":
            return f"{task.graph.entity_names[h]} | {task.relation_text(r)}"
        return f"{task.graph.entity_names[t]} | reverse of {task.relation_text(r)}"

    def target(self, tokenizer, text: str, max_length: int) -> list[int]:
        ids = tokenizer(text, add_special_tokens=False).input_ids[: max_length - 1]
        return [*ids, tokenizer.eos_token_id]

    def entity_target(self, tokenizer, task: KGTask, entity: str) -> list[int]:
        if entity not in self._targets:
            self._targets[entity] = self.target(tokenizer, task.graph.entity_names[entity], self.max_target_length)
        return self._targets[entity]

    @staticmethod
    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(map(len, rows))
        return torch.tensor([r + [value] * (width - len(r)) for r in rows])

    def seq2seq_batch(self, tokenizer, sources: list[str], targets: list[list[int]], max_length: int):
        enc = tokenizer(sources, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": self.pad(targets, -100)}

    def collate(self, tokenizer, task, triples):
        sources = [self.source(task, t, d) for t in triples for d in ("tail", "head")]
        targets = [self.entity_target(tokenizer, task, t[2] if d == "tail" else t[0])
                   for t in triples for d in ("tail", "head")]
        batch = {"kgc": self.seq2seq_batch(tokenizer, sources, targets, self.max_length)}
        if self.aux_weight > 0:
            sources = [f"contextualize: {self.source(task, t, 'tail')} | {task.graph.entity_names[t[2]]}"
                       for t in triples]
            targets = [self.target(tokenizer, task.contexts[t], self.context_max_length) for t in triples]
            batch["context"] = self.seq2seq_batch(tokenizer, sources, targets, self.max_length)
        return batch

    def kgc_loss(self, model, batch, device):
        return model(**{k: v.to(device) for k, v in batch["kgc"].items()}).loss

    def aux_loss(self, model, batch, device):
        return model(**{k: v.to(device) for k, v in batch["context"].items()}).loss

    def score_query(self, model, tokenizer, task, triple, direction, names, device):
        """Summed log-likelihood of each candidate's name; the query's encoder states are computed once."""
        enc = tokenizer([self.source(task, triple, direction)], truncation=True, max_length=self.max_length,
                        return_tensors="pt").to(device)
        states = model.get_encoder()(**enc).last_hidden_state
        scores = []
        for start in range(0, len(names), self.eval_batch_size):
            labels = self.pad([self.entity_target(tokenizer, task, e)
                               for e in names[start:start + self.eval_batch_size]], -100).to(device)
            n = labels.shape[0]
            logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=states.expand(n, -1, -1)),
                           attention_mask=enc["attention_mask"].expand(n, -1), labels=labels).logits
            picked = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scores.append((picked * (labels != -100)).sum(-1).cpu())
        return torch.cat(scores)
