"""contextualization: stage 1 of contextualization distillation (Li et al. 2024).

An instruction-following LM writes, for every training triple (h, r, t), a paragraph that
introduces h and t and the relation between them (the released code's prompt, PaLM2
text-bison at temperature 0.7). The paragraphs are appended to ``dataset.contexts_file``,
one JSON line per triple, as each batch finishes: an interrupted run keeps what it wrote,
and the next run writes only the triples still missing. The students of stage 2
(methods.kgc) read the same file. Nothing is trained; the run's "evaluation" is the writing.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch
from omegaconf import DictConfig

from ctxdistill.config import ConfigError, MethodConfig, require
from ctxdistill.data.kg import ContextWriter, KGTask, Triple, batched, build_kg_task, missing_contexts
from ctxdistill.evaluation import EvaluatorBase
from ctxdistill.methods.base import Method
from ctxdistill.progress import progress_bar
from ctxdistill.results.metrics import Metric, MetricSet


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
    batch_size: int = 16
    schema_name: ClassVar[str] = "base_contextualization"
    dataset_kinds: ClassVar[tuple[str, ...]] = ("knowledge_graph",)
    dataset_example: ClassVar[str] = "dataset=kg_synthetic, wn18rr or fb15k237n"

    @classmethod
    def check(cls, m: DictConfig, cfg: DictConfig) -> None:
        require(m.max_new_tokens >= 1, "method.max_new_tokens", f"must be >= 1, got {m.max_new_tokens}", "")
        require(m.temperature >= 0, "method.temperature", f"must be >= 0, got {m.temperature}", "")
        require(m.batch_size >= 1, "method.batch_size", f"must be >= 1, got {m.batch_size}", "")


class Contextualization(Method):
    objective = "contexts/written"

    def __init__(
        self,
        name: str,
        prompt: str,
        chat_template: bool,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        batch_size: int,
    ):
        super().__init__(name)
        self.prompt, self.chat_template = prompt, chat_template
        self.max_new_tokens, self.temperature, self.top_p, self.batch_size = (
            max_new_tokens,
            temperature,
            top_p,
            batch_size,
        )

    def build_task(self, dataset, seed):
        return build_kg_task(dataset, seed)

    def check_inputs(self, task, tokenizer, cfg):
        if task.contexts_file is None:
            raise ConfigError("dataset.contexts_file is null: set it to the JSON-lines file the contexts go to")
        try:
            self.prompt.format(head="h", relation="r", tail="t")
        except (KeyError, IndexError) as e:
            raise ConfigError(
                f"method.prompt: unknown field {e}; it may use {{head}}, {{relation}} and {{tail}}"
            ) from None
        if self.chat_template and not tokenizer.chat_template:
            raise ConfigError(f"model={cfg.model.name} has no chat template; set method.chat_template=false")

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

    def evaluator(self, handle, tokenizer, task, batch_size):
        return ContextGeneration(self, handle.base, tokenizer, task)


class ContextGeneration(EvaluatorBase):
    """Writes the missing contexts of the training triples; its metrics describe what was written."""

    metric_set = MetricSet(
        "context_generation",
        tuple(
            Metric(name, label, higher_is_better=better, sets=("contexts",), kind=kind, headline=name == "written")
            for name, label, better, kind in (
                ("written", "written", True, "count"),
                ("reused", "reused", True, "count"),
                ("covered", "covered", True, "value"),
                ("mean_words", "mean words", True, "value"),
                ("seconds", "seconds", False, "value"),
                ("tokens_per_second", "tokens/s", True, "value"),
            )
        ),
        set_titles={"contexts": "contexts written for the training triples"},
    )

    def __init__(self, method: Contextualization, model, tokenizer, task: KGTask):
        self.method, self.model, self.tokenizer, self.task = method, model, tokenizer, task
        self.writer_name = getattr(model, "name_or_path", "")

    def prepare(self) -> None:
        """Nothing to prepare: the writer is not trained."""

    @torch.no_grad()
    def generate(self, triples: list[Triple]) -> tuple[list[str], int]:
        """One batch: the paragraphs and the number of tokens generated. Seeded by the batch's triples,
        so a resumed run draws the same samples for the same pending triples."""
        m, tokenizer = self.method, self.tokenizer
        prompts = [m.render(self.task, t, tokenizer) for t in triples]
        # A chat template already holds the special tokens the model expects at the start.
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not m.chat_template)
        device = next(self.model.parameters()).device
        torch.manual_seed(zlib.crc32(f"{self.task.seed}|{'|'.join(triples[0])}".encode()))
        sample = m.temperature > 0
        out = self.model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=m.max_new_tokens,
            do_sample=sample,
            pad_token_id=tokenizer.pad_token_id,
            **({"temperature": m.temperature, "top_p": m.top_p} if sample else {}),
        )
        new = out[:, enc["input_ids"].shape[1] :]
        texts = [" ".join(t.split()) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        return texts, int((new != tokenizer.pad_token_id).sum())

    def evaluate(self, names=None) -> tuple[dict[str, float], dict[str, list[dict]]]:
        task = self.task
        pending = missing_contexts(task)
        reused = len(task.train_triples) - len(pending)
        writer = ContextWriter(task.contexts_file)
        started, tokens, rows = time.perf_counter(), 0, []
        self.model.eval()
        bar = progress_bar(total=len(pending), desc="contexts")
        for chunk in batched(pending, self.method.batch_size):
            texts, generated = self.generate(chunk)
            tokens += generated
            written = dict(zip(chunk, texts))
            writer.write(written, writer=self.writer_name)
            task.contexts.update(written)
            rows.extend(
                {"uid": "|".join(triple), "head": triple[0], "relation": triple[1], "tail": triple[2], "context": text}
                for triple, text in written.items()
            )
            bar.update(len(chunk))
        bar.close()
        seconds = time.perf_counter() - started
        words = [len(task.contexts[t].split()) for t in task.train_triples]
        metrics = {
            "contexts/written": len(pending),
            "contexts/reused": reused,
            "contexts/covered": sum(t in task.contexts for t in task.train_triples) / len(task.train_triples),
            "contexts/mean_words": sum(words) / len(words),
            "contexts/seconds": seconds,
            "contexts/tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        }
        return metrics, {"contexts": rows}
