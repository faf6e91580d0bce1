"""The comparison table: mean ± std over seeds per method x model x dataset, in three formats."""

import json

import pytest

from ctxdistill.compare import main


def write_run(directory, method, seed, accuracy, finished):
    directory.mkdir(parents=True)
    (directory / "metrics.json").write_text(json.dumps({
        "method": method, "model": "m", "dataset": "d", "seed": seed, "status": "complete", "finished_at": finished,
        "metrics": {"eval/accuracy": accuracy, "eval/teacher_agreement": 1.0, "eval/kl_to_teacher": 0.5,
                    "eval/teacher_accuracy": 0.9, "eval/majority_rate": 0.5, "hans/accuracy": accuracy / 2}}))


def test_table_aggregates_seeds_in_run_order_and_skips_incomplete_runs(tmp_path, capsys):
    write_run(tmp_path / "a", "icl", 0, 0.8, "2026-01-01T00:00:01")
    write_run(tmp_path / "b", "icl", 1, 0.6, "2026-01-01T00:00:02")
    write_run(tmp_path / "c", "cd", 0, 0.7, "2026-01-01T00:00:03")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "metrics.json").write_text(json.dumps({"status": "running"}))
    assert main([str(tmp_path), "--format", "markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "hans acc" in lines[0]
    assert lines[2].startswith("| icl ") and "| 2 " in lines[2] and "0.700 ± 0.141" in lines[2]
    assert "0.350 ± 0.071" in lines[2]  # the out-of-domain column
    assert lines[3].startswith("| cd ") and "0.700 " in lines[3]
    assert len(lines) == 4


def test_csv_output_and_an_empty_directory(tmp_path, capsys):
    write_run(tmp_path / "a", "cd", 0, 0.75, "2026-01-01T00:00:01")
    assert main([str(tmp_path), "--format", "csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("method,model,dataset,seeds,accuracy") and out[1].startswith("cd,m,d,1,0.750")
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1


def test_classification_metrics_by_hand():
    import torch

    from ctxdistill.evaluation import classification_metrics

    predictions, labels = torch.tensor([0, 1, 1, 1, 0]), torch.tensor([0, 1, 0, 1, 1])
    metrics = classification_metrics(predictions, labels, 2)
    # class 1: tp=2, fp=1, fn=1 -> F1 = 4/6
    assert metrics == pytest.approx({"accuracy": 0.6, "f1": 4 / 6, "majority_rate": 0.6,
                                     "accuracy_label0": 0.5, "accuracy_label1": 2 / 3})
