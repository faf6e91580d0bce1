"""Verbalizer scoring and the metrics every method reports.

A prediction is the class whose answer word (with its leading space) has the highest
summed log-probability after the prompt, the lm-evaluation-harness multiple-choice
convention. When every answer word is a single token, one forward pass scores all
classes. Besides accuracy (and F1 for binary tasks) every method reports how much of
the context it has internalised: agreement with the teacher's predictions and
KL(teacher with context || model) at the answer position, on held-out inputs (over the answer words
and one category for every other continuation when the teacher's tokenizer is not the model's).
Tasks with free-text answers (``task.generation``) are scored by exact match of greedy
generations instead (:class:`GenerationEvaluator`).

Under several processes each scores every ``count``-th example of a set and the label scores
are gathered, so every process ends with the whole set's scores in input order.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from ctxdistill.config import ConfigError
from ctxdistill.data import Example, Task
from ctxdistill.data.mixture import TaskMixture
from ctxdistill.encoding import SharedPrefix, answer_logits, answer_token_logprobs, encode
from ctxdistill.generation import generate
from ctxdistill.losses import forward_kl, with_rest_bucket
from ctxdistill.models import ModelHandle, runs_in_evaluation_mode
from ctxdistill.progress import progress_bar
from ctxdistill.results.metrics import EXAMPLES, IN_DOMAIN, Metric, MetricSet, float32_rounded
from ctxdistill.results.stats import bootstrap_f1
from ctxdistill.serving import ServingCost, measure_task


def check_prompt_lengths(task: Task | TaskMixture, tokenizer, window: int, answer_tokens: int) -> None:
    parts = task.parts if isinstance(task, TaskMixture) else [task]
    prompts = [
        part.teacher_prompt(e)
        for part in parts
        for e in [*part.train_queries, *(e for s in part.eval_sets.values() for e in s)]
    ]
    longest = max(len(ids) for ids in tokenizer(prompts).input_ids)
    if longest + answer_tokens > window:
        raise ConfigError(
            f"dataset.context: the teacher prompt takes up to {longest} tokens (+{answer_tokens} for "
            f"the answer), more than the model's window of {window}. Lower "
            f"dataset.context.num_demos or use a model with a longer context."
        )


def check_generation_budget(task: Task, tokenizer) -> None:
    """A generative task's worked solutions (the demonstrations' and the evaluated examples' gold ones) must fit
    in ``max_new_tokens``: a cut one has no readable answer, so even a perfect teacher would score it wrong."""
    spec = task.generation
    examples = [*task.demos, *(e for s in task.eval_sets.values() for e in s)]
    lengths = [
        len(ids) for ids in tokenizer([spec.worked_text(e) for e in examples], add_special_tokens=False).input_ids
    ]
    longest = max(lengths, default=0)
    if longest > spec.max_new_tokens:
        over = sum(length > spec.max_new_tokens for length in lengths)
        example = examples[lengths.index(longest)].uid
        raise ConfigError(
            f"dataset.generation.max_new_tokens={spec.max_new_tokens}: {over} of the {len(examples)} gold worked "
            f"solutions take more tokens in this tokenizer (up to {longest}, e.g. {example}), so their answers "
            f"would be cut off and scored wrong. Set dataset.generation.max_new_tokens={longest} or more, or make "
            "the problems shorter."
        )


def check_answer_tokenization(task: Task | TaskMixture, tokenizer, examples_per_set: int = 8) -> None:
    """Answers are tokenised on their own and scored (or trained) after the prompt's last token, so
    tokenising prompt + answer must give the prompt's tokens followed by the answer's; a template ending in
    a space ("Label: " + "yes") would otherwise score a token sequence the model never writes. Checked on
    the first examples of every set, with and without the context (the template's end is what matters)."""
    for part in task.parts if isinstance(task, TaskMixture) else [task]:
        sets = [part.demos, part.train_queries, *part.eval_sets.values()]
        examples = [e for examples in sets for e in examples[:examples_per_set]]
        for example in examples:
            answers = part.verbalizers if part.verbalizers else [part.answer_text(example)] if example.target else []
            for prompt in {part.prompt(example, True), part.prompt(example, False)}:
                prompt_ids = tokenizer(prompt).input_ids
                for answer in answers:
                    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
                    joined = tokenizer(prompt + answer).input_ids
                    if joined != prompt_ids + answer_ids:
                        pieces = tokenizer.convert_ids_to_tokens(joined[len(prompt_ids) - 1 :])
                        scored = tokenizer.convert_ids_to_tokens(prompt_ids[-1:] + answer_ids)
                        raise ConfigError(
                            f"dataset.template: the prompt ({part.template!r}) and the answer {answer!r} tokenise "
                            f"together as {pieces} at the seam, while the answer is scored as {scored} after the "
                            "prompt: a token sequence the model would never write. End the template without "
                            'trailing whitespace and start each answer word with its space (" yes"), so the '
                            "answer begins a new token."
                        )


def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)
    except (OSError, TypeError):  # no C library to load by name (Windows)
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Hands heap memory freed by the last batch back to the system (glibc's ``malloc_trim``; nothing where
    there is none). An evaluation batch frees vocabulary-sized rows that glibc does not hand out again, so
    without this a 10k-example evaluation keeps about 2 GB it no longer uses (the memory of every teacher
    distribution; ``python benchmarks/speed.py --only eval_memory``)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def check_room_for_distributions(rows: int, width: int) -> None:
    """Refuses teacher distributions (``rows`` x ``width`` float32, see :class:`SpilledRows`) that the system's
    temporary directory has no room for."""
    directory = tempfile.gettempdir()
    needed, free = 4 * rows * width, shutil.disk_usage(directory).free
    if needed > free:
        raise ConfigError(
            f"the KL to the teacher keeps the teacher's next-token distributions of {rows} eval examples x {width} "
            f"tokens in a temporary file ({needed / 2**20:,.0f} MiB) in {directory}, which has {free / 2**20:,.0f} MiB "
            "free: point TMPDIR at a disk with room, or evaluate fewer examples (dataset.num_eval)"
        )


class SpilledRows:
    """Vocabulary-sized float32 rows (the teacher's next-token log-probabilities) kept in a temporary file and
    read back a batch at a time, so the KL to the teacher is exact while memory holds one batch of them, not
    N x V floats (the file takes 4 N V bytes of disk, in the system's temporary directory)."""

    def __init__(self, width: int):
        self.width, self.file, self.slots = width, tempfile.TemporaryFile(), {}
        self.buffer = torch.empty(0, width)

    def write(self, indices: list[int], rows: torch.Tensor) -> None:
        """Stores ``rows`` [len(indices), width] as the rows of ``indices``."""
        data = rows.detach().float().cpu().contiguous().numpy()
        self.file.seek(0, os.SEEK_END)
        first = self.file.tell() // (4 * self.width)
        self.file.write(data.data)
        self.slots.update({index: first + i for i, index in enumerate(indices)})

    def read(self, indices: list[int]) -> torch.Tensor:
        """The rows of ``indices`` [len(indices), width], valid until the next read: one buffer serves every read,
        since a fresh batch-sized allocation per read fragments the heap until memory grows with the batches."""
        if self.buffer.shape[0] < len(indices):
            self.buffer = torch.empty(len(indices), self.width)
        rows = self.buffer[: len(indices)]
        for row, index in zip(rows.numpy(), indices):
            self.file.seek(self.slots[index] * 4 * self.width)
            self.file.readinto(row.data)
        return rows


class NonFiniteScores(RuntimeError):
    """A model scored an answer as NaN: evaluation stops rather than report class 0 as its predictions."""


@dataclass
class Scores:
    label_logprobs: torch.Tensor  # [N, C]
    next_token_logprobs: Optional[SpilledRows]  # [N, V] at the answer position, kept for the teacher only
    kl_to_teacher: Optional[torch.Tensor]  # [N]
    top_token: torch.Tensor  # [N] the most likely next token over the whole vocabulary (greedy decoding)
    voted: Optional[torch.Tensor] = None  # [N] majority answers, when each row stands for several draws

    @property
    def predictions(self) -> torch.Tensor:
        return self.voted if self.voted is not None else self.label_logprobs.argmax(-1)


def majority_vote(scores: Scores, votes: int) -> Scores:
    """One row per query from its ``votes`` consecutive draws: the answer most draws give (a tie goes to
    the class with the higher mean probability); log-probabilities and KL are averaged, the top token is
    the first draw's."""
    n, classes = scores.label_logprobs.shape[0] // votes, scores.label_logprobs.shape[1]
    counts = torch.nn.functional.one_hot(scores.predictions, classes).view(n, votes, classes).sum(1)
    probabilities = scores.label_logprobs.view(n, votes, classes).softmax(-1).mean(1)
    # Counts differ by whole numbers; half a probability can only break a tie.
    voted = (counts + 0.5 * probabilities).argmax(-1)
    return Scores(
        scores.label_logprobs.view(n, votes, classes).mean(1),
        None,
        None if scores.kl_to_teacher is None else scores.kl_to_teacher.view(n, votes).mean(1),
        scores.top_token.view(n, votes)[:, 0],
        voted,
    )


@torch.no_grad()
@runs_in_evaluation_mode
def score(
    model,
    tokenizer,
    task: Task,
    examples: list[Example],
    with_context: bool,
    batch_size: int,
    teacher: Optional[Scores] = None,
    keep_distribution: bool = False,
    desc: str = "eval",
    share_prefix: bool = True,
) -> Scores:
    """Score every class for each example; with ``teacher``, also the per-example KL to it.

    ``share_prefix=False`` runs every prompt whole instead of the shared context once (for comparisons), as does a
    model evaluated with dropout (``dropout_seed``, see :func:`~ctxdistill.models.evaluation_mode`): a prefix run
    once, in eval mode, would spare it the dropout of each prompt's own pass."""
    if keep_distribution:  # refused now, not on a full disk after training (the teacher is scored before it)
        check_room_for_distributions(len(examples), len(tokenizer))  # (a padded head is a few rows wider)
    verbalizer_ids = [tokenizer(v, add_special_tokens=False).input_ids for v in task.verbalizers]
    single_token = all(len(ids) == 1 for ids in verbalizer_ids)
    all_prompts = [task.prompt(e, with_context) for e in examples]
    # the context, run once for the whole set
    prefix = SharedPrefix(model, tokenizer, all_prompts, share_prefix and not model.training)
    # Batches of similar length waste little compute on padding; results go back in input order.
    order = sorted(range(len(all_prompts)), key=lambda i: len(all_prompts[i]))
    label_lp, kls, top = [], [], []
    distributions = None
    for start in progress_bar(range(0, len(examples), batch_size), desc=desc, leave=False):
        rows = order[start : start + batch_size]
        prompts = [all_prompts[i] for i in rows]
        batch = encode(tokenizer, prompts, prefix_length=prefix.length)
        next_token = answer_logits(model, batch, prefix)[:, -1].log_softmax(-1)
        top.append(next_token.argmax(-1).cpu())
        if single_token:
            label_lp.append(next_token[:, [ids[0] for ids in verbalizer_ids]].cpu())
        else:
            per_class = []
            for ids in verbalizer_ids:
                batch = encode(tokenizer, prompts, [ids] * len(prompts), prefix_length=prefix.length)
                per_class.append(answer_token_logprobs(answer_logits(model, batch, prefix), batch).cpu())
            label_lp.append(torch.stack(per_class, -1))
        if teacher is not None:
            reference = teacher.next_token_logprobs.read(rows).to(next_token.device)
            kls.append(forward_kl(*over_shared_vocabulary(next_token, reference)).cpu())
        if keep_distribution:
            distributions = distributions or SpilledRows(next_token.shape[-1])
            distributions.write(rows, next_token)
        release_freed_memory()
    restore = torch.argsort(torch.tensor(order))
    label_logprobs = torch.cat(label_lp)[restore]
    if label_logprobs.isnan().any():  # an argmax over NaN answers class 0 and the accuracy would look real
        bad = int(label_logprobs.isnan().any(-1).sum())
        raise NonFiniteScores(
            f"the model's answer scores are NaN for {bad} of {len(examples)} examples ({desc}), so no accuracy "
            "can be computed; a half-precision overflow is the usual cause: rerun with model.dtype=float32, or "
            "model.dtype=bfloat16 on a GPU"
        )
    return Scores(
        label_logprobs,
        distributions,
        torch.cat(kls)[restore] if teacher is not None else None,
        torch.cat(top)[restore],
    )


@dataclass
class Ranks:
    """This process's share of every eval set, and how the shares come back together."""

    index: int = 0
    count: int = 1
    # concatenates equal-shaped tensors from every process in rank order (accelerate's gather)
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    @classmethod
    def of_launch(cls) -> "Ranks":
        """This process's place in an ``accelerate launch`` / ``torchrun`` launch (alone: 0 of 1)."""
        from accelerate import PartialState
        from accelerate.utils import gather

        state = PartialState()
        return cls(state.process_index, state.num_processes, lambda t: gather(t.to(state.device)))

    def share(self, n: int) -> list[int]:
        """Every ``count``-th index from ``index``, padded with repeats to one size for all processes, so
        sharded models (FSDP, ZeRO-3) run the same number of forward passes everywhere."""
        mine = list(range(self.index, n, self.count))
        return mine + [n - 1] * (math.ceil(n / self.count) - len(mine))

    def combine(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """The shares' rows [n_local, ...] from every process, back in input order [n, ...]."""
        if self.count == 1:
            return local
        every = self.gather(local).cpu().reshape(self.count, -1, *local.shape[1:])  # [count, n_local, ...]
        return every.transpose(0, 1).reshape(-1, *local.shape[1:])[:n]


def score_shared(
    model,
    tokenizer,
    task: Task,
    examples: list[Example],
    with_context: bool,
    batch_size: int,
    ranks: Ranks,
    teacher: Optional[Scores] = None,
    keep_distribution: bool = False,
    desc: str = "eval",
    dropout_seed: Optional[int] = None,
) -> tuple[Scores, Scores]:
    """:func:`score` over this process's share: (its own scores, the whole set's gathered scores).

    ``teacher`` is a previous call's own share; the vocabulary-sized distributions stay
    with the process that computed them and are never gathered."""
    share = ranks.share(len(examples))
    own = score(
        model,
        tokenizer,
        task,
        [examples[i] for i in share],
        with_context,
        batch_size,
        teacher,
        keep_distribution,
        desc,
        dropout_seed=dropout_seed,
    )
    gathered = Scores(
        ranks.combine(own.label_logprobs, len(examples)),
        None,
        ranks.combine(own.kl_to_teacher, len(examples)) if teacher is not None else None,
        ranks.combine(own.top_token, len(examples)),
    )
    return own, gathered


def classification_metrics(
    predictions: torch.Tensor, labels: torch.Tensor, num_classes: int, f1_positive: Optional[int] = None
) -> dict[str, float]:
    """Accuracy (overall and within each gold class); the majority-class rate, beside which a chance-level score
    shows as such; for a task that declares it (``f1_positive``), F1 of that class with its bootstrap interval."""
    per_class = {
        f"accuracy_label{c}": (predictions[labels == c] == c).float().mean().item()
        for c in range(num_classes)
        if (labels == c).any()
    }
    result = {
        "accuracy": (predictions == labels).float().mean().item(),
        "majority_rate": labels.bincount(minlength=num_classes).max().item() / len(labels),
        **per_class,
    }
    if f1_positive is not None:
        result.update(zip((F1.name, *F1.companions), bootstrap_f1(predictions.tolist(), labels.tolist(), f1_positive)))
    return result


# Words that say nothing about what a request is about: sharing only these is no answer to it.
FUNCTION_WORDS = frozenset(
    """
    a about above after again all also am an and any are as at be because been before being below between both
    but by can could did do does doing done down during each few for from further had has have having he her here
    hers him his how i if in into is it its just me more most my no nor not now of off on once only or other our
    out over own same she should so some such than that the their them then there these they this those through
    to too under until up very was we were what when where which while who whom why will with would you your
    yours give good best better explain describe know let like make many much need please say tell think want way
    sorry sure unsure cannot don doesn didn isn aren wasn weren won wouldn couldn shouldn haven hasn t s m re ve ll d
""".split()
)


def _words(text: str) -> list[str]:
    from rouge_score.tokenize import tokenize

    return tokenize(text, None)  # lowercase letters and digits, as Rouge-L reads them


def is_degenerate(reply: str) -> bool:
    """A loop ("Ahoy! Ahoy! Ahoy!"), greedy decoding's typical failure, or nothing at all: at most half of the
    reply's words are distinct."""
    words = _words(reply)
    return 2 * len(set(words)) <= len(words)


def _content_words(text: str) -> set[str]:
    """Porter-stemmed words without the function words, so "legs" meets "leg"."""
    from nltk.stem.porter import PorterStemmer

    stem = PorterStemmer().stem
    return {stem(w) for w in _words(text) if w not in FUNCTION_WORDS}


def is_on_topic(reply: str, request: str, reference: str) -> bool:
    """Whether the reply speaks of what the request asks about or of what a reference answer says ("Paris." to
    "What is the capital of France?"): a content word (:func:`_content_words`) that the reply shares with either."""
    return bool(_content_words(reply) & (_content_words(request) | _content_words(reference)))


def adds_to_request(reply: str, request: str) -> bool:
    """Whether the reply says something the request does not: a content word the request lacks. An echo
    ("What is photosynthesis?"), the topic alone ("Moon.") and a bare refusal ("I don't know about the moon.")
    restate the request, and so answer nothing."""
    return bool(_content_words(reply) - _content_words(request))


def task_success(reply: str, request: str, reference: str, rule: re.Pattern) -> bool:
    """A reply that follows the prompt's rule and answers the request: the rule matches, the reply is on topic
    (:func:`is_on_topic`), adds to the request (:func:`adds_to_request`) and is no loop. Rule compliance alone
    rewards a loop, or an echo of the question, that happens to match the rule."""
    return (
        bool(rule.search(reply))
        and is_on_topic(reply, request, reference)
        and adds_to_request(reply, request)
        and not is_degenerate(reply)
    )


def generation_metrics(
    requests: list[str], replies: list[str], teacher_replies: list[str], base_replies: list[str], rule: re.Pattern
) -> dict[str, float]:
    """Free-text replies to ``requests``, for the model, the teacher and the base model: the share of
    replies with task success (:func:`task_success`; the base model's reply, written without the prompt, is
    the reference answer, so for the base model itself it is the rule, a word beyond the request and no loop),
    that follow the rule, and that are degenerate (:func:`is_degenerate`); Rouge-L F1 with the teacher's reply as
    reference."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"])

    def rouge(candidates: list[str]) -> float:
        return sum(scorer.score(t, c)["rougeL"].fmeasure for t, c in zip(teacher_replies, candidates)) / len(candidates)

    metrics = {}
    for prefix, texts in (("", replies), ("teacher_", teacher_replies), ("base_", base_replies)):
        metrics[f"{prefix}task_success"] = sum(
            task_success(text, request, reference, rule)
            for text, request, reference in zip(texts, requests, base_replies)
        ) / len(texts)
        metrics[f"{prefix}rule_compliance"] = sum(bool(rule.search(t)) for t in texts) / len(texts)
        metrics[f"{prefix}degenerate"] = sum(map(is_degenerate, texts)) / len(texts)
    return {**metrics, "rougeL_to_teacher": rouge(replies), "base_rougeL_to_teacher": rouge(base_replies)}


# Serving cost per query, teacher (the base model with the context) and model (without), written by the run for
# classification tasks; the ratios are teacher / model.
SERVING = "serving"
SERVING_METRICS = (
    *(
        Metric(f"{who}_{what}", f"{who} {label}", higher_is_better=False, sets=(SERVING,), kind="value", lowest=0)
        for what, label in (("prompt_tokens", "prompt tokens"), ("latency_ms", "latency ms"), ("kv_bytes", "KV bytes"))
        for who in ("teacher", "student")
    ),
    Metric("prompt_tokens_ratio", "prompt tokens ratio", sets=(SERVING,), kind="value", lowest=0),
    Metric("latency_ratio", "latency ratio", sets=(SERVING,), kind="value", lowest=0),
    Metric("kv_bytes_ratio", "KV bytes ratio", sets=(SERVING,), kind="value", lowest=0),
)
SERVING_COSTS = (
    (f"{SERVING}/student_kv_bytes", f"{SERVING}/teacher_kv_bytes", "KV-cache bytes per query"),
    (f"{SERVING}/student_latency_ms", f"{SERVING}/teacher_latency_ms", "latency per query (ms)"),
)


def against_teacher(accuracy: str, teacher: str, outcome: tuple[str, str]) -> tuple[Metric, ...]:
    """The example count, the headline accuracy (with its outcome per prediction row), the teacher's and their gap
    (with their display names)."""
    return (
        EXAMPLES,
        Metric("accuracy", accuracy, headline=True, outcome=outcome),
        Metric("teacher_accuracy", teacher),
        Metric(
            "teacher_student_gap",
            "teacher - student",
            higher_is_better=False,
            sets=(IN_DOMAIN,),
            kind="value",
            lowest=-1,
            highest=1,
        ),
    )


def teacher_student_gap(result: dict[str, float]) -> float:
    """The teacher's accuracy minus the model's, of the two as stored (float32's shortest decimals), so the gap is
    the difference a reader computes from them (0.5 - 0.54 = -0.04, not the -0.04000002 of their float32 values)."""
    return float32_rounded(result["teacher_accuracy"]) - float32_rounded(result["accuracy"])


#: a paraphrase task's companion to accuracy, as GLUE scores QQP and MRPC: F1 of the class the dataset names
#: (``dataset.f1_positive``), on every eval set; F1 is no mean over examples, so the run bootstraps its interval
F1 = Metric("f1", "F1", kind="bootstrap", lowest=0, highest=1)


def over_shared_vocabulary(*logprobs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Next-token log-probabilities of one vocabulary from output layers of different widths (padded to a multiple
    of 64 or 128, as Qwen2.5's sizes differ): each over the tokens both have, renormalised; as given when equal."""
    width = min(lp.shape[-1] for lp in logprobs)
    return tuple(lp if lp.shape[-1] == width else lp[..., :width].log_softmax(-1) for lp in logprobs)


def with_task_metrics(declared: MetricSet, task: Task | TaskMixture) -> MetricSet:
    """A classification declaration with the companions the task's dataset declares (F1 beside accuracy), and the
    single-draw accuracy only where queries are voted on (it is reported nowhere else, so selecting on it failed
    after the first epoch instead of before training)."""
    voted = max(part.votes for part in task.eval_tasks.values()) if isinstance(task, TaskMixture) else task.votes
    metrics = tuple(m for m in declared.metrics if m.name != "single_draw_accuracy" or voted > 1)
    declares_f1 = not isinstance(task, TaskMixture) and task.f1_positive is not None
    return replace(declared, metrics=(*metrics, *((F1,) if declares_f1 else ())))


CONTEXT_ACCURACY = Metric("context_accuracy", "ctx acc", sets=("train_queries",))
#: Upadhayaya et al.'s teacher accuracy as their code scores it: the trained model with the context, its greedy token
#: read as text (see :func:`decoded_answers`)
CONTEXT_DECODED_ACCURACY = Metric("context_decoded_accuracy", "ctx decoded acc", sets=("train_queries",))
TRAIN_QUERIES_TITLE = {"train_queries": "training queries: the trained model with the context"}


class EvaluatorBase:
    """What a run asks of the object a method's ``evaluator()`` returns."""

    #: the metrics :meth:`evaluate` reports, which tables, plots and dashboards show
    metric_set: MetricSet

    def prepare(self) -> None:
        """Work before training, such as the frozen teacher's references (full-weight training changes it)."""

    def evaluate(self, names: Optional[list[str]] = None) -> tuple[dict[str, float], dict[str, list[dict]]]:
        """Flat metrics ``{set}/{metric}`` and the prediction rows of each set (of ``names``; None: all)."""
        raise NotImplementedError

    def after_training(self) -> dict[str, float]:
        """Metrics that only a trained model has (none by default)."""
        return {}

    def serving_costs(self) -> list[tuple[ServingCost, ServingCost]]:
        """(teacher with the context, model as served) cost per query, one pair per evaluated task (none by
        default); see :mod:`ctxdistill.serving`."""
        return []


class MethodEvaluator(EvaluatorBase):
    """An evaluator a method builds for itself: it keeps the method, the model, the tokenizer, the task and
    the batch size that ``Method.evaluator`` is given."""

    def __init__(self, method, handle: ModelHandle, tokenizer, task: Task, batch_size: int):
        self.method, self.handle, self.tokenizer = method, handle, tokenizer
        self.task, self.batch_size = task, batch_size


class Evaluator(EvaluatorBase):
    """Evaluates the model on every eval set of a task against the frozen teacher.

    The teacher (base weights, adapter disabled, with context) is scored once per eval
    set and reused by every later evaluation, including periodic ones during training.
    """

    #: whether serving cost per query is measured: one forward pass answers a query here, while a generated
    #: answer's cost depends on how long it is.
    measures_serving = True

    metric_set = MetricSet(
        "classification",
        (
            *against_teacher("accuracy", "teacher acc", ("prediction", "label")),
            Metric("majority_rate", "majority", kind="value", lowest=0, highest=1),
            Metric("teacher_agreement", "agree w/ teacher", sets=(IN_DOMAIN,)),
            Metric("kl_to_teacher", "KL to teacher", higher_is_better=False, sets=(IN_DOMAIN,), kind="value", lowest=0),
            # every set: llmft's accuracy (the greedy token's id), and Upadhayaya et al.'s (it read as text)
            Metric("vocab_accuracy", "vocab acc", outcome=("vocab_correct",)),
            Metric("decoded_accuracy", "decoded acc", outcome=("decoded_answer", "label_word")),
            Metric("single_draw_accuracy", "single-draw acc"),
            CONTEXT_ACCURACY,
            CONTEXT_DECODED_ACCURACY,
            *SERVING_METRICS,
        ),
        teacher="teacher_accuracy",
        chance="majority_rate",
        costs=SERVING_COSTS,
        set_titles={**TRAIN_QUERIES_TITLE, SERVING: "serving cost per query (teacher: with the context)"},
    )

    def __init__(
        self,
        handle: ModelHandle,
        tokenizer,
        task: Task,
        with_context: bool,
        batch_size: int,
        model_is_teacher: bool = False,
        ranks: Optional[Ranks] = None,
    ):
        self.handle, self.tokenizer, self.task = handle, tokenizer, task
        self.with_context, self.batch_size = with_context, batch_size
        # An untrained model that sees the context *is* the teacher: score it once.
        self.model_is_teacher = model_is_teacher
        self.ranks = ranks or Ranks.of_launch()
        self.metric_set = with_task_metrics(type(self).metric_set, task)
        self.answer_tokens = [tokenizer(v, add_special_tokens=False).input_ids[0] for v in task.verbalizers]
        self.answer_words = [v.strip() for v in task.verbalizers]  # what a decoded answer must read
        # A teacher with another tokenizer is compared over the answer words (and the rest), not token by token.
        self.teacher_tokenizer = handle.teacher_tokenizer or tokenizer
        self.shared_vocabulary = handle.teacher_tokenizer is None
        self._teacher: dict[str, object] = {}  # per set: what score_teacher returns

    def prepare(self) -> None:
        """Score the teacher, and measure what serving it costs, before training: full fine-tuning changes its
        weights."""
        for name in self.task.eval_sets:
            self.teacher_scores(name)
        if self.measures_serving:
            with self.handle.teacher() as teacher:
                self.teacher_serving = measure_task(teacher, self.teacher_tokenizer, self.task, True, self.batch_size)

    def serving_costs(self) -> list[tuple[ServingCost, ServingCost]]:
        if not self.measures_serving:
            return []
        served = self.teacher_serving
        if not self.model_is_teacher:
            served = measure_task(self.handle.base, self.tokenizer, self.task, self.with_context, self.batch_size)
        return [(self.teacher_serving, served)]

    def teacher_scores(self, name: str):
        if name not in self._teacher:
            with self.handle.teacher() as teacher:
                self._teacher[name] = self.score_teacher(teacher, self.task.eval_sets[name], f"teacher {name}")
        return self._teacher[name]

    def evaluate(self, names: Optional[list[str]] = None) -> tuple[dict[str, float], dict[str, list[dict]]]:
        """Flat metrics ``{set}/{metric}`` and per-example prediction rows per set."""
        metrics, rows = {}, {}
        for name in names or list(self.task.eval_sets):
            result, rows[name] = self.evaluate_set(name, self.task.eval_sets[name], self.teacher_scores(name))
            metrics.update({f"{name}/{key}": value for key, value in result.items()})
        return metrics, rows

    def score_teacher(self, teacher, examples: list[Example], desc: str) -> tuple[Scores, Scores]:
        """(this process's share, with the distributions the model's KL needs; the whole set's scores)"""
        return score_shared(
            teacher,
            self.teacher_tokenizer,
            self.task,
            examples,
            with_context=True,
            batch_size=self.batch_size,
            ranks=self.ranks,
            keep_distribution=self.shared_vocabulary,
            desc=desc,
        )

    def evaluate_set(
        self, name: str, examples: list[Example], teacher_scores: tuple[Scores, Scores]
    ) -> tuple[dict[str, float], list[dict]]:
        teacher_share, teacher = teacher_scores
        if self.model_is_teacher:
            model = Scores(teacher.label_logprobs, None, torch.zeros(len(examples)), teacher.top_token)
        else:
            model = score_shared(
                self.handle.base,
                self.tokenizer,
                self.task,
                examples,
                self.with_context,
                self.batch_size,
                self.ranks,
                teacher=teacher_share if self.shared_vocabulary else None,
                desc=f"model {name}",
                dropout_seed=self.handle.evaluation_dropout_seed,
            )[1]
            if not self.shared_vocabulary:
                model.kl_to_teacher = forward_kl(
                    with_rest_bucket(model.label_logprobs), with_rest_bucket(teacher.label_logprobs)
                )
        labels = torch.tensor([e.label for e in examples])
        votes = self.task.votes
        if votes > 1:  # every query was answered `votes` times, with other demonstrations each time
            single_draw_accuracy = (model.predictions == labels).float().mean().item()
            model, teacher = majority_vote(model, votes), majority_vote(teacher, votes)
            examples, labels = examples[::votes], labels[::votes]
        result = classification_metrics(model.predictions, labels, self.task.num_classes, self.task.f1_positive)
        if votes > 1:
            result["single_draw_accuracy"] = single_draw_accuracy
        # llmft's `accuracy`: the argmax over the whole vocabulary must be the gold answer word's (first) token.
        # Upadhayaya et al.'s code reads that token as text instead ("yes" without its space counts).
        vocab_correct = model.top_token == torch.tensor(self.answer_tokens)[labels]
        result["vocab_accuracy"] = vocab_correct.float().mean().item()
        decoded, label_words, result["decoded_accuracy"] = self.decoded_outcomes(model.top_token, labels.tolist())
        for group in sorted({e.group for e in examples if e.group is not None}):
            members = torch.tensor([e.group == group for e in examples])
            result[f"accuracy_{group}"] = (model.predictions == labels)[members].float().mean().item()
        result["teacher_accuracy"] = (teacher.predictions == labels).float().mean().item()
        result["teacher_student_gap"] = teacher_student_gap(result)
        result["examples"] = len(examples)
        result["teacher_agreement"] = (model.predictions == teacher.predictions).float().mean().item()
        result["kl_to_teacher"] = model.kl_to_teacher.mean().item()
        rows = [
            {
                "uid": e.uid,
                "prompt": self.task.prompt(e, self.with_context),
                "label": e.label,
                "prediction": int(p),
                "teacher_prediction": int(t),
                "kl_to_teacher": float(k),
                "label_logprobs": [round(float(x), 4) for x in lp],
                "vocab_correct": bool(v),
                "decoded_answer": d,
                "label_word": w,
            }
            for e, p, t, k, lp, v, d, w in zip(
                examples,
                model.predictions,
                teacher.predictions,
                model.kl_to_teacher,
                model.label_logprobs,
                vocab_correct,
                decoded,
                label_words,
            )
        ]
        return result, rows

    def after_training(self) -> dict[str, float]:
        """Upadhayaya et al.'s "teacher accuracy": the trained model *with* the context, scored on the training
        queries (their teacher was the adapted model itself)."""
        if not self.task.train_query_labels:
            return {}
        metrics = self.context_metrics(self.task.train_queries, self.task.train_query_labels)
        return {
            **{f"train_queries/{k}": v for k, v in metrics.items()},
            "train_queries/examples": len(self.task.train_queries),
        }

    def context_metrics(self, examples: list[Example], labels: list[int]) -> dict[str, float]:
        """Accuracy of the (trained) model *with* the context on ``examples``, over the answer words and as its
        decoded greedy token (with dropout as the model's own evaluation: the released code's teacher is that
        model, in the mode training left it)."""
        scores = score_shared(
            self.handle.base,
            self.tokenizer,
            self.task,
            examples,
            with_context=True,
            batch_size=self.batch_size,
            ranks=self.ranks,
            desc="with context",
            dropout_seed=self.handle.evaluation_dropout_seed,
        )[1]
        return {
            "context_accuracy": classification_metrics(scores.predictions, torch.tensor(labels), self.task.num_classes)[
                "accuracy"
            ],
            "context_decoded_accuracy": self.decoded_outcomes(scores.top_token, labels)[2],
        }

    def decoded_outcomes(self, top_tokens: torch.Tensor, labels: list[int]) -> tuple[list[str], list[str], float]:
        """(each greedy token read as text, each gold answer word, the share that match): Upadhayaya et al.'s
        scoring."""
        decoded = decoded_answers(self.tokenizer, top_tokens)
        words = [self.answer_words[label] for label in labels]
        return decoded, words, sum(d == w for d, w in zip(decoded, words)) / len(labels)


def decoded_answers(tokenizer, tokens: torch.Tensor) -> list[str]:
    """Each greedy token as the text Upadhayaya et al.'s code compares with the answer word: decoded (special
    tokens dropped), stripped and cut at its first ".". Their code generates that one token, decodes the whole
    sequence and takes what follows the prompt's final "Label:"; a byte-level or SentencePiece tokenizer decodes
    prompt and token apart as it decodes them together (pinned against that in the tests)."""
    texts = {t: tokenizer.decode([t], skip_special_tokens=True) for t in set(tokens.tolist())}
    return [texts[t].strip().split(".")[0].strip() for t in tokens.tolist()]


def exact_match_rate(answers: list[Optional[str]], references: list[Optional[str]]) -> float:
    """How often an answer equals its reference; a missing answer (extraction failure) never does."""
    return sum(a is not None and a == r for a, r in zip(answers, references)) / len(answers)


@dataclass
class Answers:
    texts: list[str]  # the decoded generations
    answers: list[Optional[str]]  # what the extractor read from them (None: it found no answer)


class GenerationEvaluator(Evaluator):
    """Exact match of generated free-text answers (``task.generation``), against the frozen teacher's.

    The model and the teacher generate greedily; a worked generation (with the context, or from a model
    trained to write worked solutions: ``answers_worked``) is read by the task's answer extractor, a
    direct one is its first line. An extraction failure is counted (``extraction_failures``,
    ``teacher_extraction_failures``) and scored wrong.
    """

    measures_serving = False
    answers_worked = False  # the evaluated model writes worked solutions without the context (ft target=worked)

    metric_set = MetricSet(
        "exact_match",
        (
            *against_teacher("exact match", "teacher exact match", ("prediction", "target")),
            Metric("teacher_agreement", "agree w/ teacher", sets=(IN_DOMAIN,)),
            Metric("extraction_failures", "no answer", higher_is_better=False, kind="count"),
            Metric("teacher_extraction_failures", "teacher no answer", higher_is_better=False, kind="count"),
            CONTEXT_ACCURACY,
        ),
        teacher="teacher_accuracy",
        set_titles=TRAIN_QUERIES_TITLE,
    )

    def answers(
        self, model, tokenizer, examples: list[Example], with_context: bool, desc: str, worked: bool
    ) -> Answers:
        spec = self.task.generation
        prompts = [self.task.prompt(e, with_context) for e in examples]
        budget, stop = (spec.max_new_tokens, spec.stop) if worked else (spec.max_answer_tokens, "\n")
        generated = generate(
            model,
            tokenizer,
            prompts,
            budget,
            stop=stop,
            batch_size=self.batch_size,
            prefix=SharedPrefix(model, tokenizer, prompts),
            desc=desc,
        )
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        return Answers(texts, [spec.extract(t, worked) for t in texts])

    def score_teacher(self, teacher, examples: list[Example], desc: str) -> Answers:
        # A teacher from another family reads and writes in its own tokens; answers compare as text.
        return self.answers(teacher, self.teacher_tokenizer, examples, True, desc, worked=True)

    def evaluate_set(self, name: str, examples: list[Example], teacher: Answers) -> tuple[dict[str, float], list[dict]]:
        model = (
            teacher
            if self.model_is_teacher
            else self.answers(
                self.handle.base,
                self.tokenizer,
                examples,
                self.with_context,
                f"model {name}",
                self.with_context or self.answers_worked,
            )
        )
        targets = [e.target for e in examples]
        result = {
            "accuracy": exact_match_rate(model.answers, targets),
            "teacher_accuracy": exact_match_rate(teacher.answers, targets),
            "examples": len(examples),
            # Agreement is about behaviour: finding no answer where the teacher finds none agrees too.
            "teacher_agreement": sum(a == t for a, t in zip(model.answers, teacher.answers)) / len(examples),
            "extraction_failures": sum(a is None for a in model.answers),
            "teacher_extraction_failures": sum(a is None for a in teacher.answers),
        }
        for group in sorted({e.group for e in examples if e.group is not None}):
            members = [i for i, e in enumerate(examples) if e.group == group]
            result[f"accuracy_{group}"] = exact_match_rate(
                [model.answers[i] for i in members], [targets[i] for i in members]
            )
        result["teacher_student_gap"] = teacher_student_gap(result)
        rows = [
            {
                "uid": e.uid,
                "prompt": self.task.prompt(e, self.with_context),
                "target": e.target,
                "generation": text,
                "prediction": answer,
                "teacher_generation": t_text,
                "teacher_prediction": t_answer,
            }
            for e, text, answer, t_text, t_answer in zip(
                examples, model.texts, model.answers, teacher.texts, teacher.answers
            )
        ]
        return result, rows

    def context_metrics(self, examples: list[Example], targets: list[str]) -> dict[str, float]:
        answers = self.answers(self.handle.base, self.tokenizer, examples, True, "with context", worked=True).answers
        return {"context_accuracy": exact_match_rate(answers, targets)}


class MixtureEvaluator(EvaluatorBase):
    """Few-shot evaluation of every evaluated task of a mixture, one :class:`Evaluator` each.

    Metrics ``{task}/...`` per task and their means over tasks as ``eval/...`` (``eval/accuracy`` is
    the run's objective); prediction rows per task. A periodic evaluation evaluates every task too.
    """

    MEANS = (
        "accuracy",
        "teacher_accuracy",
        "single_draw_accuracy",
        "teacher_agreement",
        "kl_to_teacher",
        "majority_rate",
    )
    # In-domain figures are means over the tasks (each task's own set of examples): no interval over examples.
    metric_set = MetricSet(
        "mixture",
        (
            Metric(
                "accuracy",
                "mean acc",
                sets=(IN_DOMAIN,),
                kind="value",
                lowest=0,
                highest=1,
                headline=True,
                outcome=("prediction", "label"),  # each task's rows
            ),
            Metric("teacher_accuracy", "mean teacher acc", sets=(IN_DOMAIN,), kind="value", lowest=0, highest=1),
            Metric(
                "single_draw_accuracy", "mean single-draw acc", sets=(IN_DOMAIN,), kind="value", lowest=0, highest=1
            ),
            Metric("teacher_agreement", "mean agree w/ teacher", sets=(IN_DOMAIN,), kind="value", lowest=0, highest=1),
            Metric(
                "kl_to_teacher", "mean KL to teacher", higher_is_better=False, sets=(IN_DOMAIN,), kind="value", lowest=0
            ),
            Metric("majority_rate", "mean majority", sets=(IN_DOMAIN,), kind="value", lowest=0, highest=1),
            # each task's own figures
            EXAMPLES,
            Metric("accuracy", "accuracy"),
            Metric("teacher_accuracy", "teacher acc"),
            Metric("single_draw_accuracy", "single-draw acc"),
            Metric("majority_rate", "majority", kind="value", lowest=0, highest=1),
        ),
        teacher="teacher_accuracy",
        chance="majority_rate",
    )

    def __init__(
        self,
        handle: ModelHandle,
        tokenizer,
        mixture: TaskMixture,
        with_context: bool,
        batch_size: int,
        model_is_teacher: bool = False,
    ):
        self.evaluators = {
            name: Evaluator(handle, tokenizer, task, with_context, batch_size, model_is_teacher)
            for name, task in mixture.eval_tasks.items()
        }
        self.metric_set = with_task_metrics(type(self).metric_set, mixture)

    def prepare(self) -> None:
        for evaluator in self.evaluators.values():
            evaluator.prepare()

    def serving_costs(self) -> list[tuple[ServingCost, ServingCost]]:
        return [pair for evaluator in self.evaluators.values() for pair in evaluator.serving_costs()]

    def evaluate(self, names: Optional[list[str]] = None) -> tuple[dict[str, float], dict[str, list[dict]]]:
        metrics, rows = {}, {}
        for task, evaluator in self.evaluators.items():
            task_metrics, task_rows = evaluator.evaluate()
            metrics.update({f"{task}/{key.split('/', 1)[1]}": value for key, value in task_metrics.items()})
            rows[task] = task_rows["eval"]
        for key in self.MEANS:
            values = [metrics[f"{task}/{key}"] for task in self.evaluators if f"{task}/{key}" in metrics]
            if values:
                metrics[f"eval/{key}"] = sum(values) / len(values)
        return metrics, rows


def make_evaluator(
    handle: ModelHandle,
    tokenizer,
    task: Task | TaskMixture,
    with_context: bool,
    batch_size: int,
    model_is_teacher: bool = False,
):
    """One evaluator per task of a mixture; exact match of generated answers for free-text tasks,
    verbalizer scoring otherwise."""
    if isinstance(task, TaskMixture):
        return MixtureEvaluator(handle, tokenizer, task, with_context, batch_size, model_is_teacher)
    kind = GenerationEvaluator if task.generation else Evaluator
    return kind(handle, tokenizer, task, with_context, batch_size, model_is_teacher)
