"""opcd: on-policy distillation of a system prompt (OPCD; microsoft/LMOps ``opcd``).

The teacher is the frozen base model with the prompt as its system message; the LoRA student, given
no system message (the chat template's default, where it has one, stands in), samples a reply to each
input (one sample, temperature 1, up to ``max_reply_tokens``, ending at the end of its turn) and is
trained on the divergence between its and the teacher's next-token distributions at every sampled
token: reverse KL by default, as OPCD's ``kl_penalty``. ``lmbda`` < 1 lets the prompted teacher sample
that share of the batches instead (GKD's mixture; 0: the same loss on teacher-sampled replies). The
inputs, their held-out splits and the evaluation (task success: a reply that follows the prompt's rule
and answers the input) are GenPI's (:mod:`ctxdistill.methods.genpi`, stages 1 and 2, shared through
the same stage cache), so the two objectives meet on the same data; the sampling and the loss are
``on_policy_cd``'s (:class:`ctxdistill.methods.on_policy.OnPolicyDistillation`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from omegaconf import DictConfig

from ctxdistill.config import one_of
from ctxdistill.methods.genpi import PromptInternalization, PromptInternalizationConfig
from ctxdistill.methods.on_policy import OnPolicyDistillation, OnPolicySampling

log = logging.getLogger(__name__)


@dataclass
class OPCDConfig(OnPolicySampling, PromptInternalizationConfig):
    """On-policy distillation of a prompt; see ctxdistill.methods.opcd."""

    _target_: str = "ctxdistill.methods.opcd.OnPolicyPromptDistillation"
    prompt_placement: str = one_of("user_turn", "system_message", default="system_message")  # OPCD's
    # the sampling generator and the lambda draws: the run's seed, apart from method.seed (which keys the shared
    # stages), so seeds that share stages still draw their own samples
    sample_seed: int = "${seed}"  # type: ignore[assignment]
    schema_name: ClassVar[str] = "base_opcd"

    @classmethod
    def check(cls, m: DictConfig, cfg: DictConfig) -> None:
        super().check(m, cfg)
        cls.check_sampling(m)


class OnPolicyPromptDistillation(PromptInternalization):
    teacher_during_training = True  # it scores every step's samples

    def __init__(
        self, divergence: str, beta: float, lmbda: float, temperature: float, top_k, sample_seed: int, **shared
    ):
        super().__init__(**shared)
        # The student samples a batch with probability lambda (OPCD: 1, every batch), the prompted teacher the
        # rest; either until the end of its turn or max_reply_tokens.
        # The prompted base model teaches: no separate teacher, so none of ULD's cross-tokenizer settings.
        self.on_policy = OnPolicyDistillation(
            self.name,
            divergence,
            beta,
            lmbda,
            temperature,
            top_k,
            self.max_reply_tokens,
            stop=None,
            seed=sample_seed,
            teacher_model=None,
            uld_hybrid=False,
            uld_hybrid_weights=None,
            uld_crossentropy_weight=0.0,
        )
        self._inputs: dict[str, str] = {}  # training slot uid -> its pseudo input

    def prepare(self, handle, tokenizer, task, examples, batch_size):
        replies = self.training_replies(handle, tokenizer, task, batch_size)
        self._inputs = {example.uid: reply["input"] for example, reply in zip(examples, replies)}
        self.on_policy.start(handle, tokenizer, [self.teacher_prompt(tokenizer, r["input"]) for r in replies])
        log.info(
            "opcd: %d training and %d held-out pseudo inputs (replies cached in %s)",
            len(replies),
            len(self.heldout_pseudo_inputs),
            self.stage_dir,
        )

    def state_dict(self):
        return self.on_policy.state_dict()

    def load_state_dict(self, state):
        self.on_policy.load_state_dict(state)

    def collate(self, tokenizer, task, examples):
        texts = [self._inputs[e.uid] for e in examples]
        return {
            "student_prompts": [self.student_prompt(tokenizer, text) for text in texts],
            "teacher_prompts": [self.teacher_prompt(tokenizer, text) for text in texts],
        }

    def loss(self, handle, batch):
        return self.on_policy.loss(handle, batch)
