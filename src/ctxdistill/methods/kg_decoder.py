"""kg_decoder / kg_decoder_cd: the generative KGC student of Li et al. 2024 on a pretrained decoder LM.

KG-S2S's student is a T5 that fills the sentinel of ``h [description] | r | <extra_id_0>``; a decoder
cannot fill a gap, so here the query (the same string with ``?`` where the missing entity goes, its
position giving the direction as in the released code) is followed by a newline, and the student
continues with the missing entity's name (and, with ``target_description_tokens``, its description):

    "predict: tombstone [a stone that is used to mark a grave] | hypernym | ?\\n" -> "memorial" + EOS
    "predict: ? | hypernym | memorial [a structure erected to commemorate]\\n"    -> "tombstone" + EOS

Both directions are trained (each training triple is a tail row and a head row), as released.
``aux_weight`` > 0 adds *contextualization*: the student writes the LLM-written context after
``"{query}\\n"`` (``context_input=query``, the released code's input) or after
``"contextualize: h | r | t\\n"`` (``triple``). L = kgc_weight * L_KGC + aux_weight * L_ctx, each the
mean cross-entropy of its target tokens.

Ranking scores every candidate entity by the summed log-likelihood of its target after the query
(not KG-S2S's constrained beam search): the query runs once and every candidate continues from its
key/value cache (:class:`ctxdistill.encoding.SharedPrefix`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from omegaconf import DictConfig

from ctxdistill.config import require
from ctxdistill.data.kg import KGTask
from ctxdistill.encoding import SharedPrefix, answer_logits, answer_token_logprobs, encode
from ctxdistill.losses import answer_cross_entropy
from ctxdistill.methods.kgc import KGS2S, KGS2SConfig

#: between a query (or a context's input) and what the student writes after it
ANSWER_SEPARATOR = "\n"


@dataclass
class KGDecoderConfig(KGS2SConfig):
    """Generative KGC on a decoder LM: continue the query with the missing entity's name; the auxiliary task
    continues it with the context."""

    _target_: str = "ctxdistill.methods.kg_decoder.KGDecoder"
    max_length: int = 128  # tokens of a query; a longer one stops the run before training
    target_description_tokens: int = 0  # names alone: every candidate costs its name's tokens when ranking
    schema_name: ClassVar[str] = "base_kg_decoder"
    architectures: ClassVar[tuple[str, ...]] = ("causal_lm",)  # KG-S2S's task, continued by a decoder

    @classmethod
    def check(cls, m: DictConfig, cfg: DictConfig) -> None:
        super().check(m, cfg)
        for key, off in (("source_token_dropout", 0), ("relation_prompts", False), ("reconstruction_weight", 0)):
            require(
                m[key] == off,
                f"method.{key}",
                "is KG-S2S's, for its T5 student's encoder input",
                f"Use method=kgs2s for it, or leave it at {off}",
            )


class KGDecoder(KGS2S):
    missing_marker = "?"

    def entity_text(self, tokenizer, task: KGTask, entity: str) -> str:
        """``name[description]`` (the description only with target_description_tokens > 0)."""
        described = self.description(tokenizer, task, entity, self.target_description_tokens)
        return f"{task.graph.entity_names[entity]}{described}"

    queries_must_fit = True  # nothing is cut (:meth:`pair_batch`)

    @staticmethod
    def prompt(source: str) -> str:
        return source + ANSWER_SEPARATOR

    def pair_batch(self, tokenizer, sources, targets, max_length):
        """Left-padded ``prompt + target[:-1]`` rows with the target tokens at the last positions (:func:`encode`).
        Nothing is cut: :meth:`check_inputs` has refused queries longer than ``max_length`` before training."""
        return encode(tokenizer, [self.prompt(s) for s in sources], targets)

    def pair_loss(self, model, pairs, device):
        return answer_cross_entropy(
            answer_logits(model, pairs), pairs["answer_ids"].to(device), pairs["answer_mask"].to(device)
        )

    def score_query(self, model, tokenizer, task, triple, direction, names, batch_size, device):
        """Summed log-likelihood of each candidate's target after the query, run once for all candidates."""
        prompt = self.prompt(self.source(tokenizer, task, triple, direction))
        prefix = SharedPrefix(model, tokenizer, [prompt])
        scores = []
        for start in range(0, len(names), batch_size):
            chunk = names[start : start + batch_size]
            batch = encode(
                tokenizer,
                [prompt] * len(chunk),
                [self.entity_target(tokenizer, task, e) for e in chunk],
                prefix_length=prefix.length,
            )
            scores.append(answer_token_logprobs(answer_logits(model, batch, prefix), batch).cpu())
        return torch.cat(scores)
