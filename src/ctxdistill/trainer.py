"""The one training loop every training method shares.

The method supplies its examples, its batches and its loss; this loop owns the
optimiser, schedule, gradient accumulation, clipping, mixed precision (through
accelerate, so the same code runs on CPU, one GPU or several), logging and
periodic evaluation, the choice of the tested checkpoint (``trainer.selection``), and
resumable state: checkpoints every ``checkpoint_every`` steps, resumption from the latest
one, a clean stop on SIGTERM/SIGUSR1, and a clear stop on a non-finite loss.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import get_scheduler

from ctxdistill import provenance
from ctxdistill.checkpoint import (
    BestWeights,
    Progress,
    StopSignals,
    latest_checkpoint,
    resume_hint,
    save_checkpoint,
    trainable_weights_only,
)
from ctxdistill.config import ConfigError
from ctxdistill.data import Task
from ctxdistill.methods import Method
from ctxdistill.models import ModelHandle, compiled_for_training
from ctxdistill.progress import progress_bar
from ctxdistill.results.metrics import MetricSet

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing after the last good checkpoint is saved."""


def step_means(micro_batches: list[tuple[torch.Tensor, dict[str, float]]]) -> tuple[float, dict[str, float]]:
    """The loss and each statistic of one optimiser step: means over its accumulated micro-batches (a
    statistic over those that report it)."""
    loss = torch.stack([loss for loss, _ in micro_batches]).float().mean().item()
    names = dict.fromkeys(name for _, extra in micro_batches for name in extra)
    values = {name: [float(extra[name]) for _, extra in micro_batches if name in extra] for name in names}
    return loss, {name: sum(v) / len(v) for name, v in values.items()}


@dataclass(frozen=True)
class Selection:
    """trainer.selection, checked against the run's eval sets and metrics: the checkpoint tested is the one
    whose ``metric`` is best among those evaluated after epochs ``every_epochs``, 2 x ``every_epochs``, ... past
    the first ``skip_epochs``."""

    metric: str  # {set}/{name}
    higher_is_better: bool
    every_epochs: int
    skip_epochs: int

    @property
    def eval_set(self) -> str:
        return self.metric.rpartition("/")[0]

    def due(self, epoch: int) -> bool:
        """Whether the checkpoint after ``epoch`` (counted from 1) is a candidate."""
        return epoch > self.skip_epochs and epoch % self.every_epochs == 0

    def describe(self) -> str:
        first = self.every_epochs * (self.skip_epochs // self.every_epochs + 1)  # the first epoch it evaluates
        return f"{self.metric} after epochs {first}, {first + self.every_epochs}, ..."


def check_selection_set(spec: DictConfig, eval_sets: list[str], metric_set: Optional[MetricSet] = None) -> None:
    """A ConfigError naming a trainer.selection metric on a set the run does not evaluate (known before the model
    loads) or, given the run's declared metrics, a metric it does not report."""
    if spec.metric is None:
        return
    set_name, _, name = spec.metric.rpartition("/")
    if set_name not in eval_sets or (metric_set is not None and not metric_set.declares(spec.metric)):
        metrics = f"; its metrics: {metric_set.described()}" if metric_set else ""
        headline = metric_set.headline.name if metric_set else name
        raise ConfigError(
            f"trainer.selection.metric={spec.metric}: the run reports no such metric (its sets: "
            f"{', '.join(eval_sets)}{metrics}). Name one, e.g. trainer.selection.metric={eval_sets[-1]}/{headline}"
            + ("" if len(eval_sets) > 1 else " after adding a validation set (dataset.validation_split=valid)")
        )


def checkpoint_selection(spec: DictConfig, eval_sets: list[str], metric_set: MetricSet) -> Optional[Selection]:
    """trainer.selection as a :class:`Selection` (None: the final model is tested), or a ConfigError naming a
    metric the run does not report."""
    check_selection_set(spec, eval_sets, metric_set)
    if spec.metric is None:
        return None
    name = spec.metric.rpartition("/")[2]
    higher = next(m.higher_is_better for m in metric_set.metrics if m.name == name)
    return Selection(spec.metric, higher, spec.every_epochs, spec.skip_epochs)


def lr_schedule(
    optimizer: torch.optim.Optimizer, cfg: DictConfig, steps_per_epoch: int, schedule_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``trainer.scheduler`` over ``schedule_steps`` optimiser steps, moved on once every
    ``trainer.steps_per_lr_update`` of them, counted from each epoch's start: its length and warmup count these
    groups (``trainer.warmup_ratio`` of them, rounded down; transformers' Trainer rounds up, a step more where the
    product is not whole: docs/papers name the experiments where it is)."""
    per_update = cfg.steps_per_lr_update
    updates_per_epoch = math.ceil(steps_per_epoch / per_update)

    def update(step: int) -> int:
        """The schedule's step during optimiser step ``step`` (from 0)."""
        epoch, within = divmod(step, steps_per_epoch)
        return epoch * updates_per_epoch + within // per_update

    updates = update(schedule_steps - 1) + 1
    scheduler = get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * updates), num_training_steps=updates
    )
    # transformers' schedules are LambdaLR factors of their own step; each is read at the optimiser step's group
    scheduler.lr_lambdas = [lambda step, factor=factor: factor(update(step)) for factor in scheduler.lr_lambdas]
    return scheduler


def train(
    method: Method,
    handle: ModelHandle,
    tokenizer,
    task: Task,
    cfg: DictConfig,
    accelerator: Accelerator,
    seed: int,
    log_metrics: Callable[[dict, int], None],
    periodic_eval: Optional[Callable[[int, Optional[list[str]]], dict]] = None,
    run_dir: Optional[Path] = None,
    fingerprint: str = "",
    selection: Optional[Selection] = None,
) -> tuple[dict[str, float], list[dict]]:
    """Train ``handle.student`` with ``method``'s loss; returns summary statistics and the curves of the
    periodic evaluations (``periodic_eval(step, eval set names or None for all)`` returns its metrics).

    With ``run_dir``, training resumes from its latest checkpoint (made by a run with the
    same ``fingerprint``) and saves new ones there. With a ``selection`` (which needs both), the student
    ends with the weights of its best evaluated checkpoint instead of its final ones.
    """
    examples = method.train_examples(task)
    started = time.perf_counter()
    prepared = method.prepare(handle, tokenizer, task, examples, cfg.eval_batch_size) or {}
    prepare_seconds = time.perf_counter() - started
    examples = [e for e in examples if method.trains_on(e)]
    if not examples:
        raise ConfigError(
            f"method={method.name}: no training example has a target after preparation ({prepared}); the "
            "warnings above say why (e.g. the teacher answered none of them usably). Give the teacher what it "
            "needs to answer (a stronger teacher model, more demonstrations, sampling instead of greedy answers) "
            "or more training examples"
        )

    # The shuffle generator's state at each epoch start is checkpointed: a resumed run sees the same order.
    # The loader yields the examples; the loop collates them: a collate that draws (fresh negatives, masks)
    # must draw for trained batches only, not for the batch accelerate's loader reads ahead, nor again for the
    # batches a resumed run skips, or the method's generators in a checkpoint are ahead of its steps.
    shuffle = torch.Generator().manual_seed(seed)
    loader = DataLoader(examples, batch_size=cfg.batch_size, shuffle=cfg.shuffle, generator=shuffle, collate_fn=list)
    if accelerator.num_processes > 1 and len(examples) % cfg.batch_size:
        raise ConfigError(
            f"trainer.batch_size={cfg.batch_size} does not divide the run's {len(examples)} training examples: on "
            f"{accelerator.num_processes} processes accelerate fills each epoch's last batch with repeats of the "
            "epoch's first examples, so the run would not train as it does on one process. Train on a multiple of "
            f"{cfg.batch_size} examples (e.g. dataset.num_train_queries), choose a trainer.batch_size that divides "
            f"{len(examples)}, or run on one process"
        )
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum_steps)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    if periodic_eval and cfg.eval_every and cfg.eval_every >= total_steps:
        log.warning(  # the last step's evaluation is the final one: no point of the curve would be drawn
            "trainer.eval_every=%d is not below the run's %d training steps: no learning curve (the final "
            "evaluation still runs). Set trainer.eval_every below %d for one",
            cfg.eval_every,
            total_steps,
            total_steps,
        )
    # A schedule longer than training stops part-way down it (an earlier epoch's checkpoint of a longer run).
    schedule_steps = cfg.schedule_epochs * steps_per_epoch if cfg.schedule_epochs else total_steps
    if schedule_steps < total_steps:  # its last steps would train at the schedule's end: a rate of 0
        raise ConfigError(
            f"trainer.schedule_epochs={cfg.schedule_epochs} is an LR schedule of {schedule_steps} steps "
            f"({steps_per_epoch} an epoch), and the run trains {total_steps} (trainer.max_steps): its last "
            f"{total_steps - schedule_steps} would not learn. Set trainer.schedule_epochs to at least "
            f"{math.ceil(total_steps / steps_per_epoch)}, or null"
        )
    params = [p for p in handle.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = lr_schedule(optimizer, cfg, steps_per_epoch, schedule_steps)
    handle.student, optimizer, loader, scheduler = accelerator.prepare(handle.student, optimizer, loader, scheduler)

    # a file rewritten at its path is other data under the same settings (a checkpoint of older code has none)
    def recorded(entries) -> list[str]:
        return sorted(entry.get("sha256") or json.dumps(entry, sort_keys=True) for entry in entries)

    read = provenance.inputs()["data"]
    data = recorded(read)
    older = recorded(e for e in read if "files" not in e)  # code from before model directories were recorded
    progress = Progress(epoch_shuffle_state=shuffle.get_state(), fingerprint=fingerprint, data=data)
    accelerator.register_for_checkpointing(progress)
    trainable_weights_only(accelerator)
    resume = latest_checkpoint(run_dir) if run_dir else None
    if resume:
        accelerator.load_state(str(resume))
        if progress.fingerprint != fingerprint or progress.data not in (data, older):
            other = "settings" if progress.fingerprint != fingerprint else "data (a file at its path holds another now)"
            raise ConfigError(
                f"{resume} was written by a run with other {other}. Use a new output_dir, or "
                f"delete {resume.parent} to start this one over."
            )
        if progress.method_state:  # (a checkpoint of older code has none)
            method.load_state_dict(progress.method_state)
        log.info("resuming from %s (step %d of %d)", resume, progress.step, total_steps)
    resumed_from = progress.step
    best = None
    if selection:
        complete_epochs = total_steps // steps_per_epoch
        if not any(selection.due(epoch) for epoch in range(1, complete_epochs + 1)):
            raise ConfigError(
                f"trainer.selection evaluates {selection.describe()}, and training runs {complete_epochs} complete "
                "epoch(s): no checkpoint would be evaluated. Train longer, or lower trainer.selection.skip_epochs "
                "or trainer.selection.every_epochs"
            )
        best = BestWeights(run_dir, progress, selection.higher_is_better)

    autocast_module = accelerator.unwrap_model(
        handle.student
    )  # the module whose forward accelerate runs under autocast

    def evaluate(step: int, names: Optional[list[str]]) -> dict:
        """A periodic evaluation, in the precision of the weights as the final one (and the teacher's) are: under
        trainer.mixed_precision, selection and curves were bf16 figures, the final metrics of the same weights not."""
        autocast_forward = vars(autocast_module).get("forward")
        if "_original_forward" in vars(autocast_module):
            autocast_module.forward = autocast_module._original_forward
        try:
            return periodic_eval(step, names)
        finally:
            if autocast_forward is not None:
                autocast_module.forward = autocast_forward

    def end_of_epoch(epoch: int, last: bool) -> None:
        """The evaluations after ``epoch`` (counted from 1): every set (trainer.eval_every_epoch; the last
        epoch's is the run's final evaluation), the selection's set; the checkpoint kept if it is the best."""
        evaluated = evaluate(progress.step, None) if cfg.eval_every_epoch and not last else {}
        if selection and selection.due(epoch):
            if selection.metric not in evaluated:
                evaluated |= evaluate(progress.step, [selection.eval_set])
            if selection.metric not in evaluated:  # declared, yet not reported by this run (a bug to report)
                raise ConfigError(
                    f"trainer.selection.metric={selection.metric}: the evaluation after epoch {epoch} reported no such "
                    f"value (it reported {', '.join(sorted(evaluated))}); select on one of them"
                )
            record = {"step": progress.step, "epoch": epoch, "value": evaluated[selection.metric]}
            kept = best.consider(record, accelerator.unwrap_model(handle.student), accelerator)
            log.info(
                "epoch %d: %s=%.4f, %s",
                epoch,
                selection.metric,
                record["value"],
                "the best so far"
                if kept
                else f"no better than epoch {progress.best['epoch']}'s {progress.best['value']:.4f}",
            )
        if evaluated:
            progress.curves.append({"step": progress.step, "epoch": epoch, **evaluated})

    handle.student.train()
    handle.training_started = True

    bar = progress_bar(
        total=total_steps, initial=progress.step, desc=f"train {method.name}", disable=not accelerator.is_main_process
    )
    loop_started = time.perf_counter()
    compiling = compiled_for_training(handle.base) if cfg.compile else contextlib.nullcontext()
    with StopSignals() as signals, compiling:
        while progress.step < total_steps:
            shuffle.set_state(progress.epoch_shuffle_state)
            micro_batches = []  # (loss, statistics) of each micro-batch of the step being accumulated
            for index, chunk in enumerate(loader):
                if index < progress.batches_in_epoch:
                    continue  # consumed before the checkpoint
                batch = send_to_device(method.collate(tokenizer, task, chunk), accelerator.device)
                with accelerator.accumulate(handle.student):
                    loss, extra = method.loss(handle, batch)
                    micro_batches.append((loss.detach(), extra))
                    # accelerate divides by grad_accum_steps; an epoch's last step may hold fewer micro-batches,
                    # and its gradient is still their mean (the loss it logs)
                    step_start = index - index % cfg.grad_accum_steps
                    in_step = min(cfg.grad_accum_steps, len(loader) - step_start)
                    accelerator.backward(loss * (cfg.grad_accum_steps / in_step))
                    if accelerator.sync_gradients and cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    step_lr = optimizer.param_groups[0]["lr"]  # the step's own: the scheduler moves on after it
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                progress.batches_in_epoch = index + 1
                if not accelerator.sync_gradients:
                    continue
                progress.step += 1
                step_loss, extra = step_means(micro_batches)
                micro_batches = []
                # One collective per step: the mean loss, and whether any process saw a bad loss or a signal.
                status = accelerator.reduce(
                    torch.tensor(
                        [step_loss, float(not math.isfinite(step_loss)), float(signals.received is not None)],
                        device=accelerator.device,
                    ),
                    "sum",
                )
                if status[1] > 0:
                    last = latest_checkpoint(run_dir) if run_dir else None
                    raise TrainingDiverged(
                        f"the training loss is {step_loss} at step {progress.step} of {total_steps}; training "
                        f"stopped. "
                        + (f"The last good checkpoint is {last}; " if last else "No checkpoint was saved; ")
                        + "lower trainer.lr or set trainer.max_grad_norm before rerunning."
                    )
                progress.last_loss = status[0].item() / accelerator.num_processes
                bar.set_postfix(loss=f"{progress.last_loss:.4f}", refresh=False)  # drawn by the update
                bar.update(1)
                log_metrics(
                    {
                        "train/loss": progress.last_loss,
                        "train/lr": step_lr,
                        "train/epoch": progress.step / steps_per_epoch,
                        **{f"train/{k}": v for k, v in extra.items()},
                    },
                    progress.step,
                )
                if (
                    periodic_eval
                    and cfg.eval_every
                    and progress.step % cfg.eval_every == 0
                    and progress.step < total_steps
                ):
                    progress.curves.append(
                        {
                            "step": progress.step,
                            "epoch": progress.step / steps_per_epoch,
                            **evaluate(progress.step, ["eval"]),
                        }
                    )
                stop = status[2] > 0
                due = cfg.checkpoint_every and (
                    progress.step % cfg.checkpoint_every == 0 or progress.step == total_steps
                )
                if run_dir and (due or stop):
                    progress.method_state = method.state_dict()
                    save_checkpoint(accelerator, run_dir, progress.step, cfg.keep_checkpoints)
                    if best:
                        best.checkpointed(accelerator)
                if stop:
                    bar.close()
                    log.warning("stopped at step %d of %d; %s", progress.step, total_steps, resume_hint(run_dir))
                    signals.exit(signals.received or signal.SIGTERM)
                if progress.step >= total_steps:
                    break
            else:  # the epoch ran out: the next one starts from the generator's current state
                progress.epoch += 1
                progress.batches_in_epoch = 0
                progress.epoch_shuffle_state = shuffle.get_state()
                if periodic_eval:
                    end_of_epoch(progress.epoch, last=False)
        if periodic_eval and progress.batches_in_epoch == len(loader):  # the last step ended an epoch
            end_of_epoch(progress.epoch + 1, last=True)
    bar.close()
    # Without accelerate's autocast wrapper: the trained model is evaluated (and its serving cost measured) in the
    # precision of its weights, as the teacher was before training, not in mixed precision.
    handle.student = accelerator.unwrap_model(handle.student, keep_fp32_wrapper=False)
    selected = {}
    if best:
        best.restore(handle.student)
        selected = {f"selected_{key}": value for key, value in progress.best.items()}
        log.info(
            "testing the checkpoint of epoch %d (%s=%.4f), the best of those evaluated on %s, not the final model",
            progress.best["epoch"],
            selection.metric,
            progress.best["value"],
            selection.eval_set,
        )
    return {
        **selected,
        **prepared,
        "steps": progress.step,
        "schedule_steps": schedule_steps,
        "examples": len(examples),
        "final_loss": progress.last_loss,
        "resumed_from_step": resumed_from,
        "prepare_seconds": prepare_seconds,
        "train_seconds": time.perf_counter() - loop_started,
    }, progress.curves
