"""zero_shot and icl: evaluate the untrained model without or with the context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ctxdistill.config import MethodConfig
from ctxdistill.methods.base import Method


@dataclass
class PromptingConfig(MethodConfig):
    _target_: str = "ctxdistill.methods.prompting.Prompting"
    use_context: bool = False
    schema_name: ClassVar[str] = "base_prompting"
    defining: ClassVar[dict[str, str]] = {
        "use_context": "Run method=zero_shot for the model without the context, method=icl for it with the context"
    }
    # the untrained model on a mixture's few-shot tasks too (Huang et al.'s untrained student)
    dataset_kinds: ClassVar[tuple[str, ...]] = ("classification", "generation", "mixture")


class Prompting(Method):
    def __init__(self, name: str, use_context: bool):
        super().__init__(name)
        self.eval_with_context = use_context
