"""Shared-prefix attention gives the logits of a full forward over context + rows, on models that use it and
on one that shares nothing (a sliding window).

The reference is the model's own forward over each whole prompt (left-padded, no cache). Rows have answers of
different lengths, so every batch has padding inside the rows' own part; only positions that predict a real
answer token are compared (the others hold padding, whose logits mean nothing). Tolerance: 1e-5 absolute plus
1e-5 relative in float32, where the log-sum-exp combination and sdpa differ only in summation order.
"""

from __future__ import annotations

import pytest
import torch
from test_generation import CONTEXT, behaving  # noqa: F401 (the behaving model's fixture)
from test_models import tiny  # noqa: F401
from transformers import MistralConfig, MistralForCausalLM

from ctxdistill import prefix_attention
from ctxdistill.encoding import SharedPrefix, answer_logits, encode

QUERIES = ["\n 3 5", "\n 1 2 3 4 6", "\n 6", "\n 2 3 5 1 1 2 3"]


def compare_with_full_forward(model, tokenizer, context: str, batch_size: int) -> SharedPrefix:
    prompts = [context + q for q in QUERIES]
    lengths = [1, 4, 2, 3]  # answers of different lengths: padding inside the own part
    answers = [tokenizer(" 1 2 3 4 5 6", add_special_tokens=False).input_ids[:n] for n in lengths]
    prefix = SharedPrefix(model, tokenizer, prompts)
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            rows, spans = prompts[start : start + batch_size], answers[start : start + batch_size]
            full = answer_logits(model, encode(tokenizer, rows, spans))
            batch = encode(tokenizer, rows, spans, prefix_length=prefix.length)
            shared = answer_logits(model, batch, prefix)
            mask = batch["answer_mask"]
            torch.testing.assert_close(shared[mask], full[mask], atol=1e-5, rtol=1e-5)
    return prefix


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_shared_prefix_logits_equal_a_full_forward_on_the_tiny_model(tiny, batch_size):  # noqa: F811
    _, tokenizer, model = tiny
    context = "Label each review.\n\nReview: good\nAnswer: yes\n\nReview: bad\nAnswer: no"
    prefix = compare_with_full_forward(model, tokenizer, context, batch_size)
    assert prefix.shares_attention and prefix.length >= len(tokenizer(context).input_ids) - 1


@pytest.mark.parametrize("batch_size", [1, 4])
def test_shared_prefix_logits_equal_a_full_forward_on_the_behaving_model(behaving, batch_size):  # noqa: F811
    _, tokenizer, model = behaving
    prefix = compare_with_full_forward(model, tokenizer, CONTEXT, batch_size)
    assert prefix.shares_attention and prefix.length >= len(tokenizer(CONTEXT).input_ids) - 1


def test_the_attention_function_is_used_only_within_a_prefixed_call(tiny):  # noqa: F811
    _, tokenizer, model = tiny
    prefix = SharedPrefix(model, tokenizer, [CONTEXT + q for q in QUERIES])
    batch = encode(tokenizer, [CONTEXT + q for q in QUERIES], prefix_length=prefix.length)
    with torch.no_grad():
        answer_logits(model, batch, prefix)
    assert model.config._attn_implementation == "sdpa"


def test_a_sliding_window_model_runs_whole_prompts_with_the_same_logits(tiny):  # noqa: F811
    """Padding between a copied context and a row's tokens would shift the window: nothing is shared."""
    _, tokenizer, _ = tiny
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,  # shorter than the context: the window matters
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    model = MistralForCausalLM(config).eval()
    context = "Label each review.\n\n" + "Review: good\nAnswer: yes\n\n" * 4
    assert len(tokenizer(context).input_ids) > config.sliding_window
    prefix = compare_with_full_forward(model, tokenizer, context, batch_size=4)
    assert prefix.length == 0 and not prefix.shares_attention


@pytest.mark.parametrize("architecture", ["bloom", "gpt_neo"])
def test_a_model_with_attention_code_of_its_own_runs_whole_prompts_with_the_same_logits(tiny, architecture):  # noqa: F811
    """Found by the seventeenth audit: Bloom, Falcon, GPT-Neo, MPT and XGLM never call transformers' attention
    interface, so with the shared context each row attended to its own tokens only (4-6 nats off, 6 of 12
    predictions changed), and their padding went unmasked."""
    from transformers import AutoModelForCausalLM, BloomConfig, GPTNeoConfig

    _, tokenizer, _ = tiny
    torch.manual_seed(0)
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": 0, "eos_token_id": 0, "initializer_range": 0.3}
    config = (
        BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4, **special)
        if architecture == "bloom"
        else GPTNeoConfig(
            vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global"], 2]],
            max_position_embeddings=512, **special,
        )
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    context = "Label each review.\n\nReview: good\nAnswer: yes\n\nReview: bad\nAnswer: no"
    prefix = compare_with_full_forward(model, tokenizer, context, batch_size=4)
    assert not prefix.shares_attention


def test_the_context_part_matches_a_hand_softmax_with_and_without_gradients():
    """Without gradients the CPU runs the fused flash kernel; with them, the plain version (the kernel's backward
    ignores the log-sum-exp). Both give softmax(q k^T) v and logsumexp(q k^T); the gradient flows through both."""
    torch.manual_seed(0)
    query, key, value = torch.randn(3, 40, 16), torch.randn(3, 70, 16), torch.randn(3, 70, 16)
    scores = query @ key.transpose(-1, -2)
    expected = (scores.softmax(-1) @ value, scores.logsumexp(-1))
    with torch.no_grad():
        fused = prefix_attention._context_attention(query, key, value)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    query.requires_grad_(True)
    out, lse = prefix_attention._context_attention(query, key, value)
    torch.testing.assert_close((out, lse), expected, atol=1e-5, rtol=1e-5)
    (out.sum() + lse.sum()).backward()
    reference = query.detach().clone().requires_grad_(True)
    hand = reference @ key.transpose(-1, -2)
    ((hand.softmax(-1) @ value).sum() + hand.logsumexp(-1).sum()).backward()
    torch.testing.assert_close(query.grad, reference.grad, atol=1e-5, rtol=1e-5)
