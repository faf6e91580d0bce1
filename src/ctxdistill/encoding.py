"""Batches of prompts with answer spans, and logits at the answer positions only.

Convention: a row is ``prompt + answer[:-1]`` left-padded, so the positions that
predict the m answer tokens are the last m positions of every row. The LM head is
then applied to those positions only (``logits_to_keep``): a vocabulary-sized
projection of the whole sequence is the largest avoidable cost in distillation.

Teacher prompts share their context. :class:`SharedPrefix` runs the tokens that every
prompt starts with once and keeps their key/value cache; each batch then runs only
the query tokens, so the teacher's cost per query does not grow with the context.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer


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
    """The key/value cache of the tokens that every prompt of a set starts with."""

    def __init__(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], enabled: bool = True
    ):
        """``enabled=False`` gives an empty prefix: every prompt is run whole (for comparisons)."""
        ids = tokenizer(list(prompts)).input_ids
        first = ids[0]
        # Longest common token prefix; every row keeps at least one token of its own.
        length = min(len(r) for r in ids) - 1 if enabled else 0
        for row in ids[1:]:
            length = next((i for i, (a, b) in enumerate(zip(first[:length], row)) if a != b), length)
        self.length = length
        self.cache = None
        if length > 0:
            device = next(model.parameters()).device
            with torch.no_grad():
                self.cache = model(
                    input_ids=torch.tensor([first[:length]], device=device), use_cache=True, logits_to_keep=1
                ).cache  # only the cache is needed

    def for_batch(self, batch_size: int):
        """A cache for one batch that shares the prefix's tensors and stores only what the batch adds.

        Each layer's prefix keys and values are broadcast views of the prefix's; the batch's own
        keys and values (the queries, then every generated token) are appended per row, so a
        generation loop sees prefix + query + everything generated so far at every step.
        """
        if all(type(layer) is DynamicLayer for layer in self.cache.layers):
            cache = copy.copy(self.cache)
            cache.layers = [
                _PrefixLayer(
                    layer.keys.expand(batch_size, *layer.keys.shape[1:]),
                    layer.values.expand(batch_size, *layer.values.shape[1:]),
                )
                for layer in self.cache.layers
            ]
            return cache
        cache = copy.deepcopy(self.cache)  # sliding-window and other layer kinds: a real copy per batch
        cache.batch_repeat_interleave(batch_size)
        return cache


class _PrefixLayer(DynamicLayer):
    """A cache layer over a shared, read-only prefix: ``keys``/``values`` hold the batch's own tokens only.

    Each update appends the new keys/values to the batch's own and returns prefix + own; the joined
    tensor lives for that layer's attention only, so memory holds one layer's copy of the prefix at a time.
    """

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(prefix_keys, prefix_values)
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return (torch.cat([self.prefix_keys, self.keys], dim=-2), torch.cat([self.prefix_values, self.values], dim=-2))

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[-2] + super().get_seq_length()


def answer_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], prefix: Optional[SharedPrefix] = None
) -> torch.Tensor:
    """Logits [B, P, V] at the P answer positions of an :func:`encode` batch.

    With ``prefix`` the batch must have been encoded with ``prefix_length=prefix.length``.
    """
    device = next(model.parameters()).device
    attention_mask = batch["attention_mask"].to(device)
    past = None
    if prefix is not None and prefix.cache is not None:
        past = prefix.for_batch(attention_mask.shape[0])
        attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], prefix.length), attention_mask], 1)
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=attention_mask,
        position_ids=batch["position_ids"].to(device),
        cache=past,
        logits_to_keep=batch["answer_ids"].shape[1],
        use_cache=past is not None,
    )
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
