"""Where context distillation spends its time, measured side by side in one command.

    python benchmarks/speed.py                       # tiny-random and the bundled SmolLM2-135M, CPU
    python benchmarks/speed.py --only generation on_policy --models smollm2-135m
    python benchmarks/speed.py --device cuda --models opt-1.3b

Measurements per model, on the demo task (synthetic reviews, LoRA r=8 on q/v); ``--only`` picks some:
- training: cd training throughput and peak memory, this suite (trainer + `cd`, teacher targets
  cached) vs TRL's SDFTTrainer (closest settings: full-logit forward KL, one completion token,
  the same LoRA, frozen base teacher). Each runs in a fresh process so its peak memory is its own.
- naive (only when named; it implies training): a naive loop beside them (teacher over the full
  context at every step, logits over the whole sequence), a reference no goal depends on.
- training_32: the suite vs TRL at 32 demonstrations (TRL runs the teacher over the whole context
  at every step, so the ratio grows with the context).
- on_policy: on-policy cd (the student samples 8 tokens, reverse KL at each) vs TRL's SDFTTrainer
  in its on-policy setting (the same samples, divergence, teacher and LoRA).
- teacher: teacher cost per query as the context grows (0, 8, 32 demonstrations): the shared
  context + answer-only logits vs recomputed context vs recomputed with whole-sequence logits.
- epochs: time of the epochs after the first, with the teacher cache vs a teacher forward every step.
- icl: ICL evaluation throughput with 16 fixed demonstrations, shared context vs recomputed.
- utilisation: achieved FLOP/s of a training step, counted by torch's FLOP counter, as a fraction
  of the dense matmul peak measured in the same process.
- compiled (only when named: it compiles for minutes): the same step eager and under trainer.compile
  (torch.compile of the student's training passes), side by side, and the compilation's seconds.
- generation: tokens/s of the suite's generate over the shared context vs transformers' generate
  on the whole prompts (0, 8, 32 demonstrations; greedy, with identical tokens checked, and sampled).
Once per command (model-independent): eval_memory, peak memory of an evaluation (teacher and model
scored, KL to the teacher) at 1k and 10k eval examples on the tiny model.

The last lines are one table of every ratio with its goal; it is also written, with every figure,
to ``--output`` (Markdown, and JSON beside it), which docs/performance.md cites.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import resource
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

from ctxdistill.cli import exit_with_message, quiet_console, user_errors  # noqa: E402

quiet_console()  # run at import, so in the fork server too, whose measurement processes inherit it

CONTENDERS = ("ctxdistill", "trl_sdft")
ON_POLICY_CONTENDERS = ("on_policy_cd", "trl_sdft_on_policy")
ON_POLICY_TOKENS = 8  # completion length of the on-policy contenders
MEASUREMENTS = ("training", "training_32", "on_policy", "teacher", "epochs", "icl", "utilisation", "generation")
OPT_IN = ("compiled", "naive")  # run only when named in --only
AGAINST_TRL = ("training", "training_32", "on_policy")  # the measurements with a TRL contender
ONCE = ("eval_memory",)
TEACHER_DEMOS = (0, 8, 32)
GENERATION_DEMOS = (0, 8, 32)
EVAL_MEMORY_EXAMPLES = (1000, 10000)


# ---------------------------------------------------------------- set-up shared by every measurement
def compose_cfg(model: list[str], *overrides: str):
    """The demo experiment's config with ``model`` (overrides that pick the model) and ``overrides``, validated as
    a run validates its config."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ctxdistill.cli import CONFIG_DIR
    from ctxdistill.config import register_schemas, validate

    register_schemas()
    GlobalHydra.instance().clear()
    given = ["experiment=demo", *model, "output_dir=unused", "logger=none", *overrides]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=given)
        validate(cfg, given)
    return cfg


def load(cfg, device: str, lora: bool):
    from ctxdistill.models import ModelHandle, add_lora, load_model, load_tokenizer, model_identity

    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    model = load_model(cfg.model, cfg.cache_dir, tokenizer, cfg.seed)
    model = (add_lora(model, cfg.model) if lora else model.requires_grad_(False)).to(device)
    return tokenizer, ModelHandle(student=model, base=model, identity=model_identity(cfg.model, cfg.seed, device))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory above the level at entry: CUDA's allocator counter; on Linux CPU the kernel's resident-memory
    high-water mark (reset at entry, exact); elsewhere resident memory sampled every 5 ms, which can miss a
    short-lived peak."""

    def __init__(self, device: str):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the lifetime peak, coarser
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @staticmethod
    def _reset_high_water_mark() -> bool:
        """Whether the kernel's peak-RSS counter (VmHWM) could be reset to the current RSS (Linux >= 4.0)."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _high_water_mark() -> int:
        with open("/proc/self/status") as f:
            kib = next(line for line in f if line.startswith("VmHWM:")).split()[1]
        return int(kib) * 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.base = self.peak = self._rss()
        self.exact = self._reset_high_water_mark()
        if not self.exact:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        elif self.exact:
            self.peak = self._high_water_mark()
        else:
            self._stop.set()
            self._thread.join()
        self.used = self.peak - self.base


# ---------------------------------------------------------------- training
def suite_method(cfg, cls: Optional[type] = None):
    """The method ``cfg.method`` describes, built as a run builds it (its schema's defaults fill the rest);
    with ``cls``, that subclass of its class takes the same settings."""
    from omegaconf import OmegaConf

    from ctxdistill.methods import build_method

    if cls is None:
        return build_method(cfg.method)
    settings = OmegaConf.to_container(cfg.method, resolve=True)
    del settings["_target_"]
    return cls(**settings)


# The method settings of each contender that the suite trains.
SUITE_CONTENDERS = {
    "ctxdistill": ["method=cd", "method.teacher_cache=memory"],
    "naive": ["method=cd", "method.teacher_cache=none"],
    # TRL's settings: every token sampled at temperature 1 from the student, no stop string
    "on_policy_cd": ["method=on_policy_cd", f"method.max_new_tokens={ON_POLICY_TOKENS}", "method.stop=null"],
}


def naive_method(cfg):
    """cd as a first implementation would write it: every step, the teacher reads the whole
    context again, and both models project every position onto the vocabulary."""
    from ctxdistill.encoding import encode
    from ctxdistill.losses import distillation_loss, teacher_distribution
    from ctxdistill.methods.distill import ContextDistillation

    class NaiveContextDistillation(ContextDistillation):
        def prepare(self, handle, tokenizer, task, examples, batch_size):
            self._spans = {e.uid: [tokenizer.pad_token_id] for e in examples}

        def collate(self, tokenizer, task, examples):
            return {
                "student": encode(tokenizer, [task.student_prompt(e) for e in examples]),
                "teacher": encode(tokenizer, [task.teacher_prompt(e) for e in examples]),
            }

        def loss(self, handle, batch):
            def last_logits(model, inputs):
                device = next(model.parameters()).device
                logits = model(
                    input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device)
                ).logits
                return logits[:, -1:]

            student = last_logits(handle.student, batch["student"])
            with handle.teacher() as teacher:
                logprobs, _ = teacher_distribution(last_logits(teacher, batch["teacher"]))
            mask = torch.ones(student.shape[:2], dtype=torch.bool, device=student.device)
            return distillation_loss(student, logprobs, mask), {}

    return suite_method(cfg, NaiveContextDistillation)


def train_suite(method, cfg, handle, tokenizer, task, device: str) -> list[float]:
    """Runs the suite's trainer; returns the time at which each optimiser step ended."""
    from accelerate import Accelerator

    from ctxdistill.trainer import train

    stamps = []

    def log(_metrics: dict, _step: int) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    train(method, handle, tokenizer, task, cfg.trainer, Accelerator(cpu=device == "cpu"), cfg.seed, log)
    return stamps


def train_trl(cfg, handle, tokenizer, task, device: str, steps: int, batch_size: int, on_policy: bool) -> None:
    """TRL's SDFTTrainer at the suite's cd objective (one completion token, forward KL), or ``on_policy``: the
    student samples ON_POLICY_TOKENS tokens and the loss is the reverse KL at each, as on_policy_cd's default."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    rows = []
    for example in task.train_queries:
        student, teacher = task.student_prompt(example), task.teacher_prompt(example)
        assert teacher.endswith(student), "the teacher prompt must be context + student prompt"
        rows.append({"prompt": student, "privileged_context": teacher[: -len(student)]})
    lora = cfg.model.lora
    args = SDFTConfig(
        output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "ctxdistill-bench-trl"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        learning_rate=cfg.trainer.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        # the suite's objective: forward KL(teacher || student) over the full vocabulary at the one
        # answer position, the frozen base as teacher, context then query
        distillation_mode="full_logits",
        distillation_alpha=1.0 if on_policy else 0.0,  # 0: forward KL(teacher || student), 1: reverse KL
        distillation_is_clip=None,
        teacher_model_kind="base",
        teacher_prompt_template="{privileged_context}{prompt}",
        max_completion_length=ON_POLICY_TOKENS if on_policy else 1,
        max_prompt_length=None,  # TRL's default (512) cuts the 32-demonstration teacher prompts (~590 tokens) short
        num_generations=1,
        temperature=1.0,
        gradient_checkpointing=False,  # TRL's default is on; the suite does not recompute activations
        report_to="none",
        logging_steps=10**6,
        save_strategy="no",
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        seed=cfg.seed,
        bf16=False,
        fp16=False,
    )
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = SDFTTrainer(
        model=handle.base,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()


def measure_training(
    contender: str, model: list[str], device: str, steps: int, batch_size: int, queries: int, demos: Optional[int]
) -> dict:
    from ctxdistill.data import build_task

    context = [f"dataset.context.num_demos={demos}", "dataset.source.split_sizes.train=600"] if demos else []
    cfg = compose_cfg(
        model,
        f"trainer.max_steps={steps}",
        f"trainer.batch_size={batch_size}",
        f"dataset.num_train_queries={queries}",
        "trainer.scheduler=constant",
        *context,
        *SUITE_CONTENDERS.get(contender, []),
    )
    torch.manual_seed(cfg.seed)
    tokenizer, handle = load(cfg, device, lora=not contender.startswith("trl"))
    task = build_task(cfg.dataset, cfg.seed)
    with PeakMemory(device) as memory:
        sync(device)
        started = time.perf_counter()
        if contender.startswith("trl"):
            train_trl(
                cfg, handle, tokenizer, task, device, steps, batch_size, on_policy=contender.endswith("on_policy")
            )
        else:
            method = naive_method(cfg) if contender == "naive" else suite_method(cfg)
            train_suite(method, cfg, handle, tokenizer, task, device)
        sync(device)
        seconds = time.perf_counter() - started
    return {"queries_per_s": steps * batch_size / seconds, "seconds": seconds, "peak_mb": memory.used / 2**20}


# Wall seconds of each measurement's process (start, model load and measurement), for the report's budget.
PROCESS_SECONDS: dict[str, float] = {}
# Modules every measurement imports, loaded once by the fork server that starts the measurements' processes:
# a process then starts in well under a second instead of about 5 s of imports (21 processes a command).
# TRL's trainer module too: its import (1-2 s, 27 MB) is no part of its training, as the suite's is not of the suite's.
PRELOADED = [
    "__main__",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "hydra",
    "ctxdistill.run",
    "trl",
    "trl.experimental.sdft",
]


def in_fresh_process(label: str, function: Callable, *args) -> Any:
    """Run ``function(*args)`` in a new process (clean peak memory, no state shared between contenders), forked
    from a server that has imported the libraries but run no model."""
    started = time.perf_counter()
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED)
    with context.Pool(1) as pool:
        result = pool.apply(function, args)
        pool.close()  # a clean exit: terminating the pool (its __exit__) leaks its semaphores
        pool.join()
    PROCESS_SECONDS[label] = time.perf_counter() - started
    return result


def measure_later_epochs(model: list[str], device: str, batch_size: int, queries: int, epochs: int) -> dict:
    """Epochs 2.. of cd with targets cached once vs a (prefix-cached) teacher forward at every step."""
    from ctxdistill.data import build_task

    steps_per_epoch = queries // batch_size
    result = {}
    for cache in ("memory", "none"):
        cfg = compose_cfg(
            model,
            f"trainer.max_steps={epochs * steps_per_epoch}",
            f"trainer.batch_size={batch_size}",
            f"dataset.num_train_queries={queries}",
            "method=cd",
            f"method.teacher_cache={cache}",
        )
        task = build_task(cfg.dataset, cfg.seed)
        torch.manual_seed(cfg.seed)
        tokenizer, handle = load(cfg, device, lora=True)
        stamps = train_suite(suite_method(cfg), cfg, handle, tokenizer, task, device)
        result[cache] = (stamps[-1] - stamps[steps_per_epoch - 1]) / (epochs - 1)
    return {
        "cached_s_per_epoch": result["memory"],
        "per_step_teacher_s_per_epoch": result["none"],
        "speedup": result["none"] / result["memory"],
    }


# ---------------------------------------------------------------- the teacher's context
def teacher_prompts(model: list[str], num_demos: int, queries: int) -> list[str]:
    """``queries`` teacher prompts with ``num_demos`` demonstrations."""
    from ctxdistill.data import build_task

    cfg = compose_cfg(
        model,
        f"dataset.context.num_demos={num_demos}",
        f"dataset.num_train_queries={queries}",
        "dataset.source.split_sizes.train=600",
    )
    task = build_task(cfg.dataset, cfg.seed)
    return [task.teacher_prompt(e) for e in task.train_queries]


def frozen_base(model: list[str], device: str):
    """The tokenizer and the frozen base model, in eval mode."""
    tokenizer, handle = load(compose_cfg(model), device, lora=False)
    return tokenizer, handle.base.eval()


def teacher_growth(model: list[str], device: str, demo_counts: Sequence[int], queries: int, batch_size: int) -> list:
    """Teacher ms/query at each number of demonstrations: over the shared context (every query), recomputing
    the context with logits at the answer only, and the whole sequence with full logits (both, which grow with
    the context, on the first batch of queries only)."""
    from ctxdistill.encoding import SharedPrefix, answer_logits, encode

    tokenizer, base = frozen_base(model, device)

    def timed(run_batch: Callable[[list[str]], Any], prompts: list[str]) -> float:
        run_batch(prompts[:2])  # warm-up (a whole batch of the recomputed context would double its cost)
        sync(device)
        started = time.perf_counter()
        for start in range(0, len(prompts), batch_size):
            run_batch(prompts[start : start + batch_size])
        sync(device)
        return (time.perf_counter() - started) / len(prompts)

    rows = []
    for num_demos in demo_counts:
        prompts = teacher_prompts(model, num_demos, queries)
        with torch.no_grad():
            prefix_started = time.perf_counter()
            prefix = SharedPrefix(base, tokenizer, prompts)
            prefix_seconds = time.perf_counter() - prefix_started
            cached = timed(
                lambda p: answer_logits(base, encode(tokenizer, p, prefix_length=prefix.length), prefix), prompts
            )
            recomputed = timed(lambda p: answer_logits(base, encode(tokenizer, p)), prompts[:batch_size])
            whole = timed(
                lambda p: base(
                    **{k: v.to(device) for k, v in encode(tokenizer, p).items() if k in ("input_ids", "attention_mask")}
                ).logits[:, -1],
                prompts[:batch_size],
            )
        rows.append(
            {
                "demos": num_demos,
                "context_tokens": prefix.length,
                "queries": len(prompts),
                "prefix_once_s": prefix_seconds,
                "cached_ms": 1e3 * cached,
                # what a query costs with the context's one pass shared by these queries (a run's training queries)
                "cached_with_prefix_ms": 1e3 * (cached + prefix_seconds / len(prompts)),
                "recomputed_ms": 1e3 * recomputed,
                "whole_sequence_ms": 1e3 * whole,
            }
        )
    return rows


def icl_eval_throughput(model: list[str], device: str, num_eval: int, batch_size: int) -> dict:
    """Queries/s of ICL evaluation with 16 fixed demonstrations, prefix cached vs recomputed."""
    from ctxdistill.data import build_task
    from ctxdistill.evaluation import score

    cfg = compose_cfg(model, "dataset.context.num_demos=16", f"dataset.num_eval={num_eval}")
    tokenizer, handle = load(cfg, device, lora=False)
    task = build_task(cfg.dataset, cfg.seed)
    examples = task.eval_sets["eval"]
    result = {}
    for share in (True, False):
        score(handle.base, tokenizer, task, examples[:batch_size], True, batch_size, share_prefix=share)  # warm-up
        sync(device)
        started = time.perf_counter()
        result[share] = score(handle.base, tokenizer, task, examples, True, batch_size, share_prefix=share)
        sync(device)
        result[f"{share}_s"] = time.perf_counter() - started
    agree = (result[True].predictions == result[False].predictions).float().mean().item()
    return {
        "cached_q_per_s": len(examples) / result["True_s"],
        "recomputed_q_per_s": len(examples) / result["False_s"],
        "speedup": result["False_s"] / result["True_s"],
        "same_predictions": agree,
    }


# ---------------------------------------------------------------- generation and evaluation memory
def generation_throughput(
    model: list[str], device: str, demo_counts: Sequence[int], prompts: int, new_tokens: int
) -> list[dict]:
    """Tokens/s of the suite's generate over the shared context vs transformers' generate on the whole prompts,
    greedy (with the tokens compared) and sampled, one batch of ``prompts`` teacher prompts per number of
    demonstrations."""
    tokenizer, base = frozen_base(model, device)
    return [
        generation_at(tokenizer, base, device, teacher_prompts(model, k, prompts), k, new_tokens) for k in demo_counts
    ]


def generation_at(tokenizer, model, device: str, texts: list[str], num_demos: int, new_tokens: int) -> dict:
    from ctxdistill.encoding import SharedPrefix
    from ctxdistill.generation import generate

    def ours(temperature: float) -> list[list[int]]:
        prefix = SharedPrefix(model, tokenizer, texts)  # counted: it is part of generating over the context
        generator = torch.Generator(device=device).manual_seed(0)
        rows = generate(model, tokenizer, texts, new_tokens, temperature, stop=None, generator=generator, prefix=prefix)
        return rows

    def theirs(temperature: float, texts: list[str] = texts, new_tokens: int = new_tokens) -> list[list[int]]:
        batch = tokenizer(texts, return_tensors="pt", padding=True).to(device)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature else {"do_sample": False}
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
        rows = out[:, batch.input_ids.shape[1] :].tolist()
        # each row up to its end-of-sequence token (transformers pads the rows that ended)
        return [row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row for row in rows]

    def timed(run: Callable[[float], list[list[int]]], temperature: float) -> tuple[float, list[list[int]]]:
        sync(device)
        started = time.perf_counter()
        rows = run(temperature)
        sync(device)
        return sum(map(len, rows)) / (time.perf_counter() - started), rows

    theirs(0.0, texts[:2], 2)  # warm-up
    result = {"demos": num_demos, "context_tokens": SharedPrefix(model, tokenizer, texts).length}
    for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        result[f"{name}_ours"], our_rows = timed(ours, temperature)
        result[f"{name}_transformers"], their_rows = timed(theirs, temperature)
        result[f"{name}_speedup"] = result[f"{name}_ours"] / result[f"{name}_transformers"]
        if not temperature:
            result["identical_tokens"] = our_rows == their_rows
    return result


def evaluation_memory(num_eval: int, batch_size: int) -> dict:
    """Peak memory of evaluating the tiny model on ``num_eval`` examples: the teacher scored (with the context),
    then the model (without), with its KL to the teacher."""
    from ctxdistill.data import build_task
    from ctxdistill.evaluation import Evaluator, Ranks

    cfg = compose_cfg(
        ["model=tiny-random"], f"dataset.num_eval={num_eval}", f"dataset.source.split_sizes.eval={num_eval}"
    )
    tokenizer, handle = load(cfg, "cpu", lora=True)
    task = build_task(cfg.dataset, cfg.seed)
    evaluator = Evaluator(handle, tokenizer, task, with_context=False, batch_size=batch_size, ranks=Ranks())
    with PeakMemory("cpu") as memory:
        evaluator.prepare()
        metrics, _ = evaluator.evaluate()
    return {
        "examples": num_eval,
        "peak_mb": memory.used / 2**20,
        "kl_to_teacher": metrics["eval/kl_to_teacher"],
        # what keeping the teacher's distributions in memory would take
        "distributions_mb": num_eval * len(tokenizer) * 4 / 2**20,
    }


# ---------------------------------------------------------------- utilisation
def matmul_peak_flops(device: str, dtype: torch.dtype) -> float:
    """The best dense matmul rate this device reaches on square matrices (FLOP/s)."""
    best = 0.0
    for n in (512, 1024, 2048) if device == "cpu" else (4096, 8192):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        sync(device)
        repeats = 3 if device == "cpu" else 20
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - started))
    return best


def step_utilisation(model: list[str], device: str, batch_size: int, compiled: bool = False) -> dict:
    """One cd training step's FLOP rate against the matmul peak; with ``compiled``, also under trainer.compile."""
    from torch.utils.flop_counter import FlopCounterMode

    from ctxdistill.data import build_task
    from ctxdistill.models import compiled_for_training

    cfg = compose_cfg(model, f"dataset.num_train_queries={batch_size}", *SUITE_CONTENDERS["ctxdistill"])
    tokenizer, handle = load(cfg, device, lora=True)
    task = build_task(cfg.dataset, cfg.seed)
    method = suite_method(cfg)
    method.prepare(handle, tokenizer, task, task.train_queries, batch_size)
    batch = method.collate(tokenizer, task, task.train_queries)
    optimizer = torch.optim.AdamW([p for p in handle.student.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss, _ = method.loss(handle, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()

    def seconds_per_step(repeats: int = 5) -> float:
        sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            step()
        sync(device)
        return (time.perf_counter() - started) / repeats

    eager = seconds_per_step()
    peak = matmul_peak_flops(device, next(handle.base.parameters()).dtype)
    figures = {
        "step_gflop": flops / 1e9,
        "step_s": eager,
        "achieved_gflops": flops / eager / 1e9,
        "matmul_peak_gflops": peak / 1e9,
        "fraction_of_peak": flops / eager / peak,
        "tokens_per_step": int(batch["attention_mask"].sum()),
    }
    if compiled:
        with compiled_for_training(handle.base):
            started = time.perf_counter()
            step()
            sync(device)
            figures["compile_s"] = time.perf_counter() - started
            figures["compiled_step_s"] = seconds_per_step()
        figures["compiled_fraction_of_peak"] = flops / figures["compiled_step_s"] / peak
        figures["compiled_speedup"] = eager / figures["compiled_step_s"]
    return figures


# ---------------------------------------------------------------- report
def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, cells)])


class Report:
    """Printed detail as it comes, and every ratio with its goal for the summary at the end."""

    def __init__(self, path: str, command: str):
        self.path, self.command, self.started = path, command, time.perf_counter()
        self.lines: list[str] = []
        self.ratios: list[list[Any]] = []  # [model, what, value, goal]
        self.figures: dict[str, Any] = {}

    def print(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def ratio(self, model: str, what: str, value: Any, goal: str = "") -> None:
        self.ratios.append([model, what, value, goal])
        self.save()

    def summary(self) -> str:
        return table(self.ratios, ["model", "ratio", "value", "goal"])

    def save(self) -> None:
        """The detail and the summary so far as Markdown at ``path``, every figure as JSON beside it (after every
        measurement, so a run stopped part-way keeps what it measured)."""
        seconds = time.perf_counter() - self.started
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "w") as f:
            f.write(f"# benchmarks/speed.py\n\n`{self.command}`, {seconds:.0f} s\n\n")
            f.write(f"## Summary\n\n```\n{self.summary()}\n```\n\n## Detail\n\n```\n")
            f.write("\n".join(self.lines).strip() + "\n```\n")
        with open(os.path.splitext(self.path)[0] + ".json", "w") as f:
            saved = {"command": self.command, "seconds": seconds, "ratios": self.ratios, "figures": self.figures}
            json.dump(saved, f, indent=1)


def training_table(training: dict, base: str) -> str:
    reference = training[base]
    return table(
        [
            [
                contender,
                r["queries_per_s"],
                r["queries_per_s"] / reference["queries_per_s"],
                r["seconds"],
                r["peak_mb"],
                r["peak_mb"] / max(reference["peak_mb"], 1e-9),
            ]
            for contender, r in training.items()
        ],
        ["implementation", "queries/s", "x TRL", "seconds", "peak MB", "peak / TRL"],
    )


def benchmark(report: Report, model: list[str], device: str, args) -> None:
    name = model[0].split("=", 1)[1]
    steps, batch_size, queries, only = args.steps, args.batch_size, args.queries, args.only
    figures = report.figures.setdefault(name, {})
    report.print(f"\n=== {' '.join(model)} on {device} ===")
    epochs_run = f"{steps} steps x batch {batch_size} on {queries} queries ({steps * batch_size / queries:g} epochs)"
    for demos, key in ((None, "training"), (32, "training_32")):
        if key not in only:
            continue
        contenders = CONTENDERS + ("naive",) if demos is None and "naive" in only else CONTENDERS
        training = {
            c: in_fresh_process(
                f"{name} {key} {c}", measure_training, c, model, device, steps, batch_size, queries, demos
            )
            for c in contenders
        }
        figures[key] = training
        context = "the demo context" if demos is None else f"{demos} demonstrations"
        report.print(f"\n[{key}] cd training on {context}: {epochs_run}, LoRA r={compose_cfg(model).model.lora.r}")
        report.print(training_table(training, "trl_sdft"))
        ours, trl = training["ctxdistill"], training["trl_sdft"]
        goal = ">= 8x" if demos is None else ">= 15x"
        report.ratio(
            name, f"cd training vs TRL SDFTTrainer, {context}", ours["queries_per_s"] / trl["queries_per_s"], goal
        )
        report.ratio(name, f"cd peak memory / TRL's, {context}", ours["peak_mb"] / max(trl["peak_mb"], 1e-9), "<= 1")

    if "on_policy" in only:
        training = {
            c: in_fresh_process(
                f"{name} on_policy {c}", measure_training, c, model, device, steps, batch_size, queries, None
            )
            for c in ON_POLICY_CONTENDERS
        }
        figures["on_policy"] = training
        report.print(
            f"\n[on_policy] on-policy cd, {ON_POLICY_TOKENS} sampled tokens per query, reverse KL: {epochs_run}"
        )
        report.print(training_table(training, "trl_sdft_on_policy"))
        ours, trl = training["on_policy_cd"], training["trl_sdft_on_policy"]
        report.ratio(
            name, "on-policy cd vs TRL SDFTTrainer (on-policy)", ours["queries_per_s"] / trl["queries_per_s"], "> 1x"
        )

    if "teacher" in only:
        growth = in_fresh_process(f"{name} teacher", teacher_growth, model, device, TEACHER_DEMOS, 32, 16)
        figures["teacher"] = growth
        first = growth[0]
        report.print("\n[teacher] teacher cost per query as the context grows")
        columns = ("cached_ms", "cached_with_prefix_ms", "recomputed_ms", "whole_sequence_ms")
        report.print(
            table(
                [
                    [g["demos"], g["context_tokens"]]
                    + [v for c in columns for v in (g[c], g[c] / first[c])]
                    + [g["prefix_once_s"]]
                    for g in growth
                ],
                ["demos", "context tokens", "shared ms/q", "x 0 demos", "+ context pass ms/q", "x 0 demos"]
                + ["recomputed ms/q", "x 0 demos", "whole-seq ms/q", "x 0 demos", "prefix once s"],
            )
        )
        last = growth[-1]
        report.ratio(
            name,
            f"teacher ms/query beyond the context's one pass, {last['demos']} vs 0 demos",
            last["cached_ms"] / first["cached_ms"],
            "<= 1.3x",
        )
        report.ratio(
            name,
            f"teacher ms/query with the context's one pass over {last['queries']} queries, {last['demos']} vs 0 demos",
            last["cached_with_prefix_ms"] / first["cached_with_prefix_ms"],
        )
        report.ratio(  # the context once, against once per query
            name,
            f"teacher, recomputed / shared with its one pass, {last['demos']} demos",
            last["recomputed_ms"] / last["cached_with_prefix_ms"],
        )

    if "epochs" in only:
        epochs = figures["epochs"] = in_fresh_process(
            f"{name} epochs", measure_later_epochs, model, device, batch_size, queries, 3
        )
        report.print(
            f"\n[epochs] epochs 2-3 of cd: {epochs['cached_s_per_epoch']:.2f} s/epoch with the teacher cache, "
            f"{epochs['per_step_teacher_s_per_epoch']:.2f} s/epoch with a teacher forward every step "
            f"({epochs['speedup']:.2f}x)"
        )
        report.ratio(name, "later epochs, teacher cache vs teacher every step", epochs["speedup"])

    if "icl" in only:
        icl = figures["icl"] = in_fresh_process(f"{name} icl", icl_eval_throughput, model, device, 96, 16)
        report.print(
            f"\n[icl] ICL evaluation, 16 demonstrations: {icl['cached_q_per_s']:.1f} queries/s with the shared "
            f"context, {icl['recomputed_q_per_s']:.1f} recomputed ({icl['speedup']:.2f}x); same predictions on "
            f"{100 * icl['same_predictions']:.0f}% of queries"
        )
        report.ratio(name, "ICL evaluation, shared context vs recomputed", icl["speedup"])

    if "utilisation" in only:
        util = figures["utilisation"] = in_fresh_process(
            f"{name} utilisation", step_utilisation, model, device, batch_size
        )
        report.print(
            f"\n[utilisation] one cd training step: {util['step_gflop']:.2f} GFLOP ({util['tokens_per_step']} tokens) "
            f"at {util['achieved_gflops']:.1f} GFLOP/s = {100 * util['fraction_of_peak']:.1f}% of the measured "
            f"matmul peak ({util['matmul_peak_gflops']:.1f} GFLOP/s)"
        )
        report.ratio(name, "cd training step, fraction of the matmul peak", util["fraction_of_peak"], ">= 0.5")

    if "compiled" in only:
        util = figures["compiled"] = in_fresh_process(
            f"{name} compiled", step_utilisation, model, device, batch_size, True
        )
        report.print(
            f"\n[compiled] one cd training step ({util['step_gflop']:.2f} GFLOP): eager {util['step_s']:.3f} s "
            f"({100 * util['fraction_of_peak']:.1f}% of the matmul peak, {util['matmul_peak_gflops']:.1f} GFLOP/s), "
            f"trainer.compile {util['compiled_step_s']:.3f} s ({100 * util['compiled_fraction_of_peak']:.1f}%, "
            f"{util['compiled_speedup']:.2f}x) after a first step of {util['compile_s']:.0f} s that compiles"
        )
        report.ratio(
            name,
            "cd training step under trainer.compile, fraction of the matmul peak",
            util["compiled_fraction_of_peak"],
            ">= 0.5",
        )
        report.ratio(name, "cd training step, trainer.compile vs eager", util["compiled_speedup"])

    if "generation" in only:
        rows = in_fresh_process(f"{name} generation", generation_throughput, model, device, GENERATION_DEMOS, 16, 16)
        figures["generation"] = rows
        report.print("\n[generation] tokens/s, 16 prompts x 16 new tokens: shared context vs transformers' generate")
        report.print(
            table(
                [
                    [r["demos"], r["context_tokens"]]
                    + [r[f"{m}_{c}"] for m in ("greedy", "sampled") for c in ("ours", "transformers", "speedup")]
                    + [r["identical_tokens"]]
                    for r in rows
                ],
                ["demos", "context tokens", "greedy ours", "transformers", "x", "sampled ours", "transformers", "x"]
                + ["greedy tokens identical"],
            )
        )
        for r in rows:
            goal = ">= 3x, identical" if r["demos"] == max(GENERATION_DEMOS) else ""
            same = "identical" if r["identical_tokens"] else "DIFFERENT"
            report.ratio(
                name,
                f"generation vs transformers, {r['demos']} demos, greedy",
                f"{r['greedy_speedup']:.3g} ({same})",
                goal,
            )
            report.ratio(name, f"generation vs transformers, {r['demos']} demos, sampled", r["sampled_speedup"])


def evaluation_memory_report(report: Report) -> None:
    rows = [in_fresh_process(f"eval_memory {n}", evaluation_memory, n, 64) for n in EVAL_MEMORY_EXAMPLES]
    report.figures["eval_memory"] = rows
    report.print("\n[eval_memory] peak evaluation memory (tiny-random; teacher, model and KL to the teacher)")
    report.print(
        table(
            [[r["examples"], r["peak_mb"], r["distributions_mb"], r["kl_to_teacher"]] for r in rows],
            ["eval examples", "peak MB", "teacher distributions MB (not held)", "kl_to_teacher"],
        )
    )
    first, last = rows[0], rows[-1]
    report.ratio(
        "tiny-random",
        f"eval peak memory, {last['examples']} vs {first['examples']} examples",
        last["peak_mb"] / max(first["peak_mb"], 1e-9),
        "~1x (flat)",
    )


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny-random,smollm2-135m", help="comma-separated model configs")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override applied to every model, e.g. ++model.tiny.num_hidden_layers=30 (repeatable)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=16, help="training steps per contender")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--queries", type=int, default=32, help="training queries (Upadhayaya et al. use 32)")
    parser.add_argument(
        "--only",
        nargs="+",
        default=[*MEASUREMENTS, *ONCE],
        choices=[*MEASUREMENTS, *ONCE, *OPT_IN],
        metavar="NAME",
        help=f"run only these measurements: {', '.join(MEASUREMENTS + ONCE + OPT_IN)} (default: all but "
        f"{', '.join(OPT_IN)})",
    )
    parser.add_argument("--output", default="benchmarks/results/speed.md", help="the report (and .json beside it)")
    args = parser.parse_args(argv)
    if "naive" in args.only and "training" not in args.only:
        args.only.append("training")  # the naive loop is a contender of the training measurement
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch; use --device cpu")
    against_trl = [name for name in args.only if name in AGAINST_TRL]
    if against_trl and importlib.util.find_spec("trl") is None:
        sys.exit(
            f"--only {' '.join(against_trl)}: these measurements compare the suite with TRL, which is not installed; "
            'install it with pip install -c src/constraints.txt -e ".[bench]", or leave them out of --only'
        )
    try:  # a bad --override: the suite's one message before any model loads, not a traceback from a measurement
        for model in args.models.split(","):
            compose_cfg([f"model={model}", *args.override])
    except user_errors() as e:
        exit_with_message(e)
    command = " ".join(["python benchmarks/speed.py", *(argv if argv is not None else sys.argv[1:])])
    report = Report(args.output, command)
    report.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for model in args.models.split(","):
        if set(args.only) & set(MEASUREMENTS + OPT_IN):
            benchmark(report, [f"model={model}", *args.override], args.device, args)
    if "eval_memory" in args.only:
        evaluation_memory_report(report)
    report.ratio("", "benchmark wall time, s", time.perf_counter() - report.started, "< 600")
    report.figures["process_seconds"] = PROCESS_SECONDS
    report.print("\n=== wall seconds per measurement (each in a fresh process) ===")
    report.print(table([[label, seconds] for label, seconds in PROCESS_SECONDS.items()], ["measurement", "s"]))
    report.print(f"\n=== summary ===\n{report.summary()}")
    report.save()
    print(f"\nwritten: {args.output}")


if __name__ == "__main__":
    main()
