"""Divergences between teacher and student next-token distributions.

All functions take logits [..., V] and a boolean mask [...] of the positions that
count, and return the mean over those positions of a divergence summed over the
vocabulary. Teacher logits are detached: gradient flows through the student only.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def teacher_distribution(
    teacher_logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log p_T at temperature T: over the whole vocabulary [..., V] with indices None, or, with
    top_k, at the teacher's k most likely tokens only: (log-probabilities [..., k], indices [..., k]).

    The top-k form is what the teacher cache stores: k numbers per position instead of V.
    """
    logprobs = (teacher_logits.detach().float() / temperature).log_softmax(-1)
    if top_k is None or top_k >= logprobs.shape[-1]:
        return logprobs, None
    top = logprobs.topk(top_k, dim=-1)
    return top.values, top.indices


def with_rest_bucket(logprobs: torch.Tensor) -> torch.Tensor:
    """Append one category holding the probability mass outside the given tokens: [..., k] -> [..., k+1]."""
    captured = torch.logsumexp(logprobs, dim=-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([logprobs, torch.log(-torch.expm1(captured))], -1)


def answer_word_distribution(logits: torch.Tensor, word_ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log-probabilities [..., C+1] of each answer word (its single token ``word_ids[c]``) and of anything else,
    from one model's logits [..., V] at temperature T: the level at which two models with different
    tokenizers can be compared (both can write each answer word or something else)."""
    logprobs = (logits.float() / temperature).log_softmax(-1)[..., word_ids]
    return with_rest_bucket(logprobs)


def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(p_T || p_S) per position; tokens the teacher gives zero mass contribute nothing."""
    p_t = teacher_logp.exp()
    return torch.where(p_t > 0, p_t * (teacher_logp - student_logp), torch.zeros_like(p_t)).sum(-1)


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(p_S || p_T) per position."""
    return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)


def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """GKD's generalised JSD per position, with TRL's semantics for beta.

    M = beta * p_T + (1 - beta) * p_S;  JSD_beta = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M).
    beta = 0 is defined as forward KL(p_T || p_S) and beta = 1 as reverse KL(p_S || p_T),
    the limits TRL uses (the mixture formula itself vanishes there).
    """
    if beta == 0:
        return forward_kl(student_logp, teacher_logp)
    if beta == 1:
        return reverse_kl(student_logp, teacher_logp)
    mixture = torch.logsumexp(torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1 - beta)]), 0)
    return beta * forward_kl(mixture, teacher_logp) + (1 - beta) * forward_kl(mixture, student_logp)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    teacher_indices: Optional[torch.Tensor] = None,
    top_k_rest: str = "renormalize",
) -> torch.Tensor:
    """Mean divergence over the masked answer positions (Upadhayaya et al.'s loss is the default).

    ``student_logits`` may be log-probabilities already (e.g. :func:`answer_word_distribution`): at
    temperature 1 the log-softmax leaves them unchanged.

    ``teacher_logprobs``/``teacher_indices`` come from :func:`teacher_distribution` at the same
    temperature. With top-k indices, ``top_k_rest`` says what happens to the other tokens:
    ``renormalize`` spreads their mass over the k (only forward KL is defined then: the student
    keeps its full-vocabulary normalisation), ``bucket`` lumps it into one extra category for
    teacher and student alike, which approximates the full divergence for every choice of it.
    """
    s_logp = (student_logits.float() / temperature).log_softmax(-1)
    t_logp = teacher_logprobs
    if teacher_indices is not None:
        s_logp = s_logp.gather(-1, teacher_indices.to(s_logp.device))
        if top_k_rest == "bucket":
            s_logp, t_logp = with_rest_bucket(s_logp), with_rest_bucket(t_logp)
        elif top_k_rest == "renormalize":
            t_logp = t_logp.log_softmax(-1)
        else:
            raise ValueError(f"unknown top_k_rest {top_k_rest!r}; use renormalize or bucket")
    if divergence == "forward_kl":
        per_position = forward_kl(s_logp, t_logp)
    elif divergence == "reverse_kl":
        per_position = reverse_kl(s_logp, t_logp)
    elif divergence == "jsd":
        per_position = generalized_jsd(s_logp, t_logp, beta)
    else:
        raise ValueError(f"unknown divergence {divergence!r}; use forward_kl, reverse_kl or jsd")
    return _masked_mean(per_position, mask)


def align_by_text_offsets(student_ends: list[int], teacher_ends: list[int]) -> list[tuple[list[int], list[int]]]:
    """Pairs of token groups, (student positions, teacher positions), that write the same piece of one text.

    ``*_ends`` are the text offsets at which each token of the two tokenizations ends. A group closes where
    both tokenizers end a token at the same offset; tokens left over at the end (a side's end-of-sequence,
    which writes no text) form no group. Two equal tokenizations give one group per token.
    """
    groups, student_start, teacher_start = [], 0, 0
    s = t = 0
    while s < len(student_ends) and t < len(teacher_ends):
        if student_ends[s] < teacher_ends[t]:
            s += 1
        elif student_ends[s] > teacher_ends[t]:
            t += 1
        else:
            s, t = s + 1, t + 1
            groups.append((list(range(student_start, s)), list(range(teacher_start, t))))
            student_start, teacher_start = s, t
    return groups


def merged_group_probabilities(probs: torch.Tensor, token_probs: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """One probability vector per group of positions [G, K], by the chain rule: the distribution at the group's
    first position, which predicts its first token, times the probability of each later token of the group
    (what the model gave the token actually there). ``probs`` [P, K] may be any per-position vectors the scaling
    applies to: the distributions over some tokens, or, since sorting commutes with it, the sorted distributions
    (or their first K and a rest category); ``token_probs`` [P] is each position's probability of its own token."""
    scales = torch.stack([token_probs[group[1:]].prod() for group in groups])
    return probs[[group[0] for group in groups]] * scales.unsqueeze(-1)


def with_rest(probs: torch.Tensor, total: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Probabilities of some tokens [..., k] and one category for the rest of ``total`` [..., k+1] (1: the
    whole distribution; less when some tokens are counted elsewhere)."""
    rest = torch.as_tensor(total, dtype=probs.dtype, device=probs.device).unsqueeze(-1) - probs.sum(-1, keepdim=True)
    return torch.cat([probs, rest.clamp(min=0)], -1)


def sorted_with_rest(
    probs: torch.Tensor, top_k: Optional[int], excluded: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Probabilities sorted in descending order [..., V]; with ``top_k``, the k largest and one category for the
    rest of the mass [..., k+1]. ``excluded`` token ids (compared elsewhere, e.g. GOLD's shared tokens) are left
    out: of the sorted vector [..., V - len(excluded)] and of the rest."""
    kept = probs if excluded is None else probs.index_fill(-1, excluded.to(probs.device), 0)
    ordered = kept.sort(dim=-1, descending=True).values
    if top_k is None:
        return ordered[..., : probs.shape[-1] - (0 if excluded is None else len(excluded))]
    return with_rest(ordered[..., :top_k], kept.sum(-1))


def universal_logit_distance(student_sorted: torch.Tensor, teacher_sorted: torch.Tensor) -> torch.Tensor:
    """The ULD loss (Boizard et al. 2024) of aligned groups [G, Ks] and [G, Kt] of sorted probabilities: the
    L1 distance between the two sorted vectors (the shorter zero-padded), averaged over the groups. It needs
    no shared vocabulary (the sorting forgets which token holds which probability: it says how sure the
    teacher is, not of what; the cross-entropy on the teacher's answer says what)."""
    width = max(student_sorted.shape[-1], teacher_sorted.shape[-1])
    student_sorted = F.pad(student_sorted, (0, width - student_sorted.shape[-1]))
    teacher_sorted = F.pad(teacher_sorted.to(student_sorted), (0, width - teacher_sorted.shape[-1]))
    return (student_sorted - teacher_sorted).abs().sum(-1).mean()


def uld_teacher_targets(
    logits: torch.Tensor,
    answer_ids: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    shared_ids: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """What ULD needs of the teacher at its answer positions [..., V]: its sorted log-probabilities (the first
    ``top_k``; with GOLD's ``shared_ids``, of the other tokens only), the log-probability of each answer token,
    and (GOLD) the log-probabilities of the shared tokens [..., M]."""
    logprobs = (logits.float() / temperature).log_softmax(-1)
    token_logprobs = logprobs.gather(-1, answer_ids.unsqueeze(-1)).squeeze(-1)
    others = logprobs if shared_ids is None else logprobs.index_fill(-1, shared_ids, float("-inf"))
    width = logprobs.shape[-1] - (0 if shared_ids is None else len(shared_ids))
    ordered = others.sort(dim=-1, descending=True).values[..., : min(width, top_k or width)]
    return ordered, token_logprobs, None if shared_ids is None else logprobs[..., shared_ids]


def uld_distance(
    student_probs: torch.Tensor,
    student_token_probs: torch.Tensor,
    groups: list[tuple[list[int], list[int]]],
    teacher_sorted_logprobs: torch.Tensor,
    teacher_token_logprobs: torch.Tensor,
    teacher_shared_logprobs: Optional[torch.Tensor] = None,
    student_shared_ids: Optional[torch.Tensor] = None,
    top_k: Optional[int] = None,
    weights: tuple[float, float] = (0.0, 1.0),
    beta: float = 0.5,
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """One row's ULD distance over its aligned ``groups`` of (student, teacher) positions: (distance, shared
    term, sorted term). The student's distributions [Ps, Vs] and each position's probability of its own token
    [Ps]; the teacher's :func:`uld_teacher_targets` at its positions. Each group's vectors are merged by the
    chain rule (:func:`merged_group_probabilities`) and their sorted forms compared (L1,
    :func:`universal_logit_distance`; with ``top_k``, the first k and the rest of the mass). GOLD's hybrid
    (with the shared tokens): the weighted sum ``weights`` of the generalised JSD (``beta``) over the shared
    tokens' unnormalised probabilities, each clamped at 1e-8 before its log as GOLD does, and the sorted
    distance over the others."""
    student_merged = functools.partial(
        merged_group_probabilities, token_probs=student_token_probs, groups=[s for s, _ in groups]
    )
    teacher_merged = functools.partial(
        merged_group_probabilities, token_probs=teacher_token_logprobs.exp(), groups=[t for _, t in groups]
    )
    teacher_sorted = teacher_sorted_logprobs.exp()
    teacher_shared = None if teacher_shared_logprobs is None else teacher_shared_logprobs.exp()
    if top_k:
        teacher_sorted = with_rest(teacher_sorted, 1 if teacher_shared is None else 1 - teacher_shared.sum(-1))
    sorted_term = universal_logit_distance(
        student_merged(sorted_with_rest(student_probs, top_k, student_shared_ids)), teacher_merged(teacher_sorted)
    )
    if teacher_shared is None:
        return sorted_term, None, sorted_term
    shared_term = generalized_jsd(
        student_merged(student_probs[:, student_shared_ids]).clamp(min=1e-8).log(),
        teacher_merged(teacher_shared).clamp(min=1e-8).log(),
        beta,
    ).mean()
    return weights[0] * shared_term + weights[1] * sorted_term, shared_term, sorted_term


def answer_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the target tokens over the masked answer positions."""
    per_position = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none")
    return _masked_mean(per_position.view(targets.shape), mask)


def sampled_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    sampling_logprobs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reverse KL estimated from sampled tokens (on-policy distillation, SDFT's sampled-token mode).

    Per position, with x drawn from q and k = log p_S(x) - log p_T(x), the returned value is the masked
    mean of w * k and its gradient is the policy gradient w * k * grad log p_S(x), where
    w = p_S(x) / q(x) is the importance weight (detached). ``sampling_logprobs`` [B, P] is log q(x) of
    the distribution each token was drawn from; None means the student's own at temperature 1 (w = 1).
    Whenever q > 0 wherever p_S > 0 (any temperature, student or teacher samples, but not top-k
    sampling), E_q[w k] is KL(p_S || p_T) at that position and E_q[w k grad log p_S(x)] its exact gradient.
    """
    student_logp = student_logits.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    teacher_logp = teacher_logits.detach().float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    estimate = (student_logp - teacher_logp).detach()
    if sampling_logprobs is not None:
        # Padding positions drew no token: their weight can overflow to inf, and inf times a zero mask is NaN.
        log_weight = (student_logp - sampling_logprobs).detach().masked_fill(~mask.bool(), 0)
        estimate = estimate * log_weight.exp()
    return _masked_mean(estimate * (student_logp - student_logp.detach()) + estimate, mask)
