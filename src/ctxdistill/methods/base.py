"""The interface between a method and the shared trainer and evaluator."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ctxdistill.data import Example, Task
from ctxdistill.models import ModelHandle


class Method:
    """Defaults describe an evaluation-only method; training methods override them."""

    #: "lora" trains an adapter, "full" every weight, None trains nothing.
    adapter: Optional[str] = None
    #: whether the evaluated model sees the teacher's context (ICL) or the bare input.
    eval_with_context: bool = False

    def __init__(self, name: str):
        self.name = name

    @property
    def trains(self) -> bool:
        return self.adapter is not None

    def train_examples(self, task: Task) -> list[Example]:
        return []

    def prepare(self, handle: ModelHandle, tokenizer, task: Task, examples: list[Example], batch_size: int) -> None:
        """Work done once before the first step (e.g. the frozen teacher's targets)."""

    def collate(self, tokenizer, task: Task, examples: list[Example]) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, handle: ModelHandle, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError
