"""A plain `pip install .` (a wheel, not the editable checkout) works from any directory."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_its_configs_and_runs_from_outside_the_checkout(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            str(REPO),
            "-w",
            str(tmp_path / "dist"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("ctxdistill-*.whl")
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}

    def ctxdistill(*args):
        return subprocess.run(
            [sys.executable, "-m", "ctxdistill", *args],
            capture_output=True,
            text=True,
            cwd=outside,
            env=env,
            timeout=300,
        )

    where = subprocess.run(
        [sys.executable, "-c", "import ctxdistill.cli as c; print(c.__file__, c.CONFIG_DIR)"],
        capture_output=True,
        text=True,
        cwd=outside,
        env=env,
    )
    assert where.stdout.split() == [str(site / "ctxdistill" / "cli.py"), str(site / "ctxdistill" / "conf")]
    helped = ctxdistill("--help")
    assert helped.returncode == 0 and "method: " in helped.stdout
    ran = ctxdistill(
        "method=cd", "model=tiny-random", "logger=none", "trainer.max_steps=2", f"hydra.run.dir={outside / 'run'}"
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert (outside / "run" / "metrics.json").is_file()
