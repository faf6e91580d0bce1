"""A teacher from another model family: cd over the answer words, where two vocabularies meet."""

import math

import pytest
import torch
from hydra.utils import instantiate

from ctxdistill.config import ConfigError, validate
from ctxdistill.data import build_task
from ctxdistill.evaluation import Evaluator, score
from ctxdistill.losses import answer_word_distribution, distillation_loss, forward_kl, with_rest_bucket
from ctxdistill.models import ModelHandle, ModelLoadError, load_model, load_tokenizer
from ctxdistill.run import run

from conftest import TINY


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

    teacher = [
        f"method.teacher_model.{k}" for k in ("name=behaving", "source=hub", f"name_or_path={behaving_model_dir}")
    ]
    cfg = make_cfg(
        *VERBALIZERS,
        "+model@method.teacher_model=tiny-random",
        *teacher,
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
        (["method.answer=teacher_generation"], "ULD/GOLD"),
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
    with pytest.raises(ModelLoadError, match="different vocabularies.*method.distil_over=verbalizers"):
        method.check_teacher(cfg, task, student, bert)
