"""The reproduction scorecard: the papers' reported numbers as data, each next to the runs that reproduce it."""

import csv
import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest

from ctxdistill.results import scorecard
from ctxdistill.results.cli import main
from ctxdistill.results.scorecard import Cell, load_paper, score
from ctxdistill.results.stats import wilson

CONF = Path(__file__).parents[1] / "conf" / "experiment"

# Upadhayaya et al. 2024, Table 3 (teacher / student in-domain / student OOD), typed in from the paper
# by hand: the shipped data file must say the same.
UPADHAYAYA_TABLE_3 = {
    ("mnli", "opt-125m"): (0.547, 0.583, 0.523),
    ("mnli", "opt-350m"): (0.531, 0.595, 0.548),
    ("mnli", "opt-1.3b"): (0.609, 0.525, 0.525),
    ("mnli", "opt-2.7b"): (0.664, 0.593, 0.515),
    ("rte", "opt-125m"): (0.438, 0.530, 0.518),
    ("rte", "opt-350m"): (0.508, 0.538, 0.508),
    ("rte", "opt-1.3b"): (0.516, 0.480, 0.533),
    ("rte", "opt-2.7b"): (0.547, 0.498, 0.473),
    ("qqp", "opt-125m"): (0.625, 0.615, 0.710),
    ("qqp", "opt-350m"): (0.406, 0.420, 0.490),
    ("qqp", "opt-1.3b"): (0.406, 0.430, 0.415),
    ("qqp", "opt-2.7b"): (0.438, 0.428, 0.433),
}


def test_upadhayaya_table_3_is_36_cells_each_mapped_onto_cd_runs_with_its_metric():
    cells = load_paper("upadhayaya2024").cells
    assert len(cells) == 36
    by_cell = {(c.dataset, c.model, c.column): c for c in cells}
    for (dataset, model), values in UPADHAYAYA_TABLE_3.items():
        teacher, student, ood = (
            by_cell[dataset, model, col] for col in ("teacher acc.", "student in-domain", "student OOD")
        )
        assert (teacher.value, student.value, ood.value) == values
        assert teacher.run_metric == "train_queries/context_decoded_accuracy"
        assert student.run_metric == "eval/decoded_accuracy"
        assert ood.run_metric == ("paws_qqp" if dataset == "qqp" else "hans") + "/decoded_accuracy"
    assert {(c.method, c.shots, c.runs, c.table, c.approximate) for c in cells} == {("cd", 16, 4, "Table 3", False)}
    assert all("Table 3" in c.source for c in cells)


def test_every_shipped_paper_loads_and_says_what_it_could_not_source():
    numbers = {name: load_paper(name) for name in scorecard.known_papers()}
    assert set(numbers) >= {"upadhayaya2024", "snell2022", "li2024", "mosbach2023", "huang2022", "genpi"}
    for paper in numbers.values():
        assert paper.cells or paper.left_out  # a paper without numbers says why
        assert all(c.source and c.metric and c.run_metric for c in paper.cells)
    snell = {(c.table, c.row, c.column): c for c in numbers["snell2022"].cells}
    addition = snell["Table 3", "8-digit addition", "student after"]
    assert (addition.value, addition.percent, addition.method, addition.run_metric) == (
        95,
        True,
        "scratchpad",
        "eval/accuracy",
    )
    spider = snell["Hypothesis 4 (SPIDER)", "4 examples", "gradient descent"]
    assert (spider.value, spider.shots, spider.method) == (13.4, 4, "ft")
    li = {c.column: (c.value, c.run_metric) for c in numbers["li2024"].cells}
    assert li == {
        "MRR": (0.559, "eval/mrr"),
        "Hits@1": (0.508, "eval/hits@1"),
        "Hits@3": (0.578, "eval/hits@3"),
        "Hits@10": (0.660, "eval/hits@10"),
    }
    assert all("citing" in c.source for c in numbers["li2024"].cells)


def test_every_number_a_paper_is_scored_on_is_a_column_of_the_runs_tables():
    """The scorecard reads a cell's run metric; the tables show only declared metrics, so each must be declared
    for the eval sets it is read from (an out-of-domain ``{ood}`` cell: any set but the in-domain one)."""
    from ctxdistill.evaluation import Evaluator, GenerationEvaluator, MixtureEvaluator
    from ctxdistill.methods.contextualization import ContextGeneration
    from ctxdistill.methods.genpi import PromptInternalizationEvaluator
    from ctxdistill.ranking import link_prediction_metrics

    families = [
        e.metric_set
        for e in (Evaluator, GenerationEvaluator, MixtureEvaluator, PromptInternalizationEvaluator, ContextGeneration)
    ] + [link_prediction_metrics()]
    read = {
        c.run_metric.replace("{ood}", "paws_qqp") for name in scorecard.known_papers() for c in load_paper(name).cells
    }
    assert "paws_qqp/decoded_accuracy" in read
    assert {key for key in read if not any(family.declares(key) for family in families)} == set()


def test_every_experiment_names_a_paper_whose_numbers_ship():
    named = {
        path.relative_to(CONF).as_posix(): match[1]
        for path in CONF.rglob("*.yaml")
        # paper: null unsets an inherited paper (opcd/system_prompt builds on GenPI's settings, not its numbers)
        if (match := re.search(r"^paper: (?!null\b)(\S+)", path.read_text(), re.MULTILINE))
    }
    assert {"upadhayaya2024/_base.yaml", "mosbach2023/_base.yaml", "li2024/wn18rr.yaml"} <= set(named)
    assert set(named.values()) <= set(scorecard.known_papers())


def cell(**overrides):
    fields = dict(
        paper="p", table="T", row="r", column="c", metric="accuracy", value=0.55, runs=4, source="Table T",
        method="cd", model="opt-125m", dataset="mnli", run_metric="eval/accuracy", proportion=True, shots=16,
    )  # fmt: skip
    return Cell(**(fields | overrides))


def record(accuracy, *, model="opt-125m", method="cd", seed=0, shots=16, metric="eval/accuracy", examples=None):
    metrics = {metric: accuracy} | ({"eval/examples": examples} if examples else {})
    run = {"method": method, "model": model, "dataset": "mnli", "seed": seed, "metrics": metrics}
    return run | {"demos": [f"d{i}" for i in range(shots)]}


def test_a_metric_the_runs_declare_a_value_gets_no_rate_interval_whatever_the_cell_says():
    # the sixteenth audit: a declared value (Rouge-L) without companions got Wilson's interval from the cell's
    # proportion: true, where the table, from the same run, gives none
    from ctxdistill.methods.genpi import PromptInternalizationEvaluator

    declared = {"metric_set": PromptInternalizationEvaluator.metric_set.to_dict()}
    rouge = cell(metric="rougeL_to_teacher", run_metric="eval/rougeL_to_teacher", value=0.40, method="genpi")
    runs = [record(0.31, method="genpi", metric="eval/rougeL_to_teacher", examples=100) | declared]
    assert [(s.interval, s.verdict) for s in score([rouge], runs)] == [(None, "no interval")]
    success = cell(metric="task_success", run_metric="eval/task_success", value=0.40, method="genpi", proportion=False)
    runs = [record(0.31, method="genpi", metric="eval/task_success", examples=100) | declared]
    [scored] = score([success], runs)  # a declared proportion is a rate, whatever the cell says
    assert scored.interval == pytest.approx((0.2278, 0.4063), abs=1e-4) and scored.verdict == "consistent"


def test_a_run_read_from_wandb_meets_only_the_cells_of_its_number_of_demonstrations():
    # W&B records have no "demos" list; their config says how many the context drew
    def from_wandb(num_demos: int) -> dict:
        run = record(0.5)
        del run["demos"]
        return run | {"config": {"dataset": {"context": {"num_demos": num_demos, "num_contexts": 1}}}}

    assert [s.verdict for s in score([cell(shots=16)], [from_wandb(2)])] == ["not run"]
    assert [s.matched_runs for s in score([cell(shots=16)], [from_wandb(16)])] == [1]


def test_verdicts_on_hand_made_runs():
    four = [record(a, seed=i) for i, a in enumerate([0.50, 0.58, 0.62, 0.54])]  # interval [.478, .642]
    verdicts = {
        "consistent": score([cell(value=0.60)], four),
        "above": score([cell(value=0.40)], four),  # ours above the paper's
        "below": score([cell(value=0.70)], four),
        "not run": score([cell(model="opt-1.3b")], four),
        "other shots": score([cell(shots=2)], four),
        "not measured": score([cell(run_metric="hans/accuracy")], four),
        "wilson": score([cell(value=0.60)], [record(0.50, examples=100)]),  # [.404, .596]
        "one run, size unknown": score([cell()], [record(0.5)]),
        "one run, not a rate": score([cell(proportion=False)], [record(0.5, examples=100)]),
    }
    got = {name: [s.verdict for s in scores] for name, scores in verdicts.items()}
    assert got == {
        "consistent": ["consistent"],
        "above": ["above"],
        "below": ["below"],
        "not run": ["not run"],
        "other shots": ["not run"],
        "not measured": ["not measured"],
        "wilson": ["below"],
        "one run, size unknown": ["no interval"],
        "one run, not a rate": ["no interval"],
    }
    consistent = verdicts["consistent"][0]
    assert consistent.mean == pytest.approx(0.56) and consistent.difference == pytest.approx(-0.04)
    # by hand: s = .05164, t(0.975, 3) = 3.1824, half width .08217
    assert consistent.interval == pytest.approx((0.56 - 0.08217, 0.56 + 0.08217), abs=1e-5)
    assert verdicts["wilson"][0].interval == pytest.approx(wilson(50, 100))
    two = score([cell(value=0.5)], [record(0.2, seed=0), record(0.9, seed=1)])[0]  # t interval [-3.9, 5.0]
    assert two.interval == (0.0, 1.0) and two.verdict == "consistent"  # a mean of rates stays in [0, 1]
    # a paper in percent: the runs' fractions are scaled to its units
    percent = score([cell(value=93, percent=True)], four)[0]
    assert percent.mean == pytest.approx(56.0) and percent.verdict == "below"


def test_runs_that_agree_on_different_numbers_of_examples_are_scored_over_the_fewest():
    """Whichever run comes first: the paper's 0.60 is outside a run's interval over 1000 examples, inside 10's."""
    for runs in (
        [record(0.5, examples=1000), record(0.5, seed=1, examples=10)],
        [record(0.5, examples=10), record(0.5, seed=1, examples=1000)],
    ):
        [scored] = score([cell(value=0.60)], runs)
        assert (scored.verdict, scored.interval) == ("consistent", pytest.approx(wilson(5, 10)))
    [unknown] = score([cell(value=0.60)], [record(0.5, examples=1000), record(0.5, seed=1)])
    assert unknown.verdict == "no interval"


def test_model_as_puts_a_run_model_in_a_paper_models_place_labelled():
    runs = [record(0.5, model="smollm2-135m", seed=s) for s in (0, 1)]
    assert [s.verdict for s in score([cell()], runs)] == ["not run"]
    (mapped,) = score([cell()], runs, {"smollm2-135m": "opt-125m"})
    assert (mapped.run_model, len(mapped.values)) == ("smollm2-135m", 2)
    row = scorecard.text_rows([mapped])[0]
    assert row[5] == "smollm2-135m as opt-125m"
    with pytest.raises(ValueError, match="RUN_MODEL=PAPER_MODEL"):
        scorecard.parse_model_as(["smollm2-135m"])


def test_a_malformed_paper_file_is_refused_naming_the_cell(tmp_path):
    table = {
        "defaults": {"table": "T", "source": "s", "runs": 1, "method": "cd", "dataset": "d", "proportion": True},
        "columns": {"acc": {"metric": "accuracy", "run_metric": "{split}/accuracy"}},
        "rows": [{"row": "r", "model": "m", "split": "eval", "values": [0.5]}],
    }
    (ok,) = scorecard.table_cells("p", table, "p.yaml")
    assert ok.run_metric == "eval/accuracy"
    broken = [
        ({"rows": [{"row": "r", "model": "m", "split": "eval", "values": [0.5, 0.6]}]}, "one value per column"),
        ({"rows": [{"row": "r", "model": "m", "split": "eval", "modle": "x", "values": [0.5]}]}, r"fields \['modle'\]"),
        ({"rows": [{"row": "r", "split": "eval", "values": [0.5]}]}, r"missing \['model'\]"),
        ({"rows": [{"row": "r", "model": "m", "split": "eval", "values": ["n/a"]}]}, "is not a number"),
    ]  # fmt: skip
    for change, error in broken:
        with pytest.raises(ValueError, match=error):
            scorecard.table_cells("p", table | change, "p.yaml")
    with pytest.raises(ValueError, match="known papers: genpi"):
        load_paper("no-such-paper")


def write_cd_run(directory, seed, metrics, shots=16):
    directory.mkdir(parents=True)
    run = {
        "method": "cd", "model": "smollm2-135m", "dataset": "mnli", "seed": seed, "paper": "upadhayaya2024",
        "status": "complete", "finished_at": f"2026-01-01T00:00:0{seed}", "metrics": metrics,
        "demos": [f"d{i}" for i in range(shots)],
    }  # fmt: skip
    (directory / "metrics.json").write_text(json.dumps(run))
    rows = [{"set": "eval", "uid": i} for i in range(100)]
    (directory / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_compare_scorecard_of_a_one_model_sweep_shows_the_whole_table(tmp_path, capsys):
    metrics = {"eval/accuracy": 0.6, "eval/decoded_accuracy": 0.58, "train_queries/context_decoded_accuracy": 0.55}
    write_cd_run(tmp_path / "sweep" / "0", 0, metrics)
    assert (
        main(
            [
                str(tmp_path / "sweep"),
                "--scorecard",
                "--model-as",
                "smollm2-135m=opt-125m",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    # the teacher's 32 training queries are not in predictions.jsonl (no size, no interval); HANS was not evaluated
    assert "36 cells: 1 no interval, 1 consistent, 1 not measured, 33 not run." in out
    assert "smollm2-135m as opt-125m" in out and "1 run, 100 ex." in out
    assert "Left out (could not be sourced):" in out
    rows = list(csv.DictReader((tmp_path / "out" / "results" / "scorecard.csv").read_text().splitlines()))
    assert len(rows) == 36
    student = next(r for r in rows if r["row"] == "MNLI 125m" and r["column"] == "student in-domain")
    low, high = wilson(58, 100)
    assert (float(student["ci_low"]), float(student["ci_high"])) == pytest.approx((low, high), abs=1e-5)
    assert (student["mean"], student["examples"], student["verdict"]) == ("0.58", "100", "consistent")
    assert math.isclose(float(student["difference"]), 0.58 - 0.583, abs_tol=1e-9)
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "## Scorecard" in readme and "| MNLI 125m" in readme and "results/scorecard.csv" in readme


def test_compare_scorecard_refuses_bad_requests_before_reading_runs(tmp_path, capsys):
    write_cd_run(tmp_path / "run", 0, {"eval/accuracy": 0.6}, shots=16)
    for args, error in [
        (["--scorecard", "--paper", "nope"], "no reported numbers for paper 'nope'"),
        (["--model-as", "a=b"], "belong to --scorecard"),
        (["--scorecard", "--model-as", "a"], "RUN_MODEL=PAPER_MODEL"),
        (["--scorecard", "--format", "latex"], "no LaTeX form"),
    ]:
        with pytest.raises(SystemExit):
            main([str(tmp_path / "run"), *args])
        assert error in capsys.readouterr().err
    run = json.loads((tmp_path / "run" / "metrics.json").read_text())
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(run | {"paper": None}))
    assert main([str(tmp_path / "run"), "--scorecard"]) == 1
    out, err = capsys.readouterr()
    assert "no paper to score against: the runs' experiments name none (`paper:`); give --paper NAME" in err
    assert out == ""  # said before the tables, not after them


def test_the_scorecard_is_logged_as_a_wandb_table(tmp_path, monkeypatch):
    import wandb

    from ctxdistill.results.records import collect
    from ctxdistill.results.table import summarise
    from ctxdistill.results.wandb_outputs import log_results

    logged = {}

    class Run:  # what log_results uses of a W&B run; W&B's own offline writer is tested with the sweep
        dir = str(tmp_path / "run" / "files")
        log = logged.update
        finish = staticmethod(lambda: None)

    monkeypatch.setattr(wandb, "init", lambda **kwargs: Run())
    write_cd_run(tmp_path / "run", 0, {"eval/accuracy": 0.6, "eval/decoded_accuracy": 0.58})
    runs = collect([tmp_path / "run"])
    scores = score(load_paper("upadhayaya2024").cells, runs, {"smollm2-135m": "opt-125m"})
    tables = {"scorecard": scorecard.table_rows(scores)}
    log_results(summarise(runs), entity=None, project="p", group="g", mode="offline", extra_tables=tables)
    table = logged["scorecard"]
    assert isinstance(table, wandb.Table) and table.columns == scorecard.CSV_COLUMNS and len(table.data) == 36
    verdicts = [row[table.columns.index("verdict")] for row in table.data]
    assert verdicts.count("not run") == 33 and "consistent" in verdicts


def test_the_upadhayaya_script_narrows_its_grid_and_ends_with_the_scorecard(tmp_path):
    """sweeps/upadhayaya2024.sh with ctxdistill stood in for: METHODS, MODELS and SEEDS replace the grid's
    values, COMPARE_ARGS reach the scorecard."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command in ("ctxdistill", "ctxdistill-compare"):
        (bin_dir / command).write_text(f'#!/bin/sh\necho {command} "$@" >> "{tmp_path}/calls"\n')
        (bin_dir / command).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SWEEP_DIR": str(tmp_path / "sweep")}
    env |= {
        "METHODS": "cd",
        "MODELS": "smollm2-135m",
        "SEEDS": "0,1",
        "COMPARE_ARGS": "--model-as smollm2-135m=opt-125m",
    }
    subprocess.run(["bash", "sweeps/upadhayaya2024.sh"], cwd=CONF.parents[1], env=env, check=True)
    calls = (tmp_path / "calls").read_text().splitlines()
    sweep = tmp_path / "sweep"
    grid = "method=cd model=smollm2-135m seed=0,1 logger.group=upadhayaya2024"
    assert calls == [
        "ctxdistill-compare --check-args --scorecard --paper upadhayaya2024 --model-as smollm2-135m=opt-125m",
        *(
            f"ctxdistill -m experiment=upadhayaya2024/{d} {grid} hydra.sweep.dir={sweep}/{d}"
            for d in ("mnli", "rte", "qqp")
        ),
        f"ctxdistill-compare {sweep} --out {sweep} --scorecard --model-as smollm2-135m=opt-125m",
    ]


@pytest.mark.parametrize(
    "compare_args, message",
    [
        ("--model-as smollm2-135m=opt-12m", "--model-as smollm2-135m=opt-12m: upadhayaya2024 reports no model opt-12m"),
        ("--modle-as x=y", "unrecognized arguments: --modle-as"),
    ],
)
def test_the_upadhayaya_script_refuses_bad_compare_args_before_its_sweeps(tmp_path, compare_args, message):
    """The eighteenth audit: they were refused by the comparison at the end, after the whole grid had run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ctxdistill").write_text(f'#!/bin/sh\necho ctxdistill "$@" >> "{tmp_path}/calls"\n')
    (bin_dir / "ctxdistill").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SWEEP_DIR": str(tmp_path / "sweep")}
    env |= {"METHODS": "cd", "MODELS": "smollm2-135m", "SEEDS": "0", "COMPARE_ARGS": compare_args}
    proc = subprocess.run(
        ["bash", "sweeps/upadhayaya2024.sh"], cwd=CONF.parents[1], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "calls").exists()


def test_the_scorecard_scores_each_setting_by_splits_the_runs_into(tmp_path, capsys):
    """The runs' methods are matched under --by, and each setting is scored apart: the scorecard averaged runs
    of other settings as seeds (the eighteenth audit: lr 1e-4 at 0.59 and 1e-2 at 0.31 pooled into "consistent")."""
    for seed, accuracy in ((0, 0.6), (1, 0.3)):
        metrics = {
            "eval/accuracy": accuracy,
            "eval/decoded_accuracy": accuracy,
            "train_queries/context_decoded_accuracy": 0.55,
        }
        write_cd_run(tmp_path / str(seed), seed, metrics)
        (tmp_path / str(seed) / "config.yaml").write_text(f"trainer:\n  lr: {seed + 1}e-3\n")
    arguments = [str(tmp_path), "--scorecard", "--model-as", "smollm2-135m=opt-125m", "--format", "csv"]
    assert main([*arguments, "--by", "trainer.lr"]) == 0
    out = capsys.readouterr().out
    scored = list(csv.DictReader(out[out.index("paper,") :].splitlines()))
    in_domain = [
        (r["setting"], r["mean"], r["runs"]) for r in scored if r["column"] == "student in-domain" and r["runs"] != "0"
    ]
    assert in_domain == [("lr=0.001", "0.6", "1"), ("lr=0.002", "0.3", "1")]


def test_a_link_prediction_number_is_scored_with_the_t_interval_over_the_triples_its_run_reports():
    """A Hits@k cell (``proportion: true`` in li2024.yaml) of one run: Student's t over the triples from the spread
    of the triples' mean hits the run reports (scipy.stats.t.interval(0.95, 7, loc=0.375, scale=sd / sqrt(8)),
    sd the sample standard deviation of [1, 0, 0, 0.5, 0.5, 0, 0.5, 0.5]), not Wilson's over the triples."""
    from ctxdistill.ranking import link_prediction_metrics

    hits = cell(metric="Hits@1", value=0.6, run_metric="eval/hits@1", method="kgbert", model="minilm-l6", shots=None)
    run = record(0.375, method="kgbert", model="minilm-l6", metric="eval/hits@1", examples=8)
    run["metric_set"] = link_prediction_metrics().to_dict()
    [before] = score([hits], [run])
    assert before.interval is None and before.verdict == "no interval"  # a run that reports no spread
    run["metrics"]["eval/hits@1_sd"] = 0.3535533905932738
    [scored] = score([hits], [run])
    assert scored.interval == pytest.approx((0.079421968550902, 0.670578031449098))
    assert scored.verdict == "consistent"


def test_a_link_prediction_interval_is_cut_to_the_range_the_run_declares_as_the_table_cuts_it():
    """An MRR cell (``proportion: false`` in li2024.yaml) of a run near 0: scipy.stats.t.interval(0.95, 7, loc=0.05,
    scale=0.2 / sqrt(8)) is (-0.117, 0.217); MRR is declared in [0, 1], so the scorecard reads [0, 0.217], as the
    table does for the same run."""
    from ctxdistill.ranking import link_prediction_metrics
    from ctxdistill.results.table import summarise

    mrr = cell(metric="MRR", value=0.3, run_metric="eval/mrr", method="kgbert", model="minilm-l6", shots=None)
    run = record(0.05, method="kgbert", model="minilm-l6", metric="eval/mrr", examples=8)
    run["metric_set"] = link_prediction_metrics().to_dict()
    run["metrics"]["eval/mrr_sd"] = 0.2
    [scored] = score([mrr], [run])
    assert scored.interval == pytest.approx((0.0, 0.21720418432594218))
    [table] = summarise([run])
    assert table.rows[0].cells["eval/mrr"].interval == pytest.approx(scored.interval)
