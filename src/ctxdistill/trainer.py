"""The one training loop every training method shares.

The method supplies its examples, its batches and its loss; this loop owns the
optimiser, schedule, gradient accumulation, clipping, mixed precision (through
accelerate, so the same code runs on CPU, one GPU or several), logging and
periodic evaluation.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from ctxdistill.data import Task
from ctxdistill.methods import Method
from ctxdistill.models import ModelHandle


def train(method: Method, handle: ModelHandle, tokenizer, task: Task, cfg: DictConfig, accelerator: Accelerator,
          seed: int, log: Callable[[dict, int], None],
          periodic_eval: Optional[Callable[[int], None]] = None) -> dict[str, float]:
    """Train ``handle.student`` with ``method``'s loss; returns summary statistics."""
    examples = method.train_examples(task)
    started = time.perf_counter()
    prepared = method.prepare(handle, tokenizer, task, examples, cfg.eval_batch_size) or {}
    prepare_seconds = time.perf_counter() - started
    examples = [e for e in examples if method.trains_on(e)]
    if not examples:
        raise RuntimeError(f"method={method.name}: no training example has a target after preparation "
                           f"({prepared}); see the warnings above")

    loader = DataLoader(examples, batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed),
                        collate_fn=lambda chunk: method.collate(tokenizer, task, chunk))
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum_steps)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    params = [p for p in handle.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    handle.student, optimizer, loader, scheduler = accelerator.prepare(handle.student, optimizer, loader, scheduler)
    handle.student.train()

    step, loss_value = 0, float("nan")
    bar = tqdm(total=total_steps, desc=f"train {method.name}", disable=not accelerator.is_main_process)
    loop_started = time.perf_counter()
    while step < total_steps:
        for batch in loader:
            with accelerator.accumulate(handle.student):
                loss, extra = method.loss(handle, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            loss_value = loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            log({"train/loss": loss_value, "train/lr": scheduler.get_last_lr()[0], "train/epoch":
                 step / steps_per_epoch, **{f"train/{k}": v for k, v in extra.items()}}, step)
            if periodic_eval and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                periodic_eval(step)
            if step >= total_steps:
                break
    bar.close()
    handle.student = accelerator.unwrap_model(handle.student)
    return {**prepared, "steps": step, "examples": len(examples), "final_loss": loss_value,
            "prepare_seconds": prepare_seconds, "train_seconds": time.perf_counter() - loop_started}
