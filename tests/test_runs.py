"""End-to-end runs on the tiny random model: files on disk, distillation works, sweeps, W&B offline."""

import io
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import ctxdistill
from ctxdistill import serving
from ctxdistill.cli import CONFIG_DIR
from ctxdistill.config import cpp_compiler
from ctxdistill.methods.distill import ContextDistillation
from ctxdistill.models import load_tokenizer
from ctxdistill.progress import BarSafeHandler, progress_bar
from ctxdistill.run import run

from conftest import TINY, compose_run, outcome, own_ood_set, without_timings


def read_metrics(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())


def test_cd_lowers_the_teacher_student_kl_on_held_out_inputs(make_cfg, tmp_path):
    before = run(make_cfg(*TINY, "method=zero_shot", output_dir=tmp_path / "zs"))["metrics"]
    after = run(make_cfg(*TINY, "method=cd", "trainer.max_steps=30", "trainer.lr=1e-2", output_dir=tmp_path / "cd"))[
        "metrics"
    ]
    # The untrained student is the zero-shot model (LoRA starts as the identity).
    assert after["eval/kl_to_teacher"] < 0.5 * before["eval/kl_to_teacher"]
    assert after["eval/teacher_agreement"] > before["eval/teacher_agreement"]


@pytest.mark.parametrize("method, trained", [("zero_shot", None), ("icl", None), ("ft", "adapter"), ("cd", "adapter")])
def test_every_method_leaves_its_results_on_disk(make_cfg, tmp_path, method, trained):
    result = run(make_cfg(*TINY, f"method={method}", "trainer.max_steps=2", "seed=7"))
    saved = read_metrics(tmp_path)
    assert saved == json.loads(json.dumps(result))
    assert (saved["method"], saved["model"], saved["dataset"], saved["seed"]) == (method, "tiny-random", "synthetic", 7)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 48 and {"prediction", "teacher_prediction", "label", "prompt"} <= set(rows[0])
    # Every reported figure is the one its prediction rows give.
    metrics = saved["metrics"]

    def mean(values):
        values = list(values)
        return sum(values) / len(values)

    assert metrics["eval/accuracy"] == pytest.approx(mean(r["prediction"] == r["label"] for r in rows))
    assert metrics["eval/teacher_accuracy"] == pytest.approx(mean(r["teacher_prediction"] == r["label"] for r in rows))
    assert metrics["eval/teacher_agreement"] == pytest.approx(
        mean(r["prediction"] == r["teacher_prediction"] for r in rows)
    )
    assert metrics["eval/kl_to_teacher"] == pytest.approx(mean(r["kl_to_teacher"] for r in rows), rel=1e-5)
    for label in (0, 1):
        assert metrics[f"eval/accuracy_label{label}"] == pytest.approx(
            mean(r["prediction"] == label for r in rows if r["label"] == label)
        )
    assert all(r["prediction"] == max(range(2), key=lambda c: r["label_logprobs"][c]) for r in rows)
    assert "seed: 7" in (tmp_path / "config.yaml").read_text()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() == (trained == "adapter")
    assert ("train_queries/context_accuracy" in saved["metrics"]) == (trained is not None)
    # Serving cost: the evaluated prompts' tokens (the context's too for icl) over the measured sample.
    stored = OmegaConf.load(tmp_path / "config.yaml")
    tokenizer = load_tokenizer(stored.model, stored.cache_dir)
    tokens = [len(ids) for ids in tokenizer(serving.sample([r["prompt"] for r in rows])).input_ids]
    assert metrics["serving/student_prompt_tokens"] == sum(tokens) / len(tokens)
    if method == "icl":  # the untrained model with the context is the teacher
        assert saved["metrics"]["eval/teacher_agreement"] == 1.0
        assert saved["metrics"]["eval/kl_to_teacher"] == 0.0
        assert metrics["serving/latency_ratio"] == metrics["serving/kv_bytes_ratio"] == 1.0
    else:
        assert metrics["serving/prompt_tokens_ratio"] == pytest.approx(metrics["serving/kv_bytes_ratio"])
        assert metrics["serving/prompt_tokens_ratio"] > 10


@pytest.mark.parametrize(
    "overrides",
    [
        ["method.answer=teacher_generation", "method.max_answer_tokens=3"],
        ["method.divergence=jsd", "method.beta=0.5", "method.temperature=2.0"],
        ["method.divergence=reverse_kl"],
        ["method.top_k=20"],
    ],
    ids=["snell-answer-spans", "jsd-T2", "reverse-kl", "top-20"],
)
def test_snell_answer_spans_and_other_divergences_move_the_student_towards_the_teacher(make_cfg, tmp_path, overrides):
    before = run(make_cfg(*TINY, "method=zero_shot", output_dir=tmp_path / "zero_shot"))["metrics"]
    after = run(
        make_cfg(*TINY, "method=cd", "trainer.max_steps=12", "trainer.lr=1e-2", *overrides, output_dir=tmp_path / "cd")
    )
    assert after["train"]["steps"] == 12
    assert after["metrics"]["eval/kl_to_teacher"] < 0.8 * before["eval/kl_to_teacher"]


def test_wandb_offline_writes_a_syncable_run_directory_and_one_console_line(
    make_cfg, tmp_path, monkeypatch, capfd, caplog
):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    caplog.set_level("INFO")
    run(
        make_cfg(
            "model=tiny-random",
            "logger=wandb",
            "logger.mode=offline",
            "method=cd",
            "trainer.max_steps=2",
            "dataset.source.split_sizes.eval=16",
            "dataset.num_train_queries=8",
        )
    )
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    console = capfd.readouterr()
    assert "wandb:" not in console.out + console.err  # no banner, no footer of sparklines
    assert caplog.text.count(f"wandb sync {runs[0]}") == 1
    records = next(runs[0].glob("run-*.wandb")).read_bytes()
    # the provenance goes into the config at the start, and the teacher cache's key at the end
    cache_key = read_metrics(tmp_path)["provenance"]["caches"][0]["key"].encode()
    for logged in (b"eval/accuracy", b"train/loss", b"predictions", b"hydra_choices", b"config_sha256", cache_key):
        assert logged in records


def test_with_gradient_accumulation_the_logged_loss_is_the_steps_mean_over_its_micro_batches(tmp_path, monkeypatch):
    real_loss, losses = ContextDistillation.loss, []

    def recorded(self, handle, batch):
        value, extra = real_loss(self, handle, batch)
        losses.append(value.item())
        return value, extra

    monkeypatch.setattr(ContextDistillation, "loss", recorded)
    result = run(compose_run(tmp_path, "trainer.max_steps=2", "trainer.grad_accum_steps=2", "trainer.batch_size=2"))
    assert len(losses) == 4 and losses[2] != losses[3]
    assert result["train"]["final_loss"] == pytest.approx((losses[2] + losses[3]) / 2, rel=1e-6)


def test_an_epochs_last_step_with_fewer_micro_batches_takes_their_mean_gradient():
    """5 micro-batches, 4 per step: the second step holds one. Each optimiser step's gradient is the mean of its
    micro-batches' gradients (for the loss w * x: the mean of their x), not their sum over grad_accum_steps."""
    steps, _ = train_linear(grad_accum_steps=4)
    assert [gradient for gradient, _ in steps] == pytest.approx([(1 + 2 + 3 + 4) / 4, 5 / 1])


def train_linear(**trainer) -> tuple[list[tuple[float, float]], list[dict]]:
    """Train w on the loss w * x over x = 1..5, one example a batch (``trainer``: TrainerConfig's settings): each
    optimiser step's gradient and learning rate, as the optimiser saw them, and the metrics each step logged."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from ctxdistill.config import TrainerConfig
    from ctxdistill.methods.base import Method
    from ctxdistill.models import ModelHandle
    from ctxdistill.run import make_accelerator
    from ctxdistill.trainer import train

    class Linear(Method):
        trained_weights = "adapter"

        def train_examples(self, task):
            return [1.0, 2.0, 3.0, 4.0, 5.0]

        def collate(self, tokenizer, task, examples):
            return {"x": torch.tensor(examples)}

        def loss(self, handle, batch):
            return (handle.student.weight * batch["x"]).sum(), {}

    model, steps, logged = torch.nn.Linear(1, 1, bias=False), [], []
    optimizer_steps = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: steps.append(
            (optimizer.param_groups[0]["params"][0].grad.item(), optimizer.param_groups[0]["lr"])
        )
    )
    settings = {"batch_size": 1, "epochs": 1, "shuffle": False, "max_grad_norm": None, **trainer}
    cfg = OmegaConf.structured(TrainerConfig(**settings))
    try:
        train(
            Linear("linear"),
            ModelHandle(student=model, base=model),
            None,
            None,
            cfg,
            make_accelerator(cfg),
            0,
            lambda metrics, step: logged.append(metrics),
        )
    finally:
        optimizer_steps.remove()
    return steps, logged


def test_the_logged_learning_rate_is_the_one_each_step_used():
    """train/lr was read after the scheduler had moved on: each step logged the next one's rate (warmup looked a
    step shorter in W&B than it was)."""
    steps, logged = train_linear(lr=1e-3, warmup_ratio=0.4)
    used = [lr for _, lr in steps]
    assert used[:2] == [0.0, 5e-4] and [m["train/lr"] for m in logged] == pytest.approx(used)


def test_a_progress_bar_into_a_log_file_draws_once_and_closes(capsys):
    # capsys's stderr is no terminal, as a log file is; at tqdm's default interval (0.1 s) this bar redraws ~5 times
    bar = progress_bar(total=25, desc="steps")
    for step in range(25):
        time.sleep(0.02)
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}", refresh=False)  # as the trainer shows its loss
        bar.update(1)
    bar.close()
    assert capsys.readouterr().err.count("steps:") == 2  # the first draw and the last


@pytest.mark.parametrize("handler", [logging.StreamHandler, BarSafeHandler])
def test_a_log_line_written_while_a_bar_is_open_gets_a_line_of_its_own(handler):
    console = io.StringIO()  # a run's console: bar and log lines in one stream
    log = logging.getLogger("ctxdistill.test_bar")
    log.addHandler(handler(console))
    bar = progress_bar(total=3, desc="train cd", file=console, mininterval=0)
    bar.update(1)
    log.warning("saved a checkpoint at step 1")
    bar.update(2)
    bar.close()
    log.handlers.clear()
    # what stays on screen of each line is the text after its last carriage return
    shown = [line.split("\r")[-1] for line in console.getvalue().split("\n")]
    assert ("saved a checkpoint at step 1" in shown) == (handler is BarSafeHandler)


def test_the_bar_safe_handler_writes_to_the_stderr_of_the_moment(monkeypatch):
    handler = BarSafeHandler()
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    handler.emit(logging.makeLogRecord({"msg": "one"}))
    assert first.getvalue() == "one\n"
    first.close()  # as a test's captured stderr is, or a notebook cell's redirect
    monkeypatch.setattr(sys, "stderr", second)
    handler.emit(logging.makeLogRecord({"msg": "two"}))
    assert second.getvalue() == "two\n"


def test_every_run_logs_to_the_console_through_the_bar_safe_handler():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        hydra_cfg = compose("config", return_hydra_config=True).hydra
    GlobalHydra.instance().clear()
    assert hydra_cfg.job_logging.handlers.console["class"] == "ctxdistill.progress.BarSafeHandler"


def test_every_progress_bar_of_the_suite_goes_through_progress_bar():
    package = Path(ctxdistill.__file__).parent
    importers = [p.name for p in package.rglob("*.py") if "tqdm" in p.read_text() and p.name != "progress.py"]
    assert importers == []


def test_transformers_own_bars_are_off_and_the_hubs_download_bars_stay(monkeypatch):
    """Transformers' "Loading weights" and "Writing model shards" came with every model a run loaded or saved."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

    from ctxdistill.progress import quiet_library_bars

    monkeypatch.setattr(transformers_logging, "_tqdm_hook", None)  # restored afterwards
    quiet_library_bars()
    bar = transformers_logging.tqdm(range(3), desc="Loading weights")
    assert bar.disable
    bar.close()
    assert not are_progress_bars_disabled()


def test_a_failing_wandb_never_costs_the_run_its_results(make_cfg, tmp_path, monkeypatch):
    import wandb

    def broken_init(*args, **kwargs):
        raise wandb.errors.CommError("W&B is unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    run(make_cfg(*TINY, "logger=wandb", "logger.mode=online", "method=zero_shot"))
    assert read_metrics(tmp_path)["status"] == "complete"


def test_out_of_domain_sets_are_scored_against_the_teacher_too(make_cfg, tmp_path):
    ood_file = tmp_path / "ood.tsv"
    ood_file.write_text(
        "review\tlabel\ttopic\nA truly great gift.\t0\ttoys\nA broken, useless gift.\t1\tbooks\nGreat.\t0\ttoys\n"
    )
    ood = own_ood_set(tmp_path / "conf", "gifts", ood_file, group_by="topic")
    result = run(make_cfg(*TINY, "method=zero_shot", *ood, output_dir=tmp_path / "run"))
    for key in (
        "accuracy",
        "teacher_accuracy",
        "teacher_agreement",
        "kl_to_teacher",
        "accuracy_toys",
        "accuracy_books",
    ):
        assert f"gifts/{key}" in result["metrics"]
    rows = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    assert sum('"set": "gifts"' in r for r in rows) == 3


def test_sweep_cfg_prints_and_validates_every_cell_of_table_3():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctxdistill",
            "-m",
            "experiment=upadhayaya2024/mnli",
            "model=opt-125m,opt-350m,opt-1.3b,opt-2.7b",
            "seed=0,1,2,3",
            "--cfg",
            "job",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    cells = [line for line in proc.stdout.splitlines() if line.startswith("# cell ")]
    assert len(cells) == 16
    assert "name_or_path: facebook/opt-2.7b" in proc.stdout and "paper: upadhayaya2024" in proc.stdout


def test_pbft_trains_every_weight_on_labelled_queries_apart_from_the_demonstrations(make_cfg, tmp_path):
    from hydra.utils import instantiate

    from ctxdistill.data import build_task

    cfg = make_cfg(*TINY, "method=pbft", "dataset.num_train_queries=6", "trainer.batch_size=6", "trainer.max_steps=2")
    task = build_task(cfg.dataset, cfg.seed)
    examples = instantiate(cfg.method, _convert_="all").train_examples(task)
    assert [e.uid for e in examples] == [q.uid for q in task.train_queries]
    assert [e.label for e in examples] == task.train_query_labels and None not in task.train_query_labels
    assert not {e.uid for e in examples} & {d.uid for d in task.demos}
    result = run(cfg)
    assert result["objective"] == "eval/vocab_accuracy" and result["train"]["examples"] == 6
    assert (tmp_path / "model" / "config.json").is_file()  # every weight trained: the whole model is saved


def test_evaluating_every_epoch_records_every_sets_curve_and_resumes_with_it(make_cfg, tmp_path):
    ood_file = tmp_path / "ood.tsv"
    ood_file.write_text("review\tlabel\nA truly great gift.\t0\nA broken, useless gift.\t1\n")
    ood = own_ood_set(tmp_path / "conf", "gifts", ood_file)
    common = [
        *TINY,
        "method=pbft",
        "dataset.num_train_queries=8",
        "trainer.batch_size=4",
        "trainer.epochs=3",
        "trainer.eval_every_epoch=true",
        *ood,
    ]
    result = run(make_cfg(*common, output_dir=tmp_path / "run"))
    curves = result["curves"]
    assert [(c["step"], c["epoch"]) for c in curves] == [(2, 1), (4, 2)]  # after epochs 1 and 2; 3 is the final
    assert all({"eval/accuracy", "gifts/accuracy", "eval/vocab_accuracy"} <= set(c) for c in curves)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["curves"] == curves
    # The curves travel in every checkpoint, as part of the loop's Progress.
    from accelerate.checkpointing import load_custom_state, save_custom_state

    from ctxdistill.checkpoint import Progress

    save_custom_state(Progress(step=4, curves=curves), str(tmp_path))
    restored = Progress()
    load_custom_state(restored, str(tmp_path))
    assert restored.curves == curves


@pytest.mark.parametrize("shuffle", [True, False])
def test_released_code_orders_are_one_override_each(make_cfg, tmp_path, monkeypatch, shuffle):
    # Upadhayaya et al.'s code: the queries in the same order every epoch (trainer.shuffle=false) and the
    # demonstrations in dataset order (dataset.context.shuffle_demos=false).
    from ctxdistill.data import build_task
    from ctxdistill.methods.distill import ContextDistillation

    seen = []
    real_collate = ContextDistillation.collate

    def recording(self, tokenizer, task, examples):
        seen.extend(e.uid for e in examples)
        return real_collate(self, tokenizer, task, examples)

    monkeypatch.setattr(ContextDistillation, "collate", recording)
    cfg = make_cfg(
        *TINY,
        "method=cd",
        "dataset.num_train_queries=8",
        "trainer.batch_size=4",
        "trainer.epochs=2",
        f"trainer.shuffle={shuffle}",
        f"dataset.context.shuffle_demos={shuffle}",
    )
    run(cfg)
    task = build_task(cfg.dataset, cfg.seed)
    queries = [q.uid for q in task.train_queries]
    assert (seen == queries * 2) == (not shuffle)
    positions = [int(d.uid.split("-")[1]) for d in task.demos]
    assert (positions == sorted(positions)) == (not shuffle)


def test_released_code_evaluation_with_dropout_is_one_override_and_the_seed_reproduces_it(
    make_cfg, tmp_path, monkeypatch
):
    # Upadhayaya et al.'s code never calls model.eval() after student_model.train(): the student's accuracies and
    # their "teacher accuracy" (teacher_model.generate, the same adapted model, with the context) run with dropout.
    from ctxdistill import evaluation
    from ctxdistill.evaluate_run import evaluate_run
    from ctxdistill.evaluation import Evaluator

    phase, modes = [None], set()
    real_logits = evaluation.answer_logits

    def recording(model, batch, prefix):
        modes.add((phase[0], model.training))
        return real_logits(model, batch, prefix)

    monkeypatch.setattr(evaluation, "answer_logits", recording)
    for name in ("prepare", "evaluate", "after_training"):

        def tagged(self, *args, real=getattr(Evaluator, name), name=name):
            phase[0] = name
            return real(self, *args)

        monkeypatch.setattr(Evaluator, name, tagged)
    common = [*TINY, "method=cd", "model.lora.dropout=0.5", "trainer.lr=1e-2", "trainer.max_steps=4", "seed=3"]
    common += ["trainer.eval_every=2"]  # a periodic evaluation with dropout must leave training's draws alone
    outcomes, seen = {}, {}
    for name, dropout in [("dropout", True), ("again", True), ("eval_mode", False)]:
        modes.clear()
        run(make_cfg(*common, f"trainer.evaluate_with_dropout={dropout}", output_dir=tmp_path / name))
        outcomes[name], seen[name] = outcome(tmp_path / name), set(modes)
    assert outcomes["dropout"] == outcomes["again"]  # the seed draws the masks: the same metrics and predictions
    dropout, eval_mode = outcomes["dropout"], outcomes["eval_mode"]
    assert dropout["train"] == eval_mode["train"]  # the same training
    assert dropout["metrics"]["eval/kl_to_teacher"] != eval_mode["metrics"]["eval/kl_to_teacher"]
    assert dropout["predictions"] != eval_mode["predictions"]
    # the frozen teacher's references (scored before training) are the suite's, in eval mode either way
    assert dropout["metrics"]["eval/teacher_accuracy"] == eval_mode["metrics"]["eval/teacher_accuracy"]
    assert seen["dropout"] == {("prepare", False), ("evaluate", True), ("after_training", True)}
    assert seen["eval_mode"] == {("prepare", False), ("evaluate", False), ("after_training", False)}
    again = evaluate_run(tmp_path / "dropout", [], "again")["metrics"]  # ctxdistill-eval, from the saved adapter
    assert without_timings(again) == dropout["metrics"]


def test_released_code_lr_schedule_is_one_override(make_cfg, monkeypatch):
    # upadraj/In-context training_utils.train: 32 queries make one "batch" of 32 examples per epoch, each
    # example one optimiser step; the LambdaLR steps after each batch: 1 x 20 = 20 steps, warmup int(0.1 * 20) = 2,
    # factor step / 2 below it, then 1. So the LR is 0 for epoch 1, 1e-5 / 2 for epoch 2, 1e-5 after.
    import torch

    used = []
    real_step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    # the first 3 epochs of the 20-epoch schedule
    schedule = ["trainer.epochs=3", "trainer.schedule_epochs=20", "trainer.steps_per_lr_update=32"]
    run(make_cfg(*TINY, "method=cd", "trainer=upadhayaya2024", *schedule))  # 32 queries at batch 1, lr 1e-5
    assert used == pytest.approx([0.0] * 32 + [0.5e-5] * 32 + [1e-5] * 32, rel=1e-12)


def test_lr_updates_every_n_steps_restart_with_each_epoch():
    # The released code with 40 queries: two "batches" per epoch (32 examples, then the 8 left), 20 epochs,
    # 40 LambdaLR steps, warmup int(0.1 * 40) = 4: factors 0, 1/4 in epoch 1; 2/4, 3/4 in epoch 2; 1 after.
    import torch
    from omegaconf import OmegaConf

    from ctxdistill.trainer import lr_schedule

    def lrs(**trainer) -> list[float]:
        cfg = OmegaConf.create({"lr": 1e-5, "scheduler": "constant_with_warmup", "warmup_ratio": 0.1, **trainer})
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        scheduler = lr_schedule(optimizer, cfg, steps_per_epoch=40, schedule_steps=800)
        used = []
        for _ in range(800):
            used.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return used

    released = [0.0] * 32 + [0.25e-5] * 8 + [0.5e-5] * 32 + [0.75e-5] * 8 + [1e-5] * 720
    assert lrs(steps_per_lr_update=32) == pytest.approx(released, rel=1e-12)
    # every step (the default): warmup over int(0.1 * 800) = 80 optimiser steps
    assert lrs(steps_per_lr_update=1) == pytest.approx([1e-5 * i / 80 for i in range(80)] + [1e-5] * 720, rel=1e-12)


def test_debug_fast_runs_any_configuration_in_seconds(make_cfg, tmp_path):
    cfg = make_cfg("experiment=demo", "method=cd", "debug=fast")
    assert (cfg.model.name, cfg.logger.backend, cfg.trainer.max_steps, cfg.dataset.num_eval) == (
        "tiny-random",
        "none",
        2,
        16,
    )
    result = run(cfg)
    assert result["train"]["steps"] == 2 and len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 16


@pytest.mark.skipif(
    cpp_compiler() is None,
    reason="torch.compile on the CPU needs a C++ compiler (the run refuses trainer.compile without one)",
)
def test_compiled_training_matches_eager_and_compiles_only_the_training_passes(uninterrupted, tmp_path):
    """trainer.compile=true: every training batch runs one compiled graph (a second would mean the teacher's or
    evaluation's passes were compiled too), with the eager run's losses and metrics within float tolerance."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    run(compose_run(tmp_path, "trainer.compile=true"))
    assert counters["stats"]["unique_graphs"] == 1
    compiled = outcome(tmp_path)
    assert compiled["train"]["final_loss"] == pytest.approx(uninterrupted["train"]["final_loss"], rel=1e-3)
    assert compiled["metrics"] == pytest.approx(uninterrupted["metrics"], rel=1e-3, abs=1e-6)


def test_a_setting_the_run_never_reads_is_named_as_ignored(make_cfg, caplog):
    from ctxdistill.methods import build_method
    from ctxdistill.run import warn_unused_training_settings

    overrides = [
        "method=icl",
        "trainer.lr=0.5",
        "+trainer.epochs=3",
        "trainer.eval_batch_size=4",
        "model.lora.r=4",
        "model.prefix_frozen_tokens=0",
    ]
    with caplog.at_level(logging.WARNING, logger="ctxdistill.run"):
        for method, adapter in [("icl", "lora"), ("cd", "lora"), ("cd", "full"), ("cd", "prefix"), ("kgbert", "lora")]:
            warn_unused_training_settings(build_method(make_cfg(*TINY, f"method={method}").method), overrides, adapter)
    # evaluation reads eval_batch_size; cd trains, so it reads the trainer's; each adapter reads only its own
    assert caplog.messages == [
        "method=icl does not train: ignoring trainer.lr, trainer.epochs, model.lora.r, model.prefix_frozen_tokens",
        "model.adapter=lora does not read model.prefix_frozen_tokens: ignoring them",
        "model.adapter=full does not read model.lora.r, model.prefix_frozen_tokens: ignoring them",
        "model.adapter=prefix does not read model.lora.r: ignoring them",
        "method=kgbert trains every weight, with no adapter: ignoring model.lora.r, model.prefix_frozen_tokens",
    ]
    caplog.clear()  # a sweep's cell says nothing: its summary names them once (tests/test_sweeps.py)
    method = build_method(make_cfg(*TINY, "method=icl").method)
    ignored = warn_unused_training_settings(method, overrides, "lora", in_sweep=True)
    assert not caplog.messages and [e["keys"] for e in ignored] == [
        ["trainer.lr", "trainer.epochs", "model.lora.r", "model.prefix_frozen_tokens"]
    ]


def test_a_periodic_evaluation_no_step_reaches_is_named(tmp_path, caplog):
    # the sixteenth audit: trainer.eval_every=50 over a 6-step run drew no curve and said nothing
    from ctxdistill.run import run

    from conftest import compose_run

    with caplog.at_level(logging.WARNING, logger="ctxdistill.trainer"):
        run(compose_run(tmp_path, "trainer.eval_every=6", "trainer.checkpoint_every=null"))
    assert caplog.messages == [
        "trainer.eval_every=6 is not below the run's 6 training steps: no learning curve (the final evaluation "
        "still runs). Set trainer.eval_every below 6 for one"
    ]
    assert json.loads((tmp_path / "metrics.json").read_text())["curves"] == []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ctxdistill.trainer"):
        run(compose_run(tmp_path / "curve", "trainer.eval_every=5", "trainer.checkpoint_every=null"))
    assert not caplog.messages
    assert [p["step"] for p in json.loads((tmp_path / "curve" / "metrics.json").read_text())["curves"]] == [5]


def test_a_method_setting_its_other_settings_leave_unread_is_named_as_ignored(make_cfg, caplog):
    # found by the fifteenth audit: each ran as the default did, to the digit, and a sweep over one gave rows that
    # differed in name only
    from ctxdistill.methods import build_method
    from ctxdistill.run import warn_unused_training_settings

    def warnings(*overrides: str) -> list[str]:
        cfg = make_cfg(*TINY, *overrides)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ctxdistill.run"):
            warn_unused_training_settings(build_method(cfg.method), list(overrides), "lora", cfg=cfg)
        return caplog.messages

    assert warnings("method=cd", "method.beta=0.9", "method.max_answer_tokens=4", "method.top_k_rest=bucket") == [
        "method.beta weighs divergence=jsd's mixture (method.divergence=forward_kl): ignoring method.beta",
        "method.max_answer_tokens is answer=teacher_generation's (method.answer=label_position): ignoring "
        "method.max_answer_tokens",
        "method.top_k_rest is the rest of a top-k teacher (method.top_k=null): ignoring method.top_k_rest",
    ]  # in the command line's order
    assert warnings("method=cd", "method.teacher=live", "method.teacher_cache=memory") == [
        "a live teacher is the student at every step (method.teacher=live): ignoring method.teacher_cache"
    ]
    assert (
        warnings("method=cd", "method.divergence=jsd", "method.beta=0.9", "method.top_k=5", "method.top_k_rest=bucket")
        == []
    )
    assert warnings("method=on_policy_cd", "method.beta=0.9") == [
        "method.beta weighs divergence=jsd's mixture (method.divergence=reverse_kl): ignoring method.beta"
    ]
    assert warnings("method=zero_shot", "dataset.num_train_queries=5") == [
        "method=zero_shot does not train: ignoring dataset.num_train_queries"
    ]
    assert warnings("logger=none", "logger.project=mine", "logger.mode=offline") == [
        "logger=none logs nothing: ignoring logger.project, logger.mode"  # the sixteenth audit: said nothing
    ]
    assert warnings("logger=wandb", "logger.project=mine") == []
    assert warnings("method=cd", "trainer.selection.every_epochs=2") == [
        "trainer.selection.metric=null selects no checkpoint: ignoring trainer.selection.every_epochs"
    ]
    # the eighteenth audit: GenPI and OPCD evaluate on inputs of their own; an ood=[hans] there ran no HANS, unsaid
    assert warnings("method=genpi", "ood=[hans]", "dataset.context.num_demos=2", "method.sft_weight=0.5") == [
        "method=genpi brings its own inputs and held-out sets, reading no dataset: ignoring ood, "
        "dataset.context.num_demos"
    ]
    assert warnings("method=cd", "ood=[hans]", "dataset.context.num_demos=2") == []
    assert warnings("method=cd", "dataset.hans_file=/data/hans.txt") == [
        "no out-of-domain set reads it (ood=[hans] or [hans_all] would): ignoring dataset.hans_file"
    ]
    assert warnings("method=cd", "ood=[hans]", "dataset.hans_file=/data/hans.txt") == []
    assert warnings("method=genpi", "method.sft_weight=1.0", "method.max_reason_tokens=7") == [
        "method.sft_weight=1 trains on the replies alone, with no reasons nor prompt-generation term: ignoring "
        "method.max_reason_tokens"
    ]
    # an experiment's max_steps (demo's 32) made a command line's trainer.epochs=1 train 32 steps, unsaid
    assert warnings("method=cd", "trainer.max_steps=3", "trainer.epochs=1") == [
        "trainer.max_steps=3 sets how long the run trains: ignoring trainer.epochs"
    ]


def test_several_processes_refuse_a_batch_size_that_leaves_an_epochs_last_batch_short(monkeypatch):
    """accelerate filled that batch with repeats of the epoch's first examples: 6 examples in batches of 4 on 2
    processes trained step 2 on step 1's examples again, and the loss moved 10% from the one-process run's."""
    from accelerate import Accelerator

    from ctxdistill.config import ConfigError

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    with pytest.raises(ConfigError, match=r"batch_size=2 does not divide the run's 5 training examples: on 2 proc"):
        train_linear(batch_size=2)


def test_an_lr_schedule_shorter_than_max_steps_is_refused_and_a_longer_one_accepted(make_cfg):
    """schedule_epochs was checked against trainer.epochs, which max_steps overrides: a schedule shorter than the
    run's steps passed (its last steps trained at a rate of 0), and one longer than them was refused."""
    from ctxdistill.config import ConfigError, validate

    validate(make_cfg(*TINY, "trainer.max_steps=3", "trainer.epochs=3", "trainer.schedule_epochs=1"))
    with pytest.raises(ConfigError, match=r"schedule_epochs=1 is an LR schedule of 5 steps.*trains 10.*at least 2"):
        train_linear(max_steps=10, schedule_epochs=1)
    steps, _ = train_linear(max_steps=3, epochs=3, schedule_epochs=1)  # epochs unread: a 5-step schedule stopped at 3
    assert [lr for _, lr in steps] == pytest.approx([1e-3 * (1 - step / 5) for step in range(3)])


@pytest.mark.parametrize("method", ["cd", "on_policy_cd"])
def test_distilling_an_empty_context_from_the_model_itself_is_refused_before_the_model_loads(make_cfg, method):
    """Found by the bad-input audit: the teacher's prompt was the student's, and the run trained on a loss of 0."""
    from ctxdistill.config import ConfigError

    empty = ["dataset.context.num_demos=0", "dataset.context.instruction=", "dataset.context.separator="]
    with pytest.raises(ConfigError, match="nothing to distil.*method.teacher_model"):
        run(make_cfg(*TINY, f"method={method}", *empty))


def test_selecting_on_the_accuracy_of_one_draw_of_unvoted_queries_is_refused_before_training(make_cfg, tmp_path):
    """It was declared for every set but reported only where queries are voted on: the run trained an epoch, then
    failed with a KeyError and no checkpoint."""
    from ctxdistill.config import ConfigError

    overrides = [
        "model=tiny-random",
        "method=cd",
        "ood=[synthetic_reworded]",
        "dataset.ood.ood.source.split_sizes.eval=16",
    ]
    overrides += ["dataset.num_train_queries=8", "trainer.batch_size=4", "trainer.epochs=2"]
    selected = "trainer.selection.metric=ood/single_draw_accuracy"
    with pytest.raises(ConfigError, match=f"{selected}: the run reports no such metric"):
        run(make_cfg(*overrides, selected, output_dir=tmp_path / "r"))
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_selecting_on_a_set_the_run_does_not_evaluate_is_refused_before_the_model_loads(make_cfg, monkeypatch):
    """The nineteenth audit: the eval sets are known from the data, yet the refusal came after the model loaded
    (52 s for the bundled model)."""
    from ctxdistill import run as run_module
    from ctxdistill.config import ConfigError

    monkeypatch.setattr(run_module, "build_models", lambda *a, **k: pytest.fail("the model loaded first"))
    with pytest.raises(
        ConfigError, match=r"selection.metric=valid/accuracy: the run reports no such metric \(its sets: eval\)"
    ):
        run(make_cfg(*TINY, "method=cd", "trainer.selection.metric=valid/accuracy"))
