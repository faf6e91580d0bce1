"""contextualization: stage 1 of contextualization distillation (Li et al. 2024).

An instruction-following LM writes, for every training triple (h, r, t), a paragraph that
introduces h and t and the relation between them (the released code's prompt, PaLM2
text-bison at temperature 0.7). The paragraphs are stage rows (:class:`~ctxdistill.stage_cache.RowStore`
under ``method.stage_dir``), keyed by the triple's text and stored in a file named by the writer's
identity, the prompt and the generation settings (sampled, also the training triples, which decide each
context's batch-mates and random stream): an interrupted run keeps every batch it finished, a later run
with the same settings writes only the triples still missing, and one with other settings (or a graph whose
names differ) writes its own. Once every training triple has one, the run replaces
``dataset.contexts_file`` with them, one JSON line per triple, which the students of stage 2
(methods.kgc) read. Nothing is trained; the run's "evaluation" is the writing.

``description_contexts`` is the same stage without a writer: each triple's context is the graph's own text of
its head and its tail (on WN18RR, WordNet's definitions), the reference that tells whether an LLM's paragraphs
give the students anything the graph's descriptions do not.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch
from omegaconf import DictConfig

from ctxdistill.config import ConfigError, MethodConfig, model_label, require, require_count
from ctxdistill.data.kg import KGTask, Triple, build_kg_task
from ctxdistill.evaluation import EvaluatorBase
from ctxdistill.methods.base import Method
from ctxdistill.results.metrics import Metric, MetricSet
from ctxdistill.stage_cache import JsonLines, RowStore, digest


@dataclass
class ContextualizationConfig(MethodConfig):
    """Stage 1 of Li et al. 2024: an instruction LM writes a paragraph per training triple."""

    _target_: str = "ctxdistill.methods.contextualization.Contextualization"
    # The released code's prompt ({head}/{tail}: entity names, {relation}: the relation's text).
    prompt: str = (
        "Given a triplet ({head} | {relation} | {tail}), please generate a paragraph at least 100 words "
        'to introduce "{head}" and "{tail}" respectively and reflect their relationship {relation}. '
        '"{head}" and "{tail}" must concluded in the generated text.'
    )
    chat_template: bool = True  # wrap the prompt in the model's chat template (instruction models)
    max_new_tokens: int = 200
    temperature: float = 0.7  # 0: greedy
    top_p: float = 1.0
    # sampling from the top_k most likely tokens: transformers' default cut, which every context written before
    # it was a setting was drawn with; null samples from the whole vocabulary
    top_k: Optional[int] = 50
    batch_size: int = 16
    stage_dir: str = "${cache_dir}/contexts/stage"  # the written contexts, one file per writer and settings
    schema_name: ClassVar[str] = "base_contextualization"
    dataset_kinds: ClassVar[tuple[str, ...]] = ("knowledge_graph",)
    dataset_example: ClassVar[str] = "dataset=kg_synthetic, wn18rr or fb15k237n"

    @classmethod
    def check(cls, m: DictConfig, cfg: DictConfig) -> None:
        require(m.max_new_tokens >= 1, "method.max_new_tokens", f"must be >= 1, got {m.max_new_tokens}", "")
        require(m.temperature >= 0, "method.temperature", f"must be >= 0, got {m.temperature}", "")
        require(
            0 < m.top_p <= 1,
            "method.top_p",
            f"must be in (0, 1], got {m.top_p}",
            "It is the nucleus's probability mass; 1.0 samples from the whole distribution",
        )
        require_count(m.top_k, "method.top_k", "null samples from the whole vocabulary")
        require(m.batch_size >= 1, "method.batch_size", f"must be >= 1, got {m.batch_size}", "")


@dataclass
class DescriptionContextsConfig(MethodConfig):
    """Stage 1 without a writer: a training triple's context is its head's and its tail's descriptions."""

    _target_: str = "ctxdistill.methods.contextualization.DescriptionContexts"
    schema_name: ClassVar[str] = "base_description_contexts"
    dataset_kinds: ClassVar[tuple[str, ...]] = ("knowledge_graph",)
    dataset_example: ClassVar[str] = "dataset=kg_synthetic, wn18rr or fb15k237n"
    architectures: ClassVar[tuple[str, ...]] = ("causal_lm", "masked_lm", "seq2seq_lm")  # no model is asked


def check_writable_contexts(path: Path) -> None:
    """Stage 1 replaces the contexts file: only one it wrote (JSON lines, every row naming its ``writer``) may be
    replaced; a released or a person's own file is an input, never overwritten."""
    content = path.read_text(encoding="utf-8").lstrip() if path.is_file() else ""
    if content and not (content.startswith("{") and all("writer" in row for row in JsonLines(path).read())):
        raise ConfigError(
            f"{path} holds contexts that method=contextualization did not write (a released knowledge_context.txt, "
            f"or a file of your own): an input, which it never overwrites. Write the new contexts to another "
            f"JSON-lines file: dataset.contexts_file=NAME.jsonl"
        )


def write_contexts(path: Path, rows: list[dict]) -> None:
    """Replaces the contexts file with ``rows`` in one step: a killed run leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    os.replace(partial, path)


def replace_contexts(
    task: KGTask, contexts: list[str], writer: str, stage: str, pending: set[str]
) -> tuple[dict[str, float], dict[str, list[dict]]]:
    """Stage 1's end, whoever wrote ``contexts`` (one per training triple, in order): the task and
    ``dataset.contexts_file`` get them; returns the metrics without the timing and the new prediction rows."""
    texts = [task.graph.triple_text(t) for t in task.train_triples]
    task.contexts = dict(zip(task.train_triples, contexts))
    rows = [
        {"head": h, "relation": r, "tail": t, "text": text, "context": task.contexts[(h, r, t)]}
        for (h, r, t), text in zip(task.train_triples, texts)
    ]
    write_contexts(task.contexts_file, [{**row, "writer": writer, "stage": stage} for row in rows])
    words = [len(context.split()) for context in task.contexts.values()]
    generated_here = sum(text in pending for text in texts)
    metrics = {
        "contexts/written": generated_here,
        "contexts/reused": len(texts) - generated_here,
        # a writer that ends at once (or writes only special tokens) leaves a triple nothing to reconstruct
        "contexts/covered": sum(bool(task.contexts[t].strip()) for t in task.train_triples) / len(task.train_triples),
        "contexts/mean_words": sum(words) / len(words),
    }
    new = [{"uid": "|".join(t), **row} for t, row in zip(task.train_triples, rows) if row["text"] in pending]
    return metrics, {"contexts": new}


class ContextStage(Method):
    """What both stage-1 methods share: the graph's training triples in, ``dataset.contexts_file`` out."""

    objective = "contexts/written"

    def build_task(self, dataset, seed):
        return build_kg_task(dataset, seed)

    def check_inputs(self, task, tokenizer, cfg):
        if task.contexts_file is None:
            raise ConfigError("dataset.contexts_file is null: set it to the JSON-lines file the contexts go to")
        check_writable_contexts(task.contexts_file)


class Contextualization(ContextStage):
    def __init__(
        self,
        name: str,
        prompt: str,
        chat_template: bool,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: Optional[int],
        batch_size: int,
        stage_dir: str,
    ):
        super().__init__(name)
        self.prompt, self.chat_template, self.stage_dir = prompt, chat_template, stage_dir
        self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.batch_size = (
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            batch_size,
        )

    def check_inputs(self, task, tokenizer, cfg):
        super().check_inputs(task, tokenizer, cfg)
        try:
            self.prompt.format(head="h", relation="r", tail="t")
        except (KeyError, IndexError) as e:
            raise ConfigError(
                f"method.prompt: unknown field {e}; it may use {{head}}, {{relation}} and {{tail}}"
            ) from None
        if self.chat_template and not tokenizer.chat_template:
            raise ConfigError(f"{model_label(cfg.model)} has no chat template; set method.chat_template=false")

    def render(self, task: KGTask, triple: Triple, tokenizer) -> str:
        h, r, t = triple
        text = self.prompt.format(
            head=task.graph.entity_names[h], relation=task.relation_text(r), tail=task.graph.entity_names[t]
        )
        if not self.chat_template:
            return text
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    def settings(self, writer_identity: str, task: KGTask) -> dict:
        """What determines a context besides its triple's text (the stage rows' key): the writer, the prompt,
        the generation settings, the seed and the batch size; sampled, also the training triples in order (a
        batch shares one random stream, seeded by its first triple: a context depends on those batched with it)."""
        batched_with = {"triples": digest(task.train_triples)} if self.temperature > 0 else {}
        return {
            "writer": writer_identity,
            "prompt": self.prompt,
            "chat_template": self.chat_template,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "batch_size": self.batch_size,
            "seed": task.seed,
            **batched_with,
        }

    def evaluator(self, handle, tokenizer, task, batch_size):
        return ContextGeneration(self, handle, tokenizer, task)


@contextlib.contextmanager
def only_stop_tokens_of_its_own(model):
    """While the writer writes, its generation defaults are its special tokens alone: transformers fills every
    setting generate() is not given from the model's generation_config.json, where a Hub model may keep a repetition
    penalty, a minimum length or banned words, which would change the contexts without being in the stage's key."""
    from transformers import GenerationConfig

    own = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=own.bos_token_id, eos_token_id=own.eos_token_id, pad_token_id=own.pad_token_id
    )
    try:
        yield
    finally:
        model.generation_config = own


class ContextGeneration(EvaluatorBase):
    """Writes the contexts of the training triples the stage lacks; its metrics describe what was written."""

    metric_set = MetricSet(
        "context_generation",
        tuple(
            Metric(name, label, higher_is_better=better, sets=("contexts",), kind=kind, headline=name == "written")
            for name, label, better, kind in (
                ("written", "written", True, "count"),
                ("reused", "reused", True, "count"),
                ("covered", "non-empty", True, "value"),
                ("mean_words", "mean words", True, "value"),
                ("seconds", "seconds", False, "value"),
                ("tokens_per_second", "tokens/s", True, "value"),
            )
        ),
        set_titles={"contexts": "contexts written for the training triples"},
    )

    def __init__(self, method: Contextualization, handle, tokenizer, task: KGTask):
        self.method, self.model, self.tokenizer, self.task = method, handle.base, tokenizer, task
        self.writer_identity = handle.identity
        self.writer_name = getattr(handle.base, "name_or_path", "")

    def prepare(self) -> None:
        """Nothing to prepare: the writer is not trained."""

    @torch.no_grad()
    def generate(self, triples: list[Triple]) -> tuple[list[str], int]:
        """One batch: the paragraphs and the number of tokens generated. Seeded by the graph's seed and the batch's
        first triple, so a resumed run draws the same samples for the same pending triples."""
        m, tokenizer = self.method, self.tokenizer
        prompts = [m.render(self.task, t, tokenizer) for t in triples]
        # A chat template already holds the special tokens the model expects at the start.
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not m.chat_template)
        device = next(self.model.parameters()).device
        torch.manual_seed(zlib.crc32(f"{self.task.seed}|{'|'.join(triples[0])}".encode()))
        sample = m.temperature > 0
        with only_stop_tokens_of_its_own(self.model):
            out = self.model.generate(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                max_new_tokens=m.max_new_tokens,
                do_sample=sample,
                pad_token_id=tokenizer.pad_token_id,
                # top_k always given: transformers fills in 50 where it is left out (0: no cut)
                **({"temperature": m.temperature, "top_p": m.top_p, "top_k": m.top_k or 0} if sample else {}),
            )
        new = out[:, enc["input_ids"].shape[1] :]
        texts = [" ".join(t.split()) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        return texts, int((new != tokenizer.pad_token_id).sum())

    def evaluate(self, names=None) -> tuple[dict[str, float], dict[str, list[dict]]]:
        task = self.task
        store = RowStore(self.method.stage_dir, "contexts", self.method.settings(self.writer_identity, task))
        texts = [task.graph.triple_text(t) for t in task.train_triples]
        triple_of = dict(zip(texts, task.train_triples))  # triples of the same text share one context
        pending = {text for text in texts if text not in store.rows}
        started, tokens = time.perf_counter(), 0
        self.model.eval()

        def write(keys: list[str]) -> list[dict]:
            nonlocal tokens
            contexts, generated = self.generate([triple_of[k] for k in keys])
            tokens += generated
            return [{"key": k, "context": c} for k, c in zip(keys, contexts)]

        rows = store.fill(texts, write, self.method.batch_size, "contexts")
        seconds = time.perf_counter() - started
        metrics, predictions = replace_contexts(
            task, [row["context"] for row in rows], self.writer_name, store.path.name, pending
        )
        speed = {"contexts/seconds": seconds, "contexts/tokens_per_second": tokens / seconds if seconds > 0 else 0.0}
        return {**metrics, **speed}, predictions


class DescriptionContexts(ContextStage):
    """Stage 1 from the graph itself: ``"{head}, {its description}. {tail}, {its description}."``, the lines of
    KG-BERT's ``entity2text.txt`` for WN18RR. Nothing is generated or trained; the model is not asked."""

    writer = "entity descriptions"

    def check_inputs(self, task, tokenizer, cfg):
        super().check_inputs(task, tokenizer, cfg)
        undescribed = sorted(
            {e for h, _, t in task.train_triples for e in (h, t)} - set(task.graph.entity_descriptions)
        )
        if undescribed:
            raise ConfigError(
                f"method={self.name}: {len(undescribed)} entities of the training triples have no description in "
                f"dataset {cfg.dataset.name} (e.g. {undescribed[0]}); their contexts would be their names alone. "
                f"Use a dataset whose files describe its entities, or method=contextualization to have a model "
                f"write the contexts"
            )

    def context(self, task: KGTask, triple: Triple) -> str:
        h, _, t = triple
        return f"{task.entity_text(h)}. {task.entity_text(t)}."

    def evaluator(self, handle, tokenizer, task, batch_size):
        return DescriptionWriting(self, task)


class DescriptionWriting(EvaluatorBase):
    """Writes every training triple's description context; the same metrics as a writer's, without its speed."""

    metric_set = MetricSet(
        "context_descriptions",
        tuple(m for m in ContextGeneration.metric_set.metrics if m.name not in ("seconds", "tokens_per_second")),
        set_titles=ContextGeneration.metric_set.set_titles,
    )

    def __init__(self, method: DescriptionContexts, task: KGTask):
        self.method, self.task = method, task

    def evaluate(self, names=None) -> tuple[dict[str, float], dict[str, list[dict]]]:
        task = self.task
        contexts = [self.method.context(task, triple) for triple in task.train_triples]
        texts = {task.graph.triple_text(t) for t in task.train_triples}
        return replace_contexts(task, contexts, DescriptionContexts.writer, "descriptions", texts)
