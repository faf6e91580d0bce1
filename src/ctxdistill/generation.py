"""Generating continuations: greedy or sampled, seeded, over a shared context's KV cache.

One loop serves every method and evaluation that needs the model's own text (the
teacher's answer spans, on-policy samples of the student, a scratchpad and its final
answer, generation-based evaluation). It decodes with the key/value cache and applies
the LM head to the last position only; with a :class:`~ctxdistill.encoding.SharedPrefix`
the common context is not run again, nor copied per row. A ``torch.Generator`` makes sampling reproducible
independently of the global random state.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ctxdistill.encoding import SharedPrefix, encode
from ctxdistill.models import runs_in_evaluation_mode
from ctxdistill.progress import progress_bar


def pick_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: Optional[int],
    generator: Optional[torch.Generator],
    top_p: Optional[float] = None,
) -> torch.Tensor:
    """The next token of each row: argmax at temperature 0, else a sample of softmax(logits / T) over the top k,
    then over the nucleus of mass top_p (transformers' order and rule)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        # Drop the least likely tokens while their summed probability stays within 1 - top_p; the top token stays.
        ascending, order = logits.sort(-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
@runs_in_evaluation_mode
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    stop: Optional[str] = "\n",
    generator: Optional[torch.Generator] = None,
    prefix: Optional[SharedPrefix] = None,
    batch_size: int = 16,
    desc: Optional[str] = None,
    top_p: Optional[float] = None,
) -> list[list[int]]:
    """Each prompt's continuation, ending with the token that stops it (end-of-sequence, or the token
    that completes the text ``stop``) unless ``max_new_tokens`` came first. Runs in eval mode; the caller's mode is
    restored. With ``prefix``, every prompt must start with its tokens (it is run once, not per prompt)."""
    stop = stop or None  # "" is no stop string (it would be found in any text)
    device = next(model.parameters()).device
    stops = end_tokens(model, tokenizer)
    stop_span = len(stop.encode()) if stop else 0  # the most tokens a stop string can take
    continuations: list[list[int]] = []
    starts = range(0, len(prompts), batch_size)
    for start in progress_bar(starts, desc=desc, leave=False, disable=desc is None):
        batch = encode(tokenizer, prompts[start : start + batch_size], prefix_length=prefix.length if prefix else 0)
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        position_ids = batch["position_ids"].to(device)
        rows = input_ids.shape[0]
        past = None
        tokens = [[] for _ in range(rows)]
        done = [False] * rows
        run = prefix.forward if prefix is not None else lambda model, **inputs: model(**inputs)
        for _ in range(max_new_tokens):
            # With a prefix, the rows' cache holds their own tokens only: the context stays shared.
            out = run(
                model,
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=past,
                use_cache=True,
                logits_to_keep=1,
            )
            past = out.cache
            picked = pick_tokens(out.logits[:, -1], temperature, top_k, generator, top_p)
            for i, token in enumerate(picked.tolist()):
                if done[i]:
                    continue
                tokens[i].append(token)
                # A stop string of n bytes lies within the last n tokens (a character may take several).
                done[i] = token in stops or (stop is not None and stop in tokenizer.decode(tokens[i][-stop_span:]))
            if all(done):
                break
            input_ids = picked.unsqueeze(-1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(rows, 1)], 1)
            position_ids = position_ids[:, -1:] + 1
        continuations.extend(tokens)
    return continuations


def end_tokens(model, tokenizer) -> frozenset[int]:
    """The tokens that end a continuation: the tokenizer's end of sequence and those the model's generation config
    lists (Llama 3 Instruct's ``<|eot_id|>``, Gemma 3's ``<end_of_turn>``), on which transformers' generate stops."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = configured if isinstance(configured, (list, tuple)) else [configured]
    return frozenset(t for t in [tokenizer.eos_token_id, *listed] if t is not None)


def strip_stop(
    tokenizer, tokens: list[int], stop: Optional[str] = "\n", ends: Optional[frozenset[int]] = None
) -> list[int]:
    """A continuation without its final stop: an end token (``ends``, :func:`end_tokens`; by default the
    tokenizer's end of sequence), or the fewest last tokens that hold ``stop`` (one token, or the several a
    character split into bytes takes)."""
    if tokens and tokens[-1] in (ends or {tokenizer.eos_token_id}):
        return tokens[:-1]
    for count in range(1, min(len(tokens), len((stop or "").encode())) + 1):
        if stop in tokenizer.decode(tokens[-count:]):
            return tokens[:-count]
    return tokens
