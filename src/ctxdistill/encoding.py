"""Batches of prompts with answer spans, and logits at the answer positions only.

Convention: a row is ``prompt + answer[:-1]`` left-padded, so the positions that
predict the m answer tokens are the last m positions of every row. The LM head is
then applied to those positions only (``logits_to_keep``): a vocabulary-sized
projection of the whole sequence is the largest avoidable cost in distillation.

Teacher prompts share their context. :class:`SharedPrefix` runs the tokens that every
prompt starts with once and keeps their key/value cache; each batch then runs only
the query tokens and attends to the context without copying it
(:mod:`ctxdistill.prefix_attention`), so the teacher's cost per query barely grows with the context.

Two tokenizers (a teacher from another model family) meet on text: :func:`retokenized` writes one's tokens
in the other's, :func:`tokenization_groups` pairs the pieces of text both write, and :func:`gold_shared_tokens`
finds the tokens both vocabularies spell alike.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ctxdistill import prefix_attention
from ctxdistill.losses import align_by_text_offsets
from ctxdistill.models import evaluation_mode

log = logging.getLogger(__name__)


def encode(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Optional[Sequence[Sequence[int]]] = None,
    prefix_length: int = 0,
) -> dict[str, torch.Tensor]:
    """Left-padded ``prompt + answer[:-1]`` rows, without the first ``prefix_length`` prompt tokens.

    Returns input_ids, attention_mask, position_ids and, for the last ``P`` positions
    (P = longest answer, 1 when no answers are given), ``answer_ids`` [B, P] and
    ``answer_mask`` [B, P] marking which of those positions predict a real answer token.
    With a prefix, positions start after it (see :class:`SharedPrefix`).
    """
    prompt_ids = [ids[prefix_length:] for ids in tokenizer(list(prompts)).input_ids]
    answers = [list(a) for a in answers] if answers is not None else [[tokenizer.pad_token_id]] * len(prompt_ids)
    if any(len(a) == 0 for a in answers):
        raise ValueError("every answer needs at least one token")
    rows = [p + a[:-1] for p, a in zip(prompt_ids, answers)]
    width = max(map(len, rows))
    span = max(map(len, answers))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    answer_ids = torch.tensor([[pad] * (span - len(a)) + a for a in answers])
    answer_mask = torch.tensor([[False] * (span - len(a)) + [True] * len(a) for a in answers])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        # Positions count real tokens only, so left padding does not shift them.
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0) + prefix_length,
        "answer_ids": answer_ids,
        "answer_mask": answer_mask,
    }


class SharedPrefix:
    """The key/value cache of the tokens that every prompt of a set starts with, and forward passes over it.

    Callers see only the rows' own tokens (:meth:`forward`): their ids, positions after the prefix, an
    attention mask and a cache of their own. For models whose every layer is plain softmax attention
    with a full (not sliding-window) cache, the prefix is attended once per layer for all rows by
    :mod:`ctxdistill.prefix_attention` and never copied. Other full-attention models (another attention
    implementation, a wrapper that adds its own tokens to the cache) get a copy of the prefix's cache per
    row; models with sliding-window (or other non-full) cache layers share nothing (``length`` 0).
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], enabled: bool = True
    ):
        """``enabled=False`` gives an empty prefix: every prompt is run whole (for comparisons)."""
        first = tokenizer(prompts[0]).input_ids
        # Longest common token prefix; every row keeps at least one token of its own. Prompts are tokenised a
        # chunk at a time: the token lists of a whole eval set would take memory in proportion to it.
        length = len(first) - 1 if enabled else 0
        for start in range(0, len(prompts), 256):
            for row in tokenizer(list(prompts[start : start + 256])).input_ids:
                length = min(length, len(row) - 1)
                length = next((i for i, (a, b) in enumerate(zip(first[:length], row)) if a != b), length)
        self.length = length
        self.cache = None
        self.layers: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None  # per layer [kv_heads, length, dim]
        self.configs = prefix_attention.attention_configs(model)
        if length > 0:
            device = next(model.parameters()).device
            with torch.no_grad(), evaluation_mode(model):  # a read of the context, without dropout whatever the mode
                self.cache = model(
                    input_ids=torch.tensor([first[:length]], device=device), use_cache=True, logits_to_keep=1
                ).cache  # only the cache is needed
            if not all(type(layer) is DynamicLayer for layer in self.cache.layers):
                # A sliding window counts positions in the cache, where padding between the context and a row's
                # tokens would sit: such models run every prompt whole.
                self.length, self.cache = 0, None
            elif self.cache.get_seq_length() == length and prefix_attention.handles(model):
                # (A wrapper that adds tokens of its own to the cache, a trainable prefix, keeps the copy.)
                self.layers = [(layer.keys[0], layer.values[0]) for layer in self.cache.layers]

    @property
    def shares_attention(self) -> bool:
        """Whether rows attend to the one prefix (True) or each to a copy of it (False)."""
        return self.layers is not None

    def forward(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Optional[Cache] = None,
        **kwargs,
    ):
        """``model``'s output for rows that continue the prefix, with the rows' cache as ``output.cache``.

        ``attention_mask`` covers the rows' own tokens (those in ``cache``, then ``input_ids``); ``cache`` is a
        previous call's ``output.cache`` for the same rows, or None to start them."""
        rows = input_ids.shape[0]
        if self.cache is None:
            return model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, **kwargs
            )
        if self.shares_attention:
            with prefix_attention.attending(self.configs):
                return model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    cache=cache if cache is not None else DynamicCache(),
                    shared_prefix=self.layers,
                    **kwargs,
                )
        if cache is None:  # a copy of the context per row
            cache = copy.deepcopy(self.cache)
            cache.batch_repeat_interleave(rows)
        return model(
            input_ids=input_ids,
            attention_mask=torch.cat([attention_mask.new_ones(rows, self.length), attention_mask], 1),
            position_ids=position_ids,
            cache=cache,
            **kwargs,
        )


def answer_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], prefix: Optional[SharedPrefix] = None
) -> torch.Tensor:
    """Logits [B, P, V] at the P answer positions of an :func:`encode` batch.

    With ``prefix`` the batch must have been encoded with ``prefix_length=prefix.length``.
    """
    device = next(model.parameters()).device
    inputs = {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
        "position_ids": batch["position_ids"].to(device),
        "logits_to_keep": batch["answer_ids"].shape[1],
        "use_cache": False,  # a prefix's rows have a cache of their own all the same, for this call only
    }
    out = prefix.forward(model, **inputs) if prefix is not None else model(**inputs)
    return out.logits.float()


def answer_and_column_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], columns: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the answer positions [B, P, V] and at the given row positions ``columns`` [B, M] -> [B, M, V].

    The LM head runs from the earliest requested column to the end of the rows, not over the padding
    and tokens before it."""
    device = next(model.parameters()).device
    width, span = batch["input_ids"].shape[1], batch["answer_ids"].shape[1]
    keep = width - min(int(columns.min()), width - span)
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        position_ids=batch["position_ids"].to(device),
        logits_to_keep=keep,
    )
    logits = out.logits.float()  # [B, keep, V], row positions width-keep .. width-1
    index = (columns.to(device) - (width - keep)).unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return logits[:, -span:], logits.gather(1, index)


def answer_token_logprobs(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability [B] of each row's answer tokens."""
    logprobs = logits.log_softmax(-1)
    ids = batch["answer_ids"].to(logits.device)
    mask = batch["answer_mask"].to(logits.device)
    picked = logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def text_ends(tokenizer, ids: list[int]) -> list[int]:
    """Where each token of ``ids`` ends in their decoded text (in characters; special tokens write nothing).

    A byte-level tokenizer can split a character over several tokens; one that ends inside it writes nothing
    yet (its prefix decodes to U+FFFD, not to the start of the text), so it ends where the token before it
    did and joins the group of the token that completes the character."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    ends, end = [], 0
    for i in range(len(ids)):
        written = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        if text.startswith(written):
            end = len(written)
        ends.append(end)
    return ends


def retokenized(tokenizer, ids: list[int], into) -> list[int]:
    """The text that ``tokenizer`` writes with ``ids``, in the tokens of ``into``."""
    return into(tokenizer.decode(ids, skip_special_tokens=True), add_special_tokens=False).input_ids


def tokenization_groups(
    tokenizer, ids: list[int], teacher_tokenizer, teacher_ids: list[int]
) -> list[tuple[list[int], list[int]]]:
    """The groups of (student, teacher) positions of two tokenizations of one text that write the same piece
    of it (:func:`ctxdistill.losses.align_by_text_offsets`)."""
    return align_by_text_offsets(text_ends(tokenizer, ids), text_ends(teacher_tokenizer, teacher_ids))


def shared_vocabulary(tokenizer, teacher_tokenizer, student_width: int, teacher_width: int):
    """GOLD's matched tokens: the student's and the teacher's ids [M] of every token string both vocabularies
    hold (among the ids each model has a logit for), in the teacher's id order."""
    student_vocab = tokenizer.get_vocab()
    pairs = sorted(
        (teacher_id, student_vocab[text])
        for text, teacher_id in teacher_tokenizer.get_vocab().items()
        if text in student_vocab and teacher_id < teacher_width and student_vocab[text] < student_width
    )
    return torch.tensor([s for _, s in pairs], dtype=torch.long), torch.tensor([t for t, _ in pairs], dtype=torch.long)


def output_width(model: torch.nn.Module) -> int:
    """How many logits the model gives (its vocabulary as the LM head sees it, padding rows included)."""
    return model.get_output_embeddings().weight.shape[0]


def gold_shared_tokens(
    student: torch.nn.Module, teacher: torch.nn.Module, tokenizer, teacher_tokenizer, weights=None
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[float, float]]:
    """GOLD's hybrid split: the (student ids, teacher ids) of the shared tokens, and the [shared, other] weights,
    ``weights`` or GOLD's adaptive ones (the share of the teacher's vocabulary that is shared, and the rest)."""
    teacher_width = output_width(teacher)
    shared = shared_vocabulary(tokenizer, teacher_tokenizer, output_width(student), teacher_width)
    shared_weight = len(shared[1]) / teacher_width
    chosen = tuple(weights or (shared_weight, 1 - shared_weight))
    log.info(
        "method.uld_hybrid: %d of the teacher's %d tokens are spelt alike in the student's vocabulary; "
        "weights %.3g (shared, JSD) and %.3g (the others, sorted)",
        len(shared[1]),
        teacher_width,
        *chosen,
    )
    return shared, chosen
