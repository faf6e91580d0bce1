"""The teacher cache: a frozen teacher's answer-position distributions, computed once and reused.

Training on the same queries for many epochs (Upadhayaya et al.: 20 epochs of 32 queries), and
sweeping learning rates or divergences over the same context, asks the frozen teacher the same
questions again and again. Each answer is stored per query — the teacher's answer span, its
log-probabilities at the span's positions (the whole vocabulary, or the top k) — in one file per
model, settings and context, so later epochs and later runs run no teacher forward pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

import torch
from filelock import FileLock

from ctxdistill import provenance

log = logging.getLogger(__name__)

#: The version of the code that produces cached targets (generation, answer logits, the methods' target
#: computation). Bump it whenever that code changes what it produces: targets written by earlier code are
#: then never read. 2: generation over a shared context no longer drops the query after the first token.
#: 3: the shared context's attention runs PyTorch's fused CPU kernel and the LM head reads a contiguous input
#: (logits equal to 1e-5, but a near-tie can pick another token).
#: 4: models with attention code of their own (Bloom, Falcon, GPT-Neo, MPT, XGLM) no longer lose the context.
#:    Generation also ends on the end tokens the model's generation config lists (a teacher's answer spans).
PRODUCER_VERSION = 4


class TeacherTargets(NamedTuple):
    span: list[int]  # the answer tokens whose positions are distilled
    logprobs: torch.Tensor  # [len(span), V], or [len(span), k] with top-k
    indices: Optional[torch.Tensor]  # [len(span), k] token ids of the top k; None for the whole vocabulary
    # uld (logprobs then hold the sorted log-probabilities): [len(span)] the log-probability of each span token
    span_logprobs: Optional[torch.Tensor] = None
    # uld_hybrid (logprobs then hold the sorted log-probabilities of the other tokens): [len(span), M] the
    # log-probabilities of the tokens the student's vocabulary shares
    shared_logprobs: Optional[torch.Tensor] = None


def stack_targets(
    targets: list[TeacherTargets], width: int, right_aligned: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rows' targets padded into batch tensors [B, width, support] (zeros where a row has no position),
    right-aligned like answer spans or left-aligned like demonstration tokens."""
    support = targets[0].logprobs.shape[-1]
    logprobs = torch.zeros(len(targets), width, support)
    indices = None if targets[0].indices is None else torch.zeros(len(targets), width, support, dtype=torch.long)
    for row, target in enumerate(targets):
        at = slice(width - len(target.span), width) if right_aligned else slice(0, len(target.span))
        logprobs[row, at] = target.logprobs
        if indices is not None:
            indices[row, at] = target.indices
    return logprobs, indices


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


class TeacherCache:
    """Targets keyed by the teacher's whole input text; on disk under ``directory``, or in memory if None.

    The key covers everything that determines a target (the producing code's version, model weights,
    tokenizer, answer mode, temperature, top-k, the prompt itself), so a changed demonstration, setting
    or producer never hits a stale entry. Writes go to a temporary file renamed into place: a killed run leaves the old
    file or the new one, never half of one; runs writing the same file at once merge theirs (:meth:`save`).
    """

    def __init__(self, directory: Optional[str], model_identity: str, settings: dict[str, Any], context: str):
        self.entries: dict[str, TeacherTargets] = {}
        self.path = None
        key = _digest([PRODUCER_VERSION, model_identity, settings, context])
        if directory:
            self.path = Path(directory).expanduser() / f"{key}.pt"
            self.entries = self._stored()
        provenance.note_cache("teacher", key, self.path)
        self._added = 0

    def _stored(self) -> dict[str, TeacherTargets]:
        if not self.path.is_file():
            return {}
        try:
            stored = torch.load(self.path, weights_only=True)
        except Exception as e:  # a cache is disposable: recompute rather than fail the run
            log.warning("ignoring the unreadable teacher cache %s (%s); it will be rewritten", self.path, e)
            return {}
        return {key: TeacherTargets(*value) for key, value in stored.items()}

    @staticmethod
    def key(prompt: str) -> str:
        return _digest(prompt)

    def get(self, prompt: str) -> Optional[TeacherTargets]:
        return self.entries.get(self.key(prompt))

    def put(self, prompt: str, targets: TeacherTargets) -> None:
        self.entries[self.key(prompt)] = targets
        self._added += 1

    def save(self) -> None:
        if self.path is None or not self._added:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Runs sharing the file (a parallel sweep's cells) each add theirs: what another wrote since this run read
        # the file is kept, and an entry once written never changes (a target computed in another batch may differ
        # in its last bits; a run that read the first must find it again when it resumes).
        with FileLock(f"{self.path}.lock"):
            stored = self._stored()
            self.entries = {**stored, **self.entries}  # this run keeps the targets it trained on
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            torch.save({key: tuple(value) for key, value in {**self.entries, **stored}.items()}, tmp)
            os.replace(tmp, self.path)
        log.info("teacher cache: %d new targets saved to %s", self._added, self.path)
        self._added = 0


@contextlib.contextmanager
def saved_on_exit(*caches: TeacherCache) -> Iterator[None]:
    """Saves ``caches`` when the block ends, also when it is stopped (Ctrl-C, an error): a run started again
    computes only the targets of the batches that had not finished."""
    try:
        yield
    finally:
        for cache in caches:
            cache.save()
