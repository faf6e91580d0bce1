"""zero_shot and icl: evaluate the untrained model without or with the context."""

from __future__ import annotations

from ctxdistill.methods.base import Method


class Prompting(Method):
    reads_mixtures = True  # the untrained model on a mixture's few-shot tasks (Huang et al.'s untrained student)

    def __init__(self, name: str, use_context: bool):
        super().__init__(name)
        self.eval_with_context = use_context
