"""Fault injection: kill -9 and resume, SIGTERM, a diverging loss, W&B failing mid-run, a sweep
with a failing cell, a corrupt model cache. Each fault must leave a clear message and lose nothing."""

import json
import logging
import multiprocessing
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ctxdistill.checkpoint import latest_checkpoint
from ctxdistill.cli import user_errors
from ctxdistill.config import ConfigError
from ctxdistill.methods.distill import ContextDistillation
from ctxdistill.methods.kgc import KGBert
from ctxdistill.methods.on_policy import OnPolicyDistillation
from ctxdistill.run import run
from ctxdistill.sweeps import SweepSummaryCallback
from ctxdistill.trainer import TrainingDiverged

from conftest import RESUMABLE, compose_run, outcome

ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def cli(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "ctxdistill", *RESUMABLE, f"hydra.run.dir={run_dir}"]


def saved_step(run_dir: Path) -> int:
    """The step of the run's latest complete checkpoint; 0 when there is none (yet, or any more)."""
    try:
        latest = latest_checkpoint(run_dir)
    except FileNotFoundError:  # checkpoints/ removed while it was listed: the run just finished
        return 0
    return int(latest.name.split("-")[1]) if latest else 0


def kill_at_step_then_resume(run_dir: Path, step: int) -> int:
    """Start the run, SIGKILL it once a checkpoint of `step` or later exists, run the same command again.
    Polling for exactly `step` would miss it: with keep_checkpoints=1 it is removed as the next step is saved."""
    with (run_dir.parent / f"{run_dir.name}.log").open("w") as log:
        proc = subprocess.Popen(cli(run_dir), stdout=log, stderr=log, env=ENV)
        while proc.poll() is None and saved_step(run_dir) < step:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run_dir / "metrics.json").exists()
    killed_at = int(latest_checkpoint(run_dir).name.split("-")[1])
    resumed = subprocess.run(cli(run_dir), capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["train"]["resumed_from_step"] == killed_at
    return killed_at


@pytest.mark.parametrize("step", [1, 5])  # the first checkpoint, and the last before the run ends (6 steps)
def test_a_run_killed_once_a_step_is_saved_resumes_to_identical_results(uninterrupted, tmp_path, step):
    assert kill_at_step_then_resume(tmp_path / "run", step) >= step  # a later save may land before the kill
    assert outcome(tmp_path / "run") == uninterrupted


def inject_at_call(monkeypatch, call: int, fault, method=ContextDistillation) -> None:
    """Run `fault(loss)` during the `call`-th loss computation of `method` (one per optimiser step here)."""
    real_loss, calls = method.loss, []

    def loss(self, handle, batch):
        calls.append(1)
        value, extra = real_loss(self, handle, batch)
        return (fault(value) if len(calls) == call else value), extra

    monkeypatch.setattr(method, "loss", loss)


def send_at_call(monkeypatch, call: int, sig: int, method=ContextDistillation) -> None:
    """A real signal to this process at a fixed step."""
    inject_at_call(monkeypatch, call, lambda loss: os.kill(os.getpid(), sig) or loss, method)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_a_signal_saves_and_exits_for_requeue_then_the_same_run_and_wandb_run_resume(
    uninterrupted, tmp_path, monkeypatch, sig
):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_run(tmp_path, "trainer.checkpoint_every=null", "logger=wandb", "logger.mode=offline")
    with monkeypatch.context() as patched:
        send_at_call(patched, 3, sig)
        with pytest.raises(SystemExit) as stopped:
            run(cfg)
    assert stopped.value.code == 128 + sig  # what schedulers (SLURM --requeue, torchrun) retry
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    assert not (tmp_path / "metrics.json").exists()
    assert signal.getsignal(sig) is signal.SIG_DFL  # handlers restored

    # refused before any model loads or file is written (the eighteenth audit: after the model and the teacher's
    # evaluation, with config.yaml rewritten to settings the checkpoint never had), naming the setting
    config_before = (tmp_path / "config.yaml").read_text()
    with monkeypatch.context() as patched:
        patched.setattr("ctxdistill.run.build_models", lambda *a, **k: pytest.fail("a model loaded"))
        with pytest.raises(
            ConfigError, match=r"step-00000003 was written by a run with other settings \(trainer\.lr\)"
        ):
            run(compose_run(tmp_path, "trainer.lr=5e-3"))
    assert (tmp_path / "config.yaml").read_text() == config_before
    assert run(cfg)["train"]["resumed_from_step"] == 3
    assert outcome(tmp_path) == uninterrupted
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    wandb_runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    # W&B adds "-1" to the second run's folder when both start within the same second
    assert len(wandb_runs) == 2 and all(
        re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", name) for name in wandb_runs
    )


def test_a_checkpoint_of_a_run_on_other_data_at_the_same_path_is_not_resumed(tmp_path, monkeypatch):
    """Only the settings were compared: training data rewritten at its path resumed the old data's training, and
    the results recorded the new file's checksum for weights trained on the old."""
    from test_provenance import write_split

    data = tmp_path / "data"
    data.mkdir()
    write_split(data / "train.jsonl", 48, "train")
    write_split(data / "eval.jsonl", 16, "eval")
    files = ["dataset.source.kind=files", f"dataset.source.data_dir={data}"]
    files.append("++dataset.source.data_files={train: train.jsonl, eval: eval.jsonl}")
    cfg = compose_run(tmp_path / "run", "trainer.checkpoint_every=null", *files)
    with monkeypatch.context() as patched:
        send_at_call(patched, 3, signal.SIGTERM)
        with pytest.raises(SystemExit):
            run(cfg)
    assert latest_checkpoint(tmp_path / "run").name == "step-00000003"
    write_split(data / "train.jsonl", 40, "train")  # other training data at the same path
    with pytest.raises(ConfigError, match=r"step-00000003 was written by a run with other data \(a file at its path"):
        run(cfg)
    write_split(data / "train.jsonl", 48, "train")  # the data it trained on: it resumes
    assert run(cfg)["train"]["resumed_from_step"] == 3


def test_an_on_policy_run_resumed_after_a_signal_draws_what_the_uninterrupted_run_draws(tmp_path, monkeypatch):
    """The student's samples and GKD's lambda draws come from the method's own generators: a resumed run must
    continue their streams, not restart them from the seed (which would repeat step 1's draws at step 4)."""
    on_policy = ["method=on_policy_cd", "method.lmbda=0.5", "trainer.checkpoint_every=null"]
    real_loss, steps = OnPolicyDistillation.loss, []

    def recorded(self, handle, batch):
        value, extra = real_loss(self, handle, batch)
        steps.append((extra["on_policy"], extra["sample_tokens"], round(value.item(), 6)))
        return value, extra

    monkeypatch.setattr(OnPolicyDistillation, "loss", recorded)
    run(compose_run(tmp_path / "uninterrupted", *on_policy))
    uninterrupted, steps[:] = list(steps), []
    with monkeypatch.context() as patched:
        send_at_call(patched, 3, signal.SIGTERM, OnPolicyDistillation)
        with pytest.raises(SystemExit):
            run(compose_run(tmp_path / "resumed", *on_policy))
    assert run(compose_run(tmp_path / "resumed", *on_policy))["train"]["resumed_from_step"] == 3
    assert len({on_policy for on_policy, _, _ in uninterrupted}) == 2  # both kinds of batch were drawn
    assert steps == uninterrupted
    assert outcome(tmp_path / "resumed") == outcome(tmp_path / "uninterrupted")


def test_a_run_whose_batches_draw_when_collated_resumes_with_the_draws_of_the_uninterrupted_run(
    make_cfg, tmp_path, monkeypatch
):
    """KG-BERT's fresh_per_batch rows draw each batch's negatives and masks as the batch is collated. The
    checkpoint's generators must be those of the trained batches: not ahead by the batch the data loader reads
    ahead, nor advanced again by collating the batches a resumed run skips."""
    kg = ["dataset=kg_synthetic", "dataset.source.num_people=8", "dataset.num_train=12", "dataset.num_eval=3"]
    settings = [*kg, "dataset.eval_candidates=5", "method=kgbert", "method.training_rows=fresh_per_batch"]
    settings += ["model=minilm-l6", "logger=none", "trainer.max_steps=6", "trainer.batch_size=4"]
    settings += ["trainer.checkpoint_every=null", "trainer.save_model=false"]
    real_loss, losses = KGBert.loss, []

    def recorded(self, handle, batch):
        value, extra = real_loss(self, handle, batch)
        losses.append(round(value.item(), 6))
        return value, extra

    monkeypatch.setattr(KGBert, "loss", recorded)
    run(make_cfg(*settings, output_dir=tmp_path / "uninterrupted"))
    uninterrupted, losses[:] = list(losses), []
    with monkeypatch.context() as patched:
        send_at_call(patched, 3, signal.SIGTERM, KGBert)
        with pytest.raises(SystemExit):
            run(make_cfg(*settings, output_dir=tmp_path / "resumed"))
    assert run(make_cfg(*settings, output_dir=tmp_path / "resumed"))["train"]["resumed_from_step"] == 3
    assert losses == uninterrupted
    assert outcome(tmp_path / "resumed") == outcome(tmp_path / "uninterrupted")


def test_ctrl_c_saves_and_says_how_to_resume_and_a_second_one_stops_at_once(
    uninterrupted, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(sys, "argv", ["ctxdistill", "method=cd", "model=tiny-random"])
    cfg = compose_run(tmp_path, "trainer.checkpoint_every=null")
    handler = signal.getsignal(signal.SIGINT)  # Python's own, or SIG_IGN inherited by a shell's background job
    with monkeypatch.context() as patched:
        send_at_call(patched, 3, signal.SIGINT)
        with pytest.raises(SystemExit) as stopped:
            run(cfg)
    assert stopped.value.code == 130
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    assert (
        f"stopped at step 3 of 6; resume with: ctxdistill method=cd model=tiny-random hydra.run.dir={tmp_path}"
        in caplog.text
    )
    assert signal.getsignal(signal.SIGINT) is handler  # the Ctrl-C handler the run found, again
    assert run(cfg)["train"]["resumed_from_step"] == 3
    assert outcome(tmp_path) == uninterrupted

    def twice(loss):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return loss

    inject_at_call(monkeypatch, 2, twice)
    with pytest.raises(KeyboardInterrupt):
        run(compose_run(tmp_path / "twice", "trainer.checkpoint_every=null"))
    assert latest_checkpoint(tmp_path / "twice") is None


def test_ctrl_c_during_the_final_evaluation_says_what_was_kept_and_the_same_command_finishes_the_run(tmp_path):
    """Outside training's own handling (loading, evaluating): one line, no traceback, the run's log says what happened,
    and the command resumes from the checkpoint training ended with (the newcomer audit)."""
    args = [*RESUMABLE, f"hydra.run.dir={tmp_path}"]
    interrupted = (  # the run as the command runs it, with Ctrl-C arriving during its final evaluation
        "import sys\nimport ctxdistill.run as run\n"
        "def final_metrics(*args, **kwargs):\n    raise KeyboardInterrupt\n"
        "run.final_metrics = final_metrics\nfrom ctxdistill.cli import entry\n"
        f"sys.argv = ['ctxdistill', *{args!r}]\nentry()\n"
    )
    stopped = subprocess.run([sys.executable, "-c", interrupted], capture_output=True, text=True, env=ENV, timeout=600)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr and stopped.stderr.rstrip().endswith("ctxdistill: interrupted")
    said = (
        "Ctrl-C: the run stopped before it finished (no metrics.json); its latest checkpoint (step-00000006) is kept "
        f"and the run resumes from it; resume with: ctxdistill {' '.join(args)}"
    )
    assert said in stopped.stdout + stopped.stderr and said in (tmp_path / "cli.log").read_text()
    assert not (tmp_path / "metrics.json").exists()
    resumed = subprocess.run(
        [sys.executable, "-m", "ctxdistill", *args], capture_output=True, text=True, env=ENV, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "metrics.json").read_text())["train"]["resumed_from_step"] == 6


@pytest.mark.parametrize(
    "method, stage, kept",
    [
        ("cd", "train_rounds", "no checkpoint was saved yet, so its training starts again from the first step"),
        ("zero_shot", "final_metrics", "it trains nothing, so nothing is lost"),
    ],
)
def test_ctrl_c_before_any_checkpoint_says_whether_training_starts_again(method, stage, kept, tmp_path):
    """A second Ctrl-C before training's first checkpoint lost the steps trained, and the note said "nothing was trained
    yet, so nothing is lost"; "ctxdistill: interrupted" was written after the open bar, on its line."""
    args = [f"method={method}", "model=tiny-random", "logger=none", "dataset.source.split_sizes.eval=16"]
    interrupted = (  # Ctrl-C with a bar open: in training, or in the evaluation of a method that does not train
        "import sys\nimport ctxdistill.run as run\nfrom ctxdistill.progress import progress_bar\n"
        "def stopped(*args, **kwargs):\n    bar = progress_bar(total=4, desc='work', mininterval=0)\n"
        "    bar.update(1)\n    raise KeyboardInterrupt\n"
        f"run.{stage} = stopped\nfrom ctxdistill.cli import entry\n"
        f"sys.argv = ['ctxdistill', *{[*args, f'hydra.run.dir={tmp_path}']!r}]\nentry()\n"
    )
    stopped = subprocess.run([sys.executable, "-c", interrupted], capture_output=True, text=True, env=ENV, timeout=600)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    said = f"Ctrl-C: the run stopped before it finished (no metrics.json); {kept}; resume with: ctxdistill {args[0]}"
    assert said in stopped.stdout + stopped.stderr and said in (tmp_path / "cli.log").read_text()
    assert "\nctxdistill: interrupted\n" in stopped.stderr and "Traceback" not in stopped.stderr


def sweep_cells(root: Path) -> list[Path]:
    """The run directories of a sweep under root/outputs/multirun, as far as a listing racing the sweep sees them."""
    try:
        return list(root.glob("outputs/multirun/*/*/*"))
    except FileNotFoundError:  # a directory vanished while it was listed
        return []


def test_ctrl_c_in_a_sweep_prints_the_command_that_resumes_it_in_its_own_directory(tmp_path):
    """Hydra's default sweep dir holds the launch time: the same command again would start afresh elsewhere."""
    sweep = [sys.executable, "-m", "ctxdistill", "-m", *RESUMABLE, "seed=0,1"]
    proc = subprocess.Popen(sweep, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    while proc.poll() is None and not any(saved_step(cell) for cell in sweep_cells(tmp_path)):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    console = proc.communicate(timeout=600)[0]
    assert proc.returncode == 128 + signal.SIGINT, console[-3000:]
    [cell] = [p.parent for p in tmp_path.glob("outputs/multirun/*/*/*/checkpoints")]  # the second never started
    sweep_dir = cell.parent  # absolute: the command resumes the sweep from any directory
    hint = re.search(r"resume the sweep with: (.*)", console)
    assert hint, console[-3000:]
    hint = hint[1]
    assert hint == f"ctxdistill -m {' '.join(RESUMABLE)} seed=0,1 hydra.sweep.dir={sweep_dir}"
    time.sleep(1)  # a new launch time: without the hint's hydra.sweep.dir the sweep would go elsewhere
    resumed = subprocess.run(
        [sys.executable, "-m", *shlex.split(hint)], cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((cell / "metrics.json").read_text())["train"]["resumed_from_step"] >= 1
    assert len(list(tmp_path.glob("outputs/multirun/*/*/*/metrics.json"))) == 2


def test_a_diverging_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    inject_at_call(monkeypatch, 3, lambda loss: loss * float("nan"))
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3 of 6.*step-00000002.*lower trainer.lr"):
        run(compose_run(tmp_path))
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    assert not (tmp_path / "metrics.json").exists()


def test_nan_answer_scores_stop_the_evaluation_instead_of_predicting_class_0(tmp_path, monkeypatch):
    from ctxdistill import evaluation

    real = evaluation.answer_logits
    monkeypatch.setattr(evaluation, "answer_logits", lambda *args: real(*args) * float("nan"))
    with pytest.raises(evaluation.NonFiniteScores, match=r"NaN for 16 of 16 examples.*model.dtype=float32"):
        run(compose_run(tmp_path, "method=zero_shot"))
    assert not (tmp_path / "metrics.json").exists()
    assert evaluation.NonFiniteScores in user_errors()  # printed without a traceback


def test_wandb_failing_mid_run_costs_nothing(tmp_path, monkeypatch, caplog):
    import wandb
    from wandb.sdk.wandb_run import Run

    monkeypatch.delenv("WANDB_MODE", raising=False)

    def unreachable(self, *args, **kwargs):
        raise wandb.errors.CommError("W&B is unreachable")

    monkeypatch.setattr(Run, "log", unreachable)
    with caplog.at_level(logging.WARNING, logger="ctxdistill.tracking"):
        run(compose_run(tmp_path, "logger=wandb", "logger.mode=offline", "trainer.max_steps=2"))
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "complete"
    # said once, not at every step that logs (the run still logs each: W&B may come back)
    failures = [m for m in caplog.messages if m.startswith("W&B log failed")]
    assert failures == ["W&B log failed, continuing without it: W&B is unreachable (said once for this run)"]


def test_a_summary_is_not_overwritten_by_the_last_steps_row(tmp_path, monkeypatch):
    """The eighteenth audit: the final step's row (a selection's last-epoch evaluation) was still open when the
    summary took the selected checkpoint's figures; W&B wrote the row out afterwards, over them."""
    from ctxdistill import tracking
    from ctxdistill.results.wandb_runs import read_offline_run

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = compose_run(tmp_path, "logger=wandb", "logger.mode=offline").logger
    tracker = tracking.create_tracker(
        logger, group="g", name="n", tags=[], config={}, output_dir=str(tmp_path), resumes=False
    )
    tracker.log({"valid/mrr": 0.427}, 6)  # the last epoch's evaluation
    tracker.summary({"valid/mrr": 0.510, "status": "complete"})  # the selected checkpoint's
    tracker.predictions({"eval": [{"uid": "a", "prediction": 1}]})
    tracker.finish()
    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")
    assert read_offline_run(run_dir).summary["valid/mrr"] == pytest.approx(0.510)


def test_a_sweep_agents_run_id_is_the_one_recorded(tmp_path, monkeypatch, caplog):
    """The eighteenth audit: under a W&B sweep agent, W&B takes the agent's run id and ignores the one asked for;
    wandb_run_id kept the one asked for, so a run started over superseded a run that never existed."""
    import wandb

    from ctxdistill import tracking

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    parameters = tmp_path / "parameters.yaml"
    parameters.write_text("wandb_version: 1\n")
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep1")
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun1")
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(parameters))
    wandb.teardown()  # W&B reads the agent's environment when it is set up: as in the agent's own process
    logger = compose_run(tmp_path, "logger=wandb", "logger.mode=offline").logger
    kwargs = dict(group="g", name="n", tags=[], config={}, output_dir=str(tmp_path))
    tracking.create_tracker(logger, **kwargs, resumes=False).finish()
    assert (tmp_path / "wandb_run_id").read_text().strip() == "agentrun1"
    with caplog.at_level(logging.WARNING, logger="ctxdistill.tracking"):
        again = tracking.create_tracker(logger, **kwargs, resumes=False)  # started over (force=true)
    assert Path(again.run_dir).is_dir()  # its own directory was not set aside as the run it replaces
    again.finish()
    assert "continues W&B run agentrun1 from step 0" in caplog.text
    monkeypatch.undo()
    wandb.teardown()  # the next test's W&B reads an environment without the agent


def test_wandb_that_cannot_start_is_said_by_each_run_but_once_by_a_sweep(tmp_path, monkeypatch, caplog):
    from ctxdistill import tracking

    def outage(**kwargs):
        raise ConnectionError("W&B is unreachable")

    monkeypatch.setattr(tracking, "WandbTracker", outage)
    logger = compose_run(tmp_path, "logger=wandb", "logger.mode=online").logger
    kwargs = dict(group="g", name="n", tags=[], config={}, output_dir=str(tmp_path), resumes=False)
    first_worker = multiprocessing.get_context("fork").Process(  # a launcher's worker: a process of its own
        target=tracking.create_tracker, args=(logger,), kwargs=kwargs | {"sweep_dir": tmp_path / "sweep"}
    )
    first_worker.start()
    first_worker.join()
    with caplog.at_level(logging.WARNING, logger="ctxdistill.tracking"):
        runs = [tracking.create_tracker(logger, **kwargs) for _ in range(2)]
        cells = [tracking.create_tracker(logger, **kwargs, sweep_dir=tmp_path / "sweep") for _ in range(2)]
        cells += [tracking.create_tracker(logger, **kwargs, sweep_dir=tmp_path / "another") for _ in range(2)]
    alone = "W&B could not start (W&B is unreachable); the run continues and its results stay on disk."
    once = (
        "W&B could not start (W&B is unreachable); the sweep goes on without it and its results stay on disk "
        "(said once: the sweep's summary counts the cells it missed)."
    )
    # the first sweep's worker said it, so its cells here do not; the other sweep says it once
    assert first_worker.exitcode == 0 and caplog.messages == [alone, alone, once]
    # launched again (resumed), the first sweep says it once more
    SweepSummaryCallback().on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}}))
    with caplog.at_level(logging.WARNING, logger="ctxdistill.tracking"):
        cells += [tracking.create_tracker(logger, **kwargs, sweep_dir=tmp_path / "sweep") for _ in range(2)]
    assert caplog.messages == [alone, alone, once, once]
    assert {tracker.start_error for tracker in runs + cells} == {"W&B is unreachable"}  # kept in metrics.json


def test_a_damaged_model_cache_is_detected(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ctxdistill.models import model_dir_problem

    LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path)
    assert model_dir_problem(tmp_path) is None
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # cut short, as by a full disk
    assert "model.safetensors" in model_dir_problem(tmp_path) and "its header describes" in model_dir_problem(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "lla')
    assert model_dir_problem(tmp_path).startswith("config.json")


@pytest.mark.slow
def test_a_damaged_model_cache_is_converted_again_not_used(tmp_path, caplog):
    from ctxdistill.models import converted_dir, load_tokenizer, model_dir_problem

    spec = compose_run(tmp_path, "model=smollm2-135m").model
    damaged = converted_dir(spec, str(tmp_path))
    damaged.mkdir(parents=True)
    (damaged / "config.json").write_text('{"model_type": "llama"}')
    (damaged / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")  # header without its data
    with caplog.at_level(logging.WARNING, logger="ctxdistill.models"):
        tokenizer = load_tokenizer(spec, str(tmp_path))
    assert "is damaged" in caplog.text and "converting it again" in caplog.text
    assert model_dir_problem(damaged) is None and len(tokenizer) > 49000


def test_a_damaged_tokenizer_cache_of_a_random_model_is_converted_again_not_used(tmp_path, caplog):
    from ctxdistill.models import load_tokenizer, tokenizer_dir, tokenizer_dir_problem

    spec = compose_run(tmp_path).model  # tiny-random: the GGUF file's tokenizer alone is cached
    damaged = tokenizer_dir(spec, str(tmp_path))
    damaged.mkdir(parents=True)
    (damaged / "tokenizer.json").write_text('{"version": "1.')  # cut short
    (damaged / "tokenizer_config.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="ctxdistill.models"):
        tokenizer = load_tokenizer(spec, str(tmp_path))
    assert "is damaged" in caplog.text and "converting it again" in caplog.text
    assert tokenizer_dir_problem(damaged) is None and len(tokenizer) > 49000


def test_a_checkpoint_resumes_over_the_same_local_weights_only(tmp_path, monkeypatch):
    """The nineteenth audit: weights replaced at a local model's path were trained on from the checkpoint the old
    ones had reached. A checkpoint of code from before model directories were recorded still resumes."""
    from ctxdistill.checkpoint import Progress
    from ctxdistill.models import load_model, load_tokenizer

    spec = compose_run(tmp_path).model
    tokenizer = load_tokenizer(spec, compose_run(tmp_path).cache_dir)
    local = tmp_path / "model"
    load_model(spec, compose_run(tmp_path).cache_dir, tokenizer, 0).save_pretrained(local)
    tokenizer.save_pretrained(local)
    overrides = ["model.source=hub", f"model.name_or_path={local}", "trainer.checkpoint_every=null"]

    def stopped_at_step_3(run_dir: Path, **patches) -> None:
        with monkeypatch.context() as patched:
            for name, value in patches.items():
                patched.setattr(Progress, name, value)
            send_at_call(patched, 3, signal.SIGTERM)
            with pytest.raises(SystemExit):
                run(compose_run(run_dir, *overrides))
        assert latest_checkpoint(run_dir).name == "step-00000003"

    saved = Progress.state_dict
    older = {"state_dict": lambda self: {**saved(self), "data": [d for d in self.data if '"files"' not in d]}}
    stopped_at_step_3(tmp_path / "older", **older)
    assert run(compose_run(tmp_path / "older", *overrides))["train"]["resumed_from_step"] == 3

    stopped_at_step_3(tmp_path / "replaced")
    [weights] = local.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:-1] + b" ")
    with pytest.raises(ConfigError, match=r"step-00000003 was written by a run with other data"):
        run(compose_run(tmp_path / "replaced", *overrides))
