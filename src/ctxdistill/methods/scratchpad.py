"""scratchpad: internalising a scratchpad (Snell et al. 2022 §2.4 and Hyp. 6).

The teacher (base model, adapter disabled) with the context (instructions and worked
demonstrations) writes a scratchpad and then the final answer; the task's answer
extractor reads the answer. The student, with neither instructions nor scratchpad, is
trained to write that answer directly. Snell et al. fit the student at the token level
to the empirical distribution of many teacher samples; here each query's ``num_samples``
teacher answers form that distribution p, and the loss is the cross-entropy
-sum_a p(a) log P_S(a | query), i.e. the KL to the empirical teacher up to its entropy,
divided by the expected answer length sum_a p(a) |a| (one count per query, so that the
minimum stays P_S = p whatever the answers' lengths). ``num_samples=1`` with
``temperature=0`` is the greedy hard label.

Samples the extractor cannot read are counted, logged and reported
(``train/extraction_failures``); a query none of whose samples can be read has no target
and is left out of training, also counted (``train/queries_without_answer``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from omegaconf import DictConfig

from ctxdistill.config import MethodConfig, require, require_count
from ctxdistill.encoding import SharedPrefix, answer_logits, encode
from ctxdistill.generation import generate
from ctxdistill.methods.base import Method
from ctxdistill.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class ScratchpadConfig(MethodConfig):
    _target_: str = "ctxdistill.methods.scratchpad.ScratchpadDistillation"
    num_samples: int = 8  # teacher samples per query; their extracted answers are the empirical target
    temperature: float = 1.0  # of the teacher's sampling; 0 = greedy (then one sample suffices)
    top_k: Optional[int] = None
    # teacher prompts sampled per batch: a batch's rows share one random stream, so the samples depend on it (a
    # setting of the method's own, not trainer.eval_batch_size, which a resumed run may change)
    sample_batch_size: int = 16
    seed: int = "${seed}"  # type: ignore[assignment]
    schema_name: ClassVar[str] = "base_scratchpad"
    # free-text answers and an answer extractor (dataset.generation)
    dataset_kinds: ClassVar[tuple[str, ...]] = ("generation",)
    dataset_example: ClassVar[str] = (
        "a dataset with free-text answers and an answer extractor (dataset.generation), e.g. dataset=addition"
    )

    @classmethod
    def check(cls, m: DictConfig, cfg: DictConfig) -> None:
        require(m.num_samples >= 1, "method.num_samples", f"must be >= 1, got {m.num_samples}", "")
        require(m.temperature >= 0, "method.temperature", f"must be >= 0, got {m.temperature}", "0 is greedy")
        require_count(m.top_k, "method.top_k", "null samples from the whole vocabulary")
        require(m.sample_batch_size >= 1, "method.sample_batch_size", f"must be >= 1, got {m.sample_batch_size}", "")


class ScratchpadDistillation(Method):
    trained_weights = "adapter"

    def __init__(
        self,
        name: str,
        num_samples: int,
        temperature: float,
        top_k: Optional[int],
        sample_batch_size: int,
        seed: int,
    ):
        super().__init__(name)
        self.num_samples, self.temperature, self.top_k, self.seed = num_samples, temperature, top_k, seed
        self.sample_batch_size = sample_batch_size
        self._targets: dict[str, dict[tuple[int, ...], float]] = {}

    def train_examples(self, task):
        return task.train_queries

    @torch.no_grad()
    def prepare(self, handle, tokenizer, task, examples, batch_size):
        spec = task.generation  # validate() has checked that the dataset has one
        prompts = [task.teacher_prompt(e) for e in examples]
        generator = torch.Generator(device=next(handle.base.parameters()).device).manual_seed(self.seed)
        counts = [Counter() for _ in examples]
        failures = 0
        with handle.teacher() as teacher:
            prefix = SharedPrefix(teacher, tokenizer, prompts)
            for _ in progress_bar(range(self.num_samples), desc="teacher scratchpads", leave=False):
                generated = generate(
                    teacher,
                    tokenizer,
                    prompts,
                    spec.max_new_tokens,
                    self.temperature,
                    self.top_k,
                    spec.stop,
                    generator,
                    prefix,
                    self.sample_batch_size,
                )
                for count, text in zip(counts, tokenizer.batch_decode(generated, skip_special_tokens=True)):
                    answer = spec.extract(text, worked=True)
                    if answer is None:
                        failures += 1
                    else:
                        count[answer] += 1
        for example, count in zip(examples, counts):
            if count:
                total = sum(count.values())
                self._targets[example.uid] = {
                    tuple(tokenizer(answer + "\n", add_special_tokens=False).input_ids): n / total
                    for answer, n in count.items()
                }
        samples = self.num_samples * len(examples)
        unanswered = len(examples) - len(self._targets)
        if failures:
            log.warning(
                "answer extractor (%r) found no answer in %d of %d teacher samples; %d of %d queries have "
                "no answer and are left out of training",
                spec.answer_regex,
                failures,
                samples,
                unanswered,
                len(examples),
            )
        return {"teacher_samples": samples, "extraction_failures": failures, "queries_without_answer": unanswered}

    def trains_on(self, example):
        return example.uid in self._targets

    def collate(self, tokenizer, task, examples):
        prompts, answers, weights, queries = [], [], [], []
        for query, example in enumerate(examples):
            for answer, p in self._targets[example.uid].items():
                prompts.append(task.student_prompt(example))
                answers.append(answer)
                weights.append(p)
                queries.append(query)
        batch = encode(tokenizer, prompts, answers)
        batch["weights"] = torch.tensor(weights)
        batch["query_index"] = torch.tensor(queries)
        batch["num_queries"] = len(examples)
        return batch

    def loss(self, handle, batch):
        logits = answer_logits(handle.student, batch)
        mask = batch["answer_mask"].to(logits.device)
        nll = -logits.log_softmax(-1).gather(-1, batch["answer_ids"].to(logits.device).unsqueeze(-1)).squeeze(-1)
        weights, queries = batch["weights"].to(logits.device), batch["query_index"].to(logits.device)
        # Per query: sum_a p(a) NLL(a) / sum_a p(a) |a|. Dividing each answer by its own length instead would
        # make the minimum P_S(a) proportional to p(a) / |a|, favouring the shorter answers.
        cross_entropy = nll.new_zeros(batch["num_queries"]).index_add(0, queries, weights * (nll * mask).sum(-1))
        expected_length = nll.new_zeros(batch["num_queries"]).index_add(0, queries, weights * mask.sum(-1))
        return (cross_entropy / expected_length).mean(), {}
