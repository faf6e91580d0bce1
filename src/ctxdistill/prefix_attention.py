"""Attention over a context shared by every row of a batch, without copying it per row.

The rows of a batch all continue one context (the demonstrations), whose keys and values are
computed once (:class:`~ctxdistill.encoding.SharedPrefix`). Attention splits over the keys: the
context part and each row's own part (its query, answer and generated tokens) are attended
separately and combined by their log-sum-exp, as Hydragen (Juravsky et al. 2024) and cascade
attention (FlashInfer) do. The context part is one batched matmul of every row's queries against
the context's keys per key/value head: the context is never copied per row, nor repeated for the
query heads that share a key/value head.

It plugs in through transformers' attention interface under the name ``shared_prefix``; the model
code is untouched. The model runs the rows' own tokens with a cache and mask of their own, and the
context's keys and values arrive as the ``shared_prefix`` keyword (one ``(keys, values)`` pair
[kv_heads, context, head_dim] per layer), which transformers passes through to every attention
call. Layers with a sliding window, logit soft-capping or attention sinks are not handled (the
caller falls back to a per-row copy of the cache for such models).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "shared_prefix"
# The attention implementations whose arithmetic this one reproduces exactly (plain softmax attention).
REPLACES = ("sdpa", "eager")


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    shared_prefix: Optional[Sequence[tuple[torch.Tensor, torch.Tensor]]] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """softmax(q [context keys; own keys]^T) [context values; own values] for query [B, H, L, D] and the rows'
    own key/value [B, H_kv, S, D]; ``attention_mask`` [B, 1, L, S] (True: attend) covers the own keys only,
    every row attends to the whole context. Returns [B, L, H, D], as transformers' attention functions do."""
    if shared_prefix is None:
        raise ValueError("shared_prefix attention needs the context's keys and values (the shared_prefix keyword)")
    unhandled = [k for k in ("sliding_window", "softcap", "s_aux") if kwargs.get(k) is not None]
    if unhandled or (dropout and module.training):
        raise NotImplementedError(
            f"shared_prefix attention does not handle {unhandled or ['attention dropout']} "
            f"(layer {module.layer_idx}); SharedPrefix copies the context per row for such models"
        )
    rows, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scaling = dim**-0.5 if scaling is None else scaling
    context_keys, context_values = shared_prefix[module.layer_idx]  # [H_kv, P, D]
    query = (query * scaling).contiguous()  # [B, H, L, D]: a group's heads are adjacent
    # Context part: every row's queries of one key/value head in one matrix [H_kv, B * G * L, D].
    grouped = query.view(rows, kv_heads, groups * length, dim).transpose(0, 1).reshape(kv_heads, -1, dim)
    context_out, context_lse = _context_attention(grouped, context_keys, context_values)
    context_out = context_out.view(kv_heads, rows, groups * length, dim).transpose(0, 1)
    context_lse = context_lse.view(kv_heads, rows, groups * length).transpose(0, 1)
    # Own part: per row, the queries of a key/value head's group against that head [B, H_kv, G * L, S].
    own_length = key.shape[2]
    if attention_mask is None:  # causal over the own tokens, the queries being the last ones
        attention_mask = torch.ones(length, own_length, dtype=torch.bool, device=query.device)
        attention_mask = attention_mask.tril(own_length - length)
    mask = attention_mask[..., -own_length:].unsqueeze(-3)  # [B or 1, 1, 1, L, S]: one mask for a group's heads
    own_out, own_lse = _softmax_attention(query.view(rows, kv_heads, groups * length, dim), key, value, mask)
    # Each part's softmax weighed by its share of the total mass.
    total = torch.logaddexp(context_lse, own_lse)
    out = context_out * (context_lse - total).exp().unsqueeze(-1) + own_out * (own_lse - total).exp().unsqueeze(-1)
    return out.reshape(rows, heads, length, dim).transpose(1, 2).to(value.dtype).contiguous(), None


def _context_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_softmax_attention` without a mask. Without gradients on the CPU it runs PyTorch's fused (flash)
    CPU kernel, which returns the log-sum-exp too and never holds the [queries, context] scores: those
    score passes, not the matmuls, made the context's cost grow with its length. The kernel's backward
    ignores the log-sum-exp, so training keeps the plain version."""
    if query.device.type != "cpu" or (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))):
        return _softmax_attention(query, key, value, None)
    # Under autocast the queries come in its half precision and the context's cache (computed before) may not:
    # the kernel wants one dtype, as autocast's matmuls would give the plain version.
    key, value = key.to(query.dtype), value.to(query.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), 0.0, False, scale=1.0
    )
    return out[0].float(), lse[0].float()


def _softmax_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(query key^T) value, the log-sum-exp of each query's scores) in float32; ``mask`` (True: attend)
    applies to the scores viewed as [..., G, L, S]. A query that may attend to nothing gets zeros and -inf."""
    scores = torch.matmul(query, key.transpose(-1, -2)).float()
    if mask is not None:
        shape = scores.shape
        scores = scores.view(*shape[:-2], -1, mask.shape[-2], shape[-1])  # [..., G, L, S]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        scores = scores.view(shape)
    lse = scores.logsumexp(-1, keepdim=True)
    # A fully masked row has lse = -inf; subtracting the smallest float instead keeps its weights at 0, not NaN.
    weights = (scores - lse.clamp(min=torch.finfo(scores.dtype).min)).exp_()
    return torch.matmul(weights.to(value.dtype), value).float(), lse.squeeze(-1)


AttentionInterface.register(NAME, shared_prefix_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # boolean masks of the rows' own tokens, as for sdpa


def attention_configs(model: torch.nn.Module) -> list[PretrainedConfig]:
    """The configurations that choose the attention function of ``model``'s layers."""
    configs = {
        id(m.config): m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)
    }
    return list(configs.values())


def handles(model: torch.nn.Module) -> bool:
    """Whether every layer of ``model`` computes plain softmax attention this function reproduces, through
    transformers' attention interface: a model class with attention code of its own (Bloom, Falcon, GPT-Neo, MPT,
    XGLM) never calls it, so its rows would attend to their own tokens only, without the context."""
    configs = attention_configs(model)
    capped = any(getattr(c, "attn_logit_softcapping", None) for c in configs)
    classes = {type(m) for m in model.modules() if isinstance(m, PreTrainedModel)}
    interfaced = bool(classes) and all(getattr(c, "_supports_attention_backend", False) for c in classes)
    return bool(configs) and interfaced and not capped and all(c._attn_implementation in REPLACES for c in configs)


@contextlib.contextmanager
def attending(configs: list[PretrainedConfig]) -> Iterator[None]:
    """Within: the layers these configurations govern use :func:`shared_prefix_attention`."""
    previous = [c._attn_implementation for c in configs]
    for config in configs:
        config._attn_implementation = NAME
    try:
        yield
    finally:
        for config, name in zip(configs, previous):
            config._attn_implementation = name
