"""ctxdistill-eval: a finished run (or every cell of a sweep) evaluated again, beside it, leaving it untouched."""

import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_beyond_window import SEQUENTIAL
from test_genpi import GENPI
from test_icl_distill import MIXTURE
from test_kg import KG_TINY
from test_opcd import OPCD
from test_scratchpad import ADDITION

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


def cells_of(sweep: Path) -> list[Path]:
    """The sweep's run directories."""
    return sorted(p.parent for p in sweep.glob("*/metrics.json"))


def ctxdistill(*arguments: str, cwd: Path | None = None) -> str:
    """The ctxdistill command, in its own process (started in cwd); its console (stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "ctxdistill", *arguments], capture_output=True, text=True, env=ENV, timeout=600, cwd=cwd
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


def test_a_methods_training_settings_given_to_an_evaluation_are_said_to_be_ignored(sweep, capsys):
    """The nineteenth audit: cd's temperature and divergence, which shape its training alone, were taken by
    ctxdistill-eval, recorded in its config.yaml, and changed nothing."""
    run_dir = cells(sweep)["cd"]
    assert main([str(run_dir), "method.temperature=4", "method.divergence=reverse_kl"]) == 0
    err = capsys.readouterr().err
    assert (
        "ctxdistill-eval trains nothing and loads the run's saved weights: ignoring method.temperature, "
        "method.divergence\n" in err
    )


def test_evaluating_a_run_again_reproduces_its_metrics_and_leaves_it_untouched(sweep):
    for method, run_dir in cells(sweep).items():
        before = fingerprint(run_dir)
        assert main([str(run_dir), "--name", "again"]) == 0
        again = metrics(run_dir / "evaluations" / "again")
        # to the last bit, full weights too (the sixteenth audit: reloaded, they lost the LM head's contiguous input,
        # and the KL moved in its 5th digit)
        assert again == metrics(run_dir), method
        assert fingerprint(run_dir) == before


# Each family the sweep above (cd, pbft) and test_kg.py's kgs2s run leave out, at its tiny test settings.
FAMILIES = {
    "cd_prefix": [*TINY, "method=cd", "model.adapter=prefix", "model.prefix_tokens=8"],
    "zero_shot": [*TINY, "method=zero_shot"],
    "icl": [*TINY, "method=icl"],
    "ft": [*TINY, "method=ft"],
    "on_policy_cd": [*TINY, "method=on_policy_cd"],
    "sequential_cd": SEQUENTIAL,
    "scratchpad": [
        *ADDITION,
        "method=scratchpad",
        "method.num_samples=2",
        "dataset.generation.answer_regex='(?s)(.*)'",
    ],
    "cheat_sheet": [*TINY, "method=cheat_sheet", "method.chunk_demos=4", "method.max_sheet_tokens=6"],
    "genpi": GENPI,
    "opcd": OPCD,
    "icl_distill": MIXTURE,
    "kgbert": [*KG_TINY, "method=kgbert", "model=minilm-l6", "trainer.max_steps=2", "dataset.eval_candidates=5"],
    "kg_decoder": [*KG_TINY, "method=kg_decoder", "model=tiny-random", "trainer.max_steps=2"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_evaluated_again_reproduces_its_metrics_in_batches_of_any_size(family, make_cfg, tmp_path):
    from ctxdistill.evaluate_run import evaluate_run
    from ctxdistill.run import run

    run_dir = tmp_path / "run"
    trained = without_timings(run(make_cfg(*FAMILIES[family], output_dir=run_dir))["metrics"])
    assert without_timings(evaluate_run(run_dir, [], "again")["metrics"]) == trained
    again = without_timings(evaluate_run(run_dir, ["trainer.eval_batch_size=3"], "batches_of_3")["metrics"])
    assert again == pytest.approx(trained, rel=1e-5, abs=1e-6)  # other padding: other kernels' rounding


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
    """One run whose output_dir is not Hydra's own directory (so no .hydra/ beside it). Started in its own
    temporary directory, so Hydra's directory (outputs/<date>/<time>) lands there, not in the checkout."""
    root = tmp_path_factory.mktemp("single")
    run_dir = root / "run"
    ctxdistill("method=cd", *TINY, f"output_dir={run_dir}", cwd=root)
    return run_dir


def test_a_run_in_its_own_output_dir_records_its_overrides_and_takes_a_group_override(single_run, tmp_path, capsys):
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
    # the same command again: done, unless the set's file or config changed since (it was skipped, with 2 examples)
    command = [str(single_run), *own_ood_set(tmp_path / "conf", "gifts", gifts), "--name", "gifts"]
    assert main(command) == 0
    gifts.write_text("review\tlabel\nA truly great gift.\t0\nA broken, useless gift.\t1\nLovely.\t0\n")
    with pytest.raises(SystemExit) as stopped:
        main(command)
    assert stopped.value.code == 2 and f"made from data that changed since ({gifts})" in capsys.readouterr().err
    assert main([*command, "--force"]) == 0 and metrics(single_run / "evaluations" / "gifts")["gifts/examples"] == 3
    own_ood_set(tmp_path / "conf", "gifts", gifts, num_examples=1)  # the set's config file edited
    with pytest.raises(SystemExit):
        main(command)
    assert "its config composes otherwise now (dataset.ood.gifts.num_examples)" in capsys.readouterr().err


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


@pytest.fixture(scope="module")
def own_config_sweep(tmp_path_factory) -> tuple[Path, Path]:
    """A sweep of an experiment from a config directory of one's own (--config-dir), and that directory."""
    root = tmp_path_factory.mktemp("own")
    (root / "conf" / "experiment").mkdir(parents=True)
    (root / "conf" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /method: zero_shot\n"
    )
    sweep = root / "sweep"
    ctxdistill(
        "--config-dir", str(root / "conf"), "-m", "experiment=mine", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}"
    )
    return sweep, root / "conf"


def test_a_sweep_from_ones_own_config_dir_is_rerun_and_evaluated_from_its_record(own_config_sweep, tmp_path, capsys):
    sweep, config_dir = own_config_sweep
    readme = (sweep / "README.md").read_text()
    command = readme.split("```bash\n")[1].split("\n")[0]
    assert command.startswith(f"ctxdistill --config-dir={config_dir} -m experiment=mine")
    again = subprocess.run(  # from a directory of its own: nothing lands in the checkout's outputs/
        [sys.executable, "-m", *shlex.split(command)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("already holds a complete run: skipped") == 2
    # each cell's .hydra/hydra.yaml records the directory: no --config-dir needed
    assert main([str(sweep), "--name", "again"]) == 0
    for cell in cells_of(sweep):
        assert (
            yaml.safe_load((cell / "evaluations" / "again" / "config.yaml").read_text())["method"]["name"]
            == "zero_shot"
        )

    # a run in an output_dir of its own has no such record: the message names --config-dir, which then finds it
    run_dir = tmp_path / "run"
    ctxdistill("--config-dir", str(config_dir), "experiment=mine", *TINY, f"output_dir={run_dir}", cwd=tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main([str(run_dir)])
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert "Could not find 'experiment/mine'" in err and "ctxdistill-eval --config-dir DIR" in err
    assert main([str(run_dir), "--config-dir", str(config_dir)]) == 0

    # the experiment file edited since the run: its evaluation would not be the run's (the sixteenth audit: it was,
    # silently, with 4 demonstrations instead of 12)
    edited = tmp_path / "edited"
    (edited / "experiment").mkdir(parents=True)
    mine = (config_dir / "experiment" / "mine.yaml").read_text()
    (edited / "experiment" / "mine.yaml").write_text(mine + "dataset:\n  context:\n    num_demos: 4\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main([str(run_dir), "--config-dir", str(edited), "--name", "edited"])
    assert stopped.value.code == 1
    assert capsys.readouterr().err == (
        f"ctxdistill: {run_dir}: its recorded overrides compose another config now: dataset.context.num_demos=4 "
        "(the run: 12). A config file changed since the run (conf/, or a directory of your own). Restore it, or "
        f"evaluate with the run's values: ctxdistill-eval {run_dir} dataset.context.num_demos=12\n"
    )
    assert not (run_dir / "evaluations" / "edited").exists()
    args = [str(run_dir), "dataset.context.num_demos=12", "--config-dir", str(edited), "--name", "edited"]
    assert main(args) == 0
    assert metrics(run_dir / "evaluations" / "edited") == metrics(run_dir)


@pytest.fixture(scope="module")
def untrained_sweep(tmp_path_factory) -> Path:
    """Two zero_shot cells: quick to evaluate (no weights to load)."""
    sweep = tmp_path_factory.mktemp("untrained")
    ctxdistill("-m", "method=zero_shot", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}")
    return sweep


@pytest.mark.parametrize("name", ["..", ".", "../elsewhere", "a/b", "{tmp_path}/absolute"])
def test_an_evaluation_name_that_is_not_one_plain_directory_is_refused(untrained_sweep, name, tmp_path, capsys):
    sweep, name = untrained_sweep, name.format(tmp_path=tmp_path)
    before = {cell: fingerprint(cell) for cell in cells_of(sweep)}
    with pytest.raises(SystemExit) as stopped:
        main([str(sweep), "--name", name])
    assert stopped.value.code == 2
    assert f"--name {name}: give one plain directory name" in capsys.readouterr().err
    assert {cell: fingerprint(cell) for cell in cells_of(sweep)} == before
    assert not list(tmp_path.iterdir())  # nothing beside the run, nothing but evaluations/NAME/ in it
    assert all(p.parent.parent.name == "evaluations" for p in sweep.glob("*/evaluations/**/metrics.json"))


def test_an_evaluation_is_replaced_only_with_force(untrained_sweep, capsys):
    sweep = untrained_sweep
    assert main([str(sweep), "--name", "twice"]) == 0
    first = {cell: (cell / "evaluations" / "twice" / "metrics.json").read_text() for cell in cells_of(sweep)}
    with pytest.raises(SystemExit) as stopped:
        main([str(sweep), "dataset.source.split_sizes.eval=6", "--name", "twice"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert (
        "evaluations/twice (and 1 more) already holds an evaluation named twice (it was made with other overrides): "
        "pass --force" in err
    )
    assert {cell: (cell / "evaluations" / "twice" / "metrics.json").read_text() for cell in cells_of(sweep)} == first
    assert main([str(sweep), "dataset.source.split_sizes.eval=6", "--name", "twice", "--force"]) == 0
    assert all(metrics(cell / "evaluations" / "twice")["eval/examples"] == 6 for cell in cells_of(sweep))


def test_ctrl_c_during_an_evaluation_keeps_the_finished_ones_and_the_same_command_finishes_it(
    untrained_sweep, tmp_path, monkeypatch, capsys
):
    """No traceback; what was kept and the command; run again, it evaluates only the cell it had not finished."""
    import ctxdistill.evaluate_run as evaluate_run_module

    sweep = untrained_sweep
    before = {cell: fingerprint(cell) for cell in cells_of(sweep)}
    evaluate = evaluate_run_module.evaluate_run
    evaluated = []

    def interrupted_at_the_second(run_dir, *args, **kwargs):
        if evaluated:
            raise KeyboardInterrupt
        evaluated.append(run_dir)
        return evaluate(run_dir, *args, **kwargs)

    monkeypatch.setattr(evaluate_run_module, "evaluate_run", interrupted_at_the_second)
    command = [str(sweep), "dataset.source.split_sizes.eval=5", "--name", "ctrl-c"]
    with pytest.raises(SystemExit) as stopped:
        main(command)
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    first, second = cells_of(sweep)
    assert (
        f"ctxdistill-eval: interrupted while evaluating {second}: nothing of its evaluation was written, and the run's "
        "own files are unchanged; the 1 evaluation(s) finished before it are kept. The same command evaluates what "
        f"is left: ctxdistill-eval {shlex.join(command)}" in err
    )
    assert "Traceback" not in err
    assert (first / "evaluations" / "ctrl-c" / "metrics.json").is_file()
    assert not (second / "evaluations" / "ctrl-c").exists()
    kept = (first / "evaluations" / "ctrl-c" / "metrics.json").read_text()

    monkeypatch.setattr(evaluate_run_module, "evaluate_run", evaluate)
    assert main(command) == 0
    assert "already holds this evaluation: skipped" in capsys.readouterr().err
    assert (first / "evaluations" / "ctrl-c" / "metrics.json").read_text() == kept  # not evaluated again
    assert metrics(second / "evaluations" / "ctrl-c")["eval/examples"] == 5
    assert {cell: fingerprint(cell) for cell in cells_of(sweep)} == before


def test_a_prefix_run_evaluates_in_another_dtype_and_damaged_weights_are_one_message(make_cfg, tmp_path, capsys):
    # the sixteenth audit: the prefix's saved keys met a bfloat16 model (a traceback); an adapter/ without its
    # files was a traceback, and a model/ without config.json loaded transformers' default 7B Llama
    from ctxdistill.run import run

    prefix, full = tmp_path / "prefix", tmp_path / "full"
    run(make_cfg(*FAMILIES["cd_prefix"], output_dir=prefix))
    assert main([str(prefix), "model.dtype=bfloat16", "--name", "bf16"]) == 0
    assert metrics(prefix / "evaluations" / "bf16")["eval/examples"] == metrics(prefix)["eval/examples"]
    run(make_cfg(*TINY, "method=pbft", output_dir=full))
    (prefix / "adapter" / "trainable_context.pt").unlink()
    (full / "model" / "config.json").unlink()
    for run_dir, problem in (
        (prefix, "neither adapter_config.json (a LoRA adapter) nor trainable_context.pt (a trained prefix)"),
        (full, "config.json: [Errno 2] No such file or directory"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            main([str(run_dir), "--name", "damaged"])
        assert stopped.value.code == 1
        err = capsys.readouterr().err
        weights = run_dir / ("adapter" if run_dir == prefix else "model")
        assert f"{weights}: the run's saved weights are damaged ({problem}" in err, err
        assert "Traceback" not in err and not (run_dir / "evaluations" / "damaged").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "method=icl",
            "ctxdistill: method: {cell} is a run of method=zero_shot, and this evaluation asks for method=icl",
        ),
        (
            "model=smollm2-135m",
            "ctxdistill: model.name_or_path: {cell} trained its weights on model=tiny-random "
            "(name_or_path=tiny-random)",
        ),
        ("model.tiny.hidden_size=128", "ctxdistill: model.tiny: {cell} trained its weights on model=tiny-random"),
        # the sixteenth audit: another random draw, or another file of a package, was evaluated as the run's model
        ("seed=1", "ctxdistill: seed: {cell} ran on model=tiny-random, a random model whose weights seed=0 drew"),
        ("model.gguf_file=other.gguf", "ctxdistill: model.gguf_file: {cell} trained its weights on model=tiny-random"),
    ],
)
def test_an_evaluation_of_another_method_or_model_than_the_runs_is_refused(untrained_sweep, override, message, capsys):
    cell = cells_of(untrained_sweep)[0]
    with pytest.raises(SystemExit) as stopped:
        main([str(cell), override, "--name", "other"])
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert message.format(cell=cell) in err and "Traceback" not in err
    assert not (cell / "evaluations" / "other").exists()


def test_training_settings_given_to_an_evaluation_are_said_to_be_ignored(untrained_sweep, capsys, tmp_path):
    # overrides after an option too (the fifteenth audit: they were refused as unrecognized arguments); the
    # logger's and a HANS file no out-of-domain set reads were dropped without a word (the eighteenth audit)
    hans = tmp_path / "heuristics_evaluation_set.txt"
    hans.write_text("")
    arguments = ["trainer.lr=5", "trainer.eval_batch_size=4", "logger.mode=offline", f"dataset.hans_file={hans}"]
    assert main([str(untrained_sweep), "--name", "lr", *arguments]) == 0
    err = capsys.readouterr().err
    assert "ctxdistill-eval trains nothing and loads the run's saved weights: ignoring trainer.lr\n" in err
    assert "ctxdistill-eval logs nothing to W&B (it writes evaluations/NAME/): ignoring logger.mode\n" in err
    assert "no out-of-domain set reads it (ood=[hans] or [hans_all] would): ignoring dataset.hans_file\n" in err


def test_an_evaluation_given_as_the_run_names_its_run(untrained_sweep, capsys):
    """RUN/evaluations was read as runs, each said to hold no trained weights and to need training again."""
    cell = cells_of(untrained_sweep)[0]
    assert main([str(cell), "--name", "first"]) == 0
    capsys.readouterr()
    for given in (cell / "evaluations", cell / "evaluations" / "first"):
        with pytest.raises(SystemExit) as stopped:
            main([str(given)])
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        # (the first of the cell's evaluations: other tests' may sort before it)
        assert f"is an evaluation of the run {cell}, not a run: give {cell}" in err and "Traceback" not in err


def test_a_path_that_does_not_exist_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / "nowhere")])
    assert stopped.value.code == 2
    assert f"{tmp_path / 'nowhere'}: no such directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/nowhere"], "{tmp}/nowhere: no such directory"),
        (["{tmp}/empty"], "no finished run (metrics.json) under {tmp}/empty"),
        (["{tmp}/run", "--name", ".."], "--name ..: give one plain directory name"),
        (["{tmp}/run", "--config-dir", "{tmp}/none"], "--config-dir {tmp}/none: no such directory"),
        (["--bogus"], "the following arguments are required: path"),
        (["{tmp}/run", "dataset.hans_file={tmp}/none.txt"], "dataset.hans_file={tmp}/none.txt: no such file"),
        # the nineteenth audit: written to evaluations/force=true/ and evaluations/output_dir=.../ without a word
        (["{tmp}/run", "force=true"], "force=true: an evaluation of the same name is replaced with --force"),
        (["{tmp}/run", "output_dir={tmp}/x"], "output_dir={tmp}/x: an evaluation is written to RUN_DIR/evaluations"),
        (["{tmp}/run", "hydra.run.dir=x"], "hydra.run.dir=x: an evaluation is written to RUN_DIR/evaluations/NAME/"),
        (["{tmp}/run", "hydra/launcher=joblib"], "hydra/launcher=joblib: an evaluation is written to RUN_DIR"),
    ],
)
def test_bad_arguments_are_refused_before_torch_and_the_methods_are_imported(args, message, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    # in a process of its own: this one has imported torch already
    check = (
        "import sys\nfrom ctxdistill.evaluate_run import main\ntry:\n    main(sys.argv[1:])\n"
        "finally:\n    print(sorted({'torch', 'ctxdistill.cli', 'ctxdistill.methods'} & set(sys.modules)))"
    )
    arguments = [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run([sys.executable, "-c", check, *arguments], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 2 and proc.stdout.strip() == "[]"
    assert f"ctxdistill-eval: error: {message.format(tmp=tmp_path)}" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1  # one line, not argparse's usage block before it


def test_cells_of_a_sweep_without_results_are_named_not_skipped_quietly(untrained_sweep, tmp_path, capsys):
    import shutil

    sweep = tmp_path / "sweep"
    shutil.copytree(cells_of(untrained_sweep)[0], sweep / "done", ignore=shutil.ignore_patterns("evaluations"))
    (sweep / "killed").mkdir()
    shutil.copy(sweep / "done" / "config.yaml", sweep / "killed")  # started, stopped before its metrics.json
    (sweep / "failed").mkdir()
    (sweep / "failed" / "failure.json").write_text(json.dumps({"error": "DataError: no such file x.jsonl"}))
    assert main([str(sweep), "--name", "again"]) == 0
    err = capsys.readouterr().err
    assert f"ctxdistill-eval: warning: left out {sweep / 'failed'}, which has no results: failed (DataError" in err
    assert f"warning: left out {sweep / 'killed'}, which has no results: no complete metrics.json" in err
    assert [p.parent.parent.parent.name for p in sweep.glob("*/evaluations/again/metrics.json")] == ["done"]


def test_every_cell_of_a_sweep_is_checked_before_any_is_evaluated(untrained_sweep, tmp_path, capsys):
    """The nineteenth audit: a cell whose evaluation is refused stopped the command after the cells before it were
    evaluated and written; now the refusal comes first, naming the cell."""
    import shutil

    import yaml

    sweep = tmp_path / "sweep"
    for cell in cells_of(untrained_sweep):
        shutil.copytree(cell, sweep / cell.name, ignore=shutil.ignore_patterns("evaluations"))
    first, second = cells_of(sweep)
    recorded = yaml.safe_load((second / "overrides.yaml").read_text())
    (second / "overrides.yaml").write_text(yaml.safe_dump([*recorded, "trainer.lr=-1"]))
    with pytest.raises(SystemExit) as stopped:
        main([str(sweep), "--name", "checked"])
    assert stopped.value.code == 1
    assert f"ctxdistill: {second}: trainer.lr: must be positive" in capsys.readouterr().err
    assert not (first / "evaluations").exists()
