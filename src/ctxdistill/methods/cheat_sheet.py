"""cheat_sheet: many-shot demonstrations distilled into a text cheat sheet (Honda et al., EMNLP 2025 Findings;
code CyberAgentAILab/cheat-sheet-icl). No weight changes.

The model reads the demonstrations, all in one request as the released meta-model (GPT-4.1) does, and
writes a cheat sheet (another model writes it when ``teacher_model`` names one, e.g. a larger one, as the
paper's transfer experiments give GPT-4.1's sheets to Gemini models; any tokenizer: only the sheet's text
passes between them) with the released request (``get_cheat_prompt``, non-math tasks), greedily (the
released ``--temp 0``); the evaluated context is then the sheet, the released line "Follow the format of
the examples below in your response." and the first two demonstrations, joined and followed by the query
with the released separator ``"\\n###\\n"``. The demonstrations are those ICL would see (every context's,
in the order drawn).

Deviations (named in docs/papers/beyond-the-window.md): the demonstrations are in the dataset's own
template without reasons (the released ``--reason_type no``; the released runs use ``gen``, reasons the
meta-model wrote, and the demo task's label words are arbitrary, so there is nothing to reason); where a
small model's window cannot hold them all (the beyond-the-window sweep), ``chunk_demos`` set reads that many
at a time, in order, and every request after the first opens with the sheet so far (``sheet_so_far``), so
that the last request's sheet covers every chunk; a sheet is at most ``max_sheet_tokens`` long; the
dataset's instruction opens the evaluated context, as it opens ICL's; the query is in the dataset's template
with its answer cue (the released query is the bare input), answers are scored as label words (no generated
answer is parsed) and there is no system prompt or chat turn at evaluation.

The sheets are cached per chunk (:class:`~ctxdistill.stage_cache.RowStore`), keyed by the request
text (which holds the demonstrations), the writer model's identity, the generation settings and
:data:`PRODUCER_VERSION`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import ClassVar, Optional

from omegaconf import DictConfig, OmegaConf

from ctxdistill.config import ConfigError, MethodConfig, ModelConfig, require, require_count
from ctxdistill.data import Task
from ctxdistill.evaluation import Evaluator, MethodEvaluator, make_evaluator, with_task_metrics
from ctxdistill.generation import generate
from ctxdistill.methods.base import Method
from ctxdistill.methods.genpi import render_chat
from ctxdistill.models import context_window
from ctxdistill.stage_cache import RowStore

log = logging.getLogger(__name__)

#: The version of the code that writes cheat sheets (the request, generation, cleaning). Bump it whenever that
#: code changes what it writes: sheets written by earlier code are then never read. 2: generation's attention
#: to the shared context runs PyTorch's fused CPU kernel (a near-tie can pick another token). 3: a separate writer
#: with the evaluated model's vocabulary is prompted in its own chat template, not the evaluated model's.
PRODUCER_VERSION = 3

#: The released separator between demonstrations, and between the context and the query (data_utils.SEP).
SEPARATOR = "\n###\n"

#: The released request for non-math tasks (data_utils.get_cheat_prompt); {examples} is SEPARATOR.join(demos).
REQUEST = (
    "Create a cheat sheet based on the examples below. You will be asked to answer questions similar to these "
    "examples during the test, without being allowed to refer to the examples at that time. Your task here is to "
    "make a cheat sheet that will help you answer such problems correctly. First, carefully read the examples "
    "below and identify which ones you find most difficult to answer.\n\n{examples}\n\nNow, create a cheat sheet "
    "to help you solve the difficult examples. Exclude any content that is easy for you, and only include "
    "specific, detailed points to address the challenging ones.\n\n"
)

#: Our addition before the request of every chunk after the first (the released code has one request).
UPDATE = "Your cheat sheet so far:\n{sheet}\n\nAdd what the new examples teach and keep it short.\n\n"

#: What follows the sheet in the released context (cheatsheet_api.py), then the format examples.
FORMAT_NOTE = "\n\nFollow the format of the examples below in your response.\n\n"

#: Lines the released code drops, with everything before them, from the start of a sheet (cheatsheet_api.py).
PREAMBLES = ("Certainly!", "Here is a **")


@dataclass
class CheatSheetConfig(MethodConfig):
    _target_: str = "ctxdistill.methods.cheat_sheet.CheatSheet"
    request: str = REQUEST  # with {examples}
    sheet_so_far: str = UPDATE  # before the request of every chunk after the first, with {sheet}
    chunk_demos: Optional[int] = None  # demonstrations read per request; None: all in one, as released
    max_sheet_tokens: int = 64
    format_examples: int = 2  # demonstrations shown after the sheet (released: 2)
    chat: bool = True  # the request as a user turn in the model's chat format (the released code calls a chat API)
    sheet_dir: str = "${cache_dir}/cheat_sheets"
    # the model that writes the sheet (+model@method.teacher_model=NAME); null: the evaluated model writes it
    teacher_model: Optional[ModelConfig] = None
    schema_name: ClassVar[str] = "base_cheat_sheet"
    dataset_kinds: ClassVar[tuple[str, ...]] = ("classification",)

    @classmethod
    def check(cls, m: DictConfig, cfg: DictConfig) -> None:
        require("{examples}" in m.request, "method.request", "has no {examples} placeholder", "Keep {examples} in it")
        require("{sheet}" in m.sheet_so_far, "method.sheet_so_far", "has no {sheet} placeholder", "Keep {sheet} in it")
        require_count(m.chunk_demos, "method.chunk_demos", "null: every demonstration in one request, as released")
        require(m.max_sheet_tokens >= 1, "method.max_sheet_tokens", f"must be >= 1, got {m.max_sheet_tokens}", "")
        require(m.format_examples >= 0, "method.format_examples", f"must be >= 0, got {m.format_examples}", "")
        require(
            cfg.dataset.context.num_demos >= 1,
            "dataset.context.num_demos",
            "is 0: a cheat sheet is written from the demonstrations, and there are none",
            "Set dataset.context.num_demos to at least 1 (method=zero_shot evaluates without a context)",
        )
        require(  # the sheet is written from every context's demonstrations in the dataset's words
            cfg.dataset.context.demo_verbalizers is None and cfg.dataset.context.instructions is None,
            "dataset.context.demo_verbalizers",
            "contexts with instructions or label words of their own (e.g. experiment=instruction_override) "
            "cannot be read as one set of demonstrations in the dataset's words",
            "Set dataset.context.instructions=null and dataset.context.demo_verbalizers=null with method=cheat_sheet",
        )


def sheet_request(template: str, task: Task, demos: list, sheet_so_far: str = "", sheet: str = "") -> str:
    """The released request for one chunk of demonstrations, after the sheet so far when there is one."""
    request = template.format(examples=SEPARATOR.join(task.demonstration(d) for d in demos))
    return sheet_so_far.format(sheet=sheet) + request if sheet else request


def clean_sheet(text: str) -> str:
    """The released clean-up: strip, and drop a leading "Certainly!"/"Here is a **" line and what precedes it."""
    text = text.strip()
    lines = text.split("\n")
    for index, line in enumerate(lines):
        if line.startswith(PREAMBLES):
            return "\n".join(lines[index + 1 :]).strip()
    return text


def sheet_context(task: Task, sheet: str, format_examples: int) -> str:
    """The evaluated context: the dataset's instruction, the sheet, the released format note and examples."""
    shots = SEPARATOR.join(task.demonstration(d) for d in task.demos[:format_examples])
    body = sheet + (FORMAT_NOTE + shots if shots else "")
    return task.separator.join(p for p in (task.context_instruction, body) if p)


def use_sheet(task: Task, sheet: str, format_examples: int) -> None:
    """The task's context becomes the sheet's, followed by the query after the released separator."""
    context = sheet_context(task, sheet, format_examples)
    task.context, task.contexts, task.separator = context, [context], SEPARATOR


class CheatSheet(Method):
    eval_with_context = True

    def __init__(
        self,
        name: str,
        request: str,
        sheet_so_far: str,
        chunk_demos: Optional[int],
        max_sheet_tokens: int,
        format_examples: int,
        chat: bool,
        sheet_dir: str,
        teacher_model: Optional[dict],
    ):
        super().__init__(name)
        self.request, self.sheet_so_far, self.chunk_demos = request, sheet_so_far, chunk_demos
        self.max_sheet_tokens, self.format_examples, self.chat, self.sheet_dir = (
            max_sheet_tokens,
            format_examples,
            chat,
            sheet_dir,
        )
        self.teacher_model = None if teacher_model is None else OmegaConf.create(teacher_model)
        self.writer_tokenizer = None  # a separate writer's own (check_teacher): its chat template, its BOS
        self.sheet_room: Optional[int] = None  # set by check_inputs, which every run calls before evaluating

    def demonstrations_used(self, num_demos: int, num_contexts: int) -> int:
        return num_demos * num_contexts  # the sheet is written from every context's demonstrations

    def chunks(self, task: Task) -> list[list]:
        size = self.chunk_demos or max(len(task.demos), 1)
        return [task.demos[i : i + size] for i in range(0, len(task.demos), size)]

    def prompt(self, tokenizer, task: Task, chunk: list, sheet: str) -> str:
        request = sheet_request(self.request, task, chunk, self.sheet_so_far, sheet)
        return render_chat(tokenizer, [{"role": "user", "content": request}]) if self.chat else request

    def check_inputs(self, task, tokenizer, cfg):
        """Every request fits its writer's window (the evaluated model's here; a separate writer's in
        :meth:`check_teacher`), and so does the longest query after a sheet of full length."""
        window = context_window(cfg.model, cfg.cache_dir)
        if self.teacher_model is None:
            self.check_requests(task, tokenizer, window)
        context = len(tokenizer(sheet_context(task, "", self.format_examples)).input_ids)
        queries = [e for s in task.eval_sets.values() for e in s]
        query = max(len(ids) for ids in tokenizer([SEPARATOR + task.context_query(e) for e in queries]).input_ids)
        self.sheet_room = window - context - query - 1  # the evaluated model's tokens left for the sheet
        if self.max_sheet_tokens > self.sheet_room:
            raise ConfigError(
                f"method.max_sheet_tokens: a sheet of {self.max_sheet_tokens} tokens with the instruction, format "
                f"examples and a query may take {window - self.sheet_room + self.max_sheet_tokens} tokens, more "
                f"than the model's window of {window}. Lower method.max_sheet_tokens or method.format_examples."
            )

    def check_sheet_fits(self, tokenizer, sheet: str) -> None:
        """A sheet another model wrote, in its own tokens, may take more of the evaluated model's: refused
        before evaluation rather than cut."""
        length = len(tokenizer(sheet, add_special_tokens=False).input_ids)
        if self.sheet_room is not None and length > self.sheet_room:
            raise ConfigError(
                f"method.max_sheet_tokens: the sheet the writer wrote takes {length} of the evaluated model's tokens, "
                f"more than the {self.sheet_room} its window leaves beside the instruction, format examples and "
                f"the longest query. Lower method.max_sheet_tokens (the writer's tokens, now {self.max_sheet_tokens})."
            )

    def check_teacher(self, cfg, task, tokenizer, teacher_tokenizer):
        """A separate writer may have any tokenizer (only the sheet's text reaches the evaluated model); its
        requests must fit its own window."""
        self.writer_tokenizer = teacher_tokenizer
        self.check_requests(task, teacher_tokenizer, context_window(self.teacher_model, cfg.cache_dir))

    def check_requests(self, task: Task, tokenizer, window: int) -> None:
        """Every request (after a sheet so far of full length) and the sheet it writes fit the writer's window."""
        chunks = self.chunks(task)
        stand_in = "\n" if len(chunks) > 1 else ""  # stands for a sheet so far; its tokens are added below
        longest = max(len(tokenizer(self.prompt(tokenizer, task, c, stand_in)).input_ids) for c in chunks)
        need = longest + self.max_sheet_tokens * (2 if len(chunks) > 1 else 1)
        if need > window:
            raise ConfigError(
                f"method.chunk_demos: a request to write a cheat sheet may take {need} tokens with the sheet so far "
                f"and the new sheet ({self.max_sheet_tokens} tokens each), more than the writer's window of {window}. "
                f"Set method.chunk_demos (demonstrations per request, now {len(chunks[0])}) lower, or lower "
                "method.max_sheet_tokens."
            )

    def write_sheet(self, handle, tokenizer, task: Task, batch_size: int) -> str:
        """The cheat sheet of the task's demonstrations, written chunk after chunk by the writer (the separate
        teacher when there is one, in its own tokens; ``handle.identity`` is its identity); each step is cached."""
        # a separate writer reads its own tokens and chat template, also where its vocabulary is the evaluated
        # model's (the handle then carries no teacher tokenizer)
        tokenizer = self.writer_tokenizer or handle.teacher_tokenizer or tokenizer
        store = RowStore(
            self.sheet_dir,
            "cheat_sheet",
            {
                "writer": handle.identity,
                "max_sheet_tokens": self.max_sheet_tokens,
                "chat": self.chat,
                "version": PRODUCER_VERSION,
            },
        )

        def write(prompts: list[str]) -> list[dict]:
            with handle.teacher() as model:
                written = generate(model, tokenizer, prompts, self.max_sheet_tokens, stop=None, batch_size=batch_size)
            return [
                {"key": p, "sheet": clean_sheet(tokenizer.decode(t, skip_special_tokens=True))}
                for p, t in zip(prompts, written)
            ]

        sheet = ""
        for index, chunk in enumerate(self.chunks(task)):
            prompt = self.prompt(tokenizer, task, chunk, sheet)
            sheet = store.fill([prompt], write, 1, f"cheat sheet {index + 1}")[0]["sheet"] or sheet
        return sheet

    def evaluator(self, handle, tokenizer, task, batch_size):
        return CheatSheetEvaluator(self, handle, tokenizer, task, batch_size)


class CheatSheetEvaluator(MethodEvaluator):
    """Writes the sheet, puts it in place of the demonstrations, then scores as ICL does (the run records the
    context's tokens per query; the log says how many the replaced demonstrations took)."""

    metric_set = Evaluator.metric_set  # the label-word scoring of ICL, which it runs

    def __init__(self, method: CheatSheet, handle, tokenizer, task: Task, batch_size: int):
        super().__init__(method, handle, tokenizer, task, batch_size)
        self.metric_set = with_task_metrics(self.metric_set, task)
        self.inner = None

    def prepare(self) -> None:
        task, tokenizer = self.task, self.tokenizer
        replaced = sum(len(tokenizer(c).input_ids) for c in task.contexts)
        sheet = self.method.write_sheet(self.handle, tokenizer, task, self.batch_size)
        self.method.check_sheet_fits(tokenizer, sheet)
        use_sheet(task, sheet, self.method.format_examples)
        log.info(
            "cheat sheet of %d demonstrations (%d tokens of context in all), %d tokens of context per query:\n%s",
            len(task.demos),
            replaced,
            len(tokenizer(task.context + SEPARATOR).input_ids),
            sheet,
        )
        # A separate writer only writes: the evaluated model reading the sheet is the run's teacher.
        reader = replace(self.handle, separate_teacher=None, teacher_tokenizer=None)
        self.inner = make_evaluator(reader, tokenizer, task, True, self.batch_size, model_is_teacher=True)
        self.inner.prepare()

    def evaluate(self, names=None):
        return self.inner.evaluate(names)
