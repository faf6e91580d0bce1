"""Scale-out: a 2-process DDP run (gloo, CPU) against the 1-process run, sharded evaluation,
the sharded-strategy configs, and the SLURM launcher's submission script."""

import importlib.util
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from ctxdistill.config import ConfigError, validate
from ctxdistill.evaluation import Ranks

from conftest import RESUMABLE, outcome

ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_two_process_ddp_matches_one_process_in_one_run_dir(uninterrupted, tmp_path):
    # Default run dir (a timestamp): both ranks must agree on it. trainer.batch_size is the global batch.
    # The option after the overrides: rank 1's own overrides must join the user's, not follow the option.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "ctxdistill",
            *RESUMABLE,
            "--config-name",
            "config",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout + proc.stderr
    [run_dir] = list((tmp_path / "outputs" / "runs").glob("*/*"))
    ddp = outcome(run_dir)
    assert ddp["train"]["steps"] == uninterrupted["train"]["steps"] == 6
    # Same batches, gradients averaged over the two halves: equal up to float summation order, which moves
    # the final loss (about 2e-3 after 6 steps) by up to about 2e-7 (1e-4 of it).
    assert ddp["train"]["final_loss"] == pytest.approx(uninterrupted["train"]["final_loss"], rel=1e-4, abs=1e-6)
    assert ddp["metrics"].keys() == uninterrupted["metrics"].keys()
    for key, value in uninterrupted["metrics"].items():
        assert ddp["metrics"][key] == pytest.approx(value, abs=1e-4), key
    # Each rank scored half of every eval set; the gathered rows are complete and in order.
    rows = [
        [(r["uid"], r["prediction"]) for r in map(json.loads, run["predictions"].splitlines())]
        for run in (ddp, uninterrupted)
    ]
    assert rows[0] == rows[1]


def test_eval_shares_cover_every_example_and_come_back_in_order():
    n, count = 7, 3
    values = torch.arange(n * 2.0).reshape(n, 2)
    shares = [Ranks(i, count).share(n) for i in range(count)]
    assert shares == [[0, 3, 6], [1, 4, 6], [2, 5, 6]]  # padded to one size with the last example
    everyone = torch.cat([values[s] for s in shares])  # what accelerate's gather returns, rank by rank
    assert torch.equal(Ranks(1, count, gather=lambda local: everyone).combine(values[shares[1]], n), values)


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharded_strategies_compose_and_are_checked(make_cfg, strategy):
    cfg = make_cfg("experiment=upadhayaya2024/mnli", "model=opt-13b", f"trainer/distributed={strategy}")
    assert cfg.trainer.distributed.strategy == strategy and cfg.trainer.epochs == 20  # the experiment's trainer stays
    if strategy == "zero3" and importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(ConfigError, match="pip install deepspeed"):
            validate(cfg)
    elif not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="shards the model over CUDA GPUs.*trainer/distributed=ddp"):
            validate(cfg)
    else:
        validate(cfg)
    with pytest.raises(ConfigError, match="trainer/distributed=ddp, fsdp or zero3"):
        validate(make_cfg("trainer.distributed.strategy=zero2"))


@pytest.mark.parametrize("multirun", [[], ["-m", "seed=0,1"]], ids=["run", "sweep"])
def test_slurm_launcher_composes_with_requeue_settings(multirun):
    # a sweep's --cfg hydra printed its cells' job configs instead (the eighteenth audit)
    proc = subprocess.run(
        [sys.executable, "-m", "ctxdistill", *multirun, "hydra/launcher=slurm", "--cfg", "hydra"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "# cell " not in proc.stdout
    for line in (
        "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
        "max_num_timeout: 3",
        "signal_delay_s: 120",
        "partition: null",
        "account: null",
    ):
        assert line in proc.stdout


def test_slurm_sweep_writes_an_array_job_with_gpus_account_and_requeue(tmp_path):
    """Submit a 3-cell sweep to a stand-in `sbatch` that keeps the script submitit wrote and refuses it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_CAPTURE"\necho "no cluster here" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks that srun exists
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script, sweep = tmp_path / "array.sh", tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctxdistill",
            "-m",
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.account=myproj",
            "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.tasks_per_node=4",
            "hydra.launcher.timeout_min=600",
            "model=tiny-random",
            "trainer/distributed=fsdp",  # checked on the GPU nodes: this machine has none, and must submit
            "seed=0,1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_CAPTURE": str(script)},
    )
    assert proc.returncode != 0 and "no cluster here" in proc.stderr
    lines = script.read_text().splitlines()
    for directive in (
        "--array=0-2%3",
        "--partition=gpu",
        "--account=myproj",
        "--gpus-per-node=4",
        "--ntasks-per-node=4",
        "--time=600",
        "--signal=USR2@120",
        "--cpus-per-task=8",
        "--mem=64GB",
    ):
        assert f"#SBATCH {directive}" in lines
    assert "export SUBMITIT_EXECUTOR=slurm" in lines  # how a task knows it is one rank of a multi-GPU run
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in lines)
    # Each cell's pickled job: the Hydra launcher (whose checkpoint() requeues it) with 3 timeouts to spend.
    jobs = [pickle.loads(p.read_bytes()) for p in sweep.glob(".submitit/*.pkl")]
    assert len(jobs) == 3
    assert all(job._timeout_countdown == 3 and hasattr(job.function, "checkpoint") for job in jobs)
