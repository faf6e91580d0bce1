"""Sweeps end to end: a real multirun on tiny-random, its comparison from disk and from W&B, re-runs, failures."""

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from ctxdistill.cli import cell_dir, run_unless_complete
from ctxdistill.config import ConfigError, validate
from ctxdistill.launch_checks import writable_dir
from ctxdistill.results.cli import main as compare
from ctxdistill.results.metrics import float32_rounded
from ctxdistill.results.records import collect
from ctxdistill.results.render import render
from ctxdistill.results.table import summarise
from ctxdistill.results.wandb_runs import read_offline_run, record_from_wandb
from ctxdistill.sweeps import group_name

# A cell of these sweeps: seconds on the tiny random model (16 held-out examples, 2 training steps).
CELL = ["model=tiny-random", "dataset.source.split_sizes.eval=16", "dataset.num_train_queries=8", "trainer.max_steps=2"]


def multirun(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)  # logger.mode decides
    return subprocess.run(
        [sys.executable, "-m", "ctxdistill", "-m", *overrides], capture_output=True, text=True, env=env, timeout=900
    )


def compare_output(*args: str, capsys) -> str:
    assert compare([*args]) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """2 methods x 2 seeds on tiny-random, logged to real W&B offline runs; then the same command again."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "s"
    command = [
        "method=icl,cd",
        "seed=0,1",
        *CELL,
        "logger=wandb",
        "logger.mode=offline",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    first = multirun(*command)
    assert first.returncode == 0, first.stderr[-3000:]
    cells = sorted(p.parent for p in sweep_dir.rglob("metrics.json"))
    # everything a run wrote but logs (Hydra rewrites .hydra/ and appends to the job log on every launch;
    # W&B's service may still be appending to its debug logs)
    stamps = {
        p: p.stat().st_mtime_ns
        for cell in cells
        for p in cell.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
    }
    readme = (sweep_dir / "README.md").read_text()
    second = multirun(*command)
    return sweep_dir, cells, first, second, stamps, readme


def test_sweep_writes_one_cell_per_override_set_and_a_table_matching_a_hand_computation(sweep, capsys):
    sweep_dir, cells, first, _, _, _ = sweep
    results = [json.loads((cell / "metrics.json").read_text()) for cell in cells]
    assert sorted((r["method"], r["seed"]) for r in results) == [("cd", 0), ("cd", 1), ("icl", 0), ("icl", 1)]
    assert all("method=" in cell.name and "seed=" in cell.name for cell in cells)
    # stored as float32 holds them, with the declarations that name the columns
    assert all(float32_rounded(v) == v for r in results for v in r["metrics"].values())
    assert all(r["metric_set"]["family"] == "classification" and r["metrics"]["eval/examples"] == 16 for r in results)
    assert "Comparison (4 runs" in first.stdout

    rows = list(csv.DictReader(io.StringIO(compare_output(str(sweep_dir), "--format", "csv", capsys=capsys))))
    assert [(r["method"], r["model"], r["dataset"], r["seeds"]) for r in rows] == [
        ("icl", "tiny-random", "synthetic", "2"),
        ("cd", "tiny-random", "synthetic", "2"),
    ]
    for row in rows:
        for key in ("eval/accuracy", "eval/kl_to_teacher", "eval/teacher_accuracy"):
            a, b = (r["metrics"][key] for r in results if r["method"] == row["method"])
            # two seeds: mean (a+b)/2, sample standard deviation |a-b|/sqrt(2)
            assert float(row[f"{key}_mean"]) == pytest.approx((a + b) / 2, abs=1e-6)
            assert float(row[f"{key}_std"]) == pytest.approx(abs(a - b) / math.sqrt(2), abs=1e-6)
    cd_row = rows[1]
    gaps = [
        r["metrics"]["eval/teacher_accuracy"] - r["metrics"]["eval/accuracy"] for r in results if r["method"] == "cd"
    ]
    assert float(cd_row["eval/teacher_student_gap_mean"]) == pytest.approx(sum(gaps) / 2, abs=1e-6)
    assert cd_row["train_queries/context_accuracy_mean"] and not rows[0]["train_queries/context_accuracy_mean"]

    readme = (sweep_dir / "README.md").read_text()
    assert "| icl " in readme and "| cd " in readme and "ctxdistill -m" in readme
    for name in ("table.md", "table.csv", "table.tex", "accuracy_vs_size_synthetic.png", "teacher_gap_synthetic.png"):
        assert f"results/{name}" in readme
    for png in ("accuracy_vs_size_synthetic.png", "teacher_gap_synthetic.png"):
        with Image.open(sweep_dir / "results" / png) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 300
    assert r"\ [" in (sweep_dir / "results" / "table.tex").read_text()  # mean and interval


def test_rerunning_the_sweep_trains_nothing_and_changes_nothing(sweep, capsys):
    sweep_dir, cells, first, second, stamps, readme = sweep
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert log.count("already holds a complete run: skipped") == 4
    assert "train cd" not in log and "teacher eval" not in log  # no progress bar of any model work
    assert any(p.suffix == ".wandb" for p in stamps) and any(p.name == "adapter_model.safetensors" for p in stamps)
    for path, stamp in stamps.items():  # metrics, predictions, adapters and W&B run files untouched
        assert path.stat().st_mtime_ns == stamp, path
    assert sum(len(list(cell.rglob("offline-run-*"))) for cell in cells) == 4
    # each launch's end logs its comparison, the earlier one set aside (the eighteenth audit: every launch's comparison
    # stayed in the group, and the sync command uploaded them all)
    assert len(list((sweep_dir / "wandb").glob("offline-run-*"))) == 1
    assert len(list((sweep_dir / "wandb" / "superseded").glob("offline-run-*"))) == 1
    assert (sweep_dir / "README.md").read_text() == readme
    table = first.stdout[first.stdout.index("Comparison") : first.stdout.index("Summary, tables")]
    assert table in second.stdout


def test_wandb_offline_runs_and_the_public_api_give_the_same_table(sweep):
    import wandb.apis.public

    sweep_dir, cells, *_ = sweep
    from_files = render(summarise(collect([sweep_dir])))
    # the cells' W&B directories alone: no metrics.json under them, so W&B's own run files are read
    assert render(summarise(collect([cell / "wandb" for cell in cells]))) == from_files
    # a run's directory beside its own W&B run is one run, not two seeds
    from ctxdistill.results.records import distinct_runs

    both = distinct_runs(collect([sweep_dir, cells[0] / "wandb"]))
    assert len(both) == len(cells) and render(summarise(both)) == from_files
    api_runs = []
    for run_dir in sorted(cell_run for cell in cells for cell_run in cell.rglob("offline-run-*")):
        run = read_offline_run(run_dir)
        assert run.finished and run.config["logger"]["mode"] == "offline" and "hydra_choices" in run.config
        assert run.group == group_name(sweep_dir)  # every run of the sweep in its group
        assert set(run.tags) == {run.config["method"]["name"], "tiny-random", "synthetic", f"seed{run.config['seed']}"}
        # what the W&B server hands the public API after `wandb sync`: config values wrapped in {"value": ...}
        attrs = {
            "state": "finished",
            "config": json.dumps({k: {"value": v} for k, v in run.config.items()}),
            "summaryMetrics": json.dumps(run.summary),
        }
        api_run = wandb.apis.public.Run(None, "someone", "ctxdistill", run_dir.name.split("-")[-1], attrs, lazy=False)
        api_runs.append(
            record_from_wandb(api_run.config, api_run.summary_metrics, finished=api_run.state == "finished")
        )
    assert render(summarise(api_runs)) == from_files
    # each run's finish as metrics.json records it: the rows' order (the order the methods ran) whatever the source
    finished = sorted(r["finished_at"] for r in collect([sweep_dir]))
    assert sorted(r["finished_at"] for r in api_runs) == finished
    running = record_from_wandb(api_run.config, api_run.summary_metrics, finished=False)
    assert running is None  # unfinished runs are not counted


def test_the_sweep_logs_its_table_and_plots_to_its_wandb_group(sweep):
    sweep_dir, *_ = sweep
    run_dir = sorted((sweep_dir / "wandb").glob("offline-run-*"))[0]
    run = read_offline_run(run_dir)
    assert run.finished and run.group == group_name(sweep_dir)
    assert run.summary["comparison"]["_type"] == "table-file" and run.summary["comparison"]["nrows"] == 2
    assert {k for k in run.summary if k.startswith("plots/")} == {
        "plots/accuracy_vs_size_synthetic",
        "plots/teacher_gap_synthetic",
        "plots/serving_cost_synthetic",
    }
    logged = json.loads(next(run_dir.rglob("comparison_*.table.json")).read_text())
    assert logged["columns"][:7] == [
        "method",
        "model",
        "dataset",
        "seeds",
        "model_parameters",
        "eval/examples",
        "eval/accuracy_mean",
    ]
    files_table = list(csv.DictReader((sweep_dir / "results" / "table.csv").read_text().splitlines()))
    for row, file_row in zip(logged["data"], files_table):
        assert row[:4] == [file_row["method"], "tiny-random", "synthetic", 2] and row[4] > 1e6 and row[5] == 16
        assert row[6] == pytest.approx(float(file_row["eval/accuracy_mean"]), abs=1e-5)


def test_an_offline_sweep_names_one_upload_command_for_all_its_runs(sweep):
    """Each cell said its own `wandb sync` line; the summary gives one that uploads every cell and the comparison."""
    sweep_dir, cells, first, *_ = sweep
    console = first.stdout + first.stderr
    command = f"wandb sync {sweep_dir}/*/wandb/offline-run-* {sweep_dir}/wandb/offline-run-*"
    assert console.count("wandb sync") == 1 and f"upload the sweep's runs later with:  {command}" in first.stdout
    assert all(list(cell.glob("wandb/offline-run-*")) for cell in cells) and list(sweep_dir.glob("wandb/offline-run-*"))


def test_a_cell_directory_is_one_path_component_of_bounded_length():
    assert cell_dir("experiment=huang2022/meta_ict,method=ict") == "experiment=huang2022-meta_ict,method=ict"
    many = [",".join(f"dataset.key{i}=value/{i + shift}" for i in range(40)) for shift in (0, 1)]
    names = [cell_dir(overrides) for overrides in many]
    assert all("/" not in n and len(n) == 200 for n in names) and names[0] != names[1]


@pytest.mark.parametrize("method", ["cd", "genpi", "cheat_sheet", "contextualization"])
def test_every_setting_that_cannot_change_results_is_left_out_of_the_cell_directory(make_cfg, method):
    # A sweep run again with another cache or logger setting (logger.tags, cache_dir) would land in new cell
    # directories, and its repeated cells would be averaged as extra seeds.
    from ctxdistill.cli import CONFIG_DIR
    from ctxdistill.sweeps import compared, flatten

    excluded = set(OmegaConf.load(CONFIG_DIR / "config.yaml").hydra.job.config.override_dirname.exclude_keys)
    config = OmegaConf.to_container(make_cfg(f"method={method}", "logger=wandb"), resolve=True)
    uncompared = {k for k in flatten(config) if not compared(k)} - {"output_dir"}  # a cell's own, by design
    assert uncompared and uncompared <= excluded, uncompared - excluded


def test_a_sweep_dir_that_cannot_be_made_is_one_message(tmp_path):
    (tmp_path / "file").touch()
    sweep_dir = tmp_path / "file" / "s"  # SWEEP_DIR=... under a file
    proc = multirun("method=zero_shot", *CELL, "logger=none", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 2
    message = (
        f"ctxdistill: hydra.sweep.dir: cannot create {sweep_dir} (Not a directory). Give it a directory you can write"
    )
    assert proc.stderr == message + "\n"


@pytest.mark.parametrize(
    "data, message",
    [
        (
            "dataset.source.data_dir={missing}",
            "dataset.source.data_dir={missing}: no such directory. Point it at the directory that holds the data files",
        ),
        (
            "dataset.source.file={found},{missing}",
            "dataset.source.file={missing}: no such file. Point it at the data file",
        ),
    ],
    ids=["data_dir", "a swept file"],
)
def test_a_sweep_with_a_missing_data_path_is_refused_before_its_first_cell(data, message, tmp_path):
    paths = {"missing": tmp_path / "nowhere", "found": tmp_path / "train.jsonl"}
    paths["found"].touch()
    proc = multirun(
        "method=zero_shot", "seed=0,1", *CELL, "logger=none", data.format(**paths), f"hydra.sweep.dir={tmp_path / 's'}"
    )
    assert proc.returncode == 2 and proc.stderr == f"ctxdistill: {message.format(**paths)}\n"
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("key", ["hydra.run.dir", "output_dir"])
def test_a_run_directory_that_cannot_be_made_is_one_message(key, tmp_path):
    (tmp_path / "file").touch()
    run_dir = tmp_path / "file" / "run"  # root may write anywhere: a path under a file fails for everyone
    proc = subprocess.run(
        [sys.executable, "-m", "ctxdistill", "method=zero_shot", *CELL, "logger=none", f"{key}={run_dir}"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert (
        proc.stderr
        == f"ctxdistill: {key}: cannot create {run_dir} (Not a directory). Give it a directory you can write\n"
    )


def test_a_cache_dir_that_is_a_file_refuses_a_sweep_before_its_first_cell(tmp_path):
    """The nineteenth audit: every cell failed with a NotADirectoryError traceback."""
    (tmp_path / "file").touch()
    sweep = tmp_path / "s"
    proc = multirun(
        "method=zero_shot",
        "seed=0,1",
        *CELL,
        "logger=none",
        f"cache_dir={tmp_path / 'file'}",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        f"ctxdistill: cache_dir (CTXDISTILL_CACHE): {tmp_path / 'file'} is a file, not a directory. Give it a "
        "directory you can write\n"
    )
    assert not sweep.exists()


def test_a_refused_run_leaves_no_run_directory_behind(tmp_path):
    """A single run refused in validation left its run directory holding Hydra's .hydra/ and log alone: a run that
    seemed to have started, as a refused sweep's directory once did."""

    def refused_run(run_dir: Path) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "ctxdistill.cli", "method=zero_shot", *CELL, "logger=none", "trainer.lr=-1"]
        return subprocess.run([*command, f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=300)

    proc = refused_run(tmp_path / "new" / "runs" / "r")  # each directory made for it goes, up to the first that existed
    assert proc.returncode == 1
    assert proc.stderr == "ctxdistill: trainer.lr: must be positive, got -1.0. Set e.g. trainer.lr=1e-3\n"
    assert list(tmp_path.iterdir()) == []
    # a directory that holds anything else (a resumed run's checkpoints) is kept with it
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "checkpoints" / "step-2.json").write_text("{}\n")
    assert refused_run(resumed).returncode == 1
    assert (resumed / "checkpoints" / "step-2.json").read_text() == "{}\n"


def test_a_directory_without_write_permission_is_one_message(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as chmod 555 does for anyone but root
    with pytest.raises(ConfigError) as refused:
        writable_dir("hydra.run.dir", str(tmp_path))
    assert str(refused.value) == (
        f"hydra.run.dir: cannot write to {tmp_path} (Permission denied). Give it a directory you can write"
    )
    writable_dir("cache_dir (CTXDISTILL_CACHE)", str(tmp_path), write=False)  # a shared cache, filled: read only


def test_failed_cells_fail_the_sweep_also_when_its_summary_cannot_be_written(tmp_path):
    """The nineteenth audit: Hydra turns the summary's exception into a warning, and the failed cells were counted
    after it, so the sweep exited 0 and listed none."""
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    (sweep_dir / "results").write_text("not a directory\n")
    proc = multirun("method=zero_shot", "trainer.lr=0.001,-1", *CELL, "logger=none", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 1
    assert "1 cell(s) FAILED" in proc.stdout and "ConfigError: trainer.lr" in proc.stdout


def test_only_the_summary_a_comparison_wrote_is_removed(tmp_path):
    from ctxdistill.results.files import remove_results

    (tmp_path / "results").mkdir()
    (tmp_path / "README.md").write_text("# my notes\n")
    (tmp_path / "results" / "table.md").write_text("mine\n")
    remove_results(tmp_path)  # a README the suite did not write: nothing is removed
    assert (tmp_path / "README.md").read_text() == "# my notes\n" and (tmp_path / "results" / "table.md").is_file()


def test_a_failing_cell_does_not_stop_the_sweep_and_is_listed(tmp_path):
    sweep_dir = tmp_path / "s"
    proc = multirun("method=zero_shot", "trainer.lr=0.001,-1", *CELL, "logger=none", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 1
    [good] = [p for p in sweep_dir.iterdir() if "trainer.lr=0.001" in p.name]
    [bad] = [p for p in sweep_dir.iterdir() if "trainer.lr=-1" in p.name]
    assert json.loads((good / "metrics.json").read_text())["status"] == "complete"
    failure = json.loads((bad / "failure.json").read_text())
    assert failure["error"].startswith("ConfigError: trainer.lr") and "Traceback" in failure["traceback"]
    assert "1 cell(s) FAILED" in proc.stdout and f"{bad.name}: ConfigError: trainer.lr" in proc.stdout
    assert "1 failed cells" in (sweep_dir / "README.md").read_text()
    # a user error is one line on the console (its traceback is in failure.json), not a traceback per cell
    console = proc.stdout + proc.stderr
    assert "this cell failed; the sweep goes on: trainer.lr" in console and "Traceback" not in console

    # another command into the same directory succeeds: the earlier command's failure is not this one's to retry
    other = multirun("method=zero_shot", "trainer.lr=0.002", *CELL, "logger=none", f"hydra.sweep.dir={sweep_dir}")
    assert other.returncode == 0, other.stdout[-3000:]
    assert "FAILED" not in other.stdout and "Re-run the same command" not in other.stdout
    said = "1 failed cell(s) in this directory are not cells of this command (another command launched them"
    assert said in other.stdout and f"{bad.name}: ConfigError: trainer.lr" in other.stdout
    readme = (sweep_dir / "README.md").read_text()
    assert "failed cells**" not in readme and said in readme


def test_a_setting_no_cell_of_the_sweep_accepts_is_refused_once_before_the_first_cell(tmp_path):
    """It was a failure in every cell, then a list of them all, ending with the same command to re-run."""
    sweep_dir = tmp_path / "s"
    proc = multirun("method=zero_shot,cd", *CELL, "trainer.batch_size=0", "logger=none", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr == "ctxdistill: trainer.batch_size: must be >= 1, got 0. Set trainer.batch_size=8\n"
    assert "Launching" not in proc.stdout and not sweep_dir.exists()  # no directory of a sweep that ran nothing


def test_a_sweep_given_one_output_dir_is_refused_before_its_first_cell(tmp_path):
    """The eighteenth audit: each cell wrote there, seed 1's failure hid seed 0's result, and the sweep exited 0
    with no summary (force=true: seed 1 overwrote seed 0)."""
    sweep_dir, out = tmp_path / "s", tmp_path / "one"
    proc = multirun(
        "method=zero_shot", "seed=0,1", *CELL, "logger=none", f"output_dir={out}", f"hydra.sweep.dir={sweep_dir}"
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr == (
        f"ctxdistill: output_dir={out} is one directory for the sweep's 2 cells: each cell would find another's run "
        "there, and the sweep's summary reads none of them. Leave output_dir out (each cell writes to "
        "hydra.sweep.dir/<its overrides>) and name the sweep's directory with hydra.sweep.dir\n"
    )
    assert not out.exists() and not sweep_dir.exists()


@pytest.mark.parametrize(
    "refused",
    ["trainer.batch_size=0", "method=zero_shot,nosuch"],
    ids=["before Hydra writes multirun.yaml", "a cell that does not compose, after"],
)
def test_a_refused_sweep_leaves_no_directory_that_looks_like_a_sweep(refused, tmp_path):
    """It left an empty hydra.sweep.dir, or one holding only multirun.yaml: a sweep that seemed to have run nothing."""
    made = tmp_path / "new" / "sweeps" / "s"  # each directory made for it goes, up to the first that existed
    proc = multirun("method=zero_shot", *CELL, refused, "logger=none", f"hydra.sweep.dir={made}")
    assert proc.returncode == 2 and proc.stderr.startswith("ctxdistill: "), proc.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []
    # a directory that existed is kept as it was: empty, or with what it held (an earlier sweep's multirun.yaml)
    empty, earlier = tmp_path / "empty", tmp_path / "earlier"
    empty.mkdir()
    earlier.mkdir()
    (earlier / "multirun.yaml").write_text("an earlier sweep's\n")
    (earlier / "notes.txt").write_text("mine\n")
    for sweep_dir in (empty, earlier):
        proc = multirun("method=zero_shot", *CELL, refused, "logger=none", f"hydra.sweep.dir={sweep_dir}")
        assert proc.returncode == 2, proc.stderr[-3000:]
    assert list(empty.iterdir()) == []
    assert {p.name: p.read_text() for p in earlier.iterdir()} == {
        "multirun.yaml": "an earlier sweep's\n",
        "notes.txt": "mine\n",
    }


def test_a_training_setting_of_a_sweep_is_named_once_for_the_cells_that_do_not_train(tmp_path):
    sweep_dir = tmp_path / "s"
    proc = multirun("method=zero_shot,icl,cd", *CELL, "logger=none", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    # said once, in the sweep's summary, not in each cell of a method that does not train (a single run warns)
    said = (
        "warning: trainer.max_steps, dataset.num_train_queries: not read by 2 of the 3 cells, ignored there "
        "(method=icl does not train; method=zero_shot does not train)"
    )
    assert console.count("trainer.max_steps") == console.count("trainer.max_steps=2") + 1 and said in proc.stdout
    assert "does not train: ignoring" not in console
    assert said in (sweep_dir / "README.md").read_text()
    [cell] = [p for p in sweep_dir.iterdir() if "method=zero_shot" in p.name]
    assert json.loads((cell / "metrics.json").read_text())["ignored_settings"] == [
        {
            "keys": ["trainer.max_steps", "dataset.num_train_queries"],
            "reason": "method=zero_shot does not train",
            "warning": "method=zero_shot does not train: ignoring trainer.max_steps, dataset.num_train_queries",
        }
    ]


def test_a_setting_no_cell_of_a_sweep_reads_is_said_so_with_each_reason_once():
    from ctxdistill.sweeps import ignored_settings_warnings

    def cell(*keys: str, reason: str) -> dict:
        return {"ignored_settings": [{"keys": list(keys), "reason": reason, "warning": "..."}]}

    records = [
        cell("trainer.lr", reason="method=zero_shot does not train"),
        cell("trainer.lr", reason="method=icl does not train"),
        cell("trainer.lr", reason="method=zero_shot does not train"),
        cell("model.lora.r", reason="model.adapter=prefix reads only its own adapter's settings"),
    ]
    assert ignored_settings_warnings(records[:3]) == [
        "warning: trainer.lr: read by none of the 3 cells, ignored "
        "(method=zero_shot does not train; method=icl does not train)"
    ]
    assert ignored_settings_warnings([*records[3:], {}, {"ignored_settings": []}]) == [
        "warning: model.lora.r: not read by 1 of the 3 cells, ignored there "
        "(model.adapter=prefix reads only its own adapter's settings)"
    ]


def test_a_cell_holding_a_run_of_another_config_fails_the_sweep_and_is_not_reported(tmp_path):
    sweep_dir = tmp_path / "s"
    command = ["method=zero_shot", "trainer.lr=0.001,0.002", *CELL, "logger=none", f"hydra.sweep.dir={sweep_dir}"]
    assert multirun(*command).returncode == 0
    [changed] = [p for p in sweep_dir.iterdir() if "trainer.lr=0.002" in p.name]
    config = OmegaConf.load(changed / "config.yaml")
    config.trainer.lr = 0.003  # as if made by an older default
    OmegaConf.save(config, changed / "config.yaml")
    again = multirun(*command)
    assert again.returncode == 1
    assert "Comparison (1 runs" in again.stdout and "1 cell(s) FAILED" in again.stdout
    assert f"{changed.name}: ConfigError: {changed} holds a complete run made with a different config" in again.stdout
    readme = (sweep_dir / "README.md").read_text()
    assert "1 complete runs" in readme and "**1 failed cells**" in readme and f"`{changed.name}`" in readme


def test_a_cell_whose_data_file_changed_since_its_run_is_not_skipped_as_complete(tmp_path):
    """Only its config was compared: a data file rewritten at its path (stage 1's contexts, an eval set) left the
    old results in the table, read as the new data's."""
    from conftest import own_ood_set

    gifts = tmp_path / "gifts.tsv"
    gifts.write_text("review\tlabel\nA truly great gift.\t0\nA broken, useless gift.\t1\n")
    sweep_dir = tmp_path / "s"
    command = ["method=zero_shot", "seed=0,1", *CELL, *own_ood_set(tmp_path / "conf", "gifts", gifts), "logger=none"]
    assert multirun(*command, f"hydra.sweep.dir={sweep_dir}").returncode == 0
    gifts.write_text("review\tlabel\nA truly great gift.\t0\nA broken, useless gift.\t1\nLovely.\t0\n")
    (sweep_dir / "results" / "my_notes.txt").write_text("mine\n")
    again = multirun(*command, f"hydra.sweep.dir={sweep_dir}")
    assert again.returncode == 1 and "2 cell(s) FAILED" in again.stdout
    assert f"holds a complete run made from data that changed since: {gifts}" in again.stdout
    # no cell complete: the first launch's summary of the old data's runs is not left to be read (the nineteenth
    # audit: README.md still said "2 complete runs", with their table); a file of the user's stays
    assert not (sweep_dir / "README.md").exists()
    assert [p.name for p in (sweep_dir / "results").iterdir()] == ["my_notes.txt"]
    forced = multirun(*command, "force=true", f"hydra.sweep.dir={sweep_dir}")
    assert forced.returncode == 0, forced.stdout[-3000:]
    assert {json.loads(p.read_text())["metrics"]["gifts/examples"] for p in sweep_dir.glob("*/metrics.json")} == {3}


def test_the_sweep_table_gives_each_swept_setting_its_own_row_and_says_what_a_row_averages(tmp_path, capsys):
    sweep_dir = tmp_path / "s"
    proc = multirun(
        "method=zero_shot",
        "trainer.lr=0.001,0.002",
        "dataset.context.data_seed=0,1",  # a repetition by design (Mosbach et al. average over data seeds)
        *CELL,
        "logger=none",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    averaged = "Each row averages 2 runs: seed 0; dataset.context.data_seed 0, 1 (the `seeds` column counts the runs)."
    assert averaged in proc.stdout
    readme = (sweep_dir / "README.md").read_text()
    assert "## What each row averages" in readme and averaged in readme
    rows = [r.split("|")[1].strip() for r in readme.splitlines() if r.startswith("| zero_shot")]
    assert rows[:2] == ["zero_shot lr=0.001", "zero_shot lr=0.002"]
    table = list(csv.DictReader((sweep_dir / "results" / "table.csv").read_text().splitlines()))
    assert [(r["method"], r["seeds"]) for r in table] == [("zero_shot lr=0.001", "2"), ("zero_shot lr=0.002", "2")]
    # its command to make the table again splits the rows as the sweep did (without --by it averaged both rates)
    assert f"Regenerate with `ctxdistill-compare {sweep_dir} --by trainer.lr --out {sweep_dir}`" in readme
    # ... and keeps the command that made (and resumes) the sweep, which it dropped (the eighteenth audit)
    produced = readme[readme.index("Produced by:") :].split("```")[1]
    assert "trainer.lr=0.001,0.002" in produced
    assert compare([str(sweep_dir), "--by", "trainer.lr", "--out", str(sweep_dir)]) == 0
    assert (sweep_dir / "README.md").read_text().split("```")[1] == produced
    capsys.readouterr()
    # without --by, the row that averages both rates says so; a directory given twice counts its runs once
    assert compare([str(sweep_dir), f"{sweep_dir}/", "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert [(r["method"], r["seeds"]) for r in csv.DictReader(out.splitlines())] == [("zero_shot", "4")]
    assert "zero_shot / tiny-random / synthetic averages 4 runs that differ in trainer.lr 0.001, 0.002" in err
    assert "tell them apart with --by trainer.lr" in err and "was given more than once" in err


def test_a_complete_run_is_skipped_unless_forced_or_made_by_another_config(make_cfg, tmp_path):
    cfg = make_cfg(*CELL, "logger=none", "method=zero_shot")
    stored = {
        "method": "zero_shot",
        "model": "tiny-random",
        "dataset": "synthetic",
        "seed": 0,
        "status": "complete",
        "metrics": {"eval/accuracy": 0.123},
    }
    (tmp_path / "metrics.json").write_text(json.dumps(stored))
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    assert run_unless_complete(cfg) == stored  # nothing loaded, nothing written
    assert json.loads((tmp_path / "metrics.json").read_text()) == stored
    with pytest.raises(ConfigError, match=r"different config \(dataset.context.num_demos\).*force=true"):
        run_unless_complete(make_cfg(*CELL, "logger=none", "method=zero_shot", "dataset.context.num_demos=4"))
    rerun = run_unless_complete(make_cfg(*CELL, "logger=none", "method=zero_shot", "force=true"))
    assert rerun["metrics"]["eval/accuracy"] != 0.123
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"] == rerun["metrics"]


def test_a_forced_run_that_stops_leaves_nothing_of_the_run_it_replaces(make_cfg, tmp_path, monkeypatch):
    # Its config is written as it starts: the earlier run's metrics, predictions, weights and re-evaluations would
    # otherwise be read as its own (run again without force=true it was skipped with the earlier numbers).
    import ctxdistill.run

    cfg = make_cfg(*CELL, "logger=none", "method=zero_shot")
    stored = {"method": "zero_shot", "model": "tiny-random", "dataset": "synthetic", "seed": 0, "status": "complete"}
    (tmp_path / "metrics.json").write_text(json.dumps({**stored, "metrics": {"eval/accuracy": 0.123}}))
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    for earlier in ("predictions.jsonl", "adapter/adapter_model.safetensors", "evaluations/again/metrics.json"):
        (tmp_path / earlier).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / earlier).write_text("{}")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ctxdistill.run, "build_models", interrupted)
    forced = make_cfg(*CELL, "logger=none", "method=zero_shot", "force=true", "trainer.lr=0.05")
    with pytest.raises(KeyboardInterrupt):
        run_unless_complete(forced)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    assert OmegaConf.load(tmp_path / "config.yaml").trainer.lr == 0.05


@pytest.mark.parametrize(
    "sweep_file", sorted((Path(__file__).parents[1] / "sweeps" / "wandb").glob("*.yaml")), ids=lambda p: p.stem
)
def test_wandb_sweep_files_run_the_hydra_app_with_valid_cells(make_cfg, sweep_file, monkeypatch, tmp_path):
    import yaml
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    monkeypatch.setenv("PAWS_QQP_DIR", str(tmp_path))  # what a worker sets before `wandb agent` (the QQP files)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # a worker's GPUs, which sharded cells need
    spec = yaml.safe_load(sweep_file.read_text())
    params = spec["parameters"]
    grid = {k: p.get("values", [p.get("value")]) for k, p in params.items()}
    # cells that use every value of every parameter at least once, as the agent would be handed them
    for i in range(max(map(len, grid.values()))):
        args = {k: {"value": values[i % len(values)]} for k, values in grid.items()}
        command = create_sweep_command(spec["command"])
        variables = {**create_sweep_command_args({"args": args}), "env": ["/usr/bin/env"], "interpreter": ["python"]}
        argv = [part for c in command for part in (variables[c[2:-1]] if c.startswith("${") else [c])]
        start = argv.index("ctxdistill") + 1
        launcher = ["torchrun", "--standalone", "--nproc_per_node", "gpu"]  # one process per GPU: a sharded model
        sharded = args.get("trainer/distributed", {}).get("value", "ddp") != "ddp"
        assert argv[:start] == ["/usr/bin/env", *(launcher if sharded else ["python"]), "-m", "ctxdistill"]
        cfg = make_cfg(*argv[start:])
        validate(cfg)
        assert (cfg.method.name, cfg.seed, cfg.logger.group) == tuple(
            args[k]["value"] for k in ("method", "seed", "logger.group")
        )
        if "paws_qqp" in cfg.dataset.ood:
            assert cfg.dataset.ood.paws_qqp.source.data_dir == str(tmp_path)
            assert "PAWS_QQP_DIR=PATH wandb agent" in sweep_file.read_text()


def test_a_wandb_agent_run_without_its_data_path_variable_is_one_message(tmp_path):
    """The QQP sweep files read PAWS-QQP's local directory from PAWS_QQP_DIR: a worker without it is told so,
    by name, before a model loads; with a wrong one, the message names the path."""
    import yaml

    spec = yaml.safe_load((REPO / "sweeps" / "wandb" / "upadhayaya2024_qqp.yaml").read_text())
    data_dir = spec["parameters"]["dataset.ood.paws_qqp.source.data_dir"]["value"]
    params = {"experiment": "upadhayaya2024/qqp", "method": "zero_shot", "model": "tiny-random", "logger": "none"}
    params["dataset.ood.paws_qqp.source.data_dir"] = data_dir
    unset = agent_run(tmp_path, "run1", params)
    key = "dataset.ood.paws_qqp.source.data_dir"
    assert unset.returncode == 1 and unset.stderr == (
        f'ctxdistill: {key}: cannot resolve it (KeyError raised while resolving interpolation: "Environment variable '
        f"'PAWS_QQP_DIR' not found\"). Set the variable it reads, or give {key} a value\n"
    )
    wrong = agent_run(tmp_path, "run2", params, PAWS_QQP_DIR=str(tmp_path / "paws_qqp"))
    assert wrong.returncode == 1 and wrong.stderr == (
        f"ctxdistill: {key}={tmp_path / 'paws_qqp'}: no such directory. Point it at the directory that holds the data "
        "files\n"
    )


REPO = Path(__file__).resolve().parent.parent


def agent_run(tmp_path: Path, run_id: str, params: dict, **environment: str) -> subprocess.CompletedProcess:
    """One run as W&B's agent starts it with the command of the committed sweep files: the parameters as Hydra
    overrides and as the run's W&B sweep config, the agent's ids in the environment, from the repository root
    (here tmp_path)."""
    import yaml
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
    from wandb.sdk.lib import config_util

    commands = {yaml.safe_load(f.read_text())["command"][-1] for f in (REPO / "sweeps" / "wandb").glob("*.yaml")}
    assert len(commands) == 1  # every sweep file runs the same command
    args = {key: {"value": value} for key, value in params.items()}
    config_util.save_config_file_from_dict(tmp_path / f"{run_id}.yaml", args)
    variables = {**create_sweep_command_args({"args": args}), "env": [], "interpreter": [sys.executable]}
    spec = yaml.safe_load((REPO / "sweeps" / "wandb" / "demo.yaml").read_text())
    argv = [part for c in spec["command"] for part in (variables[c[2:-1]] if c.startswith("${") else [c])]
    env = {**os.environ, **environment, "WANDB_SILENT": "true", "WANDB_SWEEP_ID": "sweep1", "WANDB_RUN_ID": run_id}
    env["WANDB_SWEEP_PARAM_PATH"] = str(tmp_path / f"{run_id}.yaml")
    env.pop("WANDB_MODE", None)
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path)


AGENT_CELL = {"method": "icl", "model": "tiny-random", "seed": 0, "dataset.source.split_sizes.eval": 16}


def test_a_run_of_a_wandb_sweep_agent_reads_back_from_its_wandb_run(tmp_path):
    """The agent hands a run its parameters as W&B config too (method: icl), which replaces and locks the run's
    sections of the same name; the run must still read back, with its sections, from W&B."""
    done = agent_run(tmp_path, "run1", {**AGENT_CELL, "logger.mode": "offline"})
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "wandb_sweeps" / "sweep1" / "run1"
    assert read_offline_run(next((run_dir / "wandb").glob("offline-run-*"))).config["method"] == "icl"
    [record] = collect([run_dir / "wandb"])
    assert (record["method"], record["model"], record["config"]["method"]["name"]) == ("icl", "tiny-random", "icl")
    assert record["metrics"] == json.loads((run_dir / "metrics.json").read_text())["metrics"]


def test_runs_of_wandb_sweep_agents_never_share_a_directory(tmp_path):
    """Agents on several workers start their cells at the same moment; cells differing only in a setting the default
    run directory does not name (the launch second, method, model, dataset) must not land in one directory."""
    for run_id, data_seed in (("run1", 1), ("run2", 2)):
        done = agent_run(tmp_path, run_id, {**AGENT_CELL, "dataset.context.data_seed": data_seed, "logger": "none"})
        assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted(p.parent.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("metrics.json"))
    assert runs == ["outputs/wandb_sweeps/sweep1/run1", "outputs/wandb_sweeps/sweep1/run2"]


@pytest.mark.parametrize("grid", sorted((REPO / "sweeps" / "grids").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_committed_wandb_sweep_files_are_generated_from_the_grid(grid, monkeypatch):
    from ctxdistill.grids import wandb_sweeps

    monkeypatch.chdir(REPO)
    generated = wandb_sweeps(grid.relative_to(REPO), Path("sweeps/wandb"))
    assert generated, grid
    for path, text in generated.items():
        assert path.read_text() == text, f"{path} is stale: python -m ctxdistill.grids wandb {grid.relative_to(REPO)}"


def test_a_wandb_sweep_file_names_the_metric_its_runs_are_judged_by_or_none():
    # the sixteenth audit: every file said eval/accuracy, and Mosbach's pbft runs are judged by eval/vocab_accuracy
    metrics = {
        path.name: yaml.safe_load(path.read_text()).get("metric")
        for path in sorted((REPO / "sweeps" / "wandb").glob("*.yaml"))
    }
    for name, metric in metrics.items():
        if name.startswith("mosbach2023"):  # icl (accuracy) beside pbft (vocab_accuracy): no one metric ranks both
            assert metric is None, name
        else:
            assert metric == {"name": "eval/accuracy", "goal": "maximize"}, name


def test_every_wandb_sweep_file_comes_from_a_grid(monkeypatch):
    """None is hand-written beside the grids (the demo's was, its methods copied from experiment=demo's sweep)."""
    from ctxdistill.grids import wandb_sweeps

    monkeypatch.chdir(REPO)
    grids = sorted(Path("sweeps/grids").glob("*.yaml"))
    generated = {path for grid in grids for path in wandb_sweeps(grid, Path("sweeps/wandb"))}
    assert generated == set(Path("sweeps/wandb").glob("*.yaml"))


def test_a_wandb_sweep_file_sweeps_what_its_experiment_sweeps_itself():
    """An agent starts single runs, which never reach Hydra's sweeper: the experiment's hydra.sweeper.params
    join the W&B file's parameters, as Hydra would read them."""
    from ctxdistill.grids import experiment_sweep

    assert experiment_sweep("demo") == {"method": ["zero_shot", "icl", "ft", "cd"]}
    assert experiment_sweep("many_contexts") == {"method": "cd", "dataset.context.num_contexts": [1, 2, 4]}
    assert experiment_sweep("mosbach2023/mnli") == {}
    # composed as Hydra composes it: a sweep the experiment extends is its own, unless it sets another
    assert experiment_sweep("beyond_window") == experiment_sweep("demo")
    assert experiment_sweep("huang2022/meta_ict") == {"method": ["icl", "ict", "icl_d", "icl_distill"]}
    assert experiment_sweep("cross_family") == {}  # params: null, not the demo's four methods


def launched(tmp_path: Path) -> list[str]:
    """The stood-in commands a script ran, but the check of its comparison's arguments (--check-args), which runs
    before anything is launched."""
    calls = tmp_path / "calls"
    return [c for c in calls.read_text().splitlines() if "--check-args" not in c] if calls.exists() else []


def stand_ins(tmp_path: Path, *commands: str) -> dict[str, str]:
    """The environment with commands that only append their arguments to tmp_path/calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command in commands:
        (bin_dir / command).write_text(f'#!/bin/sh\necho {command} "$@" >> "{tmp_path}/calls"\n')
        (bin_dir / command).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize(
    "script, variables",
    [
        ("upadhayaya2024", {"METHODS": "cd", "SEEDS": "0"}),
        ("beyond_window", {"ARMS": "icl cd"}),
        ("snell2022_addition", {}),
    ],
)
@pytest.mark.parametrize("stop", [130, 143])
def test_a_paper_script_stopped_by_ctrl_c_launches_nothing_after(script, variables, stop, tmp_path):
    """The sixteenth audit: ctxdistill catches Ctrl-C (and SIGTERM) to save its work and exits 130 (143); the scripts
    read that as failed cells and launched the next dataset's or arm's multirun, then compared what was left."""
    env = stand_ins(tmp_path, "ctxdistill-compare", "ctxdistill-eval")
    (tmp_path / "bin" / "ctxdistill").write_text(
        f'#!/bin/sh\necho ctxdistill "$@" >> "{tmp_path}/calls"\nexit {stop}\n'
    )
    (tmp_path / "bin" / "ctxdistill").chmod(0o755)
    env.update(variables, SWEEP_DIR=str(tmp_path / "sweep"))
    proc = subprocess.run(["bash", f"sweeps/{script}.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == stop, proc.stderr[-2000:]
    calls = launched(tmp_path)
    assert len(calls) == 1 and calls[0].startswith("ctxdistill "), calls


def test_a_multirun_over_experiments_with_sweeps_of_their_own_is_refused_before_any_cell(tmp_path):
    # the sixteenth audit: -m experiment=demo,many_contexts ran two cd cells, dropping demo's four methods and
    # many_contexts' three context counts, and averaged the two experiments as seeds
    sweep = tmp_path / "sweep"
    proc = multirun("experiment=demo,many_contexts", *CELL, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 2 and not sweep.exists()
    assert proc.stderr == (
        "ctxdistill: experiment: a multirun over several experiments runs one cell each, without each experiment's "
        "own sweep (demo: method=zero_shot,icl,ft,cd; many_contexts: method=cd dataset.context.num_contexts=1,2,4). "
        "Run one multirun per experiment: ctxdistill -m experiment=demo ... ; ctxdistill -m experiment=many_contexts "
        "...\n"
    )
    # and --cfg job says so, rather than print the two cells that would never run (the eighteenth audit)
    printed = multirun("experiment=demo,many_contexts", *CELL, "--cfg", "job")
    assert printed.returncode == 2 and printed.stderr == proc.stderr and "# cell" not in printed.stdout


@pytest.mark.parametrize("script, argument", [("mosbach2023", "model=opt-125m"), ("upadhayaya2024", "seed=1")])
def test_a_paper_script_refuses_a_grid_key_among_its_arguments(script, argument, tmp_path):
    """The sixteenth audit: the script's arguments come last in each multirun, so model=opt-125m replaced the grid's
    models in every multirun, the sharded opt-6.7b one included: opt-125m ran twice, once under FSDP."""
    env = stand_ins(tmp_path, "ctxdistill", "ctxdistill-compare")
    env["SWEEP_DIR"] = str(tmp_path / "sweep")
    proc = subprocess.run(["bash", f"sweeps/{script}.sh", argument], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and not launched(tmp_path)
    key = argument.split("=")[0]
    assert proc.stderr == (
        f"error: {argument}: {key} is a key of the grid (sweeps/grids/{script}.yaml), which the script sweeps "
        "itself. Change its values with the script's variables (its --help) or in the grid, not as an argument\n"
    )


def test_the_mosbach_grid_trains_in_bf16_over_float32_weights_and_shards_what_one_gpu_cannot_hold(make_cfg, tmp_path):
    """Full fine-tuning with AdamW in float32 holds 16 bytes a parameter: opt-2.7b's 42 GB fits an 80 GB GPU,
    opt-6.7b's 107 GB does not. Every cell of the grid, as the script runs it, trains under bf16 autocast over
    float32 weights, and opt-6.7b's shard with FSDP (run on GPUs, so validated as a GPU worker would)."""
    from unittest import mock

    from ctxdistill.grids import load_grid, multiruns

    grid = load_grid(REPO / "sweeps" / "grids" / "mosbach2023.yaml")
    strategies = {}
    for experiment in grid["experiments"]:
        data = [f"{key}={tmp_path}" for key in grid["wandb"].get(experiment, {})]  # the script's QQP_ARGS
        for multirun in multiruns(grid):
            swept = dict(override.split("=", 1) for override in multirun)
            for model in swept.pop("model").split(","):
                cell = [f"{key}={value.split(',')[0]}" for key, value in swept.items()]
                cfg = make_cfg(f"experiment={experiment}", *cell, f"model={model}", "method=pbft", *data)
                with mock.patch("torch.cuda.is_available", return_value=True):
                    validate(cfg)
                assert (cfg.model.dtype, cfg.trainer.mixed_precision) == ("float32", "bf16"), (experiment, model)
                strategies[model] = cfg.trainer.distributed.strategy
    assert strategies == {
        "opt-125m": "ddp",
        "opt-350m": "ddp",
        "opt-1.3b": "ddp",
        "opt-2.7b": "ddp",
        "opt-6.7b": "fsdp",
    }


def test_a_model_with_settings_of_its_own_sweeps_in_a_multirun_of_its_own():
    from ctxdistill.grids import multiruns

    grid = {"experiments": ["e"], "params": {"model": ["a", "b", "c"], "seed": [0, 1]}, "models": {"b": {"x": 1}}}
    assert multiruns(grid) == [["model=a,c", "seed=0,1"], ["model=b", "seed=0,1", "x=1"]]
    assert multiruns(grid, ["model=b"]) == [["model=b", "seed=0,1", "x=1"]]
    assert multiruns(grid, ["model=a"]) == [["model=a", "seed=0,1"]]


def test_the_paper_scripts_sweep_the_grid_file(tmp_path):
    """sweeps/mosbach2023.sh with ctxdistill stood in for: one multirun per experiment of the grid, with its
    params, MODELS replacing the models, the per-dataset arguments and the script's own arguments after them;
    a model with settings of its own (opt-6.7b, sharded) in a multirun of its own, into the same directory."""
    env = {**stand_ins(tmp_path, "ctxdistill", "ctxdistill-compare"), "QQP_ARGS": "a=1 b=2"}
    env.update(MODELS="opt-125m,opt-6.7b", SWEEP_DIR=str(tmp_path / "sweep"))
    subprocess.run(["bash", "sweeps/mosbach2023.sh", "x=y"], cwd=REPO, env=env, check=True)
    calls = (tmp_path / "calls").read_text().splitlines()
    grid = "method=icl,pbft model={} seed=0 dataset.pattern=minimal,gpt3,eval_harness"
    grid += " dataset.context.data_seed=0,1,2,3,4,5,6,7,8,9 trainer.mixed_precision=bf16 logger.group=mosbach2023"
    small, sharded = grid.format("opt-125m"), grid.format("opt-6.7b") + " trainer/distributed=fsdp"
    sweep = tmp_path / "sweep"
    assert calls == [
        f"ctxdistill -m experiment=mosbach2023/mnli {small} hydra.sweep.dir={sweep}/mnli x=y",
        f"ctxdistill -m experiment=mosbach2023/mnli {sharded} hydra.sweep.dir={sweep}/mnli x=y",
        f"ctxdistill -m experiment=mosbach2023/qqp {small} a=1 b=2 hydra.sweep.dir={sweep}/qqp x=y",
        f"ctxdistill -m experiment=mosbach2023/qqp {sharded} a=1 b=2 hydra.sweep.dir={sweep}/qqp x=y",
        f"ctxdistill-compare {sweep} --out {sweep} --by dataset.pattern",
    ]


@pytest.mark.parametrize("script, variables", [("upadhayaya2024", "METHODS=zero_shot SEEDS=0"), ("mosbach2023", "")])
def test_a_paper_script_stops_at_a_refused_override_with_its_one_message(script, variables, tmp_path):
    """A misspelt override refuses every dataset's multirun alike: said once, and no comparison of nothing after."""
    env = {**os.environ, "MODELS": "tiny-random", "SWEEP_DIR": str(tmp_path / "sweep")}
    env.update(v.split("=") for v in variables.split())
    proc = subprocess.run(
        ["bash", f"sweeps/{script}.sh", "trainer.max_step=2"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr == "ctxdistill: trainer.max_step: no such setting; did you mean max_steps?\n"


def test_relative_paths_given_to_a_script_are_read_from_where_it_is_run(tmp_path):
    """The scripts work from the repository root; SWEEP_DIR and DATA name places seen from the user's directory."""
    env = {**stand_ins(tmp_path, "ctxdistill"), "SWEEP_DIR": "sweep", "DATA": "wn18rr"}
    (tmp_path / "wn18rr").mkdir()
    subprocess.run(["bash", REPO / "sweeps" / "li2024_alpha.sh"], cwd=tmp_path, env=env, check=True)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2 and all(f"dataset.source.data_dir={tmp_path}/wn18rr " in call for call in calls)
    assert [call.split()[-1] for call in calls] == [
        f"hydra.sweep.dir={tmp_path}/sweep/{s}" for s in ("minilm", "smollm2")
    ]


def test_the_alpha_grid_runs_the_students_and_triples_it_is_given_and_names_a_misspelt_student(tmp_path):
    env = {**stand_ins(tmp_path, "ctxdistill"), "DATA": str(tmp_path), "STUDENTS": "smollm2", "NUM_TRAIN": "128"}
    subprocess.run(["bash", "sweeps/li2024_alpha.sh"], cwd=REPO, env=env, check=True)
    [call] = (tmp_path / "calls").read_text().splitlines()
    assert "method=kg_decoder_cd" in call and " dataset.num_train=128 " in call
    env["STUDENTS"] = "minilm bert"
    proc = subprocess.run(["bash", "sweeps/li2024_alpha.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == "STUDENTS: unknown student bert; they are minilm smollm2\n"
    assert len((tmp_path / "calls").read_text().splitlines()) == 1  # no student ran


@pytest.mark.parametrize(
    "script, variables, message",
    [
        (
            "upadhayaya2024",
            {"QQP_ARGS": "dataset.ood.paws_qqp.source.data_dir={missing}"},
            "ctxdistill: dataset.ood.paws_qqp.source.data_dir={missing}: no such directory. Point it at the directory "
            "that holds the data files",
        ),
        (
            "mosbach2023",
            {"QQP_ARGS": "dataset.ood.paws_qqp.source.data_dir={missing}"},
            "ctxdistill: dataset.ood.paws_qqp.source.data_dir={missing}: no such directory. Point it at the directory "
            "that holds the data files",
        ),
        (
            "li2024_alpha",
            {"DATA": "{missing}"},
            "DATA={missing}: no such directory; set DATA to the WN18RR kgbert_format directory",
        ),
    ],
)
def test_a_script_given_a_missing_data_path_stops_before_any_cell(script, variables, message, tmp_path):
    """Checked once for the whole grid (QQP's overrides before MNLI's cells run), not failed cell after cell."""
    missing = tmp_path / "nowhere"
    env = {**stand_ins(tmp_path, "ctxdistill", "ctxdistill-compare"), "SWEEP_DIR": str(tmp_path / "sweep")}
    env.update({name: value.format(missing=missing) for name, value in variables.items()})
    proc = subprocess.run(["bash", f"sweeps/{script}.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and not launched(tmp_path)
    assert proc.stderr == message.format(missing=missing) + "\n"


SCRIPTS = sorted(p.stem for p in (REPO / "sweeps").glob("*.sh") if p.read_text().startswith("#!"))  # not the sourced


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_asked_for_help_prints_its_opening_comment_and_runs_nothing(script, tmp_path):
    env = stand_ins(tmp_path, "ctxdistill", "ctxdistill-compare", "ctxdistill-eval", "python")
    proc = subprocess.run(["bash", f"sweeps/{script}.sh", "--help"], cwd=REPO, env=env, capture_output=True, text=True)
    opening = (REPO / "sweeps" / f"{script}.sh").read_text().splitlines()[1].removeprefix("# ")
    assert proc.returncode == 0 and proc.stdout.startswith(opening + "\n") and not launched(tmp_path)


def test_a_misspelt_arm_is_refused_before_any_arm_runs(tmp_path):
    env = {**stand_ins(tmp_path, "ctxdistill", "ctxdistill-eval", "python"), "ARMS": "icl cd_prefx"}
    proc = subprocess.run(["bash", "sweeps/beyond_window.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and not launched(tmp_path)
    assert (
        proc.stderr
        == "ARMS: unknown arm cd_prefx; the arms are icl cd sequential_cd ft cd_prefix cheat_sheet below_window\n"
    )


def test_the_soft_targets_script_refuses_a_misspelt_override_with_its_message():
    proc = subprocess.run(
        [sys.executable, "sweeps/huang2022_soft_targets.py", "model=tiny-random", "trainer.max_step=2"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr == "ctxdistill: trainer.max_step: no such setting; did you mean max_steps?\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["overrides", "nowhere.yaml"], "error: nowhere.yaml: cannot read it (No such file or directory)"),
        (["overrides", "{bad}"], "error: {bad}: not YAML"),
        (["overrides", "sweeps/grids/mosbach2023.yaml", "model"], "error: 'model': write key=a,b"),
        (["overrides", "{unswept}"], "error: {unswept}: models has settings for ['opt-6.7b'], which params.model"),
    ],
)
def test_a_grid_that_cannot_be_read_or_a_replacement_without_values_is_one_message(args, message, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [\n")
    unswept = tmp_path / "unswept.yaml"
    unswept.write_text("experiments: [e]\nparams: {model: opt-125m}\nmodels: {opt-6.7b: {trainer/distributed: fsdp}}\n")
    args = [a.format(bad=bad, unswept=unswept) for a in args]
    proc = subprocess.run([sys.executable, "-m", "ctxdistill.grids", *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message.format(bad=bad, unswept=unswept)), proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_wandb_outage_is_said_once_for_a_sweep_and_its_summary_stays_out_of_the_cells_logs(tmp_path):
    """W&B unreachable (online, its server a closed port): "could not start" was said in every cell, and the summary's
    "could not log the comparison" went into the last cell's log, which Hydra leaves open."""
    import socket

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    sweep_dir = tmp_path / "s"
    env = {
        **os.environ,
        "WANDB_BASE_URL": f"http://127.0.0.1:{port}",
        "WANDB_API_KEY": "x" * 40,
        "WANDB_INIT_TIMEOUT": "5",
        "WANDB_SILENT": "true",
    }
    env.pop("WANDB_MODE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "ctxdistill", "-m", "method=zero_shot,icl", *CELL, "logger=wandb", "logger.mode=online"]
        + [f"hydra.sweep.dir={sweep_dir}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert console.count("W&B could not start") == 2  # the first cell's line, and the summary's
    assert "the sweep goes on without it" in console
    summary = next(line for line in console.splitlines() if line.startswith("warning: W&B could not start in"))
    assert summary.startswith("warning: W&B could not start in 2 of the 2 cells (") and summary.endswith(
        f"run this sweep again with logger.mode=offline force=true and upload its runs with:  "
        f"wandb sync {sweep_dir}/*/wandb/offline-run-* {sweep_dir}/wandb/offline-run-*"
    )
    readme = (sweep_dir / "README.md").read_text()
    assert summary in readme and "warning: W&B could not log this comparison (" in readme
    assert "warning: W&B could not log this comparison (" in proc.stderr
    cells = sorted(sweep_dir.glob("*/cli.log"), key=lambda log: "icl" in log.parent.name)  # zero_shot ran first
    assert [json.loads((log.parent / "metrics.json").read_text())["status"] for log in cells] == ["complete"] * 2
    first, last = (log.read_text() for log in cells)
    assert "W&B could not start" in first and "W&B could not start" not in last
    assert "comparison" not in last and "Comparison" not in last


def test_a_sweeps_command_names_its_directory_absolute(tmp_path, monkeypatch):
    """A relative hydra.sweep.dir stayed relative in the README's command and the resume hint: run from another
    directory, it started a new sweep instead of resuming this one."""
    from ctxdistill.sweeps import sweep_command

    monkeypatch.chdir(tmp_path)
    hydra = OmegaConf.create(
        {
            "overrides": {"task": ["method=cd"], "hydra": []},
            "sweep": {"dir": "out/s"},
            "runtime": {"config_sources": []},
        }
    )
    assert sweep_command(hydra) == f"ctxdistill -m method=cd hydra.sweep.dir={tmp_path / 'out' / 's'}"


def test_a_single_run_of_an_experiment_that_sweeps_says_which_sweep_it_does_not_run(tmp_path):
    """The nineteenth audit: experiment=many_contexts without -m ran one cell of its 3-cell sweep, at
    num_contexts' default, without a word."""
    command = ["experiment=many_contexts", "method=zero_shot", *CELL, "logger=none", f"hydra.run.dir={tmp_path / 'r'}"]
    proc = subprocess.run([sys.executable, "-m", "ctxdistill", *command], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = proc.stdout + proc.stderr
    assert (
        "this config sweeps dataset.context.num_contexts over 1,2,4 (hydra.sweeper.params); a single run runs one "
        "value of each, its default. Run the sweep with: ctxdistill -m ..." in console
    )
    assert "method over" not in console  # the command sets it


def test_a_bundled_models_config_naming_another_model_is_skipped_when_complete(make_cfg, behaving_model_dir, tmp_path):
    """The nineteenth audit: model=tiny-random with a name_or_path of its own loads from that directory (the run
    records source hub), so the same command again was refused as a run of another config (model.source)."""
    from ctxdistill.run import run
    from ctxdistill.sweeps import completed_run

    overrides = [*CELL, "method=zero_shot", "logger=none", f"model.name_or_path={behaving_model_dir}"]
    first = run(make_cfg(*overrides, output_dir=tmp_path / "run"))
    assert completed_run(make_cfg(*overrides, output_dir=tmp_path / "run"))["metrics"] == first["metrics"]
    # a separate teacher's config naming another model (the review: refused as another method.teacher_model.source)
    from ctxdistill.models import load_model, load_tokenizer

    cfg = make_cfg(*CELL)
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    load_model(cfg.model, cfg.cache_dir, tokenizer, 1).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    teacher = ["+model@method.teacher_model=tiny-random", f"method.teacher_model.name_or_path={tmp_path / 'teacher'}"]
    overrides = [*CELL, "method=cd", "logger=none", *teacher]
    first = run(make_cfg(*overrides, output_dir=tmp_path / "taught"))
    assert completed_run(make_cfg(*overrides, output_dir=tmp_path / "taught"))["metrics"] == first["metrics"]
