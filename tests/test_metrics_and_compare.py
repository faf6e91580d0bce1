"""The results package: declared metrics, tables with n and 95% intervals, paired tests, every renderer."""

import ast
import csv
import io
import itertools
import json
import math
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image

from ctxdistill.evaluation import Evaluator, GenerationEvaluator, MixtureEvaluator, with_task_metrics
from ctxdistill.methods.contextualization import ContextGeneration
from ctxdistill.methods.genpi import PromptInternalizationEvaluator
from ctxdistill.ranking import link_prediction_metrics
from ctxdistill.results.cli import main
from ctxdistill.results.files import write_results
from ctxdistill.results.metrics import Metric, MetricSet, float32_rounded
from ctxdistill.results.records import collect
from ctxdistill.results.stats import mcnemar_exact, sign_flip_test, t_interval, t_quantile, wilson
from ctxdistill.results.table import Cell, summarise
from ctxdistill.results.wandb_outputs import build_report

CLASSIFICATION = Evaluator.metric_set.to_dict()
SERVING = {
    "serving/teacher_prompt_tokens": 245.0,
    "serving/student_prompt_tokens": 15.0,
    "serving/teacher_latency_ms": 40.0,
    "serving/student_latency_ms": 8.0,
    "serving/teacher_kv_bytes": 2_000_000.0,
    "serving/student_kv_bytes": 120_000.0,
    "serving/prompt_tokens_ratio": 16.333334,
    "serving/latency_ratio": 5.0,
    "serving/kv_bytes_ratio": 16.666666,
}


def write_run(directory, method, seed, accuracy, finished, model="m", dataset="d", metrics=None, n=200):
    directory.mkdir(parents=True)
    (directory / "metrics.json").write_text(
        json.dumps(
            {
                "method": method,
                "model": model,
                "dataset": dataset,
                "seed": seed,
                "status": "complete",
                "finished_at": finished,
                "metric_set": CLASSIFICATION,
                "metrics": metrics
                or {
                    "eval/accuracy": accuracy,
                    "eval/examples": n,
                    "eval/teacher_agreement": 1.0,
                    "eval/kl_to_teacher": 0.5,
                    "eval/teacher_accuracy": 0.9,
                    "eval/majority_rate": 0.5,
                    "hans/accuracy": accuracy / 2,
                    "hans/examples": 1000,
                    "hans/teacher_accuracy": 0.6,
                    "hans/majority_rate": 0.5,
                },
            }
        )
    )


# ---------------------------------------------------------------- intervals and the test, against references
def test_wilson_interval_matches_newcombes_worked_examples():
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (score interval)
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert wilson(15, 148) == pytest.approx((0.0624, 0.1605), abs=5e-5)
    assert wilson(0, 20) == pytest.approx((0.0, 0.1611), abs=5e-5)


def test_t_interval_uses_students_quantiles():
    # two-sided 95% quantiles from the t table
    for df, quantile in [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (29, 2.045)]:
        assert t_quantile(df) == pytest.approx(quantile, abs=5e-4)
    low, high = t_interval([0.93, 0.89, 0.73])  # the demo's teacher over three seeds
    mean, sd = 0.85, math.sqrt(((0.08) ** 2 + 0.04**2 + 0.12**2) / 2)
    assert (low, high) == pytest.approx((mean - 4.303 * sd / math.sqrt(3), mean + 4.303 * sd / math.sqrt(3)), abs=1e-3)
    assert t_interval([0.5]) is None


def test_seeds_that_all_agree_get_one_runs_interval_not_one_of_width_zero():
    accuracy = Metric("accuracy", "accuracy")
    assert Cell(accuracy, [0.5] * 3, [48] * 3).interval == wilson(24, 48)
    assert Cell(Metric("mrr", "MRR", kind="value", lowest=0.0, highest=1.0), [0.2, 0.2], [48, 48]).interval is None
    low, high = Cell(accuracy, [0.5, 0.5, 0.52], [48] * 3).interval
    assert (low, high) == pytest.approx(t_interval([0.5, 0.5, 0.52]))


def test_seeds_that_agree_on_different_numbers_of_examples_get_the_interval_of_the_fewest(tmp_path, capsys):
    """Whichever seed comes first: the widest of the seeds' own intervals, and the CSV's n is the one it is over."""
    accuracy = Metric("accuracy", "accuracy")
    assert Cell(accuracy, [0.5, 0.5], [1000, 10]).interval == Cell(accuracy, [0.5, 0.5], [10, 1000]).interval
    assert Cell(accuracy, [0.5, 0.5], [1000, 10]).interval == wilson(5, 10)
    assert Cell(accuracy, [0.5, 0.5], [1000, None]).interval is None  # a seed of unknown n: no Wilson interval
    for seed, n in ((0, 1000), (1, 10)):
        write_run(tmp_path / str(seed), "cd", seed, 0.5, f"2026-01-01T00:00:0{seed}", n=n)
    write_run(tmp_path / "z0", "zero_shot", 0, 0.5, "2026-01-01T00:00:03", n=101)
    write_run(tmp_path / "z1", "zero_shot", 1, 0.6, "2026-01-01T00:00:04", n=100)
    assert main([str(tmp_path), "--format", "csv"]) == 0
    cd, zero = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert (cd["eval/examples"], float(cd["eval/accuracy_low"])) == ("10", pytest.approx(wilson(5, 10)[0], abs=1e-6))
    assert zero["eval/examples"] == "100"  # a whole number of examples, not their mean 100.5
    readme = write_results(tmp_path.parent / f"{tmp_path.name}-out", collect([tmp_path]), title="t").read_text()
    assert "one run's over the set's examples (`n`; the fewest where the seeds differ in it): Wilson's" in readme


def test_an_interval_over_seeds_stops_where_the_metric_can_go():
    """Two noisy seeds of a latency give a t-interval reaching below 0 ms; a proportion's stops at 1."""
    latency = next(m for m in Evaluator.metric_set.metrics if m.name == "student_latency_ms")
    low, high = t_interval([2.0, 23.0])
    assert low < 0 and Cell(latency, [2.0, 23.0], [None, None]).interval == (0.0, high)
    accuracy = Evaluator.metric_set.headline
    assert Cell(accuracy, [0.9, 1.0], [48, 48]).interval == (pytest.approx(t_interval([0.9, 1.0])[0]), 1.0)
    gap = next(m for m in Evaluator.metric_set.metrics if m.name == "teacher_student_gap")
    assert Cell(gap, [-0.3, -0.25, -0.2], [48] * 3).interval == pytest.approx(
        t_interval([-0.3, -0.25, -0.2])
    )  # < 0 is fine


def test_mcnemar_exact_is_the_two_sided_binomial_tail():
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 1024)  # P(X <= 1 | 10, 1/2), doubled
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)


def test_metrics_are_stored_as_float32_holds_them():
    assert float32_rounded(torch.tensor(0.54).item()) == 0.54 and torch.tensor(0.54).item() != 0.54
    assert float32_rounded(torch.tensor([170.0]).div(200).item()) == 0.85
    assert float32_rounded(1 / 3) == 0.33333334 and float32_rounded(200) == 200
    assert float32_rounded(float("nan")) != float32_rounded(float("nan"))  # passes through


# ---------------------------------------------------------------- the table and its formats
def test_table_shows_n_and_intervals_per_set_and_skips_incomplete_runs(tmp_path, capsys):
    write_run(tmp_path / "a", "icl", 0, 0.8, "2026-01-01T00:00:01")
    write_run(tmp_path / "b", "icl", 1, 0.6, "2026-01-01T00:00:02")
    write_run(tmp_path / "c", "cd", 0, 0.7, "2026-01-01T00:00:03")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "metrics.json").write_text(json.dumps({"status": "running"}))
    assert main([str(tmp_path), "--format", "markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "**in-domain (eval)**" and "| n " in lines[2] and "| accuracy " in lines[2]
    # icl: two seeds, t-interval 0.7 ± 12.706 * 0.1414 / sqrt(2) cut to [0, 1]; cd: one run, Wilson over 200 examples
    assert lines[4].startswith("| icl ") and "| 2 " in lines[4] and "0.700 [0.000, 1.000]" in lines[4]
    low, high = wilson(140, 200)
    assert lines[5].startswith("| cd ") and f"0.700 [{low:.3f}, {high:.3f}]" in lines[5] and "| 200 " in lines[5]
    assert lines[7] == "**hans**" and "0.350 [0.000, 0.985]" in lines[11]
    assert f"0.350 [{wilson(350, 1000)[0]:.3f}, {wilson(350, 1000)[1]:.3f}]" in lines[12]


def test_a_folder_of_links_to_runs_of_several_sweeps_reads_each_run_once(tmp_path, capsys):
    write_run(tmp_path / "sweep_a" / "0", "icl", 0, 0.8, "2026-01-01T00:00:01")
    write_run(tmp_path / "sweep_a" / "1", "icl", 1, 0.6, "2026-01-01T00:00:02")
    write_run(tmp_path / "sweep_b" / "0", "cd", 0, 0.7, "2026-01-01T00:00:03")
    chosen = tmp_path / "chosen"
    chosen.mkdir()
    (chosen / "icl").symlink_to(tmp_path / "sweep_a")
    (chosen / "cd").symlink_to(tmp_path / "sweep_b" / "0")
    (chosen / "cd_again").symlink_to(tmp_path / "sweep_b" / "0")  # the same run twice counts once
    (chosen / "up").symlink_to(chosen)  # a cycle ends
    (tmp_path / "sweep_a" / "latest").symlink_to(tmp_path / "sweep_a" / "1")  # as W&B's latest-run: not followed
    records = collect([chosen])
    assert sorted((r["method"], r["seed"]) for r in records) == [("cd", 0), ("icl", 0), ("icl", 1)]
    sweep_a = collect([tmp_path / "sweep_a"])  # each run read under its own name, not the link's
    assert sorted(Path(r["run_dir"]).name for r in sweep_a) == ["0", "1"]
    assert main([str(chosen)]) == 0
    assert "icl" in capsys.readouterr().out


def test_a_sets_seeds_are_the_runs_that_report_it(tmp_path, capsys):
    """Three seeds in-domain, one of them also on HANS: the HANS block's interval is Wilson's over that one run's
    examples, and its seeds column says 1, not the row's 3."""
    for seed, directory in enumerate("abc"):
        metrics = {"eval/accuracy": 0.6 + seed / 10, "eval/examples": 200}
        if seed == 0:
            metrics |= {"hans/accuracy": 0.35, "hans/examples": 1000}
        write_run(tmp_path / directory, "cd", seed, None, f"2026-01-01T00:00:0{seed}", metrics=metrics)
    assert main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    eval_line, hans_line = (line.split() for line in lines if line.startswith("cd "))
    assert eval_line[3] == "3" and hans_line[3] == "1"
    low, high = wilson(350, 1000)
    assert " ".join(hans_line[5:]) == f"0.350 [{low:.3f}, {high:.3f}]"


def test_a_set_that_reports_only_its_n_gets_no_block(tmp_path, capsys):
    write_run(
        tmp_path / "a",
        "cd",
        0,
        None,
        "2026-01-01T00:00:00",
        metrics={"eval/accuracy": 0.6, "eval/examples": 200, "nli/examples": 50},
    )
    (table,) = summarise(collect([tmp_path]))
    assert [c.key for c in table.columns] == ["eval/examples", "eval/accuracy"]


def test_a_reader_that_stops_early_ends_the_comparison_quietly(tmp_path):
    write_run(tmp_path / "a", "icl", 0, 0.8, "2026-01-01T00:00:01")
    compare = subprocess.Popen(
        [sys.executable, "-m", "ctxdistill.results.cli", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    compare.stdout.close()  # as `| head` does once it has its lines: every write now fails
    assert compare.wait(timeout=120) == 141
    assert compare.stderr.read() == b""  # no traceback


def test_csv_and_latex_output_and_an_empty_directory(tmp_path, capsys):
    write_run(tmp_path / "a", "cd", 0, 0.75, "2026-01-01T00:00:01", model="opt-125m", dataset="mnli")
    write_run(tmp_path / "b", "cd", 1, 0.65, "2026-01-01T00:00:02", model="opt-125m", dataset="mnli")
    write_run(tmp_path / "c", "zero_shot", 0, 0.5, "2026-01-01T00:00:03", model="opt-125m", dataset="mnli")
    assert main([str(tmp_path), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert list(rows[0])[:7] == [
        "method",
        "model",
        "dataset",
        "seeds",
        "model_parameters",
        "eval/examples",
        "eval/accuracy_mean",
    ]
    cd, zero = rows
    assert (cd["method"], cd["seeds"], cd["eval/accuracy_mean"], cd["eval/accuracy_std"]) == (
        "cd",
        "2",
        "0.7",
        "0.0707107",
    )
    half = 12.7062 * 0.0707107 / math.sqrt(2)
    assert float(cd["eval/accuracy_low"]) == pytest.approx(0.7 - half, abs=1e-4)
    assert (
        float(zero["eval/accuracy_low"]) == pytest.approx(wilson(100, 200)[0], abs=1e-6)
        and zero["eval/accuracy_std"] == ""
    )
    assert main([str(tmp_path), "--format", "md"]) == 0  # Markdown's usual short name
    assert capsys.readouterr().out.startswith("**in-domain (eval)**\n\n| method")
    assert main([str(tmp_path), "--format", "latex"]) == 0
    latex = capsys.readouterr().out.splitlines()
    assert latex[0] == "% in-domain (eval)" and latex[1].startswith(r"\begin{tabular}{lllr") and latex[2] == r"\toprule"
    assert latex[5].startswith(r"cd & opt-125m & mnli & 2 & 200 & $0.700\ [0.065, 1.000]$ & ")
    assert latex[6].startswith(r"zero\_shot & opt-125m & mnli & 1 & 200 & $0.500\ [0.431, 0.569]$")
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1


def test_intervals_and_tests_at_the_edges_match_scipy_and_statsmodels():
    """Reference values from statsmodels' proportion_confint(method="wilson"), scipy.stats.t and statsmodels'
    mcnemar(exact=True), on hand-picked numbers: one example, accuracy 0 and 1, one seed, two seeds."""
    assert wilson(0, 1) == pytest.approx((0.0, 0.7934506856227627), abs=1e-12)
    assert wilson(1, 1) == pytest.approx((0.2065493143772374, 1.0), abs=1e-12)
    assert wilson(0, 200) == pytest.approx((0.0, 0.01884532637726658), abs=1e-12)
    assert wilson(200, 200) == pytest.approx((0.9811546736227335, 1.0), abs=1e-12)
    assert wilson(170, 200) == pytest.approx((0.7939442071583334, 0.89286406437758), abs=1e-12)
    quantiles = {1: 12.706204736174694, 2: 4.302652729749462, 5: 2.5705818356363146, 100: 1.983971518523552}
    for df, quantile in quantiles.items():
        assert t_quantile(df) == pytest.approx(quantile, abs=1e-9)
    assert t_interval([0.5, 0.6]) == pytest.approx((-0.08531023680873451, 1.1853102368087347), abs=1e-9)
    assert t_interval([0.85, 0.72, 0.74]) == pytest.approx((0.5961103601774769, 0.9438896398225229), abs=1e-9)
    assert mcnemar_exact(9, 25) == pytest.approx(0.00904118549078703, abs=1e-15)
    assert mcnemar_exact(100, 80) == pytest.approx(0.15653146957815167, rel=1e-12)
    assert sign_flip_test([0.5, 0.25, -0.1, 0.3, 0.2, 0.4]) == 0.0625  # scipy's permutation_test, every pattern
    assert sign_flip_test([1.0]) == 1.0 and sign_flip_test([0.0, 0.0]) == 1.0
    accuracy = Evaluator.metric_set.headline
    assert Cell(accuracy, [0.0], [1]).interval == wilson(0, 1)  # one seed of one example
    assert Cell(accuracy, [1.0, 1.0], [200, 200]).interval == wilson(200, 200)  # seeds that agree at 1
    assert Cell(accuracy, [1.0, 0.9], [40, 40]).interval == (pytest.approx(0.3146897631912654), 1.0)


def test_renderers_escape_names_mark_lower_is_better_and_show_nan_and_missing_figures(tmp_path, capsys):
    """A method named with LaTeX's specials, a dataset with a pipe, quotes and a comma; a KL that is NaN, a majority
    rate one of a row's two seeds reports (null in the other's metrics.json, as its W&B summary would lack it)."""
    method, dataset = r"cd_v2 & #1 50% $x$ {a} ~ ^ \ <b>", 'my|data, "quoted"'
    runs = ((method, 0, math.nan, 0.5), (method, 1, 0.3, None), ("icl", 0, 0.0, 0.7))
    for i, (name, seed, kl, majority) in enumerate(runs):
        metrics = {"eval/accuracy": 0.5 + 0.1 * i, "eval/examples": 10, "eval/kl_to_teacher": kl}
        metrics["eval/majority_rate"] = majority
        write_run(tmp_path / str(i), name, seed, 0, f"2026-01-01T00:00:0{i}", dataset=dataset, metrics=metrics)
    assert main([str(tmp_path)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert re.split(r"\s{2,}", text[1])[5:] == ["accuracy", "majority", "KL to teacher ↓"]
    assert re.split(r"\s{2,}", text[3])[2:] == [dataset, "2", "10", "0.550 [0.000, 1.000]", "0.500 (1/2 seeds)", "nan"]
    assert main([str(tmp_path), "--format", "markdown"]) == 0
    markdown = capsys.readouterr().out.splitlines()
    row = markdown[4]
    assert row.count(" | ") == markdown[2].count(" | ") and r"my\|data" in row and r"\\ \<b>" in row
    assert main([str(tmp_path), "--format", "latex"]) == 0
    latex = capsys.readouterr().out.splitlines()
    assert latex[3].endswith(r"& majority & KL to teacher $\downarrow$ \\")
    assert latex[5].startswith(
        r"cd\_v2 \& \#1 50\% \$x\$ \{a\} \textasciitilde{} \textasciicircum{} \textbackslash{} $<$b$>$ & m & "
        r'my$|$data, "quoted" & 2 & 10 & $0.550\ [0.000, 1.000]$ & 0.500 (1/2 seeds) & nan \\'
    )
    assert main([str(tmp_path), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert (rows[0]["method"], rows[0]["dataset"]) == (method, dataset)  # quoted, and read back whole
    assert (
        rows[0]["eval/kl_to_teacher_mean"],
        rows[0]["eval/kl_to_teacher_low"],
        rows[0]["eval/majority_rate_mean"],
        rows[0]["eval/majority_rate_runs"],  # the sixteenth audit: the CSV said seeds=2 and nothing of the 1 run
        rows[0]["eval/accuracy_runs"],
    ) == ("nan", "", "0.5", "1", "2")


def test_a_count_the_runs_do_not_share_is_their_mean_in_every_format(tmp_path, capsys):
    # the sixteenth audit: answers not found in three runs, 3, 3 and 5, read "3/5" in the text and 3.66667 in the CSV
    declared = GenerationEvaluator.metric_set.with_objective("eval/accuracy").to_dict()
    for seed, failures in enumerate((3, 3, 5)):
        write_run(tmp_path / str(seed), "icl", seed, 0, "2026-01-01T00:00:00", metrics={"eval/accuracy": 0.5})
        record = json.loads((tmp_path / str(seed) / "metrics.json").read_text())
        record |= {"metric_set": declared, "metrics": {"eval/accuracy": 0.5, "eval/examples": 30 + seed}}
        record["metrics"]["eval/extraction_failures"] = failures
        (tmp_path / str(seed) / "metrics.json").write_text(json.dumps(record))
    assert main([str(tmp_path), "--format", "csv"]) == 0
    [row] = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert (row["eval/extraction_failures"], row["eval/examples"]) == ("3.66667", "30")
    assert main([str(tmp_path), "--format", "markdown"]) == 0
    cells = [c.strip() for c in capsys.readouterr().out.splitlines()[4].split("|")]
    assert "3.667" in cells and "30/31/32" in cells and "3/5" not in cells


def test_csv_bounds_of_no_or_every_success_are_0_and_1_exactly_and_parameter_counts_whole(tmp_path, capsys):
    """Wilson's bound at 0 of 40 was 6.9e-18 and at 40 of 40 0.9999999999999999 (rounding of centre -/+ half), printed
    so in CSV; a model's parameter count was cut to 6 digits (1.25e+08)."""
    assert wilson(0, 40) == (0.0, pytest.approx(0.0876216, abs=1e-7)) and wilson(40, 40)[1] == 1.0
    assert wilson(0, 1000)[0] == 0.0 and wilson(1000, 1000)[1] == 1.0
    write_run(tmp_path / "a", "zero_shot", 0, 0.0, "2026-01-01T00:00:01", model="opt-125m", n=40)
    write_run(tmp_path / "b", "icl", 0, 1.0, "2026-01-01T00:00:02", model="opt-125m", n=40)
    assert main([str(tmp_path), "--format", "csv"]) == 0
    zero, every = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert (zero["eval/accuracy_low"], every["eval/accuracy_high"]) == ("0", "1")
    assert zero["model_parameters"] == every["model_parameters"] == "125000000"


def test_thousands_in_latex_math_keep_their_commas_tight():
    from ctxdistill.results.render import _tex

    assert _tex("122,496 [112,738, 132,254]") == r"$122{,}496\ [112{,}738, 132{,}254]$"
    assert _tex("0.500 (1/2 seeds)") == "0.500 (1/2 seeds)" and _tex("<0.001") == "$<$0.001"


@pytest.mark.parametrize(
    "content, why",
    [
        (
            '{"status": "complete", "method": "cd"}',
            "not a run's metrics.json (it has no model, dataset, seed, metrics)",
        ),
        (
            json.dumps(
                {"status": "complete", "method": "cd", "model": "m", "dataset": "d", "seed": 0}
                | {"metrics": {"eval/accuracy": "high"}}
            ),
            "its metric eval/accuracy is 'high', not a number",
        ),
        ("[1, 2]", "unreadable (a JSON list, not a run's record)"),
    ],
)
def test_a_metrics_file_that_is_not_a_runs_is_named_and_skipped_without_a_traceback(content, why, tmp_path, capsys):
    write_run(tmp_path / "good", "cd", 0, 0.7, "2026-01-01T00:00:01")
    bad = tmp_path / "bad" / "metrics.json"
    bad.parent.mkdir()
    bad.write_text(content)
    assert main([str(tmp_path), "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert f"warning: skipping {bad}: {why}" in captured.err and "Traceback" not in captured.err
    assert captured.out.splitlines()[1].startswith("cd,m,d,1,")
    assert main([str(tmp_path / "bad")]) == 1


def test_a_cut_short_metrics_file_is_named_and_skipped_and_the_good_runs_are_shown(tmp_path, capsys):
    write_run(tmp_path / "good", "cd", 0, 0.7, "2026-01-01T00:00:01", model="opt-125m", dataset="mnli")
    broken = tmp_path / "broken" / "metrics.json"
    broken.parent.mkdir()
    broken.write_text('{"method": "cd", "status": "compl')  # a run killed while writing
    (broken.parent / "config.yaml").write_text("method: {name: cd}\n")  # as every run writes when it starts
    assert main([str(tmp_path), "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert f"warning: skipping {broken}: unreadable" in captured.err
    # named once, as unreadable, not also as a run that stopped before it finished
    assert "left out" not in captured.err and "without results" not in captured.err
    assert captured.out.splitlines()[1].startswith("cd,opt-125m,mnli,1,125000000,200,0.7,")
    assert main([str(tmp_path), "--strict"]) == 1
    assert main([str(tmp_path / "broken")]) == 1  # nothing readable


def test_a_run_from_before_declarations_keeps_every_metric(tmp_path, capsys):
    old = tmp_path / "old"
    write_run(old, "cd", 0, 0.7, "2026-01-01T00:00:01", metrics={"eval/accuracy": 0.7, "eval/bleu": 0.25})
    record = json.loads((old / "metrics.json").read_text())
    del record["metric_set"]
    (old / "metrics.json").write_text(json.dumps(record))
    assert main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[4:] == ["accuracy", "bleu"] and lines[3].split()[4:] == ["0.700", "0.250"]
    from ctxdistill.results.metrics import undeclared

    # GenPI's runs of then: its headline, not the first name (a lower-is-better rate)
    assert undeclared(["eval/task_success", "eval/rule_compliance", "eval/degenerate"]).headline.name == "task_success"
    # the same columns and headline in whatever order the keys come (a W&B summary keeps none)
    record["metrics"] = {"eval/bleu": 0.25, "eval/accuracy": 0.7}
    (old / "metrics.json").write_text(json.dumps(record))
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == lines


# ---------------------------------------------------------------- the paired test (--vs)
def write_predictions(directory, outcomes, set_name="eval"):
    with (directory / "predictions.jsonl").open("w") as f:
        for i, right in enumerate(outcomes):
            f.write(json.dumps({"set": set_name, "uid": f"q{i}", "label": 1, "prediction": int(right)}) + "\n")


def test_vs_adds_mcnemars_exact_test_on_the_shared_examples(tmp_path, capsys):
    # 20 shared examples: both right on 8, cd alone on 9, icl alone on 1, both wrong on 2
    icl = [True] * 8 + [False] * 9 + [True] + [False] * 2
    cd = [True] * 8 + [True] * 9 + [False] + [False] * 2
    for method, outcomes, directory in (("icl", icl, "a"), ("cd", cd, "b")):
        accuracy = sum(outcomes) / 20
        write_run(tmp_path / directory, method, 0, accuracy, f"2026-01-01T00:00:0{directory == 'b'}", n=20)
        write_predictions(tmp_path / directory, outcomes)
    assert main([str(tmp_path), "--vs", "icl"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("Δ accuracy vs icl  p (McNemar)  pairs")
    cd_line = next(line for line in lines if line.startswith("cd "))
    assert cd_line.split()[-3:] == ["+0.400", f"{mcnemar_exact(9, 1):.3f}", "20"] == ["+0.400", "0.021", "20"]
    assert main([str(tmp_path), "--vs", "icl", "--format", "csv"]) == 0
    row = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))[1]
    assert float(row["eval/p_vs_icl"]) == pytest.approx(2 * 11 / 1024, rel=1e-5) and row["eval/pairs_vs_icl"] == "20"
    out = tmp_path / "compared"
    assert main([str(tmp_path), "--vs", "icl", "--out", str(out)]) == 0  # the written tables keep the test
    written = list(csv.DictReader((out / "results" / "table.csv").open()))[1]
    assert written["eval/p_vs_icl"] == row["eval/p_vs_icl"]
    readme = (out / "README.md").read_text()
    assert "p (McNemar)" in readme
    # its command makes the same tables again (the nineteenth audit: it dropped --vs and with it the test)
    regenerate = re.search(r"Regenerate with `ctxdistill-compare (.+?)`", readme).group(1)
    (out / "results" / "table.csv").unlink()
    assert main(shlex.split(regenerate)) == 0
    assert list(csv.DictReader((out / "results" / "table.csv").open()))[1] == written
    assert main([str(tmp_path), "--vs", "ft"]) == 2
    assert "no run of method ft here (methods: cd, icl)" in capsys.readouterr().err


def test_vs_over_several_seeds_tests_each_example_once_on_its_mean_difference(tmp_path, capsys):
    """Seeds evaluate the same examples: pooling them as pairs counts an example once per seed (here 9 discordant
    pairs, McNemar's p = 2/2^9) where 6 examples differ, 3 of them under both seeds."""
    icl = [False] * 6 + [True] * 2 + [False] * 2
    cd = [True] * 6 + [True] * 2 + [False] * 2
    second_seed_cd = [True] * 3 + [False] * 3 + [True] * 2 + [False] * 2  # 3 of the 6 under seed 1
    for seed, cd_outcomes in ((0, cd), (1, second_seed_cd)):
        for method, outcomes in (("icl", icl), ("cd", cd_outcomes)):
            directory = tmp_path / f"{method}{seed}"
            write_run(directory, method, seed, sum(outcomes) / 10, f"2026-01-01T00:00:0{seed}", n=10)
            write_predictions(directory, outcomes)
    assert main([str(tmp_path), "--vs", "icl", "--format", "csv"]) == 0
    row = next(r for r in csv.DictReader(io.StringIO(capsys.readouterr().out)) if r["method"] == "cd")
    # per example: 1.0 on 3, 0.5 on 3, 0 on 4; of the 2^6 sign patterns of the six, only all + and all - reach 4.5
    assert row["eval/pairs_vs_icl"] == "10" and float(row["eval/delta_vs_icl"]) == pytest.approx(0.45, abs=1e-6)
    assert float(row["eval/p_vs_icl"]) == pytest.approx(sign_flip_test([1.0] * 3 + [0.5] * 3)) == 2 / 64
    assert main([str(tmp_path), "--vs", "icl"]) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith("Δ accuracy vs icl  p (sign-flip)  pairs")


def test_vs_takes_a_rows_label_under_by_to_test_two_settings_of_one_method(tmp_path, capsys):
    """OPCD against its own teacher-sampled variant (method.lmbda=0): both runs are method=opcd, so only the row's
    label under --by names the baseline. The McNemar figures of the first test, one seed."""
    lmbda0 = [True] * 8 + [False] * 9 + [True] + [False] * 2
    lmbda1 = [True] * 8 + [True] * 9 + [False] + [False] * 2
    for lmbda, outcomes in ((0, lmbda0), (1, lmbda1)):
        directory = tmp_path / f"lmbda{lmbda}"
        write_run(directory, "opcd", 0, sum(outcomes) / 20, f"2026-01-01T00:00:0{lmbda}", n=20)
        write_predictions(directory, outcomes)
        (directory / "config.yaml").write_text(f"method:\n  lmbda: {lmbda}\n")
    assert main([str(tmp_path), "--by", "method.lmbda", "--vs", "opcd lmbda=0", "--format", "csv"]) == 0
    rows = {row["method"]: row for row in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    tested = rows["opcd lmbda=1"]
    assert float(tested["eval/delta_vs_opcd lmbda=0"]) == pytest.approx(0.4, abs=1e-6)
    assert float(tested["eval/p_vs_opcd lmbda=0"]) == pytest.approx(mcnemar_exact(9, 1), rel=1e-5)
    assert rows["opcd lmbda=0"]["eval/p_vs_opcd lmbda=0"] == ""  # the baseline is not tested against itself
    assert main([str(tmp_path), "--by", "method.lmbda", "--vs", "opcd lmbda=2"]) == 2
    err = capsys.readouterr().err
    assert "no run of method opcd lmbda=2 here (methods: opcd; rows: opcd lmbda=0, opcd lmbda=1)" in err


def test_vs_names_a_method_that_shares_no_seed_or_example_with_the_baseline(tmp_path, capsys):
    for method, seed, uid in (("icl", 0, "q"), ("cd", 5, "q"), ("ft", 0, "other")):
        directory = tmp_path / method
        write_run(directory, method, seed, 0.5, f"2026-01-01T00:00:0{seed}", n=4)
        write_predictions(directory, [True, False, True, False])
        if uid != "q":
            rows = (directory / "predictions.jsonl").read_text().replace('"uid": "q', f'"uid": "{uid}')
            (directory / "predictions.jsonl").write_text(rows)
    assert main([str(tmp_path), "--vs", "icl"]) == 0
    err = capsys.readouterr().err
    assert "--vs: cd / m / d: no seed in common with icl (seeds [5] and [0]); not tested" in err
    assert "--vs: ft / m / d: no eval example in common with icl (seeds [0]); not tested" in err


def test_vs_does_not_pair_examples_whose_labels_differ_between_the_runs(tmp_path, capsys):
    """An example id is its row in the eval data: runs evaluated on other data (another dataset.source.seed, a
    file replaced) paired eval-i with eval-i all the same."""
    for method, label in (("icl", 1), ("cd", 0)):
        directory = tmp_path / method
        write_run(directory, method, 0, 0.5, f"2026-01-01T00:00:0{label}", n=4)
        write_predictions(directory, [True, False, True, False])
        if label == 0:
            rows = (directory / "predictions.jsonl").read_text().replace('"label": 1', '"label": 0', 1)
            (directory / "predictions.jsonl").write_text(rows)
    assert main([str(tmp_path), "--vs", "icl"]) == 0
    out, err = capsys.readouterr()
    said = "--vs: cd / m / d: example q0 of eval has label 0 here and 1 in icl's run (seed 0): the two were evaluated"
    assert said in err and "not tested" in err


def test_vs_names_a_row_whose_dataset_and_model_have_no_baseline_run(tmp_path, capsys):
    """A sweep over several families or models where the baseline ran only on some: the other rows were left out of
    the test without a word (no Δ column in their table at all)."""
    for method, model in (("icl", "m"), ("cd", "m"), ("cd", "other")):
        directory = tmp_path / f"{method}-{model}"
        write_run(directory, method, 0, 0.5, "2026-01-01T00:00:00", model=model, n=4)
        write_predictions(directory, [True, False, True, False])
    assert main([str(tmp_path), "--vs", "icl"]) == 0
    out, err = capsys.readouterr()
    assert "--vs: cd / other / d: no icl run of this dataset and model; not tested" in err
    assert "cd / m / d" not in err and "Δ accuracy vs icl" in out


def test_the_sign_flip_test_counts_the_sign_patterns_as_extreme_as_the_observed():
    # differences 1, 1, 1, 1: only all plus and all minus reach |4| among the 16 patterns
    assert sign_flip_test([1, 1, 1, 1]) == 2 / 16
    # 0.5, 0.25, -0.25: |sum| 0.5 is reached by (+,+,-), (+,-,+), (+,+,+) and their negations: 6 of 8
    assert sign_flip_test([0.5, 0.25, -0.25]) == 6 / 8
    assert sign_flip_test([0, 0, 0.5]) == 2 / 2  # zero differences carry no sign
    assert sign_flip_test([]) == 1.0


def test_the_sign_flip_test_beyond_exact_enumeration_agrees_with_it():
    """Above 2^n = resamples, random patterns: within their Monte Carlo error of the exact p (all 2^15 patterns)."""
    differences = [0.5, 0.3, 0.2, 0.2, 0.1, -0.1, 0.25, -0.05, 0.4, 0.15, -0.3, 0.1, 0.05, 0.2, 0.3]
    exact = sign_flip_test(differences, resamples=2**15)
    sampled = sign_flip_test(differences, resamples=5000)
    assert 0.005 < exact < 0.05 and sampled == pytest.approx(exact, abs=3 * math.sqrt(exact / 5000))
    assert sampled == sign_flip_test(differences, resamples=5000)  # seeded


def test_vs_tests_knowledge_graph_runs_on_each_triples_reciprocal_rank(tmp_path, capsys):
    """MRR is a mean of reciprocal ranks, not a share of successes: the paired test is the sign-flip test on each
    triple's (the mean of its head and tail query's), read from the rows the link-prediction evaluator writes."""
    ranks = {"kgbert": [(1, 2), (3, 1), (2, 2), (5, 4)], "kgbert_cd": [(1, 1), (1, 1), (2, 1), (4, 4)]}
    for method, pairs in ranks.items():
        directory = tmp_path / method
        rows = [{"head_rank": h, "tail_rank": t, "reciprocal_rank": (1 / h + 1 / t) / 2} for h, t in pairs]
        mrr = statistics.fmean(r["reciprocal_rank"] for r in rows)
        record = {
            "method": method,
            "model": "minilm-l6",
            "dataset": "wn18rr",
            "seed": 0,
            "status": "complete",
            "metric_set": link_prediction_metrics().to_dict(),
            "metrics": {"eval/mrr": mrr, "eval/examples": 8},
        }
        directory.mkdir()
        (directory / "metrics.json").write_text(json.dumps(record))
        with (directory / "predictions.jsonl").open("w") as f:
            f.writelines(json.dumps({"set": "eval", "uid": f"t{i}", **r}) + "\n" for i, r in enumerate(rows))
    assert main([str(tmp_path), "--vs", "kgbert"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("Δ MRR vs kgbert  p (sign-flip)  pairs")
    cd_line = next(line for line in lines if line.startswith("kgbert_cd "))
    # differences per triple: 1 - 0.75, 1 - 2/3, 0.75 - 0.5, 0.25 - 0.225 = 0.25, 1/3, 0.25, 0.025 (all positive)
    assert cd_line.split()[-3:] == ["+0.215", f"{2 / 16:.3f}", "4"]


# ---------------------------------------------------------------- every family with its own columns
def family_records():
    """A classification run (with serving costs), a GenPI run and a knowledge-graph run, as metrics.json holds them."""
    classification = {
        "method": "cd",
        "model": "smollm2-135m",
        "dataset": "synthetic",
        # a paraphrase task's: F1 beside accuracy, with the bootstrap interval the run reports
        "metric_set": with_task_metrics(Evaluator.metric_set, SimpleNamespace(f1_positive=1, votes=1))
        .with_objective("eval/accuracy")
        .to_dict(),
        "metrics": {
            "eval/accuracy": 0.85,
            "eval/examples": 200,
            "eval/teacher_accuracy": 0.93,
            "eval/teacher_student_gap": 0.08,
            "eval/kl_to_teacher": 0.116,
            "eval/f1": 0.6,
            "eval/f1_bootstrap_low": 0.45,
            "eval/f1_bootstrap_high": 0.7,
            **SERVING,
        },
    }
    genpi = {
        "method": "genpi",
        "model": "tiny-random",
        "dataset": "genpi_pirate",
        "metric_set": PromptInternalizationEvaluator.metric_set.with_objective("pseudo_heldout/task_success").to_dict(),
        "metrics": {
            "eval/task_success": 0.5,
            "eval/examples": 8,
            "eval/rule_compliance": 0.75,
            "eval/rougeL_to_teacher": 0.3125,
            "pseudo_heldout/task_success": 0.25,
            "pseudo_heldout/examples": 4,
        },
    }
    kg = {
        "method": "kgbert_cd",
        "model": "minilm-l6",
        "dataset": "wn18rr",
        "metric_set": link_prediction_metrics("sampled100_").with_objective("eval/sampled100_mrr").to_dict(),
        "metrics": {
            "eval/sampled100_mrr": 0.4,
            "eval/sampled100_hits@1": 0.25,
            "eval/sampled100_hits@3": 0.5,
            "eval/sampled100_hits@10": 0.75,
            "eval/sampled100_head_mrr": 0.3,
            "eval/examples": 40,
            # each metric's per-triple values' standard deviation, the n = 40 triples' t-interval of its mean
            "eval/sampled100_mrr_sd": 0.3,
            "eval/sampled100_hits@1_sd": 0.4,
            "eval/sampled100_hits@3_sd": 0.45,
            "eval/sampled100_hits@10_sd": 0.35,
        },
    }
    for i, record in enumerate((classification, genpi, kg)):
        record |= {"seed": 0, "paper": None, "status": "complete", "model_parameters": 10**6 * (i + 1)}
    return classification, genpi, kg


def defined_metrics(output_dir: Path) -> dict[str, str]:
    """The metrics an offline W&B run defined (``define_metric``) and the summary each keeps, from its run file."""
    from wandb.proto import wandb_internal_pb2 as pb

    from ctxdistill.results.wandb_runs import _run_file_records

    defined = {}
    for raw in _run_file_records(next(output_dir.rglob("*.wandb")))[0]:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "metric" and record.metric.name:
            summary = record.metric.summary
            defined[record.metric.name] = "max" if summary.max else "min" if summary.min else ""
    return defined


def test_link_prediction_runs_of_both_ranking_modes_make_one_table_with_one_headline():
    """Full and sampled ranking declare differently named headlines (mrr, sampled50_mrr) in one family: the
    table keeps the first run's as the headline and shows the other's as a column (merging raised ValueError)."""
    records = [
        {
            "method": "kgbert",
            "model": "m",
            "dataset": "d",
            "seed": 0,
            "finished_at": f"2026-01-01T00:00:0{i}",
            "metric_set": link_prediction_metrics(prefix).to_dict(),
            "metrics": {"eval/examples": 100, f"eval/{prefix}mrr": mrr, f"eval/{prefix}hits@1": 0.2},
        }
        for i, (prefix, mrr) in enumerate((("", 0.3), ("sampled50_", 0.6)))
    ]
    (table,) = summarise(records)
    assert table.family.headline.name == "mrr"
    assert [c.key for c in table.columns] == [
        "eval/examples", "eval/mrr", "eval/hits@1", "eval/sampled50_mrr", "eval/sampled50_hits@1"
    ]  # fmt: skip
    assert table.rows[0].cells["eval/sampled50_mrr"].values == [0.6]


def log_offline_run(record: dict, output_dir: Path, monkeypatch) -> Path:
    """What run.py logs of a run to W&B offline (the config with the declarations, the final metrics as the
    summary); returns its run file."""
    from ctxdistill.tracking import WandbTracker

    for setting in ("STATS", "META", "MACHINE_INFO"):  # seconds of system probing these tests do not need
        monkeypatch.setenv(f"WANDB_X_DISABLE_{setting}", "true")
    tracker = WandbTracker(
        project="p",
        entity=None,
        mode="offline",
        group="g",
        name=record["method"],
        tags=[],
        job_type="train",
        config={key: {"name": record[key]} for key in ("method", "model", "dataset")} | {"seed": 0, "paper": None},
        output_dir=str(output_dir),
        log_predictions=False,
        resumes=False,
    )
    tracker.declare(MetricSet.from_dict(record["metric_set"]))
    tracker.log(record["metrics"], 2)
    tracker.summary({**record["metrics"], "model/parameters": record["model_parameters"], "status": "complete"})
    tracker.finish()
    return next(output_dir.rglob("*.wandb"))


def test_each_family_prints_its_own_columns_from_metrics_json_and_from_offline_wandb_runs(
    tmp_path, capsys, monkeypatch
):
    for record in family_records():
        cell = tmp_path / "files" / record["method"]
        cell.mkdir(parents=True)
        (cell / "metrics.json").write_text(json.dumps(record))
        log_offline_run(record, tmp_path / "wandb" / record["method"], monkeypatch)
        # the run keeps the best value of its own objective (not a hard-coded eval/accuracy)
        assert defined_metrics(tmp_path / "wandb" / record["method"]) == {record["metric_set"]["objective"]: "max"}
    assert main([str(tmp_path / "files")]) == 0
    from_files = capsys.readouterr().out
    assert main([str(tmp_path / "wandb")]) == 0
    assert capsys.readouterr().out == from_files
    sections = from_files.split("== ")[1:]
    assert [s.split(" ==")[0] for s in sections] == [
        "classification (headline: accuracy)",
        "link_prediction (headline: sampled100 MRR)",
        "prompt_internalization (headline: task success)",
    ]
    classification, kg, genpi = sections
    header = re.split(r"\s{2,}", classification.splitlines()[3])
    assert header[4:] == ["n", "accuracy", "teacher acc", "teacher - student ↓", "KL to teacher ↓", "F1"]
    assert (
        "0.850 [0.794, 0.893]" in classification
        and "0.600 [0.450, 0.700]" in classification
        and "serving cost per query" in classification
    )
    assert "KV bytes ratio" in classification and "2,000,000" in classification and "16.667" in classification
    kg_lines = kg.splitlines()
    assert re.split(r"\s{2,}", kg_lines[3])[4:] == [
        "n",
        "sampled100 MRR",
        *(f"sampled100 Hits@{k}" for k in (1, 3, 10)),
    ]
    # scipy.stats.t.interval(0.95, 39, loc=mean, scale=sd / sqrt(40)): MRR 0.4 (sd 0.3), Hits@1 0.25 (sd 0.4)
    assert kg_lines[5].split()[4:10] == ["40", "0.400", "[0.304,", "0.496]", "0.250", "[0.122,"]
    assert "0.378]" in kg_lines[5]
    assert "head_mrr" not in kg and "head MRR" not in kg  # undeclared companions stay in metrics.json
    assert "task success" in genpi and "Rouge-L to teacher" in genpi and "0.312" in genpi
    assert "held-out pseudo inputs (the objective's set)" in genpi and "0.250 [" in genpi


def test_every_family_gives_the_same_rows_from_metrics_json_offline_wandb_and_the_wandb_api(tmp_path, monkeypatch):
    """Classification, GenPI, knowledge graphs, exact match and a task mixture: each run written as run.py writes it
    (metrics.json; its W&B run offline), then read back from the files, from the offline run and through the
    public API (wandb.apis.public.Run over what `wandb sync` uploads, the double test_sweeps uses)."""
    import wandb
    import wandb.apis.public

    from ctxdistill.results.render import render
    from ctxdistill.results.wandb_runs import api_records, read_offline_run

    exact_match = {
        "method": "icl",
        "model": "smollm2-135m",
        "dataset": "addition",
        "metric_set": GenerationEvaluator.metric_set.with_objective("eval/accuracy").to_dict(),
        "metrics": {
            "eval/accuracy": 0.9,
            "eval/examples": 30,
            "eval/teacher_accuracy": 0.9,
            "eval/teacher_student_gap": 0.0,
            "eval/extraction_failures": 1,
            "eval/teacher_extraction_failures": 1,
        },
    }
    mixture = {
        "method": "icl_distill",
        "model": "tiny-random",
        "dataset": "synthetic_mixture",
        "metric_set": MixtureEvaluator.metric_set.with_objective("eval/accuracy").to_dict(),
        "metrics": {
            "eval/accuracy": 0.625,
            "eval/teacher_accuracy": 0.75,
            "eval/kl_to_teacher": 0.25,
            **{f"{task}/{k}": v for task, acc in (("sentiment", 0.5), ("topic", 0.75)) for k, v in
               (("accuracy", acc), ("examples", 8), ("teacher_accuracy", 0.75), ("majority_rate", 0.5))},
        },
    }  # fmt: skip
    for record in (exact_match, mixture):
        record |= {"seed": 0, "paper": None, "status": "complete", "model_parameters": 10**6}
    api_runs = []
    for record in [*family_records(), exact_match, mixture]:
        record["finished_at"] = "2026-01-01T00:00:00"
        cell = tmp_path / "files" / record["method"]
        cell.mkdir(parents=True)
        (cell / "metrics.json").write_text(json.dumps(record))
        log_offline_run(record, tmp_path / "wandb" / record["method"], monkeypatch)
        run = read_offline_run(next((tmp_path / "wandb" / record["method"]).rglob("offline-run-*")))
        attrs = {
            "state": "finished",
            "tags": run.tags,
            "config": json.dumps({k: {"value": v} for k, v in run.config.items()}),
            "summaryMetrics": json.dumps(dict(reversed(run.summary.items()))),  # a summary keeps no logging order
        }
        api_runs.append(wandb.apis.public.Run(None, "e", "p", record["method"], attrs, lazy=False))

    class Api:  # the public API's runs of the project, as the server holds them after `wandb sync`
        def runs(self, path, filters=None, lazy=True):
            return api_runs

    monkeypatch.setattr(wandb, "Api", Api)
    from_files, offline, api = collect([tmp_path / "files"]), collect([tmp_path / "wandb"]), api_records("e/p")
    assert [t.family.family for t in summarise(from_files)] == [
        "classification", "exact_match", "link_prediction", "mixture", "prompt_internalization"
    ]  # fmt: skip
    key = lambda r: r["method"]  # noqa: E731
    for a, b, c in zip(*(sorted(records, key=key) for records in (from_files, offline, api))):
        assert a["metrics"] == b["metrics"] == c["metrics"] and a["metric_set"] == b["metric_set"] == c["metric_set"]
    for fmt in ("text", "csv", "markdown", "latex"):
        assert render(summarise(from_files), fmt) == render(summarise(offline), fmt) == render(summarise(api), fmt)
    text = render(summarise(api))
    assert "no answer ↓" in text and "mean acc" in text and "sentiment" in text and "topic" in text


def test_every_evaluator_declares_one_headline_and_its_objective_is_checked(make_cfg):
    from ctxdistill.config import ConfigError
    from ctxdistill.methods import build_method

    declared = [
        Evaluator.metric_set,
        GenerationEvaluator.metric_set,
        MixtureEvaluator.metric_set,
        PromptInternalizationEvaluator.metric_set,
        ContextGeneration.metric_set,
        link_prediction_metrics(),
    ]
    assert [m.headline.name for m in declared] == ["accuracy", "accuracy", "accuracy", "task_success", "written", "mrr"]
    ft = build_method(make_cfg("method=ft", "method.objective=eval/vocab_accuracy").method)
    assert ft.metric_set(Evaluator).objective == "eval/vocab_accuracy"
    ft.objective = "eval/bleu"
    with pytest.raises(ConfigError, match=r"method.objective: eval/bleu is not a metric method=ft reports"):
        ft.metric_set(Evaluator)


# ---------------------------------------------------------------- files, plots, W&B
def grid(tmp_path):
    """Two methods x two model sizes x two seeds on one dataset with an out-of-domain set and serving costs."""
    for i, (method, model, seed) in enumerate(itertools.product(["icl", "cd"], ["opt-1.3b", "opt-125m"], [0, 1])):
        accuracy = 0.6 + 0.1 * (model == "opt-1.3b") + 0.05 * seed - 0.05 * (method == "cd")
        metrics = {"eval/accuracy": accuracy, "eval/examples": 200, "eval/teacher_accuracy": 0.9}
        metrics |= {"eval/majority_rate": 0.5, "hans/accuracy": accuracy / 2, "hans/teacher_accuracy": 0.6}
        metrics |= {k: v * (1 + (method == "icl")) for k, v in SERVING.items()}
        write_run(tmp_path / "runs" / str(i), method, seed, 0, f"2026-01-01T00:00:{i:02d}", model, "mnli", metrics)
    return collect([tmp_path / "runs"])


def test_results_directory_has_readme_tables_and_plots_per_dataset(tmp_path):
    readme = write_results(tmp_path, grid(tmp_path), title="Results: grid")
    text = readme.read_text()
    assert text.startswith("# Results: grid") and "8 complete runs" in text and "95% interval" in text
    table = text[text.index("| method") :].splitlines()
    # model sizes in order (125m before 1.3b), methods in the order they ran
    assert [line.split("|")[1:3] for line in table[2:6]] == [
        [" icl    ", " opt-125m "],
        [" cd     ", " opt-125m "],
        [" icl    ", " opt-1.3b "],
        [" cd     ", " opt-1.3b "],
    ]
    assert "**hans**" in text and "**serving cost per query (teacher: with the context)**" in text
    for plot in ("accuracy_vs_size_mnli.png", "serving_cost_mnli.png"):
        assert f"](results/{plot})" in text
        with Image.open(tmp_path / "results" / plot) as image:
            image.verify()
            assert image.size[0] > 400
    assert (tmp_path / "results" / "table.csv").read_text().count("\n") == 5


def test_models_of_the_same_size_are_plotted_side_by_side_not_on_top_of_each_other(tmp_path):
    """opt-125m and gpt-neo-125m (125M by their names): the comparison's files were lost to a TypeError."""
    from ctxdistill.results.plots import _models

    for i, model in enumerate(("opt-125m", "gpt-neo-125m")):
        write_run(tmp_path / "runs" / model, "cd", 0, 0.6 + i / 10, f"2026-01-01T00:00:0{i}", model, "mnli")
    records = collect([tmp_path / "runs"])
    assert _models(summarise(records)[0].rows)[1:] == ({"gpt-neo-125m": 0, "opt-125m": 1}, False)
    write_results(tmp_path / "out", records, title="Results")
    with Image.open(tmp_path / "out" / "results" / "accuracy_vs_size_mnli.png") as image:
        image.verify()


def test_wandb_report_spec_follows_the_declarations(tmp_path):
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    runs = grid(tmp_path)
    write_run(tmp_path / "rte", "cd", 0, 0.5, "2026-01-01T00:01:00", "opt-125m", "rte")
    kg = family_records()[2]
    report = build_report(
        summarise(runs + collect([tmp_path / "rte"]) + [kg]), entity="me", project="ctxdistill", group="sweep-1"
    )
    assert (report.entity, report.project, report.title) == ("me", "ctxdistill", "ctxdistill: sweep-1")
    headings = [b.text for b in report.blocks if isinstance(b, wr.H2)]
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert headings == ["mnli: classification", "rte: classification", "wn18rr: link_prediction"]
    runset = grids[0].runsets[0]
    conditions = {(f.key.section, f.key.name, f.value) for f in expr.expr_to_filters(runset.filters).filters}
    # the runs the table holds (the sixteenth audit: a stopped attempt or a running run joined the bars)
    assert conditions == {
        ("run", "group", "sweep-1"),
        ("config", "identity.dataset", "mnli"),
        ("run", "state", "finished"),
        ("summary", "status", "complete"),
    }
    assert runset.groupby == ["config.identity.method", "config.identity.model"]
    by_setting = build_report(summarise(runs), entity="me", project="ctxdistill", group="sweep-1", by=["seed"])
    [by_runset] = next(b for b in by_setting.blocks if isinstance(b, wr.PanelGrid)).runsets
    assert by_runset.groupby == ["config.identity.method", "config.identity.model", "config.seed"]  # as --by's rows
    assert "grouped by method, model, seed;" in by_setting.blocks[0].text
    bars = grids[0].panels[0]
    assert bars.metrics == ["eval/accuracy", "hans/accuracy"] and bars.groupby_rangefunc == "stddev"
    assert [p.y.name for p in grids[0].panels if isinstance(p, wr.ScatterPlot)] == ["eval/accuracy", "hans/accuracy"]
    assert grids[2].panels[0].metrics == ["eval/sampled100_mrr"]


def test_the_results_modules_import_no_cycle_and_nothing_above_them():
    package = Path(__file__).parents[1] / "src" / "ctxdistill" / "results"
    graph = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ctxdistill")
        }
        graph[f"ctxdistill.results.{path.stem}"] = imported
    outside = {m for name, deps in graph.items() for m in deps if not m.startswith("ctxdistill.results")}
    assert outside <= {"ctxdistill.tracking"}  # only the command line's W&B mode lookup
    assert {name for name, deps in graph.items() if "ctxdistill.tracking" in deps} == {"ctxdistill.results.cli"}

    def visit(module, path):
        assert module not in path, f"import cycle: {' -> '.join([*path, module])}"
        for dep in graph.get(module, ()):
            visit(dep, [*path, module])

    for module in graph:
        visit(module, [])


def test_settings_that_move_with_the_seed_are_seeds_of_one_setting(tmp_path, capsys):
    """The eighteenth audit: method.seed (${seed}) and Upadhayaya's HANS shuffle (${add:${seed},1}) differ with
    every seed, and each such row was warned of as averaging other settings, advising --by to split it into
    single-seed rows; so was a W&B run's record of the run a forced re-run replaced."""
    for seed in range(3):
        run = tmp_path / f"s{seed}"
        run.mkdir()
        record = {"status": "complete", "method": "cd", "model": "m", "dataset": "mnli", "seed": seed}
        (run / "metrics.json").write_text(json.dumps({**record, "metrics": {"eval/accuracy": 0.5}}))
        config = {"seed": seed, "method": {"seed": seed, "sample_seed": 0}, "dataset": {"hans_seed": seed + 1}}
        config["supersedes_wandb_run"] = f"id{seed}"  # as read back from W&B
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main([str(tmp_path), "--format", "csv"]) == 0
    assert "warning" not in capsys.readouterr().err
    (tmp_path / "s2" / "config.yaml").write_text(
        yaml.safe_dump({"seed": 2, "method": {"seed": 7, "sample_seed": 0}, "dataset": {"hans_seed": 3}})
    )
    assert main([str(tmp_path), "--format", "csv"]) == 0
    assert "averages 3 runs that differ in method.seed 0, 1, 7: not seeds of one setting" in capsys.readouterr().err
    # a setting that is no seed is one, though it moves as the seeds do (the review of the eighteenth audit)
    for seed in range(3):
        config = {"seed": seed, "method": {"seed": seed}, "dataset": {"context": {"num_contexts": seed + 1}}}
        (tmp_path / f"s{seed}" / "config.yaml").write_text(yaml.safe_dump(config))
    assert main([str(tmp_path), "--format", "csv"]) == 0
    assert "differ in dataset.context.num_contexts 1, 2, 3: not seeds" in capsys.readouterr().err


def test_the_readmes_regenerate_command_runs_after_a_comparison_logged_to_wandb(tmp_path, capsys, monkeypatch):
    """--wandb-log --group G --out DIR wrote `ctxdistill-compare RUNS --group G --out DIR`, which --group without
    --wandb refuses: the group names where the tables were logged, and reads nothing."""
    monkeypatch.chdir(tmp_path)  # W&B's offline files
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    runs = tmp_path / "runs" / "s0"
    runs.mkdir(parents=True)
    record = {"status": "complete", "method": "cd", "model": "m", "dataset": "d", "seed": 0}
    (runs / "metrics.json").write_text(json.dumps({**record, "metrics": {"eval/accuracy": 0.5}}))
    assert main([str(tmp_path / "runs"), "--wandb-log", "--group", "g", "--out", str(tmp_path / "out")]) == 0
    readme = (tmp_path / "out" / "README.md").read_text()
    command = re.search(r"Regenerate with `ctxdistill-compare (.+?)`", readme).group(1)
    assert "--group" not in command
    capsys.readouterr()
    assert main(shlex.split(command)) == 0


def test_by_splits_a_methods_runs_by_a_config_key_and_mixed_settings_are_warned_of(tmp_path, capsys):
    for alpha, mrrs in ((0.0, (0.5, 0.6, 0.7)), (1.0, (0.2, 0.2))):
        for seed, mrr in enumerate(mrrs):
            run = tmp_path / f"a{alpha}_s{seed}"
            run.mkdir()
            record = {"status": "complete", "method": "kgbert_cd", "model": "m", "dataset": "d", "seed": seed}
            (run / "metrics.json").write_text(json.dumps({**record, "metrics": {"eval/mrr": mrr}}))
            (run / "config.yaml").write_text(f"method:\n  aux_weight: {alpha}\n")
    assert main([str(tmp_path), "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert "averages 5 runs over seeds [0, 0, 1, 1, 2]" in err and "--by KEY" in err
    assert main([str(tmp_path), "--format", "csv", "--by", "method.aux_weight"]) == 0
    out, err = capsys.readouterr()
    rows = out.splitlines()[1:]
    # t interval over seeds: 0.6 +- t(0.975, 2) * 0.1 / sqrt(3) = 0.6 +- 0.248414; two seeds that agree say
    # nothing of the spread (an MRR has no interval over examples)
    assert rows == [
        "kgbert_cd aux_weight=0.0,m,d,3,,0.6,0.1,0.351586,0.848414,3",
        "kgbert_cd aux_weight=1.0,m,d,2,,0.2,0,,,2",
    ]
    assert "warning" not in err
    # the path after --by's keys (the nineteenth audit: "give run or sweep directories", --by had taken it)
    assert main(["--format", "csv", "--by", "method.aux_weight", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == rows


def test_a_wandb_run_that_crashed_or_was_stopped_is_not_read_back_and_its_attempts_make_one_run(tmp_path, monkeypatch):
    import os
    import signal

    from ctxdistill.methods.distill import ContextDistillation
    from ctxdistill.results.wandb_runs import offline_records, read_offline_run, record_from_wandb
    from ctxdistill.run import run

    from conftest import compose_run

    monkeypatch.delenv("WANDB_MODE", raising=False)
    for setting in ("STATS", "META", "MACHINE_INFO"):
        monkeypatch.setenv(f"WANDB_X_DISABLE_{setting}", "true")
    cfg = compose_run(tmp_path, "trainer.eval_every=1", "logger=wandb", "logger.mode=offline")

    def crash():
        raise RuntimeError("a bug at step 3")

    real_loss = ContextDistillation.loss
    for fault in (crash, lambda: os.kill(os.getpid(), signal.SIGTERM)):  # a failure, then a checkpointed stop
        calls = []

        def loss(self, handle, batch):
            calls.append(1)
            if len(calls) == 3:
                fault()
            return real_loss(self, handle, batch)

        with monkeypatch.context() as patched:
            patched.setattr(ContextDistillation, "loss", loss)
            with pytest.raises((RuntimeError, SystemExit)):
                run(cfg)
    run(cfg)
    run(cfg)  # again, over the complete run: a W&B run of its own, which replaces the third as metrics.json does
    [record] = offline_records(tmp_path / "wandb")
    assert record["metrics"] == json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    # the run made again replaces the earlier one: its attempts move aside, out of `wandb sync --sync-all`
    [current] = [read_offline_run(d) for d in (tmp_path / "wandb").glob("offline-run-*")]
    attempts = [read_offline_run(d) for d in sorted((tmp_path / "wandb" / "superseded").glob("offline-run-*"))]
    attempts.append(current)
    assert [a.finished for a in attempts] == [False, False, True, True]
    assert all("eval/accuracy" in a.summary for a in attempts)  # the stopped ones' from a periodic evaluation
    assert [a.summary.get("status") for a in attempts] == [None, None, "complete", "complete"]
    # the attempts that resume from a checkpoint continue one W&B run; the one that starts over at step 0 gets
    # its own (under the old id W&B would drop every step it logs below the old run's last), naming the one
    # it replaces
    ids = [a.run_id for a in attempts]
    assert ids[0] == ids[1] == ids[2] != ids[3]
    assert current.config["supersedes_wandb_run"] == ids[0] and "supersedes_wandb_run" not in attempts[2].config
    # read through the public API with its old exit code 0, the stopped attempt is still not a run
    assert record_from_wandb(attempts[1].config, attempts[1].summary, finished=True) is None


def test_a_run_made_again_and_stopped_gives_no_row_from_w_and_b_either(tmp_path, monkeypatch, capsys):
    # found by the fifteenth audit: the replaced run, set aside in wandb/superseded, was still read back, so a
    # directory whose re-run (force=true) had stopped gave the old run's row from its W&B files
    from ctxdistill.methods.distill import ContextDistillation
    from ctxdistill.results.wandb_runs import offline_records
    from ctxdistill.run import run

    from conftest import compose_run

    monkeypatch.delenv("WANDB_MODE", raising=False)
    for setting in ("STATS", "META", "MACHINE_INFO"):
        monkeypatch.setenv(f"WANDB_X_DISABLE_{setting}", "true")
    run(compose_run(tmp_path, "logger=wandb", "logger.mode=offline"))
    [record] = offline_records(tmp_path / "wandb")
    # the versions line a sweep's README writes reads the run's provenance, from W&B as from metrics.json
    assert record["provenance"] == json.loads((tmp_path / "metrics.json").read_text())["provenance"]

    def crash(self, handle, batch):
        raise RuntimeError("a bug at the first step")

    monkeypatch.setattr(ContextDistillation, "loss", crash)
    with pytest.raises(RuntimeError):
        run(compose_run(tmp_path, "logger=wandb", "logger.mode=offline", "force=true", "trainer.lr=0.05"))
    assert list((tmp_path / "wandb" / "superseded").glob("offline-run-*"))
    assert offline_records(tmp_path / "wandb") == []
    assert main([str(tmp_path)]) == 1 and "no complete metrics.json" in capsys.readouterr().err


def test_an_offline_run_file_cut_short_is_named_with_what_was_lost_not_dropped_in_silence(
    tmp_path, capsys, monkeypatch
):
    """A real offline run file cut in half (a copy cut short, a full disk) loses its final summary and exit: the run
    is left out of the table, and the warning says which file, what was lost and what to give instead."""
    classification, _, kg = family_records()
    whole = log_offline_run(classification, tmp_path / "cd", monkeypatch)
    cut = log_offline_run(kg, tmp_path / "kgbert", monkeypatch)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    assert main([str(tmp_path), "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert [row.split(",")[0] for row in out.splitlines()[1:]] == ["cd"]
    assert f"warning: {cut}: cut off or damaged at byte " in err and str(whole) not in err
    assert "the run is not read as complete and is left out" in err and "(its metrics.json) instead" in err
    assert "1 unreadable run file(s)" in err and main([str(tmp_path), "--strict"]) == 1
    whole.write_bytes(b"not a run file")
    assert main([str(tmp_path / "cd")]) == 1
    assert f"warning: {whole}: unreadable ({whole} is not a W&B run file" in capsys.readouterr().err


def test_every_offline_attempt_of_a_replaced_run_is_set_aside_also_one_w_and_b_numbered(tmp_path):
    # Two attempts that start within the same second: W&B names the second's folder with a "-1" suffix.
    from ctxdistill.tracking import set_aside_offline_runs

    attempts = ["offline-run-20261206_031359-oyuud82p", "offline-run-20261206_031359-oyuud82p-1"]
    others = ["offline-run-20261206_031402-f8zf4j6n", "offline-run-20261206_031402-xoyuud82p"]
    for name in attempts + others:
        (tmp_path / name).mkdir()
    moved = set_aside_offline_runs(tmp_path, "oyuud82p")
    assert [p.name for p in moved] == attempts and all(p.parent.name == "superseded" for p in moved)
    assert sorted(p.name for p in tmp_path.glob("offline-run-*")) == others


def test_a_run_replaced_online_is_tagged_and_leaves_its_group():
    from types import SimpleNamespace

    from ctxdistill.tracking import mark_superseded_online

    updates = []
    earlier = SimpleNamespace(tags=["cd"], group="demo", update=lambda: updates.append((earlier.tags, earlier.group)))
    mark_superseded_online(earlier, "demo")  # the fields wandb's public Run.update() sends to the server
    assert updates == [(["cd", "superseded"], "superseded:demo")]


def test_runs_read_from_wandb_keep_the_last_complete_run_of_each_output_dir():
    """The API path's rule, as the offline one's: a run made again in its dir (force=true) replaces it."""
    from ctxdistill.results.wandb_runs import latest_per_run_dir

    def record(output_dir, finished_at, accuracy):
        return {
            "config": {"output_dir": output_dir},
            "finished_at": finished_at,
            "metrics": {"eval/accuracy": accuracy},
        }

    records = [
        record("/runs/a", "2026-12-05T10:00:00", 0.5),
        record("/runs/a", "2026-12-05T12:00:00", 0.7),  # the re-run
        record("/runs/b", "2026-12-05T11:00:00", 0.6),
        record(None, "2026-12-05T09:00:00", 0.4),  # no dir recorded: a run of its own
        record(None, "2026-12-05T09:00:00", 0.3),
    ]
    kept = latest_per_run_dir(records)
    assert sorted(r["metrics"]["eval/accuracy"] for r in kept) == [0.3, 0.4, 0.6, 0.7]


def test_a_run_of_several_rounds_read_from_wandb_has_only_its_final_metrics():
    """sequential_cd logs each earlier round's evaluation as round/eval/...; its metrics.json keeps those under
    "rounds", so from W&B they are no block of their own (they were: a "round/eval" block only W&B's copy had)."""
    from ctxdistill.results.wandb_runs import record_from_wandb

    config = {"method": {"name": "sequential_cd"}, "model": {"name": "m"}, "dataset": {"name": "d"}, "seed": 0}
    summary = {
        "eval/accuracy": 0.7,
        "eval/examples": 200,
        "round/eval/accuracy": 0.6,
        "round/eval/examples": 200,
        "round": 1,
        "train/loss": 0.1,
        "model/parameters": 10,
        "status": "complete",
        "_timestamp": 1.8e9,
    }
    record = record_from_wandb(config, summary, finished=True)
    assert record["metrics"] == {"eval/accuracy": 0.7, "eval/examples": 200}


def test_a_runs_evaluation_again_is_not_one_more_seed_but_can_be_compared_on_its_own(make_cfg, tmp_path, capsys):
    from ctxdistill.evaluate_run import evaluate_run
    from ctxdistill.run import run

    from conftest import TINY

    for seed in (0, 1):
        run(make_cfg(*TINY, "method=cd", "trainer.max_steps=2", f"seed={seed}", output_dir=tmp_path / f"s{seed}"))
    evaluate_run(tmp_path / "s0", [], "again")  # what `ctxdistill-eval RUN_DIR` writes
    assert main([str(tmp_path), "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert [row["seeds"] for row in csv.DictReader(io.StringIO(out))] == ["2"] and "warning" not in err
    assert main([str(tmp_path / "s0" / "evaluations" / "again"), "--format", "csv"]) == 0
    assert [row["seeds"] for row in csv.DictReader(io.StringIO(capsys.readouterr().out))] == ["1"]


def test_by_refuses_a_key_no_runs_config_has_naming_the_nearest(make_cfg, tmp_path, capsys):
    from ctxdistill.run import run

    from conftest import TINY

    for lr in ("1e-3", "2e-3"):
        run(make_cfg(*TINY, "method=cd", "trainer.max_steps=2", f"trainer.lr={lr}", output_dir=tmp_path / lr))
    capsys.readouterr()
    assert main([str(tmp_path), "--format", "csv", "--by", "trainer.lrr"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: --by trainer.lrr: no run's config has this key; did you mean trainer.lr?\n"
    assert main([str(tmp_path), "--format", "csv", "--by", "trainer.lr"]) == 0
    assert [row["method"] for row in csv.DictReader(io.StringIO(capsys.readouterr().out))] == [
        "cd lr=0.001",
        "cd lr=0.002",
    ]


def test_vs_refuses_rows_of_runs_sharing_a_seed_and_pairs_each_setting_with_by(make_cfg, tmp_path, capsys):
    from ctxdistill.run import run

    from conftest import TINY

    for method, data_seed in itertools.product(("cd", "zero_shot"), (0, 1, 2)):
        overrides = [*TINY, f"method={method}", "trainer.max_steps=2", f"dataset.context.data_seed={data_seed}"]
        run(make_cfg(*overrides, output_dir=tmp_path / f"{method}-{data_seed}"))
    capsys.readouterr()
    assert main([str(tmp_path), "--vs", "zero_shot"]) == 2
    err = capsys.readouterr().err
    assert "cd / tiny-random / synthetic averages 3 runs over seeds [0, 0, 0]" in err  # the table's warning
    assert "error: --vs pairs one run per seed on each side" in err and "--by KEY" in err
    assert main([str(tmp_path), "--vs", "zero_shot", "--by", "dataset.context.data_seed", "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    rows = {row["method"]: row for row in csv.DictReader(io.StringIO(out))}
    assert "warning" not in err and len(rows) == 6
    for data_seed in (0, 1, 2):  # each against zero_shot's run of its own data seed, on all 48 examples
        tested, baseline = rows[f"cd data_seed={data_seed}"], rows[f"zero_shot data_seed={data_seed}"]
        assert tested["eval/pairs_vs_zero_shot"] == tested["eval/examples"] == "48"
        difference = float(tested["eval/accuracy_mean"]) - float(baseline["eval/accuracy_mean"])
        assert float(tested["eval/delta_vs_zero_shot"]) == pytest.approx(difference, abs=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/nowhere"], "no such path: {tmp}/nowhere"),
        (["{tmp}", "--out", "{tmp}/file/results"], "--out {tmp}/file/results: cannot write into it (Not a directory)"),
        (["{tmp}", "--out", "{tmp}/file"], "--out {tmp}/file: it is a file, not a directory"),
        (["{tmp}", "--out", "/proc"], "--out /proc: cannot write into it"),  # a directory no one can write into
        (["{tmp}", "--paper", "snell2022"], "--paper and --model-as belong to --scorecard"),
        (["{tmp}", "--wandb-log", "--project", "a/b/c"], "--project a/b/c: give PROJECT or ENTITY/PROJECT"),
        (["{tmp}", "--project", "p"], "--project names where --wandb-log logs to: give --wandb-log too"),
        (["{tmp}", "--wandb-log"], "--wandb-log: WANDB_MODE=disabled turns W&B off, so nothing would be logged"),
        # the eighteenth audit: it filtered nothing, without a word
        (["{tmp}", "--group", "g"], "--group g selects runs read through W&B's API (--wandb ENTITY/PROJECT)"),
    ],
)
def test_compare_refuses_bad_arguments_with_one_line_before_reading_runs(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    (tmp_path / "file").write_text("")  # a file where --out wants a directory
    with pytest.raises(SystemExit) as stopped:
        main([a.format(tmp=tmp_path) for a in args])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and "Traceback" not in err


@pytest.mark.parametrize("path", ["my-team", "my-team/ctxdistill/extra", "/ctxdistill"])
def test_a_malformed_wandb_path_is_refused_before_w_and_b_is_called(path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--wandb", path, "--group", "g"])
    assert exit.value.code == 2
    assert f"--wandb {path}: give ENTITY/PROJECT" in capsys.readouterr().err


def test_model_as_naming_no_runs_model_is_an_error(tmp_path, capsys):
    write_run(tmp_path / "a", "cd", 0, 0.5, "2026-01-01T00:00:01", model="opt-125m")
    assert main([str(tmp_path), "--scorecard", "--paper", "snell2022", "--model-as", "smollm2=opt-125m"]) == 2
    err = capsys.readouterr().err
    assert "--model-as smollm2=opt-125m: no run has model smollm2 (the runs' models: opt-125m)" in err


def test_vs_over_a_run_directory_without_predictions_names_it_and_how_to_write_them(tmp_path, capsys):
    write_run(tmp_path / "cd", "cd", 0, 0.8, "2026-01-01T00:00:01")
    write_run(tmp_path / "icl", "icl", 0, 0.6, "2026-01-01T00:00:02")  # neither wrote predictions.jsonl
    assert main([str(tmp_path), "--vs", "icl"]) == 2
    err = capsys.readouterr().err
    assert f"has none in {tmp_path / 'cd'}: evaluate the run again (ctxdistill-eval {tmp_path / 'cd'})" in err


def test_model_as_naming_a_model_the_paper_does_not_report_is_an_error_naming_its_models(tmp_path, capsys):
    write_run(tmp_path / "a", "cd", 0, 0.5, "2026-01-01T00:00:01", model="smollm2")
    assert main([str(tmp_path), "--scorecard", "--paper", "snell2022", "--model-as", "smollm2=t5-smal"]) == 2
    out, err = capsys.readouterr()
    assert "--model-as smollm2=t5-smal: snell2022 reports no model t5-smal (its models: incoder-6.7b, t5-small" in err
    assert out == ""  # before the tables


@pytest.mark.parametrize("offline", ["no login", "no network"])
def test_reading_wandb_without_login_or_network_names_the_problem_and_the_local_alternative(
    offline, tmp_path, capsys, monkeypatch
):
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no W&B settings: not logged in
    if offline == "no network":

        def unreachable(*args, **kwargs):
            raise wandb.errors.CommError("Network error (ConnectionError), entering retry loop")

        monkeypatch.setattr(wandb, "Api", unreachable)
    assert main(["--wandb", "me/proj", "--group", "g"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --wandb me/proj: cannot read runs from W&B (") and "Traceback" not in err
    assert "needs network and a login (`wandb login`, or WANDB_API_KEY)" in err
    assert "give the runs' directories instead: run or sweep directories, or RUN_DIR/wandb" in err


def test_logging_to_wandb_online_without_a_login_says_so_after_the_tables(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "online")
    write_run(tmp_path / "a", "cd", 0, 0.5, "2026-01-01T00:00:01")
    assert main([str(tmp_path / "a"), "--wandb-log"]) == 1
    out, err = capsys.readouterr()
    assert "| accuracy" in out or "accuracy" in out
    assert "could not log to W&B in online mode (" in err and "WANDB_MODE=offline logs under ./wandb" in err
    assert "Traceback" not in err


def test_runs_of_a_sweep_without_results_are_named_and_left_out_not_dropped_quietly(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    write_run(sweep / "icl", "icl", 0, 0.6, "2026-01-01T00:00:01")
    (sweep / "icl" / ".hydra").mkdir()
    (sweep / "icl" / ".hydra" / "config.yaml").write_text("")  # Hydra's record of the run, not a run
    (sweep / "icl" / "evaluations" / "again").mkdir(parents=True)
    (sweep / "icl" / "evaluations" / "again" / "config.yaml").write_text("")  # an evaluation cut short: no cell
    (sweep / "killed").mkdir(parents=True)
    (sweep / "killed" / "config.yaml").write_text("method: {name: cd}\n")  # started, never finished
    (sweep / "failed").mkdir()
    (sweep / "failed" / "failure.json").write_text(json.dumps({"error": "DataError: no such file x.jsonl\n..."}))
    write_run(sweep / "refused", "cd", 0, 0.9, "2026-01-01T00:00:02")  # complete once; its latest attempt failed
    (sweep / "refused" / "failure.json").write_text(json.dumps({"error": "ConfigError: a different config"}))
    assert main([str(sweep), "--format", "csv", "--out", str(sweep)]) == 0
    out, err = capsys.readouterr()
    assert [row["method"] for row in csv.DictReader(io.StringIO(out.split("\n\n")[0]))] == ["icl"]
    assert f"warning: left out {sweep / 'failed'}: failed (DataError: no such file x.jsonl; its traceback is in " in err
    assert f"warning: left out {sweep / 'refused'}: failed (ConfigError: a different config;" in err
    assert f"warning: left out {sweep / 'killed'}: no complete metrics.json: it stopped before it finished" in err
    assert err.count("warning: left out") == 3
    assert "3 run(s) without results left out (listed above): run their ctxdistill command again to finish" in err
    assert "**3 failed cells**" in (sweep / "README.md").read_text()
    assert main([str(sweep), "--strict"]) == 1


def test_qqp_reports_f1_of_the_duplicate_class_with_its_bootstrap_interval_and_only_where_declared(make_cfg, tmp_path):
    """GLUE scores QQP by accuracy and F1 of the duplicate class (1): the dataset declares it (``f1_positive``), every
    eval set reports it with its 95% percentile-bootstrap interval over the examples, and only such a task's table
    has the column. F1 by hand (sklearn is not installed: f1_score(labels, predictions, pos_label=1) is this
    2 TP / (2 TP + FP + FN)); the bootstrap against a plain loop over the same seeded resamples."""
    import numpy

    from ctxdistill.evaluation import classification_metrics
    from ctxdistill.results.stats import bootstrap_f1

    assert (make_cfg("dataset=qqp").dataset.f1_positive, make_cfg("dataset=rte").dataset.f1_positive) == (1, None)
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0] * 5
    predictions = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0] * 5  # per 10: TP 3, FN 1, FP 2, TN 4
    result = classification_metrics(torch.tensor(predictions), torch.tensor(labels), 2, f1_positive=1)
    assert result["f1"] == pytest.approx(2 * 15 / (2 * 15 + 10 + 5)) and result["accuracy"] == pytest.approx(0.7)
    assert "f1" not in classification_metrics(torch.tensor(predictions), torch.tensor(labels), 2)  # RTE: not declared
    draws = numpy.random.default_rng(0).integers(0, 50, size=(1000, 50))
    resampled = []
    for draw in draws:
        pairs = [(predictions[i], labels[i]) for i in draw]
        tp, fp, fn = (sum(pair == wanted for pair in pairs) for wanted in ((1, 1), (1, 0), (0, 1)))
        resampled.append(2 * tp / (2 * tp + fp + fn))
    resampled.sort()
    # numpy's default percentile: linear between the order statistics at (B - 1) q
    low, high = (resampled[int(q * 999)] + (q * 999 % 1) * (resampled[int(q * 999) + 1] - resampled[int(q * 999)])
                 for q in (0.025, 0.975))  # fmt: skip
    assert bootstrap_f1(predictions, labels, 1) == pytest.approx((result["f1"], low, high))
    assert (result["f1_bootstrap_low"], result["f1_bootstrap_high"]) == pytest.approx((low, high))
    assert low < result["f1"] < high and high - low < 0.4
    qqp = with_task_metrics(Evaluator.metric_set, SimpleNamespace(f1_positive=1, votes=1))
    assert with_task_metrics(Evaluator.metric_set, SimpleNamespace(f1_positive=None, votes=3)) == Evaluator.metric_set
    # one draw per query: no single-draw accuracy is reported, so none is declared (nor selectable)
    unvoted = with_task_metrics(Evaluator.metric_set, SimpleNamespace(f1_positive=None, votes=1))
    assert [m.name for m in Evaluator.metric_set.metrics if m not in unvoted.metrics] == ["single_draw_accuracy"]
    rte_result = classification_metrics(torch.tensor(predictions), torch.tensor(labels), 2)
    for name, declared, reported in (("qqp", qqp, result), ("rte", Evaluator.metric_set, rte_result)):
        record = {"method": "icl", "model": "opt-125m", "dataset": name, "seed": 0, "status": "complete"}
        metrics = {f"{s}/{k}": v for s in ("eval", "paws_qqp") for k, v in {**reported, "examples": 50}.items()}
        record |= {"metric_set": declared.to_dict(), "metrics": metrics}
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(record))
    [rte_alone] = summarise(collect([tmp_path / "rte"]))
    assert "F1" not in {c.metric.label for c in rte_alone.columns}
    [table] = summarise(collect([tmp_path]))
    assert [c.key for c in table.columns if c.metric.name == "f1"] == ["eval/f1", "paws_qqp/f1"]
    qqp_row, rte_row = sorted(table.rows, key=lambda r: r.dataset)
    assert qqp_row.cells["eval/f1"].interval == pytest.approx((low, high))
    assert qqp_row.cells["paws_qqp/f1"].interval == pytest.approx((low, high))
    assert "eval/f1" not in rte_row.cells  # shown as -


# ---------------------------------------------------------------- each row's headline: its method's objective
@pytest.fixture(scope="module")
def mosbach_runs(tmp_path_factory):
    """pbft (objective eval/vocab_accuracy, llmft's fine-tuning score) and icl (eval/accuracy, its answer-word score)
    on the tiny random model, as a Mosbach sweep's cells write them: 4 steps at lr 1e-3 move pbft's vocab accuracy
    (0.5) away from icl's (0) while their accuracies agree (0.5), so a difference says which metric it is of."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ctxdistill.cli import CONFIG_DIR
    from ctxdistill.run import run

    from conftest import TINY

    runs = tmp_path_factory.mktemp("mosbach")
    for method, training in (("icl", []), ("pbft", ["trainer.max_steps=4", "trainer.lr=1e-3"])):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            run(compose("config", overrides=[f"output_dir={runs / method}", *TINY, f"method={method}", *training]))
    GlobalHydra.instance().clear()
    return runs


def read_csv(args, capsys) -> dict[str, dict[str, str]]:
    assert main([*args, "--format", "csv"]) == 0
    return {row["method"]: row for row in csv.DictReader(io.StringIO(capsys.readouterr().out))}


def test_a_runs_recorded_headline_is_its_objective_with_its_outcome_per_example(mosbach_runs):
    pbft = json.loads((mosbach_runs / "pbft" / "metrics.json").read_text())
    declared = MetricSet.from_dict(pbft["metric_set"])
    assert (declared.objective, declared.headline.name) == ("eval/vocab_accuracy", "vocab_accuracy")
    rows = [json.loads(line) for line in (mosbach_runs / "pbft" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == pbft["metrics"]["eval/examples"] == 48
    assert pbft["metrics"]["eval/vocab_accuracy"] == pytest.approx(statistics.fmean(r["vocab_correct"] for r in rows))
    icl = json.loads((mosbach_runs / "icl" / "metrics.json").read_text())
    assert MetricSet.from_dict(icl["metric_set"]).headline.name == "accuracy"


def test_each_row_is_judged_by_its_own_headline_and_a_mosbach_table_names_each(mosbach_runs, tmp_path, capsys):
    import wandb_workspaces.reports.v2 as wr

    rows = read_csv([str(mosbach_runs), "--vs", "icl"], capsys)
    assert (rows["pbft"]["headline"], rows["icl"]["headline"]) == ("vocab_accuracy", "accuracy")
    # the paired test is of pbft's headline, which icl's runs record per example too: the difference in vocab accuracy
    pbft, icl = rows["pbft"], rows["icl"]
    assert pbft["eval/metric_vs_icl"] == "vocab_accuracy" and pbft["eval/pairs_vs_icl"] == "48"
    vocab_difference = float(pbft["eval/vocab_accuracy_mean"]) - float(icl["eval/vocab_accuracy_mean"])
    assert float(pbft["eval/delta_vs_icl"]) == pytest.approx(vocab_difference, abs=1e-6)
    assert vocab_difference == 0.5 and float(pbft["eval/accuracy_mean"]) - float(icl["eval/accuracy_mean"]) == 0
    [table] = summarise(collect([mosbach_runs]))
    reported = {m: json.loads((mosbach_runs / m / "metrics.json").read_text())["metrics"] for m in ("pbft", "icl")}
    assert {row.method: (row.headline.name, row.cells[f"eval/{row.headline.name}"].mean) for row in table.rows} == {
        "pbft": ("vocab_accuracy", reported["pbft"]["eval/vocab_accuracy"]),
        "icl": ("accuracy", reported["icl"]["eval/accuracy"]),
    }
    for fmt in ("text", "markdown"):
        assert main([str(mosbach_runs), "--vs", "icl", "--format", fmt]) == 0
        in_domain = capsys.readouterr().out.split("\n\n")[1 if fmt == "markdown" else 0]  # markdown: title, table
        lines = [re.split(r"\s*\|\s*|\s{2,}", line.strip("| ")) for line in in_domain.splitlines()]
        header = next(line for line in lines if line[0] == "method")
        by_method = {line[0]: dict(zip(header, line)) for line in lines if line[0] in ("pbft", "icl")}
        assert (by_method["pbft"]["headline"], by_method["icl"]["headline"]) == ("vocab acc", "accuracy")
        assert "Δ vocab acc vs icl" in header
    assert main([str(mosbach_runs), "--vs", "icl", "--format", "latex"]) == 0
    spec, _, heading = capsys.readouterr().out.splitlines()[1:4]
    columns = heading.count(" & ") + 1
    assert spec == r"\begin{tabular}{lllrl" + "r" * (columns - 5) + "}"  # the headline's names left, figures right
    write_results(tmp_path, collect([mosbach_runs]), title="Mosbach")
    assert (tmp_path / "results" / "headline_vs_size_synthetic.png").is_file()
    assert not (tmp_path / "results" / "accuracy_vs_size_synthetic.png").exists()
    report = build_report([table], entity="me", project="ctxdistill", group="mosbach")
    bars = next(b for b in report.blocks if isinstance(b, wr.PanelGrid)).panels[0]
    assert bars.metrics == ["eval/accuracy", "eval/vocab_accuracy"] and bars.title.endswith(
        "accuracy / vocab acc by method and model"
    )


def test_metric_judges_every_row_by_one_metric_and_an_unknown_one_is_named(mosbach_runs, tmp_path, capsys):
    rows = read_csv([str(mosbach_runs), "--vs", "icl", "--metric", "accuracy"], capsys)
    pbft, icl = rows["pbft"], rows["icl"]
    assert "headline" not in pbft and pbft["eval/metric_vs_icl"] == "accuracy"
    difference = float(pbft["eval/accuracy_mean"]) - float(icl["eval/accuracy_mean"])
    assert float(pbft["eval/delta_vs_icl"]) == pytest.approx(difference, abs=1e-6)
    assert main([str(mosbach_runs), "--vs", "icl", "--metric", "accuracy"]) == 0
    assert "Δ accuracy vs icl" in capsys.readouterr().out
    assert main([str(mosbach_runs), "--metric", "bleu"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: --metric bleu: no run reports it; give one the runs report: accuracy, ")
    assert len(err.splitlines()) == 1 and "vocab_accuracy" in err and "Traceback" not in err
    # a seed of pbft run with another objective: the row is judged by its first run's, and says so
    shutil.copytree(mosbach_runs, tmp_path / "runs")
    other = json.loads((mosbach_runs / "pbft" / "metrics.json").read_text())
    other |= {"seed": 1, "finished_at": "2099-01-01T00:00:00"}
    other["metric_set"] = MetricSet.from_dict(other["metric_set"]).with_objective("eval/accuracy").to_dict()
    (tmp_path / "runs" / "pbft-1").mkdir()
    (tmp_path / "runs" / "pbft-1" / "metrics.json").write_text(json.dumps(other))
    assert read_csv([str(tmp_path / "runs")], capsys)["pbft"]["headline"] == "vocab_accuracy"
    assert main([str(tmp_path / "runs")]) == 0
    assert (
        "warning: pbft / tiny-random / synthetic: its runs' headlines differ (vocab_accuracy, accuracy); the row's is "
        "its first run's, vocab_accuracy: tell the runs apart with --by method.objective"
    ) in capsys.readouterr().err
    assert main([str(tmp_path / "runs"), "--metric", "accuracy"]) == 0
    assert "headlines differ" not in capsys.readouterr().err


def as_written_before_headlines_followed_objectives(run_dir: Path) -> None:
    """The run's metrics.json and predictions.jsonl as written before 7 Dec 2026: the evaluator's headline
    (accuracy) whatever the objective, the set's one per-example outcome, no vocab outcome per example."""
    record = json.loads((run_dir / "metrics.json").read_text())
    declared = record["metric_set"]
    for metric in declared["metrics"]:
        metric["headline"] = metric["name"] == "accuracy"
        del metric["outcome"], metric["example_score"]
    declared |= {"outcome": ["prediction", "label"], "example_score": None}
    (run_dir / "metrics.json").write_text(json.dumps(record))
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in row.items() if k != "vocab_correct"} for row in rows]
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_runs_written_before_are_judged_by_their_objective_and_vs_says_which_metric_it_tests(
    mosbach_runs, tmp_path, capsys
):
    old = tmp_path / "old"
    shutil.copytree(mosbach_runs, old)
    for method in ("pbft", "icl"):
        as_written_before_headlines_followed_objectives(old / method)
    rows = read_csv([str(old), "--vs", "icl"], capsys)
    assert (rows["pbft"]["headline"], rows["pbft"]["eval/metric_vs_icl"]) == ("vocab_accuracy", "accuracy")
    assert main([str(old), "--vs", "icl"]) == 0
    out, err = capsys.readouterr()
    assert (
        "--vs: pbft / tiny-random / synthetic: tested on accuracy, not on its headline vocab_accuracy: no run records "
        "it per example"
    ) in err
    header = next(re.split(r"\s{2,}", line) for line in out.splitlines() if line.startswith("method"))
    assert header[4] == "headline" and "Δ accuracy vs icl" in header
    (old / "icl" / "metrics.json").write_text((mosbach_runs / "icl" / "metrics.json").read_text())
    assert main([str(old), "--vs", "icl"]) == 0
    assert "vocab_accuracy: pbft's runs do not record it per example (evaluated before" in capsys.readouterr().err
