"""One run: validate, load data and model, train (if the method trains), evaluate, save.

Everything cheap that can fail (config values, data files, demonstrations, prompt
lengths) is checked before the model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from omegaconf import DictConfig, OmegaConf

from ctxdistill import provenance
from ctxdistill.checkpoint import (
    latest_checkpoint,
    load_trainable_weights,
    remove_checkpoints,
    restore_random_states,
    save_random_states,
    save_trainable_weights,
)
from ctxdistill.config import ConfigError, DatasetConfig, MixtureConfig, override_keys, table_label, validate
from ctxdistill.data import Task
from ctxdistill.methods import build_method
from ctxdistill.models import (
    ModelHandle,
    TrainableContext,
    add_adapter,
    check_adapter,
    honour_name_or_path,
    load_model,
    load_tokenizer,
    load_trained,
    teaching_identity,
)
from ctxdistill.results.metrics import float32_rounded
from ctxdistill.results.records import EVALUATIONS, PREDICTIONS, RUN_CONFIG
from ctxdistill.serving import serving_metrics
from ctxdistill.sweeps import config_changes, group_name
from ctxdistill.tracking import Tracker, create_tracker, exit_code
from ctxdistill.trainer import check_selection_set, checkpoint_selection, train

log = logging.getLogger(__name__)


def write_json(path: Path, payload: Any) -> None:
    """Write then rename, so a killed run never leaves a half-written file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def run_identity(cfg: DictConfig, task: Task) -> dict[str, Any]:
    return {
        "method": cfg.method.name,
        "model": table_label(cfg.model),
        "dataset": task.name,
        "seed": cfg.seed,
        "paper": cfg.paper,
    }


def wandb_tag(text: str) -> str:
    """``text`` as a W&B tag, which holds at most 64 characters: a long local path keeps its end."""
    return text if len(text) <= 64 else "..." + text[-61:]


def training_fingerprint(cfg: DictConfig) -> str:
    """What a checkpoint must share with the run that resumes it (not how often it saves or evaluates)."""
    return hashlib.sha256(json.dumps(training_settings(cfg), sort_keys=True).encode()).hexdigest()[:16]


def training_settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings the training fingerprint hashes."""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in (
        "checkpoint_every",
        "keep_checkpoints",
        "eval_every",
        "eval_every_epoch",
        "eval_batch_size",
        "save_model",
        "evaluate_with_dropout",
    ):
        trainer.pop(key, None)  # a config.yaml written before the setting: read as it is
    # a checkpoint of code from before these settings still resumes
    if trainer["selection"]["metric"] is None:
        trainer.pop("selection")
    if trainer["steps_per_lr_update"] == 1:
        trainer.pop("steps_per_lr_update")
    return {
        "trainer": trainer,
        "seed": cfg.seed,
        **{key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("method", "model", "dataset")},
    }


def make_accelerator(trainer: DictConfig) -> Accelerator:
    """``trainer.batch_size`` is the global batch: under N processes each takes 1/N of every batch,
    so the optimisation does not depend on the number of processes."""
    from accelerate.utils import DataLoaderConfiguration, DeepSpeedPlugin, FullyShardedDataParallelPlugin

    plugins: dict[str, Any] = {}
    offload = trainer.distributed.cpu_offload
    if trainer.distributed.strategy == "fsdp":
        plugins["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            reshard_after_forward=True,
            state_dict_type="SHARDED_STATE_DICT",
            cpu_offload=offload,
        )
    elif trainer.distributed.strategy == "zero3":
        plugins["deepspeed_plugin"] = DeepSpeedPlugin(
            zero_stage=3,
            gradient_accumulation_steps=trainer.grad_accum_steps,
            gradient_clipping=trainer.max_grad_norm or 0.0,
            zero3_init_flag=False,
            offload_optimizer_device="cpu" if offload else "none",
            offload_param_device="cpu" if offload else "none",
        )
    accelerator = Accelerator(
        mixed_precision=trainer.mixed_precision,
        gradient_accumulation_steps=trainer.grad_accum_steps,
        cpu=not torch.cuda.is_available(),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        **plugins,
    )
    if trainer.batch_size % accelerator.num_processes:
        raise ConfigError(
            f"trainer.batch_size: {trainer.batch_size} does not split over "
            f"{accelerator.num_processes} processes. Use a multiple of {accelerator.num_processes}."
        )
    return accelerator


def hydra_choices() -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def hydra_overrides() -> Optional[list[str]]:
    """The command line's overrides (a sweep cell's own values included); None outside the ctxdistill command."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


# Settings only training reads: the trainer group but what evaluation reads of it, and the trained adapter.
TRAINING_KEYS = ("trainer.", "model.adapter", "model.lora.", "model.prefix_")
# What only the evaluation of a trained model reads (ctxdistill-eval reads it, a method that trains nothing does not)
TRAINED_MODEL_EVALUATION_KEYS = ("trainer.evaluate_with_dropout",)
EVALUATION_TRAINER_KEYS = ("trainer.eval_batch_size", "trainer.distributed", *TRAINED_MODEL_EVALUATION_KEYS)
# The settings each model.adapter reads, which no other adapter does.
ADAPTER_KEYS = {"lora": "model.lora.", "prefix": "model.prefix_"}


# A task's settings that a task mixture sets for all its tasks, or has no use for (data.mixture reads the rest).
MIXTURE_SETS = {
    "context.num_demos": "a task mixture draws dataset.num_demos demonstrations for every task's prompts",
    "num_eval": "a task mixture evaluates dataset.num_eval held-out queries of every task",
    "context.data_seed": "a task mixture draws every task's pool with dataset.data_seed",
    "num_train_queries": "a task mixture spreads dataset.num_train_instances prompts over its tasks",
    **dict.fromkeys(
        ("context.num_contexts", "context.instructions", "context.demo_verbalizers", "context.shuffle_demos",
         "context.draw"),
        "a task mixture draws each prompt's demonstrations from its task's pool (dataset.pool_size)",
    ),
    **dict.fromkeys(
        ("ood", "hans_file"), "a task mixture evaluates its tasks' held-out queries only"
    ),
}  # fmt: skip


def unread_settings(cfg: DictConfig) -> dict[str, str]:
    """The settings of ``cfg`` that its other settings leave unread, each with why: the method's own (its schema's
    ``unread``), a checkpoint selection's without its metric, a logger's that logs nothing, the number of epochs
    where trainer.max_steps sets the length, the dataset and ood groups where the method brings its own data. A
    group's name (``dataset``) stands for each of its settings."""
    schema = OmegaConf.get_type(cfg.method)
    unread = schema.unread(cfg.method)
    if schema.dataset_kinds is None:
        reason = f"method={cfg.method.name} brings its own inputs and held-out sets, reading no dataset"
        unread |= {"dataset": reason, "ood": reason}
    elif OmegaConf.get_type(cfg.dataset) is DatasetConfig and cfg.dataset.hans_file is not None:
        if not any(eval_set.source.file == cfg.dataset.hans_file for eval_set in cfg.dataset.ood.values()):
            unread["dataset.hans_file"] = "no out-of-domain set reads it (ood=[hans] or [hans_all] would)"
    if OmegaConf.get_type(cfg.dataset) is MixtureConfig:
        for group in ("train_tasks", "eval_tasks"):
            for name in cfg.dataset[group]:
                unread |= {f"dataset.{group}.{name}.{key}": why for key, why in MIXTURE_SETS.items()}
    if cfg.trainer.selection.metric is None:
        reason = "trainer.selection.metric=null selects no checkpoint"
        unread |= {f"trainer.selection.{key}": reason for key in cfg.trainer.selection if key != "metric"}
    if cfg.logger.backend == "none":
        unread |= {f"logger.{key}": "logger=none logs nothing" for key in cfg.logger if key != "backend"}
    if cfg.trainer.max_steps is not None:
        unread["trainer.epochs"] = f"trainer.max_steps={cfg.trainer.max_steps} sets how long the run trains"
    return unread


def unread_entries(cfg: DictConfig, keys: list[str]) -> list[dict[str, Any]]:
    """Those of ``keys`` that ``cfg``'s other settings leave unread (:func:`unread_settings`), one entry per
    reason: ``{"keys", "reason", "warning"}``."""
    unread = unread_settings(cfg)
    reasons = {k: unread.get(k, unread.get(k.partition(".")[0])) for k in keys}
    entries = []
    for reason in dict.fromkeys(r for r in reasons.values() if r):
        given = [k for k in keys if reasons[k] == reason]
        entries.append({"keys": given, "reason": reason, "warning": f"{reason}: ignoring {', '.join(given)}"})
    return entries


def unused_settings(
    method, overrides: Optional[list[str]], adapter: str, cfg: Optional[DictConfig] = None
) -> list[dict[str, Any]]:
    """The command-line settings the run never reads, each ``{"keys", "reason", "warning"}``: training's, when the
    method does not train; an adapter's other than the one it trains (``adapter``: model.adapter), or any adapter's
    when it trains every weight; those the run's other settings leave unread (:func:`unread_settings` of ``cfg``)."""
    keys = override_keys(overrides or [])
    entries = unread_entries(cfg, keys) if cfg is not None else []
    if not method.trains:
        unused = training_settings_in(overrides or []) + [
            k for k in keys if k.startswith(TRAINED_MODEL_EVALUATION_KEYS) or k == "dataset.num_train_queries"
        ]
        reason = f"method={method.name} does not train"
        if unused:
            entries.insert(0, {"keys": unused, "reason": reason, "warning": f"{reason}: ignoring {', '.join(unused)}"})
        return entries
    trained = adapter if method.trained_weights == "adapter" else None
    unused = [k for k in keys if any(k.startswith(ADAPTER_KEYS[a]) for a in ADAPTER_KEYS if a != trained)]
    if trained is None and "model.adapter" in keys:
        unused.insert(0, "model.adapter")
    if not unused:
        return entries
    if trained:
        reason = f"model.adapter={adapter} reads only its own adapter's settings"
        warning = f"model.adapter={adapter} does not read {', '.join(unused)}: ignoring them"
    else:
        reason = f"method={method.name} trains every weight, with no adapter"
        warning = f"{reason}: ignoring {', '.join(unused)}"
    return [{"keys": unused, "reason": reason, "warning": warning}, *entries]


def warn_unused_training_settings(
    method,
    overrides: Optional[list[str]],
    adapter: str,
    in_sweep: bool = False,
    cfg: Optional[DictConfig] = None,
) -> list[dict[str, Any]]:
    """Name the command-line settings the run never reads (``unused_settings``) in a warning, not silently dropped
    (a warning, not an error: a sweep gives every cell the same settings). A sweep's cell returns them unsaid: the
    settings of a sweep are meant for the cells that read them, and its summary says once which cells did not
    (``ctxdistill.sweeps.ignored_settings_warnings``, from each cell's metrics.json)."""
    unused = unused_settings(method, overrides, adapter, cfg)
    if not in_sweep:
        for entry in unused:
            log.warning("%s", entry["warning"])
    return unused


def training_settings_in(overrides: list[str]) -> list[str]:
    """The keys of ``overrides`` that only training reads (trainer.* but its evaluation settings, the adapter's)."""
    keys = override_keys(overrides)
    return [k for k in keys if k.startswith(TRAINING_KEYS) and not k.startswith(EVALUATION_TRAINER_KEYS)]


def sweep_dir() -> Optional[Path]:
    """The directory of this run's sweep; None for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir)


def sweep_group() -> Optional[str]:
    """The W&B group naming this run's sweep; None for a single run."""
    return None if (swept := sweep_dir()) is None else group_name(swept)


def separate_teacher_tokenizer(cfg: DictConfig, method, task, tokenizer):
    """The method's separate teacher's tokenizer when its vocabulary is not the student's (None when it is,
    or when the base weights teach), once the method has checked that teacher, before either model loads."""
    teacher_spec = method.teacher_model
    if teacher_spec is None:
        return None
    honour_name_or_path(teacher_spec, "method.teacher")
    teacher_tokenizer = load_tokenizer(teacher_spec, cfg.cache_dir)
    method.check_teacher(cfg, task, tokenizer, teacher_tokenizer)
    return None if teacher_tokenizer.get_vocab() == tokenizer.get_vocab() else teacher_tokenizer


def evaluation_dropout_seed(cfg: DictConfig, method) -> Optional[int]:
    """The seed of the trained model's dropout in its evaluation (trainer.evaluate_with_dropout), or None: eval mode."""
    return cfg.seed if cfg.trainer.evaluate_with_dropout and method.trains else None


def build_models(
    cfg: DictConfig, method, tokenizer, task, device, saved: Optional[Path] = None, teacher_tokenizer=None
):
    """(the model the method trains or evaluates, the separate frozen teacher or None, the base model's
    parameter count). With ``saved`` (a finished run's adapter/ or model/) the trained weights are loaded
    instead of a new adapter, and with model/ the initial weights stay as the teacher. ``teacher_tokenizer``:
    the separate teacher's, when it is not the student's."""
    initial = method.wrap_model(load_model(cfg.model, cfg.cache_dir, tokenizer, cfg.seed), tokenizer)
    parameters = sum(p.numel() for p in initial.parameters())  # the x axis of comparison plots
    model, teacher = initial, None
    if saved is not None:
        model = load_trained(initial, saved, cfg.model).requires_grad_(False)
        if saved.name == "model" and model is not initial:
            teacher = initial.requires_grad_(False).eval()
    elif method.trained_weights == "adapter":  # the adapter model.adapter selects
        model = add_adapter(initial, cfg.model, tokenizer, task.context)
    elif method.trained_weights is None:
        model.requires_grad_(False)
    if method.teacher_model is not None:
        teacher = load_model(method.teacher_model, cfg.cache_dir, teacher_tokenizer or tokenizer, cfg.seed)
        teacher = teacher.requires_grad_(False).eval()
        log.info(
            "teacher %s: %d parameters, frozen", method.teacher_model.name, sum(p.numel() for p in teacher.parameters())
        )
    return model.to(device), teacher.to(device) if teacher is not None else None, parameters


def run(cfg: DictConfig) -> dict[str, Any]:
    started = time.perf_counter()
    provenance.begin_run()
    validate(cfg, hydra_overrides() or ())
    honour_name_or_path(cfg.model)
    out = Path(cfg.output_dir)
    set_seed(cfg.seed)
    method = build_method(cfg.method)
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    task = method.build_task(cfg.dataset, cfg.seed)
    if method.trains and not method.train_examples(task):
        raise ConfigError(
            f"method={method.name} trains on the {task.name} demonstrations or queries, and "
            f"there are none. Set dataset.context.num_demos or dataset.num_train_queries above 0."
        )
    method.check_inputs(task, tokenizer, cfg)
    check_selection_set(cfg.trainer.selection, list(task.eval_sets))  # its metric is checked once declared
    if method.trained_weights == "adapter":
        check_adapter(cfg.model, cfg.cache_dir, tokenizer, task.context, method.wrap_model)
    ignored = warn_unused_training_settings(
        method, hydra_overrides(), cfg.model.adapter, sweep_group() is not None, cfg
    )
    teacher_spec = method.teacher_model  # a separate (larger) teacher, or None: the base weights teach
    teacher_tokenizer = separate_teacher_tokenizer(cfg, method, task, tokenizer)

    accelerator = make_accelerator(cfg.trainer)
    if method.trains:  # before the models load and the run's files are written
        refuse_checkpoints_of_other_settings(cfg, out, accelerator)
    # Under several processes every rank trains and evaluates its share; rank 0 alone writes and logs.
    writer = accelerator.is_main_process
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_provenance = provenance.describe(resolved, task, accelerator.device, accelerator.num_processes)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        clear_earlier_results(out)
        (out / RUN_CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        overrides = hydra_overrides()
        if overrides is not None:  # what ctxdistill-eval recomposes, wherever output_dir put the run
            (out / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    identity = run_identity(cfg, task)
    tracker = (
        create_tracker(
            cfg.logger,
            # named as its tables name it: by the model it loads, where name_or_path is not its model file's
            group=sweep_group() or f"{task.name}-{identity['model']}",
            name=f"{cfg.method.name}-{identity['model']}-{task.name}-s{cfg.seed}",
            tags=[
                cfg.method.name,
                wandb_tag(identity["model"]),
                task.name,
                f"seed{cfg.seed}",
                *([cfg.paper] if cfg.paper else []),
            ],
            config={
                **resolved,
                "hydra_choices": hydra_choices(),
                "provenance": run_provenance,
                "identity": identity,  # what a run read back from W&B, and the report's panels, are named by
            },
            output_dir=str(out),
            resumes=resumes_training(out),
            sweep_dir=sweep_dir(),
        )
        if writer
        else Tracker()
    )
    try:
        model, teacher, model_parameters = build_models(
            cfg, method, tokenizer, task, accelerator.device, teacher_tokenizer=teacher_tokenizer
        )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if method.trains else 0
        log.info(
            "%s on %s, %d process(es) (weights %s, mixed precision %s); %d trainable parameters",
            cfg.model.name,
            accelerator.device,
            accelerator.num_processes,
            cfg.model.dtype,
            cfg.trainer.mixed_precision,
            trainable,
        )
        handle = ModelHandle(
            student=model,
            base=model,
            separate_teacher=teacher,
            teacher_tokenizer=teacher_tokenizer,
            identity=teaching_identity(
                teacher_spec, cfg.model, cfg.seed, accelerator.device, tokenizer if teacher_tokenizer is None else None
            ),
            evaluation_dropout_seed=evaluation_dropout_seed(cfg, method),
        )
        if method.trains and method.teacher_during_training and handle.trains_base_weights:
            handle.keep_frozen_teacher()
        evaluator = method.evaluator(handle, tokenizer, task, cfg.trainer.eval_batch_size)
        metric_set = method.metric_set(evaluator)
        tracker.declare(metric_set)
        selection = checkpoint_selection(cfg.trainer.selection, list(task.eval_sets), metric_set)
        evaluator.prepare()

        train_stats: dict[str, Any] = {}
        curves: list[dict] = []
        rounds: list[dict] = []
        if method.trains:
            train_stats, curves, rounds = train_rounds(
                cfg, method, handle, tokenizer, task, accelerator, tracker, evaluator, selection
            )
            if cfg.trainer.save_model:  # saved before evaluation, so a failure there keeps it
                # sharded weights (FSDP, ZeRO-3) are gathered by every process; plain ones are at hand
                sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
                gathered = {"state_dict": accelerator.get_state_dict(handle.student)} if sharded else {}
                if writer:
                    whole = method.trained_weights == "all" or cfg.model.adapter == "full"
                    handle.base.save_pretrained(out / ("model" if whole else "adapter"), **gathered)
                    if whole:  # a model directory that loads as model.name_or_path (e.g. a fine-tuned teacher)
                        tokenizer.save_pretrained(out / "model")
        metrics, predictions = final_metrics(method, evaluator)
        run_provenance.update(provenance.inputs())  # with the caches training used
        run_provenance["eval_set_sizes"] = provenance.with_made_sets(run_provenance["eval_set_sizes"], predictions)
        result = {
            **run_identity(cfg, task),
            "status": "complete",
            "metrics": metrics,
            "trainable_parameters": trainable,
            "context_tokens_per_query": context_tokens_per_query(task, tokenizer, method.eval_with_context)
            + trained_prefix_tokens(handle.student),
            "metric_set": metric_set.to_dict(),
            "objective": method.objective,
            "train": train_stats,
            "curves": curves,
            **(
                {
                    "rounds": [
                        *rounds,
                        {"round": len(rounds) + 1, "train": train_stats, "metrics": metrics, "curves": curves},
                    ]
                }
                if rounds
                else {}
            ),
            "model_parameters": model_parameters,
            "demos": [d.uid for d in task.demos],
            "ignored_settings": ignored,  # what a sweep's summary names once for all its cells
            # W&B's outage, which a sweep's summary names once for all its cells
            **({"wandb_could_not_start": tracker.start_error} if tracker.start_error else {}),
            "provenance": run_provenance,
            "runtime_seconds": time.perf_counter() - started,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if writer:
            save_results(out, result, predictions)
            remove_checkpoints(out)  # the run is complete; its adapter/model is saved on its own
            if rounds:
                shutil.rmtree(out / ROUNDS)  # the rounds' weights and records are in the final ones now
        tracker.add_config({"provenance": run_provenance})  # now with the caches training used
        last_step = train_stats.get("steps_all_rounds", train_stats.get("steps", 0))
        # a checkpoint selection evaluated the last model at this step; the final metrics (the selected model's)
        # would overwrite that curve point in W&B's history, so those keys go to the summary alone
        curve_point = curves[-1] if curves and curves[-1].get("step") == train_stats.get("steps") else {}
        tracker.log({k: v for k, v in metrics.items() if k not in curve_point}, last_step)
        tracker.summary(  # after metrics.json, as its status: what reads the run back takes only a complete one
            {
                **metrics,
                **{f"train/{k}": v for k, v in train_stats.items()},
                "model/parameters": model_parameters,
                "status": "complete",
                "finished_at": result["finished_at"],  # metrics.json's: read back, the runs sort as from the files
            }
        )
        tracker.predictions(predictions)
        log.info("%s", " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        log.info("results in %s (metrics.json, predictions.jsonl)", out)
    except BaseException as stopped:  # interrupted (a checkpointed stop exits 130/143) or failed: not finished
        tracker.finish(exit_code(stopped))
        raise
    tracker.finish()
    return result


def context_tokens_per_query(task: Task, tokenizer, with_context: bool) -> float:
    """The tokens the evaluated prompts hold besides the query (the context, or an instruction), on average over
    the in-domain eval set: what a method costs at every query (0 for a task mixture, whose prompts draw their own)."""
    examples = next(iter(task.eval_sets.values()), []) if isinstance(task, Task) else []
    if not examples:
        return 0.0
    prompts = tokenizer([task.prompt(e, with_context) for e in examples]).input_ids
    queries = tokenizer([task.context_query(e) if with_context else task.query(e) for e in examples]).input_ids
    return sum(len(p) - len(q) for p, q in zip(prompts, queries)) / len(examples)


def trained_prefix_tokens(model) -> int:
    """The key/value positions a trained prefix (``model.adapter=prefix``) adds to every query: it replaces the
    context's text, but each query still attends to it."""
    return model.num_tokens if isinstance(model, TrainableContext) else 0


ROUNDS = "rounds"  # a run of several rounds keeps each finished round here until the run is complete
ROUND_WEIGHTS = "trainable.safetensors"


def clear_earlier_results(out: Path) -> None:
    """Remove an earlier run's results from ``out`` (a run made again with force=true): left beside this run's
    config, an interrupted re-run would leave them to be read as its own (a later run of the command skips a
    directory with a complete metrics.json, ctxdistill-eval loads adapter/ and keeps evaluations/). A run that
    resumes from a checkpoint has none: they are written when a run completes."""
    for name in ("metrics.json", PREDICTIONS, "adapter", "model", EVALUATIONS):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def refuse_checkpoints_of_other_settings(cfg: DictConfig, out: Path, accelerator: Accelerator) -> None:
    """Before the models load and the run's files are written: an unfinished run in ``out`` (its latest
    checkpoint, or a finished round) made with settings that shape training otherwise is refused, naming them; the
    trainer found it only after the model had loaded and the teacher been evaluated, with config.yaml already
    rewritten to settings its checkpoint never had. force=true starts the run over instead."""
    fingerprint = training_fingerprint(cfg)
    rounds = sorted(p for p in (out / ROUNDS).glob("*") if p.is_dir()) if (out / ROUNDS).is_dir() else []
    other = []
    for round_dir in [out, *rounds]:
        checkpoint, finished = latest_checkpoint(round_dir), round_dir / "round.json"
        if checkpoint is not None:
            state = torch.load(checkpoint / "custom_checkpoint_0.pkl", map_location="cpu", weights_only=False)
            other += [checkpoint] if state["fingerprint"].split("-round")[0] != fingerprint else []
        if finished.is_file():
            other += (
                [finished] if json.loads(finished.read_text())["fingerprint"].split("-round")[0] != fingerprint else []
            )
    if not other:
        return
    if cfg.force:
        accelerator.wait_for_everyone()  # every process has read them; one removes them
        if accelerator.is_main_process:
            log.warning("force=true: starting over, removing %s's checkpoints of a run with other settings", out)
            remove_checkpoints(out)
            shutil.rmtree(out / ROUNDS, ignore_errors=True)
        accelerator.wait_for_everyone()
        return
    changed = []
    if (out / RUN_CONFIG).is_file():  # the settings the unfinished run wrote, where they shape training
        stored = training_settings(OmegaConf.load(out / RUN_CONFIG))
        changed = config_changes(stored, training_settings(cfg))
    raise ConfigError(
        f"{other[0]} was written by a run with other settings"
        + (f" ({', '.join(changed[:6])}{', ...' if len(changed) > 6 else ''})" if changed else "")
        + ". Run with the settings it was made with to resume it, pass force=true to start it over, or give it "
        "another output_dir."
    )


def resumes_training(out: Path) -> bool:
    """Whether ``out`` holds a checkpoint or finished rounds that this run continues from (a run without
    them starts at step 0)."""
    return latest_checkpoint(out) is not None or (out / ROUNDS).is_dir()


def train_rounds(cfg, method, handle, tokenizer, task, accelerator, tracker, evaluator, selection):
    """Train every round of the method (most have one); returns the last round's statistics and curves, and
    a record per round but the last (its statistics, its evaluation, its periodic evaluations). Rounds after
    the first get their own accelerator and checkpoints (RUN_DIR/rounds/N/); a finished round leaves its
    trainable weights and its record there, so a restarted run loads them and resumes at the first unfinished
    round. Their steps are logged one after another (W&B needs a step that only grows), the rounds' metrics as
    ``round/...``."""
    out = Path(cfg.output_dir)
    count = method.rounds(task)
    records: list[dict] = []
    train_stats: dict[str, Any] = {}
    curves: list[dict] = []
    offset, fresh = 0, True
    for index in range(count):
        method.begin_round(index)
        round_dir = out if count == 1 else out / ROUNDS / str(index + 1)
        finished = round_dir / "round.json"
        fingerprint = training_fingerprint(cfg) + (f"-round{index + 1}" if count > 1 else "")
        if count > 1 and finished.is_file():
            record = json.loads(finished.read_text())
            # one of other settings was refused (or removed, force=true) before the models loaded
            record.pop("fingerprint", None)
            load_trainable_weights(handle.student, round_dir / ROUND_WEIGHTS)
            restore_random_states(
                round_dir, accelerator.process_index
            )  # where the uninterrupted run's next round starts
            log.info("round %d of %d finished earlier: its weights loaded from %s", index + 1, count, round_dir)
            records.append(record)
            offset += record["train"]["steps"]
            continue
        at = offset  # the steps of earlier rounds, for the logger

        def log_metrics(metrics: dict, step: int) -> None:
            tracker.log(metrics, at + step)

        def periodic_eval(step: int, names: Optional[list[str]]) -> dict:
            metrics = rounded(evaluator.evaluate(names)[0])  # as the final ones: what float32 holds
            tracker.log(metrics, at + step)
            return metrics

        train_stats, curves = train(
            method,
            handle,
            tokenizer,
            task,
            cfg.trainer,
            accelerator if fresh else make_accelerator(cfg.trainer),  # an accelerator prepares one training
            cfg.seed,
            log_metrics,
            periodic_eval,
            run_dir=round_dir,
            fingerprint=fingerprint,
            selection=selection,
        )
        fresh = False
        offset += train_stats["steps"]
        if count > 1 and index < count - 1:  # the last round's evaluation is the run's
            metrics = rounded(evaluator.evaluate()[0])
            tracker.log({f"round/{key}": value for key, value in metrics.items()} | {"round": index + 1}, offset)
            record = {"round": index + 1, "train": train_stats, "metrics": metrics, "curves": curves}
            save_random_states(round_dir, accelerator.process_index)
            accelerator.wait_for_everyone()  # every process's states before the record that says the round is done
            if accelerator.is_main_process:
                save_trainable_weights(handle.student, round_dir / ROUND_WEIGHTS)
                write_json(finished, {**record, "fingerprint": fingerprint})  # after the weights: the round is complete
                remove_checkpoints(round_dir)
            records.append(record)
    if count > 1:
        train_stats = {**train_stats, "rounds": count, "steps_all_rounds": offset}
    return train_stats, curves, records


def final_metrics(method, evaluator) -> tuple[dict[str, Any], dict[str, list[dict]]]:
    """The run's reported metrics and prediction rows, as ``ctxdistill-eval`` reproduces them from its saved weights."""
    metrics, predictions = evaluator.evaluate()
    if method.trains:
        metrics.update(evaluator.after_training())
    metrics.update(serving_metrics(evaluator.serving_costs()))
    return rounded(metrics), predictions


def rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as float32 holds them (0.54, not 0.5400000214576721), the same in metrics.json and W&B."""
    return {key: float32_rounded(value) for key, value in metrics.items()}


def save_results(out: Path, result: dict[str, Any], predictions: dict[str, list[dict]]) -> None:
    """Predictions first, metrics.json last: a complete metrics.json means a complete run."""
    with (out / PREDICTIONS).open("w") as f:
        for name, rows in predictions.items():
            for row in rows:
                f.write(json.dumps({"set": name, **row}) + "\n")
    write_json(out / "metrics.json", result)
