"""What serving one query costs, with the context in the prompt and without it.

Internalising a context pays off at inference: the trained model answers the bare query, where the
teacher (in-context learning) reads the whole context for every query. For each classification run
the teacher (with the context) and the evaluated model (as the method serves it: without the context,
or with it where the method evaluates with it) are measured on the same fixed sample of eval queries:

- prompt tokens per query (the tokenizer's count);
- latency per query: the time of one forward pass over the prompts (the pass that yields the answer's
  scores and fills the KV cache), in batches of the same size for both, the first batch run once
  beforehand as a warm-up and not timed, and the median of :data:`TIMED_PASSES` passes over the sample;
- KV-cache bytes per query: what the forward pass leaves in the model's cache for that query, without
  left padding; a trainable key/value prefix is part of it.

:func:`serving_metrics` turns the measurements into the flat ``serving/*`` metrics, with teacher /
student ratios.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ctxdistill.encoding import encode
from ctxdistill.models import runs_in_evaluation_mode

#: Eval queries measured per run (evenly spaced over the first eval set): few, so that every run, the
#: tests' included, can afford it (the teacher's prompts hold the whole context).
SAMPLE_QUERIES = 4
#: Timed passes over the sample; the median pass is reported.
TIMED_PASSES = 3


@dataclass(frozen=True)
class ServingCost:
    """Per query, averaged over the sample."""

    prompt_tokens: float
    latency_ms: float
    kv_bytes: float


def sample(examples: Sequence, count: int = SAMPLE_QUERIES) -> list:
    """``count`` examples evenly spaced over ``examples`` (all of them when there are fewer)."""
    if len(examples) <= count:
        return list(examples)
    return [examples[i * len(examples) // count] for i in range(count)]


def row_cache_bytes(cache, attention_mask: torch.Tensor) -> list[int]:
    """Bytes each row of a left-padded batch holds in ``cache``, its padding left out.

    A layer holding L positions for a batch of width W holds, for a row of n real tokens, n positions
    plus the L - W positions that precede every row (a trainable prefix), at most L (a sliding-window
    layer keeps only its window)."""
    width = attention_mask.shape[1]
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    prefix = max(0, max(keys.shape[-2] for keys, _ in layers) - width)
    real = attention_mask.sum(-1).tolist()
    total = [0] * len(real)
    for keys, values in layers:
        rows, held = keys.shape[0], keys.shape[-2]
        per_position = (keys.numel() * keys.element_size() + values.numel() * values.element_size()) // (rows * held)
        for row, tokens in enumerate(real):
            total[row] += per_position * min(tokens + prefix, held)
    return total


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
@runs_in_evaluation_mode
def measure(model, tokenizer, prompts: list[str], batch_size: int) -> ServingCost:
    """Prompt tokens, latency and KV-cache bytes per query of ``model`` over ``prompts`` (see the module)."""
    device = next(model.parameters()).device
    batches = [encode(tokenizer, prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]

    def forward(batch):
        return model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            position_ids=batch["position_ids"].to(device),
            use_cache=True,
            logits_to_keep=1,
        )

    forward(batches[0])  # warm-up: first-call allocations and kernel choices are not a query's cost
    passes, caches = [], []
    for _ in range(TIMED_PASSES):
        _synchronize(device)
        start = time.perf_counter()
        caches = [forward(batch).cache for batch in batches]
        _synchronize(device)
        passes.append(time.perf_counter() - start)
    kv = [n for batch, cache in zip(batches, caches) for n in row_cache_bytes(cache, batch["attention_mask"])]
    tokens = [len(ids) for ids in tokenizer(prompts).input_ids]
    return ServingCost(
        prompt_tokens=sum(tokens) / len(tokens),
        latency_ms=1000 * statistics.median(passes) / len(prompts),
        kv_bytes=sum(kv) / len(kv),
    )


def measure_task(model, tokenizer, task, with_context: bool, batch_size: int) -> ServingCost:
    """:func:`measure` on the sample of the task's first eval set, with or without the context, in batches of
    ``batch_size`` (at most the sample)."""
    examples = sample(next(iter(task.eval_sets.values())))
    prompts = [task.prompt(e, with_context) for e in examples]
    return measure(model, tokenizer, prompts, min(batch_size, len(prompts)))


def serving_metrics(pairs: Sequence[tuple[ServingCost, ServingCost]]) -> dict[str, float]:
    """The flat ``serving/*`` metrics of (teacher, student) measurements, averaged over the pairs (one per
    evaluated task; none: no metrics), with the teacher / student ratios of the averages."""
    if not pairs:
        return {}
    metrics = {}
    for quantity, ratio in (("prompt_tokens", "prompt_tokens"), ("latency_ms", "latency"), ("kv_bytes", "kv_bytes")):
        teacher = sum(getattr(t, quantity) for t, _ in pairs) / len(pairs)
        student = sum(getattr(s, quantity) for _, s in pairs) / len(pairs)
        metrics[f"serving/teacher_{quantity}"] = teacher
        metrics[f"serving/student_{quantity}"] = student
        metrics[f"serving/{ratio}_ratio"] = teacher / student
    return metrics
