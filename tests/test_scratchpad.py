"""Scratchpad internalisation: Nye et al.'s addition format, the answer extractor, exact-match evaluation."""

import json
from types import SimpleNamespace

import pytest
import torch

from ctxdistill.config import ConfigError, validate
from ctxdistill.data import build_task
from ctxdistill.data.addition import generate_examples, scratchpad
from ctxdistill.data.tasks import AnswerGeneration
from ctxdistill.methods import build_method
from ctxdistill.models import ModelHandle, load_model, load_tokenizer
from ctxdistill.run import run

# The tiny random model on a handful of short problems.
ADDITION = [
    "model=tiny-random",
    "logger=none",
    "dataset=addition",
    "dataset.source.split_sizes.train=64",
    "dataset.source.split_sizes.eval=4",
    "dataset.num_train_queries=4",
    "dataset.source.generator_options.max_digits=1",
    "dataset.generation.max_new_tokens=36",  # the longest 1-digit worked solution
    "dataset.generation.max_answer_tokens=4",
    "trainer.max_steps=2",
    "trainer.batch_size=2",
]


def test_scratchpad_is_nye_et_al_right_to_left_trace():
    assert scratchpad(29, 57) == "<scratch>\n2 9 + 5 7 , C: 0\n2 + 5 , 6 C: 1\n, 8 6 C: 0\n0 8 6\n</scratch>"
    assert scratchpad(123, 45) == (
        "<scratch>\n1 2 3 + 4 5 , C: 0\n1 2 + 4 , 8 C: 0\n1 + , 6 8 C: 0\n, 1 6 8 C: 0\n0 1 6 8\n</scratch>"
    )
    assert scratchpad(5, 7).splitlines()[-2] == "1 2"  # the final carry leads the sum


def test_generator_is_deterministic_with_1_to_8_digit_operands_and_disjoint_splits():
    train = generate_examples(2000, seed=3, split="train")
    assert train == generate_examples(2000, seed=3, split="train")
    lengths = {len(operand.replace(" ", "")) for r in train for operand in r["problem"].split(" + ")}
    assert lengths == set(range(1, 9))
    for r in train[:200]:
        a, b = (int(x.replace(" ", "")) for x in r["problem"].split(" + "))
        assert r["answer"] == " ".join(str(a + b)) and r["scratchpad"] == scratchpad(a, b)
    evals = generate_examples(300, seed=3, split="eval", max_digits=3)
    assert not {r["problem"] for r in evals} & {r["problem"] for r in generate_examples(500, seed=4, max_digits=3)}


def test_answer_extractor_reads_the_answer_after_the_scratchpad_or_reports_none():
    spec = AnswerGeneration(r"</scratch>\s*([0-9 ]+)", 200, 24, "\n\n", "{scratchpad}\n{answer}")
    assert spec.extract(scratchpad(29, 57) + "\n8 6", worked=True) == "8 6"
    assert spec.extract("<scratch>\n2 9 + 5 7 , C: 0\n", worked=True) is None  # cut off: a failure
    assert spec.extract("8 6\n<scratch>", worked=False) == "8 6"  # a direct answer is its first line
    # blanks after the scratchpad are no answer (they read as "", which the scratchpad teacher trained on as "\n")
    assert spec.extract(scratchpad(29, 57) + " \n", worked=True) is None


def test_addition_task_shows_the_teacher_worked_demonstrations_and_the_student_the_bare_problem(make_cfg):
    cfg = make_cfg(*ADDITION)
    task = build_task(cfg.dataset, cfg.seed)
    query = task.train_queries[0]
    assert query.target is None and task.train_query_labels[0] is not None
    assert task.student_prompt(query) == f"Input:\n{query.fields['problem']}\nTarget:\n"
    assert task.teacher_prompt(query).count("</scratch>\n") == 4 and task.teacher_prompt(query).startswith("Add")
    demo = task.demos[0]
    assert f"{demo.fields['scratchpad']}\n{demo.target}\n\n" in task.context + "\n\n"
    assert task.answer_text(task.eval_sets["eval"][0]) == task.eval_sets["eval"][0].target + "\n"


def test_scratchpad_needs_a_dataset_with_an_answer_extractor(make_cfg):
    with pytest.raises(ConfigError, match="dataset.generation"):
        validate(make_cfg("method=scratchpad", "dataset=synthetic"))
    with pytest.raises(ConfigError, match="answer_regex"):
        validate(make_cfg(*ADDITION, "dataset.generation.answer_regex=no-group"))


def test_a_budget_that_cuts_gold_worked_solutions_is_refused_before_the_model_loads(make_cfg, monkeypatch):
    # The 8-digit default fits its longest worked solution (316 tokens, a spaced digit being two).
    monkeypatch.setattr("ctxdistill.run.load_model", lambda *args: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=r"max_new_tokens=35: 4 of the 8 .*\(up to 36, .*max_new_tokens=36 or more"):
        run(make_cfg(*ADDITION, "method=icl", "dataset.generation.max_new_tokens=35"))


def test_exact_match_evaluation_counts_extraction_failures_as_wrong(make_cfg, tmp_path):
    metrics = run(make_cfg(*ADDITION, "method=zero_shot"))["metrics"]
    # The random model never closes a scratchpad: every teacher generation is an extraction failure.
    assert metrics["eval/teacher_extraction_failures"] == 4 and metrics["eval/teacher_accuracy"] == 0
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["teacher_prediction"] is None for r in rows)
    assert {"target", "generation", "teacher_generation"} <= set(rows[0])
    # The teacher agrees with itself, also where neither finds an answer.
    assert run(make_cfg(*ADDITION, "method=icl", output_dir=tmp_path / "icl"))["metrics"]["eval/teacher_agreement"] == 1


def test_scratchpad_reports_extraction_failures_and_refuses_to_train_without_answers(make_cfg, tmp_path):
    # a user error (the CLI prints it without a traceback) that says what to change
    with pytest.raises(ConfigError, match="'extraction_failures': 8, 'queries_without_answer': 4.*stronger teacher"):
        run(make_cfg(*ADDITION, "method=scratchpad", "method.num_samples=2", output_dir=tmp_path / "none"))
    # An extractor that reads any text gives every query a target.
    result = run(
        make_cfg(
            *ADDITION,
            "method=scratchpad",
            "method.num_samples=2",
            "dataset.generation.answer_regex='(?s)(.*)'",
            output_dir=tmp_path / "all",
        )
    )
    assert result["train"]["steps"] == 2 and result["train"]["teacher_samples"] == 8
    assert result["train"]["extraction_failures"] == 0 and result["train"]["queries_without_answer"] == 0
    rows = [json.loads(line) for line in (tmp_path / "all" / "predictions.jsonl").read_text().splitlines()]
    assert result["metrics"]["eval/accuracy"] == sum(r["prediction"] == r["target"] for r in rows) / len(rows)
    assert all(r["prediction"] == r["generation"].split("\n", 1)[0].strip() for r in rows)  # a direct answer


def test_scratchpad_loss_is_the_cross_entropy_to_the_teachers_answers_over_their_expected_length(make_cfg):
    # By hand, per query: -sum_a p(a) log P_S(a) / sum_a p(a) |a|, from plain forwards of prompt + answer; then the
    # mean over queries. Dividing each answer by its own length would move the minimum to p(a) / |a| (renormalised).
    cfg = make_cfg(*ADDITION, "method=scratchpad")
    method, task = build_method(cfg.method), build_task(cfg.dataset, cfg.seed)
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    model = load_model(cfg.model, cfg.cache_dir, tokenizer, cfg.seed).eval()
    answers = [tuple(tokenizer(text, add_special_tokens=False).input_ids) for text in ("9\n", "10\n", "7 + 5\n")]
    assert len({len(a) for a in answers}) == 3  # lengths differ
    queries = task.train_queries[:2]
    method._targets = {queries[0].uid: {answers[0]: 0.75, answers[1]: 0.25}, queries[1].uid: {answers[2]: 1.0}}
    batch = method.collate(tokenizer, task, queries)
    with torch.no_grad():
        loss, _ = method.loss(SimpleNamespace(student=model), batch)

    def answer_nll(query, answer):
        prompt = tokenizer(task.student_prompt(query), add_special_tokens=False).input_ids
        logprobs = model(torch.tensor([prompt + list(answer)])).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        return -logprobs[torch.arange(len(answer)), torch.tensor(answer)].sum()

    with torch.no_grad():
        expected = [
            sum(p * answer_nll(query, a) for a, p in method._targets[query.uid].items())
            / sum(p * len(a) for a, p in method._targets[query.uid].items())
            for query in queries
        ]
    assert loss.item() == pytest.approx(sum(expected).item() / 2, rel=1e-5)


def test_scratchpad_samples_do_not_depend_on_the_evaluation_batch_size(make_cfg):
    # A resumed run may change trainer.eval_batch_size (a checkpoint does not record it); the teacher's samples,
    # the training targets, are drawn in batches of the method's own size, so they stay the same.
    cfg = make_cfg(*ADDITION, "method=scratchpad", "method.num_samples=2", "dataset.generation.answer_regex='(?s)(.*)'")
    method, task = build_method(cfg.method), build_task(cfg.dataset, cfg.seed)
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    model = load_model(cfg.model, cfg.cache_dir, tokenizer, cfg.seed).eval()
    handle = ModelHandle(student=model, base=model)
    targets = []
    for eval_batch_size in (1, 4):
        method.prepare(handle, tokenizer, task, task.train_queries, eval_batch_size)
        targets.append(dict(method._targets))
    assert targets[0] == targets[1] and len(targets[0]) == 4


def test_ft_on_worked_solutions_trains_on_the_demonstrations_target_and_is_read_by_the_extractor(make_cfg, tmp_path):
    cfg = make_cfg(*ADDITION, "method=ft", "method.target=worked", "method.train_on=labelled_queries")
    method, task = build_method(cfg.method), build_task(cfg.dataset, cfg.seed)
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    example = method.train_examples(task)[0]
    batch = method.collate(tokenizer, task, [example])
    answer = tokenizer.decode(batch["answer_ids"][0][batch["answer_mask"][0].bool()])
    assert answer == f"{example.fields['scratchpad']}\n{example.target}\n\n"  # the worked solution, then the stop
    demo = task.demos[0]  # written as the demonstrations in the teacher's context are
    assert task.query(demo) + task.generation.worked_text(demo) in task.context + "\n\n"

    # The random model writes no closed scratchpad: read by the extractor, every answer is a failure, where the
    # same model fine-tuned on the answers is read on its first line (never a failure).
    worked = run(cfg)["metrics"]
    direct = run(make_cfg(*ADDITION, "method=ft", "method.train_on=labelled_queries", output_dir=tmp_path / "direct"))
    assert worked["eval/extraction_failures"] == 4 and direct["metrics"]["eval/extraction_failures"] == 0


def test_ft_on_worked_solutions_needs_a_dataset_that_has_them(make_cfg):
    with pytest.raises(ConfigError, match="method.target: worked needs a dataset whose examples carry worked"):
        validate(make_cfg("model=tiny-random", "method=ft", "method.target=worked", "dataset=synthetic"))


def test_a_full_weight_run_leaves_a_model_directory_that_loads_as_the_model(make_cfg, tmp_path):
    run(make_cfg(*ADDITION, "method=ft", "method.finetune=full", "trainer.lr=0.05", output_dir=tmp_path / "ft"))
    model_dir = tmp_path / "ft" / "model"
    run(make_cfg(*ADDITION, "method=zero_shot", f"model.name_or_path={model_dir}", output_dir=tmp_path / "again"))

    def generations(run_dir):
        return [json.loads(line)["generation"] for line in (run_dir / "predictions.jsonl").read_text().splitlines()]

    run(make_cfg(*ADDITION, "method=zero_shot", output_dir=tmp_path / "untrained"))
    # the reloaded directory answers as the trained model did, not as the model it started from
    assert generations(tmp_path / "again") == generations(tmp_path / "ft")
    assert generations(tmp_path / "again") != generations(tmp_path / "untrained")
