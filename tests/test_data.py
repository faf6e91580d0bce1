"""Task specs: deterministic data, seeded balanced demonstrations, exact prompts, clear data errors."""

import pytest

from ctxdistill.data import build_task
from ctxdistill.data.synthetic import generate_examples
from ctxdistill.data.tasks import DataError


def test_synthetic_data_is_deterministic_balanced_and_splits_are_disjoint():
    train = generate_examples(200, seed=1, split="train")
    assert train == generate_examples(200, seed=1, split="train")
    assert sum(e["label"] for e in train) == 100
    assert len({e["review"] for e in train}) == 200
    evals = generate_examples(200, seed=1, split="eval")
    assert not {e["review"] for e in train} & {e["review"] for e in evals}


def test_demos_are_balanced_seeded_and_queries_unlabelled(make_cfg):
    cfg = make_cfg("dataset.context.num_demos=6", "dataset.num_train_queries=20")
    task = build_task(cfg.dataset, seed=3)
    assert sorted(d.label for d in task.demos) == [0, 0, 0, 1, 1, 1]
    assert [d.uid for d in build_task(cfg.dataset, seed=3).demos] == [d.uid for d in task.demos]
    assert [d.uid for d in build_task(cfg.dataset, seed=4).demos] != [d.uid for d in task.demos]
    cfg.dataset.context.data_seed = 3  # a data seed fixes the draw whatever the run seed
    assert [d.uid for d in build_task(cfg.dataset, seed=4).demos] == [d.uid for d in task.demos]
    assert len(task.train_queries) == 20
    assert all(q.label is None for q in task.train_queries)  # distillation cannot read labels
    assert not {q.uid for q in task.train_queries} & {d.uid for d in task.demos}


def test_teacher_prompt_is_context_then_query_and_student_prompt_is_the_query(make_cfg):
    task = build_task(make_cfg("dataset.context.num_demos=2").dataset, seed=0)
    query = task.eval_sets["eval"][0]
    d0, d1 = task.demos
    instruction = make_cfg().dataset.context.instruction
    assert task.student_prompt(query) == f"Review: {query.fields['review']}\nSentiment:"
    assert task.teacher_prompt(query) == (
        f"{instruction}\n\n"
        f"Review: {d0.fields['review']}\nSentiment:{task.verbalizers[d0.label]}\n\n"
        f"Review: {d1.fields['review']}\nSentiment:{task.verbalizers[d1.label]}\n\n"
        f"Review: {query.fields['review']}\nSentiment:"
    )


def write(path, text):
    path.write_text(text)
    return str(path)


def files_dataset(make_cfg, tmp_path, train_text, eval_text="s\tl\ngood\tpos\n", suffix="tsv"):
    train = write(tmp_path / f"train.{suffix}", train_text)
    dev = write(tmp_path / f"dev.{suffix}", eval_text)
    return make_cfg(
        "dataset.source.kind=files",
        f"++dataset.source.data_files.train={train}",
        f"++dataset.source.data_files.eval={dev}",
        "dataset.fields=[s]",
        "dataset.label_field=l",
        "++dataset.label_map.pos=0",
        "++dataset.label_map.neg=1",
        "dataset.template='S: {s}\\nA:'",
        "dataset.context.num_demos=2",
        "dataset.num_train_queries=1",
    ).dataset


def test_local_tsv_files_load_with_quoting_disabled(make_cfg, tmp_path):
    spec = files_dataset(make_cfg, tmp_path, 's\tl\n"quoted start\tpos\nbad\tneg\nok\tpos\n')
    task = build_task(spec, seed=0)
    texts = sorted(d.fields["s"] for d in task.demos) + [q.fields["s"] for q in task.train_queries]
    assert '"quoted start' in texts
    assert task.eval_sets["eval"][0].label == 0


def test_unknown_label_names_the_file_and_record(make_cfg, tmp_path):
    spec = files_dataset(make_cfg, tmp_path, "s\tl\na\tpos\nb\tmaybe\n")
    with pytest.raises(DataError, match=r"train\.tsv: record 1 has unknown label 'maybe'"):
        build_task(spec, seed=0)


def test_malformed_row_names_the_file_and_line(make_cfg, tmp_path):
    spec = files_dataset(make_cfg, tmp_path, "s\tl\na\tpos\nonly-one-column\n")
    with pytest.raises(DataError, match=r"train\.tsv:3: expected 2 columns"):
        build_task(spec, seed=0)


def test_a_file_with_a_header_and_no_rows_is_named_as_empty(make_cfg, tmp_path):
    spec = files_dataset(make_cfg, tmp_path, "s\tl\n")  # found by the bad-input audit (probe p20)
    with pytest.raises(DataError, match=r"train\.tsv: split 'train' holds no records\. Check the file"):
        build_task(spec, seed=0)


def test_missing_data_file_names_the_path(make_cfg, tmp_path):
    spec = make_cfg("dataset.source.kind=files", f"++dataset.source.data_files.train={tmp_path}/nope.jsonl").dataset
    with pytest.raises(DataError, match="nope.jsonl"):
        build_task(spec, seed=0)


def test_a_sweep_reads_each_file_once_but_sees_edits(make_cfg, tmp_path, monkeypatch):
    import os

    from ctxdistill.data import tasks

    spec = files_dataset(make_cfg, tmp_path, "s\tl\na\tpos\nb\tneg\nc\tpos\n")
    reads = []
    real_read = tasks._read_file
    monkeypatch.setattr(tasks, "_read_file", lambda path, *rest: reads.append(path) or real_read(path, *rest))
    build_task(spec, seed=0)
    build_task(spec, seed=1)
    assert len(reads) == 2  # train and eval, once each
    train = tmp_path / "train.tsv"
    train.write_text("s\tl\na\tpos\nb\tneg\nc\tneg\n")
    os.utime(train, ns=(1, 1))
    assert sum(d.label for d in build_task(spec, seed=0).demos) == 1
    assert len(reads) == 3


def test_more_eval_examples_asked_for_than_there_are_is_said(make_cfg, caplog):
    # found by the fifteenth audit: num_eval=100000 evaluated the split's 200 rows with no word, where a training
    # pool too small is refused
    with caplog.at_level("WARNING", logger="ctxdistill.data.tasks"):
        task = build_task(make_cfg("dataset.num_eval=100000").dataset, 0)
    assert len(task.eval_sets["eval"]) == 200
    assert caplog.messages == ["dataset.num_eval=100000 is more than the 200 examples there are: all are used"]
