"""ctxdistill-eval: a finished run (or every cell of a sweep) evaluated again, beside it, leaving it untouched."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctxdistill.evaluate_run import main

from conftest import own_ood_set, without_timings

TINY = [
    "model=tiny-random",
    "logger=none",
    "dataset.source.split_sizes.eval=24",
    "dataset.num_train_queries=16",
    "trainer.batch_size=8",
    "trainer.max_steps=3",
]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def fingerprint(run_dir: Path) -> dict[str, str]:
    """Every file of the run and its content, the evaluations left out."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and "evaluations" not in p.parts
    }


def metrics(directory: Path) -> dict[str, float]:
    return without_timings(json.loads((directory / "metrics.json").read_text())["metrics"])


def cells(sweep: Path) -> dict[str, Path]:
    """The sweep's run directories by method."""
    return {json.loads(p.read_text())["method"]: p.parent for p in sweep.glob("*/metrics.json")}


def ctxdistill(*arguments: str) -> str:
    """The ctxdistill command, in its own process; its console (stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "ctxdistill", *arguments], capture_output=True, text=True, env=ENV, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.fixture(scope="module")
def sweep_and_console(tmp_path_factory) -> tuple[Path, str]:
    """A sweep of a LoRA student (cd) and a full-weight one (pbft), started by the ctxdistill command,
    its cells in the joblib launcher's worker processes."""
    root = tmp_path_factory.mktemp("sweep")
    launcher = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    return root, ctxdistill("-m", "method=cd,pbft", *TINY, *launcher, f"hydra.sweep.dir={root}")


@pytest.fixture(scope="module")
def sweep(sweep_and_console) -> Path:
    return sweep_and_console[0]


def test_a_sweep_in_worker_processes_prints_no_third_party_warning(sweep_and_console):
    console = sweep_and_console[1]
    assert "Warning" not in console, console  # e.g. PEFT's call of a deprecated transformers property


def test_evaluating_a_run_again_reproduces_its_metrics_and_leaves_it_untouched(sweep):
    for method, run_dir in cells(sweep).items():
        before = fingerprint(run_dir)
        assert main([str(run_dir), "--name", "again"]) == 0
        again = metrics(run_dir / "evaluations" / "again")
        original = {k: v for k, v in metrics(run_dir).items() if not k.startswith("train_queries/")}
        # Reloaded full weights round in the last bits (a KL of 0.01 is a difference of near-equal numbers).
        assert again == pytest.approx(original, rel=1e-5, abs=1e-6), method
        assert fingerprint(run_dir) == before


def test_another_eval_set_is_evaluated_on_every_cell_of_a_sweep(sweep, tmp_path):
    ood_file = tmp_path / "gifts.tsv"
    ood_file.write_text("review\tlabel\nA truly great gift.\t0\nA broken, useless gift.\t1\nA fine gift.\t0\n")
    ood = own_ood_set(tmp_path / "conf", "gifts", ood_file)
    runs = cells(sweep)
    assert sorted(runs) == ["cd", "pbft"]
    before = {method: fingerprint(run_dir) for method, run_dir in runs.items()}
    assert main([str(sweep), *ood, "dataset.source.split_sizes.eval=12", "--name", "gifts"]) == 0
    for method, run_dir in runs.items():
        result = metrics(run_dir / "evaluations" / "gifts")
        assert {"eval/accuracy", "gifts/accuracy", "gifts/teacher_accuracy"} <= set(result)
        rows = (run_dir / "evaluations" / "gifts" / "predictions.jsonl").read_text().splitlines()
        assert sum('"set": "gifts"' in r for r in rows) == 3 and sum('"set": "eval"' in r for r in rows) == 12
        assert fingerprint(run_dir) == before[method]


def test_a_run_without_saved_weights_is_refused_naming_why(sweep, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(cells(sweep)["cd"], run_dir, ignore=shutil.ignore_patterns("adapter", "evaluations"))
    with pytest.raises(SystemExit) as stopped:
        main([str(run_dir)])
    assert stopped.value.code == 1
    assert "holds no trained weights (adapter/ or model/)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    """One run whose output_dir is not Hydra's own directory (so no .hydra/ beside it)."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    ctxdistill("method=cd", *TINY, f"output_dir={run_dir}")
    return run_dir


def test_a_run_in_its_own_output_dir_records_its_overrides_and_takes_a_group_override(single_run, tmp_path):
    assert not (single_run / ".hydra").exists()
    assert yaml.safe_load((single_run / "overrides.yaml").read_text()) == [
        "method=cd",
        *TINY,
        f"output_dir={single_run}",
    ]
    gifts = tmp_path / "gifts.tsv"
    gifts.write_text("review\tlabel\nA truly great gift.\t0\nA broken, useless gift.\t1\n")
    assert main([str(single_run), *own_ood_set(tmp_path / "conf", "gifts", gifts), "--name", "gifts"]) == 0
    assert metrics(single_run / "evaluations" / "gifts")["gifts/examples"] == 2


def test_a_run_without_recorded_overrides_is_evaluated_from_its_config(single_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(single_run, run_dir, ignore=shutil.ignore_patterns("overrides.yaml", "evaluations"))
    # config.yaml alone: the method's schema and checks are recovered from its config group
    assert main([str(run_dir), "dataset.source.split_sizes.eval=12", "--name", "smaller"]) == 0
    assert metrics(run_dir / "evaluations" / "smaller")["eval/examples"] == 12
    with pytest.raises(SystemExit) as stopped:
        main([str(run_dir), "ood=[paws_qqp]"])
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert "records no overrides" in err and "Traceback" not in err
