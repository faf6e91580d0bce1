"""The comparison table: mean ± std over seeds per method x model x dataset, its formats, plots and W&B outputs."""

import itertools
import json

import pytest
from PIL import Image

from ctxdistill.compare import collect, main, summarise, write_results
from ctxdistill.wandb_results import build_report


def write_run(directory, method, seed, accuracy, finished, model="m", dataset="d"):
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
                "metrics": {
                    "eval/accuracy": accuracy,
                    "eval/teacher_agreement": 1.0,
                    "eval/kl_to_teacher": 0.5,
                    "eval/teacher_accuracy": 0.9,
                    "eval/majority_rate": 0.5,
                    "hans/accuracy": accuracy / 2,
                    "hans/teacher_accuracy": 0.6,
                    "hans/majority_rate": 0.5,
                },
            }
        )
    )


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


def test_csv_and_latex_output_and_an_empty_directory(tmp_path, capsys):
    write_run(tmp_path / "a", "cd", 0, 0.75, "2026-01-01T00:00:01", model="opt-125m", dataset="mnli")
    write_run(tmp_path / "b", "cd", 1, 0.65, "2026-01-01T00:00:02", model="opt-125m", dataset="mnli")
    write_run(tmp_path / "c", "zero_shot", 0, 0.5, "2026-01-01T00:00:03", model="opt-125m", dataset="mnli")
    assert main([str(tmp_path), "--format", "csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("method,model,dataset,seeds,eval/accuracy_mean,eval/accuracy_std,")
    assert out[1].startswith("cd,opt-125m,mnli,2,0.7,0.0707107,") and out[2].startswith(
        "zero_shot,opt-125m,mnli,1,0.5,,"
    )
    assert main([str(tmp_path), "--format", "latex"]) == 0
    latex = capsys.readouterr().out.splitlines()
    assert latex[0].startswith(r"\begin{tabular}{lllr") and latex[1] == r"\toprule"
    assert latex[4].startswith(r"cd & opt-125m & mnli & 2 & $0.700 \pm 0.071$ & ")
    assert latex[5].startswith(r"zero\_shot & opt-125m & mnli & 1 & 0.500 & ") and latex[-1] == r"\end{tabular}"
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1


def test_a_cut_short_metrics_file_is_named_and_skipped_and_the_good_runs_are_shown(tmp_path, capsys):
    write_run(tmp_path / "good", "cd", 0, 0.7, "2026-01-01T00:00:01", model="opt-125m", dataset="mnli")
    broken = tmp_path / "broken" / "metrics.json"
    broken.parent.mkdir()
    broken.write_text('{"method": "cd", "status": "compl')  # a run killed while writing
    assert main([str(tmp_path), "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert f"warning: skipping {broken}: unreadable" in captured.err
    assert captured.out.splitlines()[1].startswith("cd,opt-125m,mnli,1,0.7,")
    assert main([str(tmp_path), "--strict"]) == 1
    assert main([str(tmp_path / "broken")]) == 1  # nothing readable


def grid(tmp_path):
    """Two methods x two model sizes x two seeds on one dataset with an out-of-domain set."""
    for i, (method, model, seed) in enumerate(itertools.product(["icl", "cd"], ["opt-1.3b", "opt-125m"], [0, 1])):
        accuracy = 0.6 + 0.1 * (model == "opt-1.3b") + 0.05 * seed - 0.05 * (method == "cd")
        write_run(tmp_path / "runs" / str(i), method, seed, accuracy, f"2026-01-01T00:00:{i:02d}", model, "mnli")
    return collect([tmp_path / "runs"])


def test_results_directory_has_readme_tables_and_plots_per_dataset(tmp_path):
    readme = write_results(tmp_path, grid(tmp_path), title="Results: grid")
    text = readme.read_text()
    assert text.startswith("# Results: grid") and "8 complete runs" in text
    table = text[text.index("| method") :].splitlines()
    # model sizes in order (125m before 1.3b), methods in the order they ran
    assert [line.split("|")[1:3] for line in table[2:6]] == [
        [" icl    ", " opt-125m "],
        [" cd     ", " opt-125m "],
        [" icl    ", " opt-1.3b "],
        [" cd     ", " opt-1.3b "],
    ]
    assert "hans acc" in table[0] and "hans teacher acc" in table[0] and "hans majority" in table[0]
    for plot in ("accuracy_vs_size_mnli.png", "teacher_gap_mnli.png"):
        assert f"](results/{plot})" in text
        with Image.open(tmp_path / "results" / plot) as image:
            image.verify()


def test_wandb_report_spec_has_a_section_per_dataset_filtered_to_the_group(tmp_path):
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    runs = grid(tmp_path)
    write_run(tmp_path / "rte", "cd", 0, 0.5, "2026-01-01T00:01:00", "opt-125m", "rte")
    report = build_report(
        summarise(runs + collect([tmp_path / "rte"])), entity="me", project="ctxdistill", group="sweep-1"
    )
    assert (report.entity, report.project, report.title) == ("me", "ctxdistill", "ctxdistill: sweep-1")
    headings = [b.text for b in report.blocks if isinstance(b, wr.H2)]
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert headings == ["mnli", "rte"] and len(grids) == 2
    runset = grids[0].runsets[0]
    conditions = {(f.key.section, f.key.name, f.value) for f in expr.expr_to_filters(runset.filters).filters}
    assert conditions == {("run", "group", "sweep-1"), ("config", "dataset.name", "mnli")}
    assert runset.groupby == ["config.method.name", "config.model.name"]
    bars = grids[0].panels[0]
    assert bars.metrics == ["eval/accuracy", "hans/accuracy"] and bars.groupby_rangefunc == "stddev"
    scatter_y = [p.y.name for p in grids[0].panels if isinstance(p, wr.ScatterPlot)]
    assert scatter_y == ["eval/accuracy", "hans/accuracy"]


def test_a_mean_over_seeds_gets_its_95_percent_t_interval():
    from ctxdistill.compare import Stat

    three = Stat([0.5, 0.6, 0.7])  # std 0.1; t(0.975, 2) = 4.303
    assert three.half_width95 == pytest.approx(4.303 * 0.1 / 3**0.5)
    assert three.interval_text() == "0.600 [0.352, 0.848]"
    assert Stat([0.5, 0.5]).interval_text() == "0.500 [0.500, 0.500]" and Stat([0.5]).interval_text() == "0.500"


def test_seed_intervals_groups_runs_by_a_config_key(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "sweeps" / "seed_intervals.py"
    spec = importlib.util.spec_from_file_location("seed_intervals", script)
    seed_intervals = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed_intervals)
    for alpha, mrrs in ((0.0, (0.5, 0.6, 0.7)), (1.0, (0.2, 0.2))):
        for seed, mrr in enumerate(mrrs):
            run = tmp_path / f"a{alpha}_s{seed}"
            run.mkdir()
            record = {"status": "complete", "method": "kgbert_cd", "model": "m", "dataset": "d", "seed": seed}
            (run / "metrics.json").write_text(json.dumps({**record, "metrics": {"eval/mrr": mrr, "eval/hits@1": 0.1}}))
            (run / "config.yaml").write_text(f"method:\n  aux_weight: {alpha}\n")
    (tmp_path / "cut_short").mkdir()
    (tmp_path / "cut_short" / "metrics.json").write_text(json.dumps({"status": "running"}))
    lines = seed_intervals.table([tmp_path], ["method.aux_weight"], None).splitlines()
    assert lines[0] == "| method | model | dataset | method.aux_weight | seeds | eval/mrr | eval/hits@1 |"
    assert lines[2] == "| kgbert_cd | m | d | 0.0 | 0,1,2 | 0.600 [0.352, 0.848] | 0.100 [0.100, 0.100] |"
    assert lines[3] == "| kgbert_cd | m | d | 1.0 | 0,1 | 0.200 [0.200, 0.200] | 0.100 [0.100, 0.100] |"
