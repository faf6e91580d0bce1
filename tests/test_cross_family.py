"""A teacher from another model family: cd over the answer words, where two vocabularies meet."""

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_generation import behaving  # noqa: F401 (the behaving model's fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer

from ctxdistill.config import ConfigError, validate
from ctxdistill.data import build_task
from ctxdistill.encoding import tokenization_groups
from ctxdistill.evaluation import Evaluator, score
from ctxdistill.losses import (
    align_by_text_offsets,
    answer_word_distribution,
    distillation_loss,
    forward_kl,
    merged_group_probabilities,
    sorted_with_rest,
    universal_logit_distance,
    with_rest_bucket,
)
from ctxdistill.models import ModelHandle, ModelLoadError, load_model, load_tokenizer
from ctxdistill.run import run

from conftest import TINY, behaving_teacher_overrides, method_of


def test_the_shared_vocabulary_objective_matches_hand_computed_numbers():
    # The teacher has 5 tokens and writes the two answer words as tokens 3 and 1; the student has 4 tokens
    # and writes them as 0 and 2. Each is reduced to P(word 1), P(word 2), P(anything else).
    teacher_probs = [0.1, 0.2, 0.05, 0.6, 0.05]  # words: 0.6, 0.2; rest 0.2
    student_probs = [0.3, 0.4, 0.2, 0.1]  # words: 0.3, 0.2; rest 0.5
    teacher = answer_word_distribution(torch.tensor(teacher_probs).log().view(1, 1, 5), [3, 1])
    student = answer_word_distribution(torch.tensor(student_probs).log().view(1, 1, 4), [0, 2])
    assert teacher.exp().view(-1).tolist() == pytest.approx([0.6, 0.2, 0.2])
    assert student.exp().view(-1).tolist() == pytest.approx([0.3, 0.2, 0.5])
    mask = torch.ones(1, 1, dtype=torch.bool)
    # KL(T || S) = .6 ln(.6/.3) + .2 ln(.2/.2) + .2 ln(.2/.5) = 0.41588830 - 0.18325815 = 0.23263
    assert distillation_loss(student, teacher, mask).item() == pytest.approx(0.232630, abs=1e-5)
    # KL(S || T) = .3 ln(.3/.6) + .2 ln 1 + .5 ln(.5/.2) = -0.20794415 + 0.45814537 = 0.25020
    assert distillation_loss(student, teacher, mask, "reverse_kl").item() == pytest.approx(0.250201, abs=1e-5)
    # At temperature 2 each model's whole distribution is softened first, then reduced to the three categories.
    soft_t = [p**0.5 / sum(q**0.5 for q in teacher_probs) for p in teacher_probs]
    soft_s = [p**0.5 / sum(q**0.5 for q in student_probs) for p in student_probs]
    t3 = [soft_t[3], soft_t[1], 1 - soft_t[3] - soft_t[1]]
    s3 = [soft_s[0], soft_s[2], 1 - soft_s[0] - soft_s[2]]
    teacher2 = answer_word_distribution(torch.tensor(teacher_probs).log().view(1, 1, 5), [3, 1], temperature=2.0)
    student2 = answer_word_distribution(torch.tensor(student_probs).log().view(1, 1, 4), [0, 2], temperature=2.0)
    expected = sum(p * math.log(p / q) for p, q in zip(t3, s3))
    assert distillation_loss(student2, teacher2, mask).item() == pytest.approx(expected, abs=1e-6)


VERBALIZERS = [*TINY, "method=cd", "method.distil_over=verbalizers"]


def test_a_teacher_with_another_tokenizer_teaches_the_answer_words_end_to_end(
    make_cfg, behaving_model_dir, monkeypatch
):
    """The tiny student (SmolLM2's tokenizer) and the behaving model as teacher (its own 264-token tokenizer):
    the first step's loss, before any update, is the KL between each model's answer-word distribution as the
    evaluator scores it, each with its own tokenizer; evaluation compares them over the same categories."""
    from ctxdistill.methods.distill import ContextDistillation

    cfg = make_cfg(
        *VERBALIZERS,
        *behaving_teacher_overrides(behaving_model_dir),
        "dataset.num_train_queries=8",
        "dataset.source.split_sizes.eval=16",
        "trainer.batch_size=8",
        "trainer.max_steps=1",
    )
    # One token each in both tokenizers; the behaving teacher, shown the context, gives the line end most of
    # its mass (the random student spreads its own evenly), so the loss is far from zero.
    cfg.dataset.verbalizers = ["\n", "1"]
    losses = []
    original = ContextDistillation.loss

    def recording(self, handle, batch):
        loss, stats = original(self, handle, batch)
        losses.append(loss.item())
        return loss, stats

    monkeypatch.setattr(ContextDistillation, "loss", recording)
    result = run(cfg)
    student_tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    teacher_tokenizer = load_tokenizer(cfg.method.teacher_model, cfg.cache_dir)
    assert len(teacher_tokenizer) == 264 and student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab()
    student_model = load_model(cfg.model, cfg.cache_dir, student_tokenizer, cfg.seed)
    teacher_model = load_model(cfg.method.teacher_model, cfg.cache_dir, teacher_tokenizer, cfg.seed)
    task = build_task(cfg.dataset, cfg.seed)
    student = score(student_model, student_tokenizer, task, task.train_queries, with_context=False, batch_size=8)
    teacher = score(teacher_model, teacher_tokenizer, task, task.train_queries, with_context=True, batch_size=8)
    expected = forward_kl(with_rest_bucket(student.label_logprobs), with_rest_bucket(teacher.label_logprobs))
    assert expected.mean().item() > 1
    assert losses[0] == pytest.approx(expected.mean().item(), rel=1e-4)
    assert 0 < result["metrics"]["eval/kl_to_teacher"] < 10


def test_a_teacher_with_its_own_tokenizer_is_compared_over_the_answer_words(make_cfg):
    cfg = make_cfg(*TINY, "dataset.source.split_sizes.eval=16")
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    model = load_model(cfg.model, cfg.cache_dir, tokenizer, cfg.seed)
    task = build_task(cfg.dataset, cfg.seed)
    shared = Evaluator(ModelHandle(model, model), tokenizer, task, False, 16).evaluate()[0]
    # the teacher reads its own tokenizer (here a second copy of the same one)
    handle = ModelHandle(model, model, teacher_tokenizer=load_tokenizer(cfg.model, cfg.cache_dir))
    evaluator = Evaluator(handle, tokenizer, task, False, 16)
    own, rows = evaluator.evaluate()
    assert not evaluator.shared_vocabulary
    student = score(model, tokenizer, task, task.eval_sets["eval"], with_context=False, batch_size=16)
    teacher = score(model, tokenizer, task, task.eval_sets["eval"], with_context=True, batch_size=16)
    expected = forward_kl(with_rest_bucket(student.label_logprobs), with_rest_bucket(teacher.label_logprobs))
    assert own["eval/kl_to_teacher"] == pytest.approx(expected.mean().item(), rel=1e-5)
    # three categories are a coarsening of the vocabulary: their KL can only be smaller
    assert own["eval/kl_to_teacher"] < shared["eval/kl_to_teacher"]
    assert own["eval/teacher_accuracy"] == shared["eval/teacher_accuracy"]
    assert own["eval/accuracy"] == shared["eval/accuracy"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["method.answer=teacher_generation"], "method.divergence=uld"),
        (["method.top_k=5", "method.top_k_rest=bucket"], "no top_k"),
        (["dataset=addition"], "answer words of a classification dataset"),
        (["model@method.teacher_model=minilm-l6"], "a teacher predicts the next token"),
        (["method.teacher=live", "method.distil_over=vocabulary", "model@method.teacher_model=tiny-random"], "live"),
    ],
)
def test_unsupported_combinations_are_refused_before_anything_loads(make_cfg, overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(make_cfg(*VERBALIZERS, *("+" + o if o.startswith("model@") else o for o in overrides)))


def test_a_teacher_with_another_vocabulary_needs_the_answer_words_each_one_token(make_cfg):
    cfg = make_cfg(*VERBALIZERS, "+model@method.teacher_model=minilm-l6")
    method = instantiate(cfg.method, _convert_="all")
    task = build_task(cfg.dataset, cfg.seed)
    student = load_tokenizer(cfg.model, cfg.cache_dir)
    bert = load_tokenizer(cfg.method.teacher_model, cfg.cache_dir)  # another vocabulary: BERT's WordPiece
    method.check_teacher(cfg, task, student, bert)  # " foo" and " bar" are one token in each
    task.verbalizers = [" foo", " qzxv"]  # the second is several tokens in each tokenizer
    with pytest.raises(ModelLoadError, match="each must be one token of its own"):
        method.check_teacher(cfg, task, student, bert)
    method.over_verbalizers = False
    with pytest.raises(
        ModelLoadError,
        match="^method.teacher_model=minilm-l6 and .*different vocabularies.*method.distil_over=verbalizers",
    ):
        method.check_teacher(cfg, task, student, bert)


# ULD: the text "abc" written by a student as "a" "b" "c" (3-token vocabulary) and by a teacher as "ab" "c"
# (4 tokens). The student's first two positions write the teacher's first token.
STUDENT_PROBS = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]  # its tokens: 0, 1, 2
TEACHER_PROBS = [[0.1, 0.7, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]]  # its tokens: 1, 0
GROUPS = [([0, 1], [0]), ([2], [1])]


def test_uld_aligns_the_two_tokenizations_where_both_end_a_token():
    assert align_by_text_offsets([1, 2, 3], [2, 3]) == GROUPS
    assert align_by_text_offsets([2, 3], [1, 3]) == [([0, 1], [0, 1])]
    assert align_by_text_offsets([3, 5], [3, 5, 5]) == [([0], [0]), ([1], [1])]  # the teacher's end-of-sequence
    assert align_by_text_offsets([1, 2], [1, 2]) == [([0], [0]), ([1], [1])]


class ByteTokenizer:
    """One token per UTF-8 byte, decoded as byte-level tokenizers do: a character cut short writes U+FFFD."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


class CharTokenizer:
    """One token per character."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def test_uld_groups_the_tokens_that_split_a_character_with_the_token_that_writes_it():
    # "a日本": the byte tokenizer writes 日 and 本 in three tokens each (SmolLM2's writes 日 in two), the
    # character tokenizer in one. A token that ends inside a character writes none of it yet.
    text = "a日本"
    groups = tokenization_groups(ByteTokenizer(), list(text.encode()), CharTokenizer(), [ord(c) for c in text])
    assert groups == [([0], [0]), ([1, 2, 3], [1]), ([4, 5, 6], [2])]
    # One tokenizer on both sides is still one group per token.
    assert tokenization_groups(ByteTokenizer(), list(text.encode()), ByteTokenizer(), list(text.encode())) == [
        ([i], [i]) for i in range(7)
    ]


def test_uld_matches_hand_computed_numbers():
    student = torch.tensor(STUDENT_PROBS)
    teacher = torch.tensor(TEACHER_PROBS)
    # Group 1: the student's sorted first distribution times its 0.6 for "b": [.3, .18, .12, 0] against the
    # teacher's [.7, .1, .1, .1]: L1 0.4 + 0.08 + 0.02 + 0.1 = 0.6. Group 2: [.6, .2, .2, 0] against
    # [.4, .3, .2, .1]: 0.2 + 0.1 + 0 + 0.1 = 0.4. Mean 0.5.
    s = merged_group_probabilities(sorted_with_rest(student, None), torch.tensor([0.5, 0.6, 0.6]), [[0, 1], [2]])
    t = merged_group_probabilities(sorted_with_rest(teacher, None), torch.tensor([0.7, 0.4]), [[0], [1]])
    assert s.flatten().tolist() == pytest.approx([0.3, 0.18, 0.12, 0.6, 0.2, 0.2])
    assert universal_logit_distance(s, t).item() == pytest.approx(0.5)
    # The first token and the rest: [.3, .3] vs [.7, .3] (0.4); [.6, .4] vs [.4, .6] (0.4).
    s1 = merged_group_probabilities(sorted_with_rest(student, 1), torch.tensor([0.5, 0.6, 0.6]), [[0, 1], [2]])
    t1 = merged_group_probabilities(sorted_with_rest(teacher, 1), torch.tensor([0.7, 0.4]), [[0], [1]])
    assert universal_logit_distance(s1, t1).item() == pytest.approx(0.4)


def test_the_uld_loss_of_a_batch_is_cross_entropy_plus_the_mean_distance_of_its_rows():
    """Two rows: the one above, and one whose span is a single token on both sides (left of it, padding)."""
    from ctxdistill.methods.distill import DistillConfig
    from ctxdistill.teacher_cache import TeacherTargets

    method = method_of(
        DistillConfig, name="cd", answer="teacher_generation", divergence="uld", uld_crossentropy_weight=0.5
    )
    teacher_sorted = torch.tensor(TEACHER_PROBS).sort(-1, descending=True).values.log()
    rows = [
        (TeacherTargets([1, 0], teacher_sorted, None, torch.tensor([0.7, 0.4]).log()), GROUPS),
        (TeacherTargets([0], teacher_sorted[1:], None, torch.tensor([0.4]).log()), [([0], [0])]),
    ]
    student = torch.tensor([STUDENT_PROBS, [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], STUDENT_PROBS[2]]]).log()
    batch = {
        "answer_ids": torch.tensor([[0, 1, 2], [0, 0, 2]]),
        "answer_mask": torch.tensor([[True, True, True], [False, False, True]]),
        "uld_targets": rows,
    }
    loss, stats = method._uld_loss(student, batch)
    crossentropy = -(math.log(0.5) + 3 * math.log(0.6)) / 4  # the four answer tokens
    assert stats["uld_crossentropy"] == pytest.approx(crossentropy, rel=1e-5)
    assert stats["uld_distance"] == pytest.approx((0.5 + 0.4) / 2, rel=1e-5)  # row 2: [.6,.2,.2] vs [.4,.3,.2,.1]
    assert loss.item() == pytest.approx(0.5 * crossentropy + 0.45, rel=1e-5)


# GOLD's hybrid on the same text: the student's token 0 and the teacher's token 1 are spelt alike (the shared
# vocabulary); the others are compared sorted.
SHARED = (torch.tensor([0]), torch.tensor([1]))


@pytest.mark.parametrize(
    "top_k, weights, distance",
    [
        # Shared (JSD, beta .5, on unnormalised probabilities): group 1 student .5 x .6 = .3 against the teacher's
        # .7, mixture .5: .5 (.7 ln 1.4 + .3 ln .6) = 0.0411415; group 2 .2 against .3, mixture .25:
        # .5 (.3 ln 1.2 + .2 ln .8) = 0.0050339; mean 0.0230877. The others, sorted: group 1 [.18, .12] against
        # [.1, .1, .1]: 0.2; group 2 [.6, .2] against [.4, .2, .1]: 0.3; mean 0.25. GOLD's adaptive weights: one
        # of the teacher's 4 tokens is shared, so .25 and .75.
        (None, None, 0.25 * 0.0230877 + 0.75 * 0.25),
        (None, [1.0, 1.0], 0.0230877 + 0.25),
        # The others' first token and their rest: group 1 [.18, .12] (.3 and .2 of the student's unshared .5, times
        # .6) against [.1, .2] (the teacher's unshared mass 1 - .7, less .1): 0.16; group 2 [.6, .2] against
        # [.4, .3]: 0.3; mean 0.23.
        (1, [1.0, 1.0], 0.0230877 + 0.23),
    ],
)
def test_gold_hybrid_uld_matches_hand_computed_numbers(top_k, weights, distance):
    from ctxdistill.methods.distill import DistillConfig
    from ctxdistill.teacher_cache import TeacherTargets

    method = method_of(
        DistillConfig,
        name="cd",
        answer="teacher_generation",
        divergence="uld",
        top_k=top_k,
        top_k_rest="bucket",
        uld_hybrid=True,
        uld_hybrid_weights=weights,
    )
    method._shared = SHARED
    method._hybrid_weights = tuple(weights or (0.25, 0.75))
    # the teacher's targets from its logits, as prepare stores them: the unshared tokens sorted, the shared apart
    fields = method._targets_from_logits(torch.tensor([TEACHER_PROBS]).log(), torch.tensor([[1, 0]]))
    targets = TeacherTargets([1, 0], *(f if f is None else f[0] for f in fields))
    assert targets.shared_logprobs.exp().flatten().tolist() == pytest.approx([0.7, 0.3])
    others = [[0.1, 0.1, 0.1], [0.4, 0.2, 0.1]] if top_k is None else [[0.1], [0.4]]
    assert targets.logprobs.exp().tolist() == [pytest.approx(row) for row in others]
    batch = {
        "answer_ids": torch.tensor([[0, 1, 2]]),
        "answer_mask": torch.ones(1, 3, dtype=torch.bool),
        "uld_targets": [(targets, GROUPS)],
    }
    loss, stats = method._uld_loss(torch.tensor([STUDENT_PROBS]).log(), batch)
    assert stats["uld_shared_jsd"] == pytest.approx(0.0230877, abs=1e-6)
    assert stats["uld_distance"] == pytest.approx(distance, abs=1e-6)
    assert loss.item() == pytest.approx(stats["uld_crossentropy"] + distance, abs=1e-6)


def test_with_one_vocabulary_the_gold_hybrid_is_the_jsd_of_the_two_distributions():
    from ctxdistill.losses import generalized_jsd
    from ctxdistill.methods.distill import DistillConfig
    from ctxdistill.teacher_cache import TeacherTargets

    method = method_of(DistillConfig, name="cd", answer="teacher_generation", divergence="uld", uld_hybrid=True)
    method._shared, method._hybrid_weights = (torch.arange(3), torch.arange(3)), (1.0, 1.0)
    teacher, student = (
        torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]]),
        torch.tensor([[0.3, 0.3, 0.4], [0.5, 0.25, 0.25]]),
    )
    fields = method._targets_from_logits(teacher.log()[None], torch.tensor([[1, 0]]))
    targets = TeacherTargets([1, 0], *(f if f is None else f[0] for f in fields))
    assert targets.logprobs.shape == (2, 0)  # nothing is left to sort
    batch = {
        "answer_ids": torch.tensor([[1, 0]]),
        "answer_mask": torch.ones(1, 2, dtype=torch.bool),
        "uld_targets": [(targets, [([0], [0]), ([1], [1])])],
    }
    _, stats = method._uld_loss(student.log()[None], batch)
    assert stats["uld_sorted_distance"] == 0
    expected = generalized_jsd(student.log(), teacher.log(), 0.5).mean().item()
    assert stats["uld_distance"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["method.uld_hybrid=true"], "uld_hybrid: is a variant of divergence=uld"),
        (["method.uld_hybrid_weights=[1.0,1.0]"], "uld_hybrid_weights: must be two non-negative weights"),
        (["method.divergence=uld", "method.uld_hybrid=true", "method.uld_hybrid_weights=[1.0]"], "got \\[1.0\\]"),
        (["method.divergence=uld", "method.uld_hybrid=true", "method.uld_hybrid_weights=[1.0,-1.0]"], "non-negative"),
    ],
)
def test_gold_hybrid_settings_are_checked_before_anything_loads(make_cfg, overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(make_cfg(*TINY, "method=cd", "method.answer=teacher_generation", *overrides))


def test_the_shared_vocabulary_pairs_the_token_strings_both_tokenizers_hold(make_cfg, behaving_model_dir):
    from ctxdistill.encoding import shared_vocabulary

    cfg = make_cfg(*TINY)
    student = load_tokenizer(cfg.model, cfg.cache_dir)
    teacher = AutoTokenizer.from_pretrained(behaving_model_dir)
    student_ids, teacher_ids = shared_vocabulary(student, teacher, len(student), len(teacher))
    assert 0 < len(teacher_ids) < len(teacher)
    assert student.convert_ids_to_tokens(student_ids.tolist()) == teacher.convert_ids_to_tokens(teacher_ids.tolist())
    assert teacher_ids.tolist() == sorted(teacher_ids.tolist())
    shared = set(student.get_vocab()) & set(teacher.get_vocab())
    assert len(teacher_ids) == len(shared)
    # ids a model has no logit for are left out; one tokenizer shares everything with itself
    assert len(shared_vocabulary(student, teacher, len(student), 10)[1]) == sum(teacher_ids < 10)
    same = shared_vocabulary(student, student, len(student), len(student))
    assert same[0].tolist() == same[1].tolist() == list(range(len(student)))


@pytest.mark.parametrize("hybrid", [False, True])
def test_a_teacher_with_another_tokenizer_teaches_a_generated_answer_by_uld(
    make_cfg, behaving_model_dir, monkeypatch, hybrid
):
    """The behaving teacher (264 tokens) generates each answer; the tiny student (SmolLM2's tokenizer) trains on
    the same text in its own tokens, and every aligned group of positions writes the same piece of it. With
    GOLD's hybrid, the teacher's targets keep the shared tokens' log-probabilities apart from the sorted rest."""
    from ctxdistill.methods.distill import ContextDistillation

    cfg = make_cfg(
        *TINY,
        "method=cd",
        "method.answer=teacher_generation",
        "method.divergence=uld",
        "method.top_k=16",
        "method.top_k_rest=bucket",
        *behaving_teacher_overrides(behaving_model_dir),
        "dataset.num_train_queries=8",
        "dataset.source.split_sizes.eval=16",
        "trainer.batch_size=8",
        "trainer.max_steps=2",
        f"method.uld_hybrid={hybrid}",
    )
    seen = []
    original = ContextDistillation.loss

    def recording(self, handle, batch):
        seen.append((self, batch))
        return original(self, handle, batch)

    monkeypatch.setattr(ContextDistillation, "loss", recording)
    result = run(cfg)
    method, batch = seen[0]
    student_tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    teacher_tokenizer = load_tokenizer(cfg.method.teacher_model, cfg.cache_dir)
    pieces = 0
    if hybrid:
        student_ids, teacher_ids = method._shared
        assert 0 < len(teacher_ids) < len(teacher_tokenizer)
        assert student_tokenizer.convert_ids_to_tokens(student_ids.tolist()) == teacher_tokenizer.convert_ids_to_tokens(
            teacher_ids.tolist()
        )
        assert method._hybrid_weights == pytest.approx((len(teacher_ids) / 264, 1 - len(teacher_ids) / 264))
    for row, (targets, groups) in enumerate(batch["uld_targets"]):
        assert targets.logprobs.shape == (len(targets.span), 16)  # the teacher's 16 largest, sorted
        if hybrid:  # the shared tokens' log-probabilities, in the shared ids' order
            assert targets.shared_logprobs.shape == (len(targets.span), len(teacher_ids))
        student_span = batch["answer_ids"][row][batch["answer_mask"][row]].tolist()
        text = teacher_tokenizer.decode(targets.span, skip_special_tokens=True)
        assert student_tokenizer.decode(student_span) == text
        for student_positions, teacher_positions in groups:
            written = student_tokenizer.decode([student_span[i] for i in student_positions])
            assert written == teacher_tokenizer.decode([targets.span[i] for i in teacher_positions])
            pieces += 1
    assert pieces >= 8  # every row aligned at least once
    assert result["metrics"]["eval/accuracy"] is not None


def test_free_text_evaluation_runs_a_teacher_of_another_family_in_its_own_tokens(make_cfg, behaving_model_dir):
    """Exact-match evaluation of a generated answer: the teacher (the behaving model, 264 tokens) reads the prompt
    and writes its answer in its own tokenizer, and its recorded text is the start of what transformers'
    ``generate`` gives it (before, the student's token ids were fed to it: wrong text, or an index error)."""
    cfg = make_cfg(
        *TINY,
        "dataset=addition",
        "dataset.source.split_sizes.eval=4",
        "dataset.num_train_queries=4",
        "dataset.context.num_demos=1",
        "dataset.source.generator_options.max_digits=1",
        "dataset.source.split_sizes.train=64",
        "dataset.generation.max_new_tokens=36",
        "dataset.generation.max_answer_tokens=4",
        "method=cd",
        "method.answer=teacher_generation",
        "method.divergence=uld",
        "method.teacher_cache=memory",
        "method.max_answer_tokens=4",
        *behaving_teacher_overrides(behaving_model_dir),
        "trainer.batch_size=4",
        "trainer.eval_batch_size=4",
        "trainer.max_steps=1",
    )
    run(cfg)
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "predictions.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(behaving_model_dir)
    model = AutoModelForCausalLM.from_pretrained(behaving_model_dir).eval()
    task = build_task(cfg.dataset, cfg.seed)
    prompts = {e.uid: task.prompt(e, with_context=True) for e in task.eval_sets["eval"]}
    for row in rows:
        ids = tokenizer(prompts[row["uid"]], return_tensors="pt").input_ids
        reference = model.generate(ids, max_new_tokens=36, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        written = tokenizer.decode(reference[0, ids.shape[1] :], skip_special_tokens=True)
        assert row["teacher_generation"] and written.startswith(row["teacher_generation"]), row


def test_the_uld_experiment_is_the_documented_command_line(make_cfg):
    """experiment=cross_family_uld composes to what docs/cross-family.md's long command line gave."""
    spelt_out = make_cfg(
        "experiment=cross_family",
        "model=gemma3-270m",
        "model@method.teacher_model=smollm2-135m",
        "method.distil_over=vocabulary",
        "method.divergence=uld",
        "method.answer=teacher_generation",
        "method.top_k=256",
        "method.top_k_rest=bucket",
    )
    named = make_cfg("experiment=cross_family_uld")
    validate(named)
    assert (named.model.name, named.method.teacher_model.name) == ("gemma3-270m", "smollm2-135m")
    assert OmegaConf.to_container(named) == OmegaConf.to_container(spelt_out)


def test_a_teacher_whose_output_layer_is_padded_wider_is_compared_over_the_shared_vocabulary(behaving):  # noqa: F811
    """Same vocabulary, another width of output layer (Qwen2.5-0.5B's 151936 logits beside 7B's 152064): the
    evaluation's KL compared the two token by token and failed ("size of tensor a (384) must match ... (264)").
    Padding rows name no token: the distributions are compared over the vocabulary both models have."""
    import copy
    import random

    from ctxdistill.data.tasks import Example, Task
    from ctxdistill.evaluation import Ranks

    _, tokenizer, model = behaving
    teacher = copy.deepcopy(model)
    teacher.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=128)
    assert teacher.get_output_embeddings().weight.shape[0] > model.get_output_embeddings().weight.shape[0]
    draw = random.Random(0)
    queries = [" " + " ".join(str(draw.randrange(1, 7)) for _ in range(draw.randrange(1, 6))) for _ in range(6)]
    examples = [Example(uid=f"e{i}", fields={"q": q}, label=i % 3) for i, q in enumerate(queries)]
    task = Task(
        name="t", template="{q}", verbalizers=[" 1", " 2", " 4"], student_instruction="", context=" 2 4 6 3 2",
        separator="\n", demos=[], train_queries=[], train_query_labels=[], eval_sets={"eval": examples},
    )  # fmt: skip
    handle = ModelHandle(student=model, base=model, separate_teacher=teacher)
    evaluator = Evaluator(handle, tokenizer, task, True, 4, ranks=Ranks())
    evaluator.prepare()
    # the same weights over the shared vocabulary: the same distribution
    assert evaluator.evaluate()[0]["eval/kl_to_teacher"] == pytest.approx(0.0, abs=1e-5)
