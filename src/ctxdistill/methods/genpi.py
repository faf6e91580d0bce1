"""genpi: Generative Prompt Internalization (Shin et al., NAACL 2025; code kaistAI/GenPI).

The aim is a model that behaves as if a prompt (a system prompt, a persona, a format rule)
were present, without the prompt in its input. Stages 1-3 generate data with the base model
(adapter disabled); each is cached by its settings (:mod:`ctxdistill.stage_cache`), so a sweep
over the loss weights reuses them and a killed run continues where it stopped:

1. pseudo inputs: the generator, shown the prompt and a few example inputs, samples user
   inputs (seeded per round), cleaned and deduplicated; the last ``num_heldout_pseudo_inputs``
   are held out for evaluation;
2. replies: greedy replies to every input with the prompt (teacher) and without it (base); as in
   the released code, both keep the system message "You are a helpful assistant." and the prompt
   opens the teacher's user turn (``prompt_placement``);
3. reasons: the model, shown an input, both replies and the prompt, writes why the prompt
   changes the reply (sampled, top-p as released);
4. training the LoRA student, which never sees the prompt, on
   ``L = (1 - sft_weight) * L_PG + sft_weight * L_SFT (+ kl_weight * KL)``:
   L_PG is the cross-entropy of "### Context ... ### Reason ..." (the prompt and the reason)
   after the released turn showing the input and the bad (base) and good (teacher) replies; L_SFT the
   cross-entropy of the teacher's reply after the bare input; the optional KL is forward KL
   from the teacher-with-prompt at the reply tokens (the released code has none).

The headline metric is task success: a reply follows the prompt's rule *and* answers the input
(:func:`ctxdistill.evaluation.task_success`). A sweep optimises it on the held-out pseudo inputs,
so the configured held-out inputs (set "eval"), which results report, never choose a setting.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
from omegaconf import MISSING, DictConfig, OmegaConf

from ctxdistill.config import ConfigError, MethodConfig, one_of, require, require_count
from ctxdistill.data import Example, Task
from ctxdistill.data.tasks import DataError
from ctxdistill.encoding import SharedPrefix, answer_logits, encode
from ctxdistill.evaluation import MethodEvaluator, generation_metrics, task_success
from ctxdistill.generation import end_tokens, generate, strip_stop
from ctxdistill.losses import answer_cross_entropy, distillation_loss, teacher_distribution
from ctxdistill.methods.base import Method
from ctxdistill.progress import progress_bar
from ctxdistill.results.metrics import EXAMPLES, Metric, MetricSet
from ctxdistill.stage_cache import RowStore, digest

log = logging.getLogger(__name__)

PG_TARGET = "### Context\n-----------\n{prompt}\n-----------\n\n### Reason\n{reason}"

#: The system message of the teacher's and the base model's generations in the released code.
RELEASED_SYSTEM_MESSAGE = "You are a helpful assistant."


@dataclass
class PromptInternalizationConfig(MethodConfig):
    """What the methods that internalise a prompt share (GenPI, and OPCD in ctxdistill.methods.opcd): the
    prompt, its rule, the configured and generated inputs, and the replies stage."""

    task_name: str = MISSING  # names the prompt in results (the run's "dataset")
    prompt: str = MISSING  # internalised: in the teacher's input, never in the student's
    rule: str = MISSING  # a regular expression (re.search) that a reply following the prompt matches
    # user_turn: as the released code, every generation keeps the system message "You are a helpful assistant."
    # and the prompt opens the teacher's user turn (<USER>:/<AGENT>: markers split it into turns).
    # system_message: the prompt is the teacher's system message (the student's input has none).
    prompt_placement: str = one_of("user_turn", "system_message", default="user_turn")
    example_inputs: list[str] = field(default_factory=list)  # shown to the generator of pseudo inputs
    heldout_inputs: list[str] = field(default_factory=list)  # evaluation set "eval"
    num_pseudo_inputs: int = 32  # training inputs (the paper: 1,000 per prompt)
    # further generated inputs, evaluation set "pseudo_heldout": the validation set a sweep's objective is read on
    num_heldout_pseudo_inputs: int = 8
    # A completion prompt with {prompt} and {examples} (a numbered list ending in the next number).
    generator_template: str = (
        "An AI assistant was given these instructions: {prompt}\nMessages that users sent to the assistant:\n{examples}"
    )
    generator_temperature: float = 1.0
    generator_top_k: Optional[int] = 50
    generator_top_p: Optional[float] = None  # nucleus sampling after top-k (the released code: 0.9, no top-k)
    inputs_per_round: int = 16  # samples per generator call
    max_rounds: int = 20
    max_input_tokens: int = 32
    max_reply_tokens: int = 48
    # Rows the sampled stages (pseudo inputs, GenPI's reasons) generate at once: a batch's rows share one random
    # stream, so this decides what is drawn. The method's own setting: trainer.eval_batch_size (an evaluation
    # made again with another) must not change the generated inputs.
    sample_batch_size: int = 16
    stage_dir: str = "${cache_dir}/genpi"  # cached stages, shared by runs with the same settings
    seed: int = "${seed}"  # type: ignore[assignment]
    dataset_kinds: ClassVar[None] = None  # it brings its own inputs (the prompt's); the dataset group is not read

    @classmethod
    def check(cls, m: DictConfig, cfg: DictConfig) -> None:
        unset = [k for k in ("task_name", "prompt", "rule") if OmegaConf.is_missing(m, k)]
        require(
            not unset,
            "method",
            f"method={m.name} needs {', '.join('method.' + k for k in unset)}",
            "Set them on the command line, or keep those of its YAML file under conf/method/",
        )
        require(bool(m.prompt.strip()), "method.prompt", "is empty; nothing to internalise", "Set method.prompt")
        for key in (
            "num_pseudo_inputs",
            "inputs_per_round",
            "max_rounds",
            "max_input_tokens",
            "max_reply_tokens",
            "sample_batch_size",
        ):
            require(m[key] >= 1, f"method.{key}", f"must be >= 1, got {m[key]}", "")
        require(
            m.num_heldout_pseudo_inputs >= 1,
            "method.num_heldout_pseudo_inputs",
            f"must be >= 1, got {m.num_heldout_pseudo_inputs}: the run's objective (a sweep's) is measured on "
            "them, apart from the reported held-out inputs",
            "Set e.g. method.num_heldout_pseudo_inputs=8",
        )
        require(  # the reported evaluation set ("eval"): an empty one was an IndexError from the tokenizer
            len(m.heldout_inputs) >= 1,
            "method.heldout_inputs",
            "is empty: the run's reported metrics are measured on them",
            "List the held-out inputs, or keep those of the method's YAML file",
        )
        repeated = sorted({q for q in m.heldout_inputs if list(m.heldout_inputs).count(q) > 1})
        require(
            not repeated,
            "method.heldout_inputs",
            f"{repeated} appear more than once: each would count twice in the metrics, and a paired test "
            "(ctxdistill-compare --vs) pairs the examples by their text",
            "List each held-out input once",
        )
        require(  # every round asks the same prompt: greedy decoding writes one input, however many rounds run
            m.generator_temperature > 0,
            "method.generator_temperature",
            f"must be positive, got {m.generator_temperature}: the inputs are distinct samples of one prompt",
            "The released code samples at 1.0",
        )
        require_count(m.generator_top_k, "method.generator_top_k", "null samples from the whole vocabulary")
        require(
            m.generator_top_p is None or 0 < m.generator_top_p <= 1,
            "method.generator_top_p",
            f"must be in (0, 1] or null, got {m.generator_top_p}",
            "",
        )
        try:
            re.compile(m.rule)
        except re.error as e:
            raise ConfigError(f"method.rule: {m.rule!r} is not a regular expression ({e}). Fix the pattern") from e
        fillable_templates(m, {"generator_template": ("prompt", "examples")})


def fillable_templates(m: DictConfig, templates: dict[str, tuple[str, ...]]) -> None:
    """Each ``method.<key>`` template can be filled with its fields, or a ConfigError names what it may use."""
    for key, fields in templates.items():
        try:
            m[key].format(**{f: "" for f in fields})
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"method.{key}: cannot fill it ({e!r}); it may use only "
                f"{', '.join('{' + f + '}' for f in fields)} (double literal braces)"
            ) from e


@dataclass
class GenPIConfig(PromptInternalizationConfig):
    """Generative Prompt Internalization; see ctxdistill.methods.genpi for the stages and the loss."""

    _target_: str = "ctxdistill.methods.genpi.GenPI"
    # The released reasons are about five sentences, sampled at temperature 0.7, top-p 0.9, up to 512 tokens.
    reason_template: str = (
        "A user sent an AI assistant this message:\n{input}\n\n"
        "Without instructions, the assistant replied:\n{base}\n\n"
        "With the instructions below, it replied:\n{teacher}\n\n"
        "Instructions:\n{prompt}\n\n"
        "In about five sentences, explain how the instructions changed the reply."
    )
    reason_temperature: float = 0.7
    reason_top_p: Optional[float] = 0.9
    max_reason_tokens: int = 512
    # The prompt-generation turn: the released meta_cognition_input_prompt (src/dataset_cls/agentbench/os/prompts.py)
    # word for word, its {student_output} and {teacher_output} named base and teacher.
    pg_template: str = (
        "When a certain Context and Input were provided together, the Bad Output changed to Good Output as shown "
        "below.\nGuess which Context was provided and generate a Reason why the Output changed as shown below.\n\n"
        "### Input:\n{input}\n\n### Bad Output:\n{base}\n\n### Good Output:\n{teacher}"
    )
    # lambda: L = (1 - lambda) * L_PG + lambda * L_SFT, the released stage2_ratio (0.7 for OS and WebShop,
    # 0.3 for Mind2Web)
    sft_weight: float = 0.7
    kl_weight: float = 0.0  # optional forward KL from the teacher with the prompt at the reply tokens
    schema_name: ClassVar[str] = "base_genpi"

    @classmethod
    def check(cls, m: DictConfig, cfg: DictConfig) -> None:
        super().check(m, cfg)
        require(0 <= m.sft_weight <= 1, "method.sft_weight", f"must be in [0, 1], got {m.sft_weight}", "")
        require(m.kl_weight >= 0, "method.kl_weight", f"must be >= 0, got {m.kl_weight}", "")
        require(m.max_reason_tokens >= 1, "method.max_reason_tokens", f"must be >= 1, got {m.max_reason_tokens}", "")
        require(
            m.reason_temperature >= 0,
            "method.reason_temperature",
            f"must be >= 0, got {m.reason_temperature}",  # a negative one samples the least likely tokens
            "0 is greedy; the released reasons were sampled at 0.7",
        )
        require(
            m.reason_top_p is None or 0 < m.reason_top_p <= 1,
            "method.reason_top_p",
            f"must be in (0, 1] or null, got {m.reason_top_p}",
            "",
        )
        fillable_templates(
            m,
            {"pg_template": ("input", "base", "teacher"), "reason_template": ("input", "base", "teacher", "prompt")},
        )

    @classmethod
    def unread(cls, m: DictConfig) -> dict[str, str]:
        if m.sft_weight < 1:
            return {}
        reason = "method.sft_weight=1 trains on the replies alone, with no reasons nor prompt-generation term"
        keys = ("pg_template", "reason_template", "reason_temperature", "reason_top_p", "max_reason_tokens")
        return {f"method.{key}": reason for key in keys}


def prompt_turns(text: str) -> list[dict]:
    """The released code's conversation from a prompt followed by the input: ``<USER>:`` and ``<AGENT>:``
    markers (the AgentBench prompts' few-shot dialogues) split it into alternating user and assistant turns;
    a prompt without markers is one user turn."""
    turns = [turn.strip() for turn in re.split(r"<USER>:|<AGENT>:", text.strip())]
    return [{"role": "assistant" if i % 2 else "user", "content": turn} for i, turn in enumerate(filter(None, turns))]


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The conversation in the model's chat format up to the assistant's turn (a plain User/Assistant layout
    without a template). Llama and Gemma templates write the BOS token and their tokenizers add one as well:
    the text then leaves it to the tokenizer, so the token ids start with exactly one, as the released training
    code's do."""
    if not tokenizer.chat_template:
        system = "".join(f"{m['content']}\n\n" for m in messages if m["role"] == "system")
        turns = "".join(
            f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n"
            for m in messages
            if m["role"] != "system"
        )
        return f"{system}{turns}Assistant:"
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]:
        return text[len(bos) :]
    return text


def user_turn(tokenizer, text: str) -> str:
    """One user turn without a system message: the prompt-generation turn (as released) and the reasons' turn."""
    return render_chat(tokenizer, [{"role": "user", "content": text}])


def clean_input(text: str) -> str:
    """A sampled line without list numbering, bullets or quotes."""
    return re.sub(r"^\s*(\d+[.)]|[-*•])\s*", "", text).strip().strip('"').strip()


def genpi_loss(
    sft_logits: torch.Tensor,
    sft_batch: dict,
    pg_logits: Optional[torch.Tensor],
    pg_batch: Optional[dict],
    sft_weight: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(1 - sft_weight) * L_PG + sft_weight * L_SFT, each the mean cross-entropy over its own target tokens.

    ``pg_logits`` may be None when sft_weight is 1 (the PG term is then not computed)."""
    device = sft_logits.device
    sft = answer_cross_entropy(sft_logits, sft_batch["answer_ids"].to(device), sft_batch["answer_mask"].to(device))
    if pg_logits is None:
        return sft, {"loss_sft": sft.item()}
    pg = answer_cross_entropy(pg_logits, pg_batch["answer_ids"].to(device), pg_batch["answer_mask"].to(device))
    return (1 - sft_weight) * pg + sft_weight * sft, {"loss_sft": sft.item(), "loss_pg": pg.item()}


def decoded_samples(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    stop: Optional[str] = None,
    generator: Optional[torch.Generator] = None,
    prefix: Optional[SharedPrefix] = None,
    batch_size: int = 16,
    top_p: Optional[float] = None,
) -> list[tuple[str, bool]]:
    """Each prompt's continuation as text, and whether it ended by itself (end-of-sequence or ``stop``)."""
    texts, ends = [], end_tokens(model, tokenizer)
    for tokens in generate(
        model, tokenizer, prompts, max_new_tokens, temperature, top_k, stop, generator, prefix, batch_size, top_p=top_p
    ):
        kept = strip_stop(tokenizer, tokens, stop, ends)
        texts.append((tokenizer.decode(kept, skip_special_tokens=True).strip(), len(kept) < len(tokens)))
    return texts


class PromptInternalization(Method):
    """A prompt internalised by a LoRA student from generated inputs (stage 1) and the teacher's and base
    model's replies (stage 2, also the evaluation's references); subclasses bring the training objective."""

    trained_weights = "adapter"
    # Measured on the held-out pseudo inputs: the configured held-out inputs ("eval") are the reported set.
    objective = "pseudo_heldout/task_success"

    def __init__(
        self,
        name: str,
        task_name: str,
        prompt: str,
        rule: str,
        prompt_placement: str,
        example_inputs: list[str],
        heldout_inputs: list[str],
        num_pseudo_inputs: int,
        num_heldout_pseudo_inputs: int,
        generator_template: str,
        generator_temperature: float,
        generator_top_k: Optional[int],
        generator_top_p: Optional[float],
        inputs_per_round: int,
        max_rounds: int,
        max_input_tokens: int,
        max_reply_tokens: int,
        sample_batch_size: int,
        stage_dir: str,
        seed: int,
    ):
        super().__init__(name)
        self.task_name, self.prompt, self.rule = task_name, prompt, re.compile(rule)
        self.prompt_placement, self.generator_top_p = prompt_placement, generator_top_p
        self.example_inputs, self.heldout_inputs = list(example_inputs), list(heldout_inputs)
        self.num_pseudo_inputs, self.num_heldout_pseudo_inputs = num_pseudo_inputs, num_heldout_pseudo_inputs
        self.generator_template, self.generator_temperature = generator_template, generator_temperature
        self.generator_top_k, self.inputs_per_round, self.max_rounds = generator_top_k, inputs_per_round, max_rounds
        self.max_input_tokens, self.max_reply_tokens = max_input_tokens, max_reply_tokens
        self.sample_batch_size = sample_batch_size
        self.stage_dir, self.seed = stage_dir, seed
        self.pseudo_inputs: list[str] = []  # training inputs, then the held-out ones
        self._replies: Optional[RowStore] = None

    # ------------------------------------------------------------ task and data
    def build_task(self, dataset, seed):
        heldout = [Example(f"eval-{i}", {"input": text}, None) for i, text in enumerate(self.heldout_inputs)]
        return Task(
            name=self.task_name,
            template="{input}",
            verbalizers=[],
            student_instruction="",
            context=self.prompt,
            separator="\n\n",
            demos=[],
            train_queries=[],
            train_query_labels=[],
            eval_sets={"eval": heldout} if heldout else {},
        )

    def train_examples(self, task):
        # Slots, filled with generated data by prepare(): the shared loop batches and shuffles them.
        return [Example(f"pseudo-{i}", {}, None) for i in range(self.num_pseudo_inputs)]

    @property
    def heldout_pseudo_inputs(self) -> list[str]:
        return self.pseudo_inputs[self.num_pseudo_inputs :]

    def _settings(self, handle) -> dict:
        return {"model": handle.identity, "prompt": self.prompt}

    def teacher_prompt(self, tokenizer, text: str) -> str:
        """The input with the prompt: by default as the released code places it, the system message kept and the
        prompt opening the user turn(s); with prompt_placement=system_message, the prompt as the system message."""
        if self.prompt_placement == "system_message":
            return render_chat(
                tokenizer, [{"role": "system", "content": self.prompt}, {"role": "user", "content": text}]
            )
        return render_chat(
            tokenizer,
            [{"role": "system", "content": RELEASED_SYSTEM_MESSAGE}, *prompt_turns(f"{self.prompt}\n\n{text}")],
        )

    def student_prompt(self, tokenizer, text: str) -> str:
        """The input without the prompt: the base model's replies, the student's training input and its evaluation."""
        if self.prompt_placement == "system_message":
            return user_turn(tokenizer, text)
        return render_chat(
            tokenizer, [{"role": "system", "content": RELEASED_SYSTEM_MESSAGE}, {"role": "user", "content": text}]
        )

    def _generator(self, model, key: str) -> torch.Generator:
        """A random stream per (seed, key): a resumed stage samples what an uninterrupted one would."""
        generator = torch.Generator(next(model.parameters()).device)
        return generator.manual_seed(int(digest([self.seed, key]), 16) % 2**63)

    def _pseudo_inputs(self, model, tokenizer, settings: dict) -> list[str]:
        """Stage 1: sample rounds of inputs until enough distinct new ones exist."""
        examples = [*self.example_inputs, ""]
        listing = "\n".join(f"{i + 1}. {text}" for i, text in enumerate(examples)).rstrip()
        prompt = self.generator_template.format(prompt=self.prompt, examples=listing)
        store = RowStore(
            self.stage_dir,
            "inputs",
            {
                **settings,
                "template": prompt,
                "seed": self.seed,
                "temperature": self.generator_temperature,
                "top_k": self.generator_top_k,
                "top_p": self.generator_top_p,
                "per_round": self.inputs_per_round,
                "max_tokens": self.max_input_tokens,
                "batch_size": self.sample_batch_size,  # a batch's rows share one random stream
            },
        )
        prefix = None

        def sample_round(keys: list[str]) -> list[dict]:
            nonlocal prefix
            prefix = prefix or SharedPrefix(model, tokenizer, [prompt])  # run once for every round
            texts = decoded_samples(
                model,
                tokenizer,
                [prompt] * self.inputs_per_round,
                self.max_input_tokens,
                self.generator_temperature,
                self.generator_top_k,
                "\n",
                self._generator(model, f"round-{keys[0]}"),
                prefix,
                self.sample_batch_size,
                self.generator_top_p,
            )
            return [{"key": keys[0], "samples": [text for text, _ in texts]}]

        wanted = self.num_pseudo_inputs + self.num_heldout_pseudo_inputs
        seen = {" ".join(t.lower().split()) for t in [*self.example_inputs, *self.heldout_inputs]}
        found: list[str] = []
        bar = progress_bar(total=wanted, desc="genpi pseudo inputs", leave=False)
        for round_index in range(self.max_rounds):
            row = store.fill([str(round_index)], sample_round, 1, "genpi pseudo inputs")[0]
            for text in map(clean_input, row["samples"]):
                norm = " ".join(text.lower().split())
                if len(text.split()) >= 3 and norm not in seen and len(found) < wanted:
                    seen.add(norm)
                    found.append(text)
                    bar.update(1)
            if len(found) == wanted:
                break
        bar.close()
        if len(found) < wanted:
            raise DataError(
                f"method={self.name}: {self.max_rounds} rounds of {self.inputs_per_round} samples gave "
                f"{len(found)} distinct pseudo inputs of the {wanted} wanted (num_pseudo_inputs + "
                f"num_heldout_pseudo_inputs). Raise method.max_rounds or method.generator_temperature, "
                f"or ask for fewer inputs."
            )
        return found

    def replies(self, handle, tokenizer, inputs: list[str], batch_size: int) -> list[dict]:
        """Stage 2: the teacher's (with the prompt) and the base model's greedy replies, cached per input."""
        if self._replies is None:
            self._replies = RowStore(
                self.stage_dir,
                "replies",
                {**self._settings(handle), "placement": self.prompt_placement, "max_tokens": self.max_reply_tokens},
            )

        def answer(keys: list[str]) -> list[dict]:
            with handle.teacher() as model:
                teacher = decoded_samples(
                    model,
                    tokenizer,
                    [self.teacher_prompt(tokenizer, k) for k in keys],
                    self.max_reply_tokens,
                    batch_size=batch_size,
                )
                base = decoded_samples(
                    model,
                    tokenizer,
                    [self.student_prompt(tokenizer, k) for k in keys],
                    self.max_reply_tokens,
                    batch_size=batch_size,
                )
            return [
                {"key": k, "teacher": t, "teacher_complete": tc, "base": b}
                for k, (t, tc), (b, _) in zip(keys, teacher, base)
            ]

        return self._replies.fill(inputs, answer, batch_size, "genpi replies")

    def ensure_inputs(self, handle, tokenizer) -> None:
        if not self.pseudo_inputs:
            with handle.teacher() as model:
                self.pseudo_inputs = self._pseudo_inputs(model, tokenizer, self._settings(handle))

    @torch.no_grad()
    def training_replies(self, handle, tokenizer, task, batch_size: int) -> list[dict]:
        """Stages 1 and 2, before any weight changes: every input's replies (evaluation reads the references from
        the stage); returns those of the training inputs, each with its ``input``."""
        self.ensure_inputs(handle, tokenizer)
        eval_inputs = [e.fields["input"] for examples in task.eval_sets.values() for e in examples]
        replies = self.replies(handle, tokenizer, [*self.pseudo_inputs, *eval_inputs], batch_size)
        return [{**reply, "input": text} for text, reply in zip(self.pseudo_inputs[: self.num_pseudo_inputs], replies)]

    # ------------------------------------------------------------ evaluation
    def evaluator(self, handle, tokenizer, task, batch_size):
        return PromptInternalizationEvaluator(self, handle, tokenizer, task, batch_size)


class GenPI(PromptInternalization):
    """Stage 3 (reasons) and GenPI's loss on top of the shared stages."""

    def __init__(
        self,
        reason_template: str,
        reason_temperature: float,
        reason_top_p: Optional[float],
        max_reason_tokens: int,
        pg_template: str,
        sft_weight: float,
        kl_weight: float,
        **shared,
    ):
        super().__init__(**shared)
        self.reason_template, self.reason_temperature = reason_template, reason_temperature
        self.reason_top_p, self.max_reason_tokens, self.pg_template = reason_top_p, max_reason_tokens, pg_template
        self.sft_weight, self.kl_weight = sft_weight, kl_weight
        self.teacher_during_training = kl_weight > 0  # the KL term's targets come at every step
        self._records: dict[str, dict] = {}  # training slot uid -> input, replies, reason

    def _reasons(self, handle, tokenizer, replies: list[dict]) -> list[str]:
        """Stage 3: why the prompt changes the reply, sampled (seeded per batch)."""
        by_input = {r["key"]: r for r in replies}
        store = RowStore(
            self.stage_dir,
            "reasons",
            {
                **self._settings(handle),
                "replies": self._replies.path.name,
                # A batch's rows share one random stream: the inputs in order and the batch size say which rows did,
                # so a run with more (or other) training inputs never reads rows drawn in other batches.
                "inputs": digest(list(by_input)),
                "template": self.reason_template,
                "seed": self.seed,
                "temperature": self.reason_temperature,
                "top_p": self.reason_top_p,
                "max_tokens": self.max_reason_tokens,
                "batch_size": self.sample_batch_size,
            },
        )

        def explain(keys: list[str]) -> list[dict]:
            prompts = [
                user_turn(
                    tokenizer,
                    self.reason_template.format(
                        input=k, base=by_input[k]["base"], teacher=by_input[k]["teacher"], prompt=self.prompt
                    ),
                )
                for k in keys
            ]
            with handle.teacher() as model:
                reasons = decoded_samples(
                    model,
                    tokenizer,
                    prompts,
                    self.max_reason_tokens,
                    self.reason_temperature,
                    generator=self._generator(model, f"reasons-{keys[0]}"),
                    batch_size=self.sample_batch_size,
                    top_p=self.reason_top_p,
                )
            return [{"key": k, "reason": text} for k, (text, _) in zip(keys, reasons)]

        return [row["reason"] for row in store.fill(list(by_input), explain, self.sample_batch_size, "genpi reasons")]

    @torch.no_grad()
    def prepare(self, handle, tokenizer, task, examples, batch_size):
        replies = self.training_replies(handle, tokenizer, task, batch_size)
        # only the prompt-generation term reads the reasons: sft_weight=1 writes none
        reasons = self._reasons(handle, tokenizer, replies) if self.sft_weight < 1 else [None] * len(replies)
        for example, reply, reason in zip(examples, replies, reasons):
            self._records[example.uid] = {**reply, "reason": reason}
        log.info(
            "genpi: %d training and %d held-out pseudo inputs with replies%s, cached in %s",
            len(replies),
            len(self.heldout_pseudo_inputs),
            " and reasons" if self.sft_weight < 1 else "",
            self.stage_dir,
        )

    # ------------------------------------------------------------ training
    def _target(self, tokenizer, text: str, complete: bool) -> list[int]:
        # Replies are kept stripped; without a chat template one follows "Assistant:" after a space, as the
        # model writes it (and as a user's text follows "User:"), not glued to the colon.
        lead = " " if text and not tokenizer.chat_template else ""
        ids = tokenizer(lead + text, add_special_tokens=False).input_ids
        # The end of the turn is learnt only where the teacher ended it (not cut off by max tokens).
        return ids + [tokenizer.eos_token_id] if complete or not ids else ids

    def collate(self, tokenizer, task, examples):
        records = [self._records[e.uid] for e in examples]
        replies = [self._target(tokenizer, r["teacher"], r["teacher_complete"]) for r in records]
        batch = {"sft": encode(tokenizer, [self.student_prompt(tokenizer, r["input"]) for r in records], replies)}
        if self.sft_weight < 1:
            turns = [
                user_turn(tokenizer, self.pg_template.format(input=r["input"], base=r["base"], teacher=r["teacher"]))
                for r in records
            ]
            targets = [
                self._target(tokenizer, PG_TARGET.format(prompt=self.prompt, reason=r["reason"]), True) for r in records
            ]
            batch["pg"] = encode(tokenizer, turns, targets)
        if self.kl_weight > 0:
            batch["teacher_sft"] = encode(
                tokenizer, [self.teacher_prompt(tokenizer, r["input"]) for r in records], replies
            )
        return batch

    def loss(self, handle, batch):
        sft_logits = answer_logits(handle.student, batch["sft"])
        pg_logits = answer_logits(handle.student, batch["pg"]) if "pg" in batch else None
        loss, parts = genpi_loss(sft_logits, batch["sft"], pg_logits, batch.get("pg"), self.sft_weight)
        if self.kl_weight > 0:
            with handle.teacher() as teacher:
                teacher_logits = answer_logits(teacher, batch["teacher_sft"])
            kl = distillation_loss(
                sft_logits, teacher_distribution(teacher_logits)[0], batch["sft"]["answer_mask"].to(sft_logits.device)
            )
            loss = loss + self.kl_weight * kl
            parts["loss_kl"] = kl.item()
        return loss, parts


class PromptInternalizationEvaluator(MethodEvaluator):
    """Greedy replies of the trained model without the prompt, against the teacher with it and the base
    model without it (both from the replies stage, written before training), on the config's held-out
    inputs (set "eval", the reported one) and the held-out pseudo inputs (the objective's): task success
    first (:func:`ctxdistill.evaluation.generation_metrics`)."""

    metric_set = MetricSet(
        "prompt_internalization",
        (
            EXAMPLES,
            Metric("task_success", "task success", headline=True, outcome=("succeeds",)),
            Metric("teacher_task_success", "teacher task success"),
            Metric("base_task_success", "base task success"),
            Metric("rule_compliance", "rule compliance"),
            Metric("teacher_rule_compliance", "teacher rule compliance"),
            Metric("degenerate", "degenerate", higher_is_better=False),
            Metric("rougeL_to_teacher", "Rouge-L to teacher", kind="value", lowest=0, highest=1),
            Metric("base_rougeL_to_teacher", "base Rouge-L to teacher", kind="value", lowest=0, highest=1),
            Metric("prompt_tokens_saved", "prompt tokens saved", kind="value"),
        ),
        teacher="teacher_task_success",
        set_titles={"pseudo_heldout": "held-out pseudo inputs (the objective's set)"},
    )

    def prepare(self) -> None:
        """Nothing to do before training: the references come from the adapter-disabled base model."""

    def evaluate(self, names: Optional[list[str]] = None) -> tuple[dict[str, float], dict[str, list[dict]]]:
        method, tokenizer = self.method, self.tokenizer
        method.ensure_inputs(self.handle, tokenizer)
        sets = {
            **{n: [e.fields["input"] for e in s] for n, s in self.task.eval_sets.items()},
            "pseudo_heldout": method.heldout_pseudo_inputs,
        }
        metrics, rows = {}, {}
        for name in names or list(sets):
            inputs = sets.get(name) or []
            if not inputs:
                continue
            references = method.replies(self.handle, tokenizer, inputs, self.batch_size)
            student_prompts = [method.student_prompt(tokenizer, text) for text in inputs]
            replies = [
                text
                for text, _ in decoded_samples(
                    self.handle.base, tokenizer, student_prompts, method.max_reply_tokens, batch_size=self.batch_size
                )
            ]
            teacher = [r["teacher"] for r in references]
            base = [r["base"] for r in references]
            result = generation_metrics(inputs, replies, teacher, base, method.rule)
            teacher_tokens = [
                len(ids) for ids in tokenizer([method.teacher_prompt(tokenizer, t) for t in inputs]).input_ids
            ]
            student_tokens = [len(ids) for ids in tokenizer(student_prompts).input_ids]
            result["examples"] = len(inputs)
            result["teacher_input_tokens"] = sum(teacher_tokens) / len(inputs)
            result["prompt_tokens_saved"] = sum(t - s for t, s in zip(teacher_tokens, student_tokens)) / len(inputs)
            metrics.update({f"{name}/{key}": value for key, value in result.items()})
            rows[name] = [
                {
                    "uid": text,  # the inputs are distinct within a set: the paired test's key
                    "input": text,
                    "reply": r,
                    "teacher_reply": t,
                    "base_reply": b,
                    "complies": bool(method.rule.search(r)),
                    "succeeds": task_success(r, text, b, method.rule),
                }
                for text, r, t, b in zip(inputs, replies, teacher, base)
            ]
        return metrics, rows
