"""benchmarks/speed.py runs: every contender the suite trains is built from a composed config, as a run
builds it, so a change to a method's settings cannot leave the benchmark behind (it once called a
constructor whose defaults had moved into the schema, and only the published run found out)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_speed_benchmark_trains_every_contender_and_reports_each_ratio(tmp_path):
    out = tmp_path / "speed.md"
    command = [sys.executable, "benchmarks/speed.py", "--models", "tiny-random", "--steps", "2", "--queries", "8"]
    command += ["--only", "training", "on_policy", "epochs", "utilisation", "compiled", "naive", "--output", str(out)]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads(out.with_suffix(".json").read_text())
    ratios = {what: value for model, what, value, goal in saved["ratios"] if model == "tiny-random"}
    assert ratios["cd training vs TRL SDFTTrainer, the demo context"] > 0
    assert ratios["on-policy cd vs TRL SDFTTrainer (on-policy)"] > 0
    assert ratios["later epochs, teacher cache vs teacher every step"] > 0
    assert 0 < ratios["cd training step, fraction of the matmul peak"] < 1
    assert ratios["cd training step under trainer.compile, fraction of the matmul peak"] > 0
    assert saved["figures"]["tiny-random"]["compiled"]["compile_s"] > 0
    # the three training contenders, each with its throughput and peak memory
    training = saved["figures"]["tiny-random"]["training"]
    assert set(training) == {"ctxdistill", "trl_sdft", "naive"}
    assert all(r["queries_per_s"] > 0 and r["peak_mb"] >= 0 for r in training.values())
    assert "## Summary" in out.read_text()


def test_a_bad_override_is_the_suite_s_one_message_before_any_model_loads(tmp_path):
    """The benchmark never validated the configs it composes: model.dtype=float17 went on to a traceback from the
    measurement that loaded the model."""
    command = [sys.executable, "benchmarks/speed.py", "--models", "tiny-random", "--only", "teacher", "--override"]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [*command, "model.dtype=float17", "--output", str(tmp_path / "speed.md")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stderr == "ctxdistill: model.dtype: unknown value 'float17'. Use one of: float32, bfloat16, float16\n"
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_without_trl_the_measurements_against_it_are_refused_naming_the_extra(tmp_path):
    """Without TRL a measurement against it ended in two ImportError tracebacks, after the suite's own contender
    had run; the others run without it."""
    hide_trl = (
        "import runpy, sys; sys.modules['trl'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path('benchmarks/speed.py', run_name='__main__')"
    )
    command = [
        sys.executable,
        "-c",
        hide_trl,
        "speed.py",
        "--models",
        "tiny-random",
        "--output",
        str(tmp_path / "s.md"),
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [*command, "--only", "teacher", "on_policy"], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 1 and list(tmp_path.iterdir()) == []
    assert proc.stderr == (
        "--only on_policy: these measurements compare the suite with TRL, which is not installed; "
        'install it with pip install -c src/constraints.txt -e ".[bench]", or leave them out of --only\n'
    )


def test_peak_memory_counts_a_short_lived_allocation():
    """A batch's logits live for milliseconds; a peak that misses them made evaluation memory look as if it grew
    with the eval set (1.40x from 1k to 10k examples, measured flat once the peak was exact)."""
    # In a process of its own, as the benchmark measures: in a test worker the kernel's counters carry what earlier
    # tests left (once 35 of the 64 MiB were counted there, never in a fresh process).
    measure = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); from speed import PeakMemory\n"
        "with PeakMemory('cpu') as memory:\n"
        "    transient = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched, then freed at once\n"
        "    del transient\n"
        "print(memory.used)"
    )
    used = subprocess.run(
        [sys.executable, "-c", measure, str(ROOT / "benchmarks")], capture_output=True, text=True, check=True
    ).stdout
    assert int(used) >= 60 * 2**20
