"""Compare runs: method x model x dataset, each metric family with its own columns, intervals and tests.

    ctxdistill-compare outputs/multirun/2026-11-23/10-00-00            # terminal tables
    ctxdistill-compare SWEEP_DIR --vs icl                             # + a paired test against icl per cell
    ctxdistill-compare SWEEP_DIR --metric accuracy                    # judge every row by one metric
    ctxdistill-compare SWEEP_DIR --format markdown|csv|latex
    ctxdistill-compare SWEEP_DIR --out SWEEP_DIR                      # README.md + results/ (tables, PNGs)
    ctxdistill-compare --wandb ENTITY/PROJECT --group GROUP            # the same tables from W&B
    ctxdistill-compare SWEEP_DIR --wandb-log --group GROUP             # log them as W&B Tables + plots
    ctxdistill-compare --wandb ENTITY/PROJECT --group GROUP --wandb-report
    ctxdistill-compare SWEEP_DIR --scorecard --model-as smollm2-135m=opt-125m  # against the paper's numbers

Inputs are run or sweep directories (every metrics.json under them), W&B run directories
(``RUN_DIR/wandb/offline-run-*``, read from W&B's own run file) or a W&B project read
through the public API; all become the same run records.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

from ctxdistill.results import scorecard
from ctxdistill.results.files import RESULTS_DIR, sweep_command_in, write_results
from ctxdistill.results.records import UnknownConfigKeyError, collect, distinct_runs, split_by, unfinished_runs
from ctxdistill.results.render import render
from ctxdistill.results.table import (
    PairedTestError,
    UnknownMetricError,
    choose_headline,
    duplicate_seed_warnings,
    mixed_headline_warnings,
    mixed_settings_warnings,
    paired_tests,
    spreadless_notes,
    summarise,
)
from ctxdistill.tracking import resolve_mode


def main(argv: list[str] | None = None) -> int:
    try:
        return compare(argv)
    except BrokenPipeError:  # the reader stopped early (| head): stop quietly, as a Unix tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 141


class OneLineErrors(argparse.ArgumentParser):
    """An argument parser whose errors are one line, as the ctxdistill command's are (not the usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def argument_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(
        prog="ctxdistill-compare",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[1:]),
    )
    parser.add_argument(
        "paths", nargs="*", type=Path, help="run or sweep directories, metrics.json files, or W&B run directories"
    )
    parser.add_argument(
        "--format",
        choices=["text", "markdown", "md", "csv", "latex"],
        default="text",
        help="md: markdown",
    )
    parser.add_argument(
        "--vs",
        metavar="METHOD",
        help="per cell and eval set, a paired test against METHOD's run of the same dataset, model and seeds, on "
        "the examples both were evaluated on (reads each run's predictions.jsonl): exact McNemar on one seed's "
        "right/wrong outcomes, else a sign-flip test on each example's difference (averaged over the seeds). "
        "Under --by, METHOD may be a row's whole label ('METHOD lmbda=0.0') to test two settings of one method",
    )
    parser.add_argument(
        "--metric",
        metavar="NAME",
        help="judge every row by this metric (e.g. accuracy or vocab_accuracy): the plots' and --vs's, instead of "
        "each row's own headline (its method's objective)",
    )
    parser.add_argument("--out", type=Path, help="write README.md and results/ (tables, plots) here")
    parser.add_argument(
        "--check-args",
        action="store_true",
        help="check the other arguments (--model-as against --paper's models) and exit, reading no runs: a paper "
        "script checks its COMPARE_ARGS before its sweeps",
    )
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from W&B (public API)")
    parser.add_argument("--group", help="only the W&B runs of this group (a sweep); also the group logged to")
    parser.add_argument(
        "--wandb-log", action="store_true", help="log the tables and plots to a W&B run (job_type=compare) in --group"
    )
    parser.add_argument(
        "--wandb-report",
        action="store_true",
        help="create a W&B report for --group in --wandb's project (needs network)",
    )
    parser.add_argument(
        "--project",
        metavar="[ENTITY/]PROJECT",
        help="W&B project for --wandb-log without --wandb (default: ctxdistill)",
    )
    parser.add_argument(
        "--by",
        nargs="+",
        default=[],
        metavar="KEY",
        help="config keys that tell a method's runs apart (e.g. method.aux_weight): one row per value",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit non-zero when any metrics.json or W&B run file is unreadable or any run under the paths has no "
        "results",
    )
    parser.add_argument(
        "--scorecard",
        action="store_true",
        help="also put each number the runs' paper reports next to the runs' mean, 95%% interval and a verdict",
    )
    parser.add_argument(
        "--paper", action="append", default=[], help="score against this paper (default: the papers the runs name)"
    )
    parser.add_argument(
        "--model-as",
        action="append",
        default=[],
        metavar="RUN_MODEL=PAPER_MODEL",
        help="score a run model in a paper model's place, labelled (e.g. smollm2-135m=opt-125m)",
    )
    return parser


def paper_models_unknown(papers: list[scorecard.Paper], model_as: dict[str, str]) -> str | None:
    """What is wrong with a --model-as naming a model none of ``papers`` reports; None when each is reported."""
    paper_models = sorted({cell.model for paper in papers for cell in paper.cells})
    unknown = [m for m in model_as.values() if m not in paper_models]
    if not unknown or not papers:
        return None
    run_model = next(k for k, v in model_as.items() if v == unknown[0])
    return (
        f"--model-as {run_model}={unknown[0]}: {', '.join(p.name for p in papers)} reports no model {unknown[0]} "
        f"(its models: {', '.join(paper_models)})"
    )


def compare(argv: list[str] | None = None) -> int:
    parser = argument_parser()
    args = parser.parse_args(argv)
    # --by's list takes every word after it: a directory there (--by seed SWEEP) is a path to read, not a key
    args.paths += [Path(key) for key in args.by if Path(key).exists()]
    args.by = [key for key in args.by if not Path(key).exists()]
    args.format = {"md": "markdown"}.get(args.format, args.format)
    if not args.paths and not args.wandb and not args.check_args:
        parser.error("give run or sweep directories, or --wandb ENTITY/PROJECT")
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        parser.error(f"no such path: {', '.join(missing)}")
    # else W&B's API fails on it with a traceback, and only after logging in
    if args.wandb and not re.fullmatch(r"[^/\s]+/[^/\s]+", args.wandb):
        parser.error(f"--wandb {args.wandb}: give ENTITY/PROJECT, e.g. --wandb my-team/ctxdistill")
    if args.project and not args.wandb_log:
        parser.error("--project names where --wandb-log logs to: give --wandb-log too, or leave --project out")
    if args.project and args.wandb:
        parser.error(f"--project {args.project}: --wandb-log logs to --wandb's project {args.wandb}; give only one")
    if args.project and not re.fullmatch(r"([^/\s]+/)?[^/\s]+", args.project):
        parser.error(f"--project {args.project}: give PROJECT or ENTITY/PROJECT, e.g. --project my-team/ctxdistill")
    if args.wandb_log and resolve_mode("auto") == "disabled":  # W&B would log nothing, without a word
        parser.error(
            "--wandb-log: WANDB_MODE=disabled turns W&B off, so nothing would be logged; run with WANDB_MODE=offline "
            "(logged under ./wandb, for `wandb sync`) or WANDB_MODE=online, or leave --wandb-log out"
        )
    if args.group and not (args.wandb or args.wandb_log):  # it read every run given, without a word
        parser.error(
            f"--group {args.group} selects runs read through W&B's API (--wandb ENTITY/PROJECT) and names the group "
            "--wandb-log logs to; runs given as directories are not filtered by it: give that group's directories, "
            "or --wandb too"
        )
    if args.wandb_report and not (args.wandb and args.group):
        parser.error("--wandb-report needs --wandb ENTITY/PROJECT and --group")
    if (args.paper or args.model_as) and not args.scorecard:
        parser.error("--paper and --model-as belong to --scorecard")
    if args.scorecard and args.format == "latex":
        parser.error("the scorecard has no LaTeX form: use --format text, markdown or csv")
    if args.out:  # before reading any run: a directory that cannot be written fails at once, not after the tables
        problem = unwritable(args.out)
        if problem:
            parser.error(f"--out {args.out}: {problem}; give a directory to write README.md and {RESULTS_DIR}/ into")
    try:
        model_as = scorecard.parse_model_as(args.model_as)
        named_papers = [scorecard.load_paper(name) for name in args.paper]
    except ValueError as e:
        parser.error(str(e))
    if args.check_args:
        unknown = paper_models_unknown(named_papers, model_as)
        if unknown:
            parser.error(unknown)
        return 0

    records = []
    if args.wandb:  # first: a missing login or network is said before the local runs are read
        from ctxdistill.results.wandb_runs import WandbReadError, api_records

        try:
            records = api_records(args.wandb, args.group)
        except WandbReadError as e:
            print(f"error: --wandb {args.wandb}: {e}", file=sys.stderr)
            return 1
    unreadable: list[str] = []
    collected = collect(args.paths, unreadable)
    unfinished = {  # (a run whose metrics.json is unreadable was named as such, once)
        str(path / cell): why
        for path in args.paths
        if path.is_dir()
        for cell, why in unfinished_runs(path).items()
        if str(path / cell / "metrics.json") not in unreadable
    }
    # a run whose latest attempt failed is left out even beside an earlier complete metrics.json, as a sweep does
    records = distinct_runs([*records, *(r for r in collected if r.get("run_dir") not in unfinished)])
    for run_dir, why in unfinished.items():
        print(f"warning: left out {run_dir}: {why}", file=sys.stderr)
    if not records:
        where = ", ".join([*map(str, args.paths), *([args.wandb] if args.wandb else [])])
        print(f"no complete runs (metrics.json or W&B summary with status 'complete') in {where}", file=sys.stderr)
        return 1
    run_models = sorted({r["model"] for r in records})
    absent_models = [m for m in model_as if m not in run_models]
    if absent_models:  # it would stand in for nothing, yet the scorecard would list it
        print(
            f"error: --model-as {absent_models[0]}={model_as[absent_models[0]]}: no run has model "
            f"{absent_models[0]} (the runs' models: {', '.join(run_models)})",
            file=sys.stderr,
        )
        return 2
    papers: list[scorecard.Paper] = []
    if args.scorecard:  # before the tables: a scorecard that cannot be made is said before anything is printed
        papers = named_papers or [scorecard.load_paper(name) for name in scorecard.papers_of(records)]
        if not papers:
            print(
                "no paper to score against: the runs' experiments name none (`paper:`); give --paper NAME "
                f"(known: {', '.join(scorecard.known_papers())})",
                file=sys.stderr,
            )
            return 1
        unknown = paper_models_unknown(papers, model_as)
        if unknown:
            print(f"error: {unknown}", file=sys.stderr)
            return 2
    try:
        rows = split_by(records, args.by)  # the table's rows, and the scorecard's: one per setting
    except UnknownConfigKeyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tables = summarise(rows)
    try:
        headline_notes = choose_headline(tables, args.metric) if args.metric else mixed_headline_warnings(tables)
    except UnknownMetricError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for warning in (
        mixed_settings_warnings(tables) + duplicate_seed_warnings(tables) + spreadless_notes(tables) + headline_notes
    ):
        print(warning, file=sys.stderr)
    if args.vs:
        try:
            notes = paired_tests(tables, args.vs)
        except PairedTestError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for note in notes:
            print(note, file=sys.stderr)
    print(render(tables, args.format))
    scores: list[scorecard.Score] = []
    if args.scorecard:
        scores = scorecard.score([c for p in papers for c in p.cells], rows, model_as)  # per --by setting
        print("\n" + scorecard.render(papers, scores, model_as, args.format))
    if args.out:
        appendix = ""
        if args.scorecard:
            (args.out / RESULTS_DIR).mkdir(parents=True, exist_ok=True)
            appendix = "## Scorecard\n\n" + scorecard.write(args.out / RESULTS_DIR, papers, scores, model_as)
            appendix += f"\n\nAs CSV: [{RESULTS_DIR}/scorecard.csv]({RESULTS_DIR}/scorecard.csv)."
        title = f"Results: {args.group or args.out.name}"
        sources = shlex.join(  # what to give ctxdistill-compare to read the same runs again
            [*map(str, args.paths), *(["--wandb", args.wandb] if args.wandb else [])]
            + (["--group", args.group] if args.group and args.wandb else [])  # --wandb-log's group logs, reads none
            + (["--by", *args.by] if args.by else [])
            + (["--metric", args.metric] if args.metric else [])
            + (["--vs", args.vs] if args.vs else [])
            + (["--scorecard"] if args.scorecard else [])
            + [option for paper in args.paper for option in ("--paper", paper)]
            + [option for pair in args.model_as for option in ("--model-as", pair)]
        )
        # over a sweep's own directory (SWEEP --out SWEEP): its README keeps the command that made and resumes it
        own = not args.wandb and [p.resolve() for p in args.paths] == [args.out.resolve()]
        readme = write_results(
            args.out,
            rows,
            title=title,
            failures=unfinished,
            command=sweep_command_in(args.out / "README.md") if own else None,
            appendix=appendix,
            tables=tables,
            sources=sources,
        )
        print(f"\nwrote {readme} and {args.out / RESULTS_DIR}/", file=sys.stderr)
    if args.wandb_log:
        import wandb

        from ctxdistill.results.wandb_outputs import log_results

        project = args.wandb or args.project or "ctxdistill"
        entity, project = project.split("/", 1) if "/" in project else (None, project)
        extra = {"scorecard": scorecard.table_rows(scores)} if args.scorecard else {}
        mode = resolve_mode("auto")
        try:
            log_results(tables, entity=entity, project=project, group=args.group, mode=mode, extra_tables=extra)
        except wandb.errors.Error as e:  # the tables and files above are already done
            print(
                f"could not log to W&B in {mode} mode ({e}); online logging needs network and `wandb login`: "
                "WANDB_MODE=offline logs under ./wandb, for `wandb sync` later",
                file=sys.stderr,
            )
            return 1
    if args.wandb_report:
        from ctxdistill.results.wandb_outputs import build_report

        entity, project = args.wandb.split("/", 1)
        report = build_report(tables, entity=entity, project=project, group=args.group, by=args.by or ())
        try:
            print(f"W&B report: {report.save().url}")
        except Exception as e:  # noqa: BLE001 - the tables and files above are already done
            print(f"could not publish the W&B report ({e}); it needs network and `wandb login`", file=sys.stderr)
            return 1
    if unreadable:
        print(f"{len(unreadable)} unreadable run file(s) (metrics.json or W&B .wandb) listed above", file=sys.stderr)
    if unfinished:
        print(
            f"{len(unfinished)} run(s) without results left out (listed above): run their ctxdistill command again "
            "to finish them; it skips complete runs, so a sweep's command (in its README.md) reruns only these",
            file=sys.stderr,
        )
    return 1 if (unreadable or unfinished) and args.strict else 0


def unwritable(directory: Path) -> str | None:
    """Why README.md and results/ cannot be written into ``directory`` (made if missing); None when they can."""
    if directory.exists() and not directory.is_dir():
        return "it is a file, not a directory"
    if (directory / RESULTS_DIR).exists() and not (directory / RESULTS_DIR).is_dir():
        return f"{directory / RESULTS_DIR} is a file, where the tables and plots go"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        return f"cannot write into it ({e.strerror})"
    return None


if __name__ == "__main__":
    sys.exit(main())
