"""Where context distillation spends its time, measured side by side in one command.

    python benchmarks/speed.py                       # tiny-random and the bundled SmolLM2-135M, CPU
    python benchmarks/speed.py --device cuda --models opt-1.3b

Five measurements per model, on the demo task (synthetic reviews, LoRA r=8 on q/v):
1. CD training throughput and peak memory: this suite (trainer + `cd`, teacher targets cached)
   vs TRL's SDFTTrainer (closest settings: full-logit forward KL, one completion token, the
   same LoRA, frozen base teacher) vs a naive loop (teacher over the full context at every
   step, logits over the whole sequence). Each runs in a fresh process so its peak memory is
   its own.
2. Teacher cost per query as the context grows (0..32 demonstrations): prefix cache + answer-only
   logits vs recomputed context vs recomputed context with whole-sequence logits.
3. Time of the epochs after the first, with the teacher cache vs a teacher forward every step.
4. ICL evaluation throughput with 16 fixed demonstrations: cached prefix vs recomputed.
5. Achieved FLOP/s of a training step, counted by torch's FLOP counter, as a fraction of the
   dense matmul peak measured in the same process.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import threading
import time
from typing import Any, Callable, Optional

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

CONTENDERS = ("ctxdistill", "trl_sdft", "naive")


# ---------------------------------------------------------------- set-up shared by every measurement
def compose_cfg(model: list[str], *overrides: str):
    """The demo experiment's config with ``model`` (overrides that pick the model) and ``overrides``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ctxdistill.cli import CONFIG_DIR
    from ctxdistill.config import register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=["experiment=demo", *model, "output_dir=unused", "logger=none", *overrides])


def load(cfg, device: str, lora: bool):
    from ctxdistill.models import ModelHandle, add_lora, load_model, load_tokenizer, model_identity

    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    model = load_model(cfg.model, cfg.cache_dir, tokenizer, cfg.seed)
    model = (add_lora(model, cfg.model) if lora else model.requires_grad_(False)).to(device)
    return tokenizer, ModelHandle(student=model, base=model, identity=model_identity(cfg.model, cfg.seed))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory above the level at entry: CUDA's allocator counter, or resident memory sampled on CPU."""

    def __init__(self, device: str):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the lifetime peak, coarser
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base = self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
        self.used = self.peak - self.base


# ---------------------------------------------------------------- 1 and 3: training
def naive_method():
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

    return NaiveContextDistillation("cd-naive", teacher_cache="none")


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


def train_trl(cfg, handle, tokenizer, task, device: str, steps: int, batch_size: int) -> None:
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
        distillation_alpha=0.0,
        distillation_is_clip=None,
        teacher_model_kind="base",
        teacher_prompt_template="{privileged_context}{prompt}",
        max_completion_length=1,
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


def measure_training(contender: str, model: list[str], device: str, steps: int, batch_size: int, queries: int) -> dict:
    from ctxdistill.data import build_task
    from ctxdistill.methods.distill import ContextDistillation

    cfg = compose_cfg(
        model,
        f"trainer.max_steps={steps}",
        f"trainer.batch_size={batch_size}",
        f"dataset.num_train_queries={queries}",
        "trainer.scheduler=constant",
    )
    torch.manual_seed(cfg.seed)
    tokenizer, handle = load(cfg, device, lora=contender != "trl_sdft")
    task = build_task(cfg.dataset, cfg.seed)
    with PeakMemory(device) as memory:
        sync(device)
        started = time.perf_counter()
        if contender == "trl_sdft":
            train_trl(cfg, handle, tokenizer, task, device, steps, batch_size)
        else:
            method = naive_method() if contender == "naive" else ContextDistillation("cd", teacher_cache="memory")
            train_suite(method, cfg, handle, tokenizer, task, device)
        sync(device)
        seconds = time.perf_counter() - started
    return {"queries_per_s": steps * batch_size / seconds, "seconds": seconds, "peak_mb": memory.used / 2**20}


def in_fresh_process(function: Callable, *args) -> Any:
    """Run ``function(*args)`` in a new process (clean peak memory, no state shared between contenders)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(function, args)


def measure_later_epochs(model: list[str], device: str, batch_size: int, queries: int, epochs: int) -> dict:
    """Epochs 2.. of cd with targets cached once vs a (prefix-cached) teacher forward at every step."""
    from ctxdistill.data import build_task
    from ctxdistill.methods.distill import ContextDistillation

    steps_per_epoch = queries // batch_size
    cfg = compose_cfg(
        model,
        f"trainer.max_steps={epochs * steps_per_epoch}",
        f"trainer.batch_size={batch_size}",
        f"dataset.num_train_queries={queries}",
    )
    task = build_task(cfg.dataset, cfg.seed)
    result = {}
    for cache in ("memory", "none"):
        torch.manual_seed(cfg.seed)
        tokenizer, handle = load(cfg, device, lora=True)
        stamps = train_suite(ContextDistillation("cd", teacher_cache=cache), cfg, handle, tokenizer, task, device)
        result[cache] = (stamps[-1] - stamps[steps_per_epoch - 1]) / (epochs - 1)
    return {
        "cached_s_per_epoch": result["memory"],
        "per_step_teacher_s_per_epoch": result["none"],
        "speedup": result["none"] / result["memory"],
    }


# ---------------------------------------------------------------- 2 and 4: the teacher's context
def teacher_seconds_per_query(model: list[str], device: str, num_demos: int, queries: int, batch_size: int) -> dict:
    from ctxdistill.data import build_task
    from ctxdistill.encoding import SharedPrefix, answer_logits, encode

    cfg = compose_cfg(
        model,
        f"dataset.context.num_demos={num_demos}",
        f"dataset.num_train_queries={queries}",
        "dataset.source.split_sizes.train=600",
    )
    tokenizer, handle = load(cfg, device, lora=False)
    task = build_task(cfg.dataset, cfg.seed)
    prompts = [task.teacher_prompt(e) for e in task.train_queries]
    model = handle.base.eval()

    def timed(run_batch: Callable[[list[str]], Any]) -> float:
        run_batch(prompts[:batch_size])  # warm-up
        sync(device)
        started = time.perf_counter()
        for start in range(0, len(prompts), batch_size):
            run_batch(prompts[start : start + batch_size])
        sync(device)
        return (time.perf_counter() - started) / len(prompts)

    with torch.no_grad():
        prefix_started = time.perf_counter()
        prefix = SharedPrefix(model, tokenizer, prompts)
        prefix_seconds = time.perf_counter() - prefix_started
        cached = timed(lambda p: answer_logits(model, encode(tokenizer, p, prefix_length=prefix.length), prefix))
        recomputed = timed(lambda p: answer_logits(model, encode(tokenizer, p)))
        whole = timed(
            lambda p: model(
                **{k: v.to(device) for k, v in encode(tokenizer, p).items() if k in ("input_ids", "attention_mask")}
            ).logits[:, -1]
        )
    return {
        "demos": num_demos,
        "context_tokens": prefix.length,
        "prefix_once_s": prefix_seconds,
        "cached_ms": 1e3 * cached,
        "recomputed_ms": 1e3 * recomputed,
        "whole_sequence_ms": 1e3 * whole,
    }


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


# ---------------------------------------------------------------- 5: utilisation
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


def step_utilisation(model: list[str], device: str, batch_size: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from ctxdistill.data import build_task
    from ctxdistill.methods.distill import ContextDistillation

    cfg = compose_cfg(model, f"dataset.num_train_queries={batch_size}")
    tokenizer, handle = load(cfg, device, lora=True)
    task = build_task(cfg.dataset, cfg.seed)
    method = ContextDistillation("cd", teacher_cache="memory")
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
    repeats = 5
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    sync(device)
    achieved = flops * repeats / (time.perf_counter() - started)
    peak = matmul_peak_flops(device, next(handle.base.parameters()).dtype)
    return {
        "step_gflop": flops / 1e9,
        "achieved_gflops": achieved / 1e9,
        "matmul_peak_gflops": peak / 1e9,
        "fraction_of_peak": achieved / peak,
        "tokens_per_step": int(batch["attention_mask"].sum()),
    }


# ---------------------------------------------------------------- report
def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, cells)])


def benchmark(model: list[str], device: str, steps: int, batch_size: int, queries: int) -> None:
    print(f"\n=== {' '.join(model)} on {device} ===", flush=True)
    training = {c: in_fresh_process(measure_training, c, model, device, steps, batch_size, queries) for c in CONTENDERS}
    base = training["trl_sdft"]
    print(
        f"\n[1] cd training: {steps} steps x batch {batch_size} on {queries} queries "
        f"({steps * batch_size / queries:g} epochs), LoRA r={compose_cfg(model).model.lora.r}"
    )
    print(
        table(
            [
                [
                    c,
                    r["queries_per_s"],
                    r["queries_per_s"] / base["queries_per_s"],
                    r["seconds"],
                    r["peak_mb"],
                    r["peak_mb"] / max(base["peak_mb"], 1e-9),
                ]
                for c, r in training.items()
            ],
            ["implementation", "queries/s", "x TRL", "seconds", "peak MB", "peak / TRL"],
        ),
        flush=True,
    )

    print("\n[2] teacher cost per query as the context grows")
    growth = [in_fresh_process(teacher_seconds_per_query, model, device, k, 32, 16) for k in (0, 2, 8, 16, 32)]
    first = growth[0]
    print(
        table(
            [
                [
                    g["demos"],
                    g["context_tokens"],
                    g["cached_ms"],
                    g["cached_ms"] / first["cached_ms"],
                    g["recomputed_ms"],
                    g["recomputed_ms"] / first["recomputed_ms"],
                    g["whole_sequence_ms"],
                    g["whole_sequence_ms"] / first["whole_sequence_ms"],
                    g["prefix_once_s"],
                ]
                for g in growth
            ],
            [
                "demos",
                "context tokens",
                "cached ms/q",
                "x 0 demos",
                "recomputed ms/q",
                "x 0 demos",
                "whole-seq ms/q",
                "x 0 demos",
                "prefix once s",
            ],
        ),
        flush=True,
    )

    epochs = in_fresh_process(measure_later_epochs, model, device, batch_size, queries, 3)
    print(
        f"\n[3] epochs 2-3 of cd: {epochs['cached_s_per_epoch']:.2f} s/epoch with the teacher cache, "
        f"{epochs['per_step_teacher_s_per_epoch']:.2f} s/epoch with a teacher forward every step "
        f"({epochs['speedup']:.2f}x)",
        flush=True,
    )

    icl = in_fresh_process(icl_eval_throughput, model, device, 96, 16)
    print(
        f"\n[4] ICL evaluation, 16 demonstrations: {icl['cached_q_per_s']:.1f} queries/s with the prefix cache, "
        f"{icl['recomputed_q_per_s']:.1f} recomputed ({icl['speedup']:.2f}x); same predictions on "
        f"{100 * icl['same_predictions']:.0f}% of queries",
        flush=True,
    )

    util = in_fresh_process(step_utilisation, model, device, batch_size)
    print(
        f"\n[5] one cd training step: {util['step_gflop']:.2f} GFLOP ({util['tokens_per_step']} tokens) at "
        f"{util['achieved_gflops']:.1f} GFLOP/s = {100 * util['fraction_of_peak']:.1f}% of the measured "
        f"matmul peak ({util['matmul_peak_gflops']:.1f} GFLOP/s)",
        flush=True,
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
    parser.add_argument("--steps", type=int, default=16, help="training steps per contender in [1]")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--queries", type=int, default=32, help="training queries (Upadhayaya et al. use 32)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch; use --device cpu")
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for model in args.models.split(","):
        benchmark([f"model={model}", *args.override], args.device, args.steps, args.batch_size, args.queries)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
