"""Task specs as data: loading, label mapping, demonstrations and prompt rendering.

A dataset config (``conf/dataset/*.yaml``) says where the records come from, which
fields the template reads, how raw labels map to classes, the answer word of each
class and the teacher's context. :func:`build_task` turns it into a :class:`Task`
that renders the teacher prompt (context + query) and the student prompt (query).
"""

from __future__ import annotations

import csv
import json
import logging
import random
import re
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from ctxdistill import provenance

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad data or a data spec that cannot be satisfied; the message names the source and the fix."""


@dataclass(frozen=True)
class Example:
    uid: str
    fields: dict[str, str]
    label: Optional[int]  # None for unlabelled queries: what distillation trains on
    group: Optional[str] = None  # a subset to report separately (e.g. HANS's heuristic)
    target: Optional[str] = None  # the free-text answer of a generative task (then label is None)
    template: Optional[str] = None  # its eval set's own query template (dataset.ood.NAME.template); None: the task's


@dataclass(frozen=True)
class AnswerGeneration:
    """How a generative task's answers are generated and read (see config.GenerationConfig)."""

    answer_regex: str
    max_new_tokens: int
    max_answer_tokens: int
    stop: str
    demo_target: str  # a demonstration's worked solution, over its fields: "{scratchpad}\n{answer}"

    def worked_text(self, example: Example) -> str:
        """The example's worked solution as a model should write it: the demonstrations' target and the stop."""
        return self.demo_target.format(**example.fields) + (self.stop or "")

    def extract(self, text: str, worked: bool) -> Optional[str]:
        """The final answer of a worked generation (with the context; None when the extractor finds none, or only
        blanks: ``</scratch>`` and a newline is no answer, not the empty one), or the first line of a direct answer."""
        if not worked:
            return text.split("\n", 1)[0].strip()
        found = re.search(self.answer_regex, text)
        return (found.group(1).strip() if found else "") or None  # what reads as nothing is no answer


@dataclass
class DemoSampler:
    """In-context tuning's prompts: every example gets its own k demonstrations, drawn from a pool
    with a seed and the example's id, so a prompt is the same in every epoch and every run. The
    example itself (its id up to ``#``, which marks repeated draws) is never among them."""

    pool: list[Example]
    num_demos: int
    balanced: bool
    seed: int
    render: Callable[[list[Example]], str]  # demonstrations -> context text
    instruction_chars: int = 0  # the context's leading instruction and its separator, before the demonstrations

    def context(self, example: Example, num_classes: int) -> str:
        own = example.uid.split("#", 1)[0]
        rng = random.Random(f"{self.seed}:{example.uid}")
        others = [d for d in self.pool if d.uid != own]
        return self.render(select_demos(others, self.num_demos, self.balanced, num_classes, rng))


@dataclass
class Task:
    name: str
    template: str
    verbalizers: list[str]
    student_instruction: str
    context: str  # instruction + demonstrations, prepended to the query for the teacher
    separator: str
    demos: list[Example]
    train_queries: list[Example]
    # Their labels (targets of a generative task), kept apart so no loss can read them; only a report uses them.
    train_query_labels: list[Any]
    eval_sets: dict[str, list[Example]]  # "eval" (in-domain) first, then out-of-domain sets
    generation: Optional[AnswerGeneration] = None  # set for free-text answers (exact-match evaluation)
    # Every context when there are several (dataset.context.num_contexts); ``context`` is the first.
    contexts: list[str] = field(default_factory=list)
    demo_sampler: Optional[DemoSampler] = None  # set: each example draws its own demonstrations instead
    # Consecutive eval examples that are draws of one query (each with other demonstrations); the
    # evaluation takes their majority answer.
    votes: int = 1
    context_query_template: Optional[str] = None  # the query after the context; None: template
    demo_template: Optional[str] = None  # a demonstration's query in the context; None: template
    context_instruction: str = ""  # the instruction that opens each context, before its demonstrations
    f1_positive: Optional[int] = None  # the class whose F1 is reported beside accuracy (dataset.f1_positive)

    @property
    def num_classes(self) -> int:
        return len(self.verbalizers)

    def answer_text(self, example: Example) -> str:
        """The gold answer as the model should write it: the label word, or the free text and its line end."""
        return example.target + "\n" if self.generation else self.verbalizers[example.label]

    def query(self, example: Example) -> str:
        return (example.template or self.template).format(**example.fields)

    def context_query(self, example: Example) -> str:
        """The query as it follows a context, also an empty one (llmft's 0-shot prompt ends as its k-shot one)."""
        return (example.template or self.context_query_template or self.template).format(**example.fields)

    def demonstration(self, example: Example) -> str:
        """``example`` written as a demonstration of the context writes it."""
        return render_shot(self.demo_template or self.template, example, self.verbalizers, self.generation)

    def student_prompt(self, example: Example) -> str:
        if self.student_instruction:
            return self.student_instruction + self.separator + self.query(example)
        return self.query(example)

    def context_of(self, example: Example) -> str:
        """The example's context: with several (Snell et al.'s simultaneous distillation, eq. 2), the one a
        hash of its id picks, so each context teaches its own share of the queries and is evaluated on its share.
        With a demonstration sampler (in-context tuning), demonstrations drawn for this example."""
        if self.demo_sampler is not None:
            return self.demo_sampler.context(example, self.num_classes)
        if len(self.contexts) > 1:
            return self.contexts[zlib.crc32(example.uid.encode()) % len(self.contexts)]
        return self.context

    def teacher_prompt(self, example: Example, context: Optional[str] = None) -> str:
        """The example after its context, or after ``context`` when given (one of ``contexts``)."""
        context = self.context_of(example) if context is None else context
        query = self.context_query(example)
        return context + self.separator + query if context else query

    def prompt(self, example: Example, with_context: bool) -> str:
        return self.teacher_prompt(example) if with_context else self.student_prompt(example)


# ---------------------------------------------------------------- loading records
def _read_json(path: Path) -> list[dict[str, Any]]:
    """A JSON list of records, a JSON object of records keyed by id, or JSON lines."""
    text = path.read_text(encoding="utf-8")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        return whole
    if isinstance(whole, dict) and whole and all(isinstance(v, dict) for v in whole.values()):
        return [{"id": key, **value} for key, value in whole.items()]
    records = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{line_no}: not a JSON record ({e.msg}); expected JSON lines, "
                f"a JSON list, or a JSON object of records"
            ) from e
    return records


def _read_file(path: Path, key: str, quoting: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{key}: data file not found: {path}. Check {key}.file, or its data_dir and data_files.")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_json(path)
    if suffix in (".tsv", ".csv", ".txt"):
        # GLUE's own TSVs hold quote characters as text: read them with quoting disabled unless told otherwise.
        delimiter = "," if suffix == ".csv" else "\t"
        quoted = suffix == ".csv" or quoting == "csv"
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
            records = []
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    raise DataError(f"{path}:{reader.line_num}: expected {len(reader.fieldnames)} columns")
                records.append(row)
            return records
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .tsv, .txt (tab-separated) or .csv")


def _strip_bytes_literal(value: Any) -> Any:
    """The text inside a bytes literal b'...' as llmft and upadraj/In-context read it (``[2:-1]``): its escapes
    (PAWS-QQP's ``\\xcf\\x80``) stay as written."""
    if isinstance(value, str) and len(value) >= 3 and value[0] == "b" and value[1] in "'\"" and value[-1] == value[1]:
        return value[2:-1]
    return value


def _local_file(source: DictConfig, split: str, key: str) -> Optional[Path]:
    """The local file a split is read from: ``file``, or ``data_files[split]`` under ``data_dir``; None: the Hub."""
    if source.file:
        return Path(source.file).expanduser()
    if source.kind == "files" or source.data_dir:
        if split not in source.data_files:
            raise DataError(
                f"{key}.data_files has no file for split {split!r} "
                f"(has: {sorted(source.data_files)}); add ++{key}.data_files.{split}=FILE"
            )
        return Path(source.data_dir or ".").expanduser() / source.data_files[split]
    return None


def _fetch(source: DictConfig, split: str, key: str) -> tuple[list[dict[str, Any]], str, Optional[dict[str, Any]]]:
    """The records, where they came from (for messages), and their origin as provenance records it (None:
    generated)."""
    if source.kind == "synthetic":
        size = source.split_sizes.get(split)
        if size is None:
            raise DataError(f"{key}.split_sizes has no size for split {split!r}")
        generator = get_method(source.generator)
        records = generator(num_examples=size, seed=source.seed, split=split, **source.generator_options)
        return records, source.generator, None
    path = _local_file(source, split, key)
    if path is not None:
        return _read_file(path, key, source.quoting), str(path), provenance.data_file(path)
    import datasets  # slow import, only when the Hub is used

    where = f"{source.hub_id}" + (f"/{source.hub_config}" if source.hub_config else "") + f" [{split}]"
    try:
        loaded = datasets.load_dataset(source.hub_id, source.hub_config, split=split)
    except Exception as e:  # noqa: BLE001 - network, missing split, missing dataset all end here
        raise DataError(
            f"{key}: could not load {where} with datasets.load_dataset: {e}. Without network (or for "
            f"a dataset the Hub serves only through a loading script), point {key}.file at the original "
            f"file, or {key}.data_dir at a directory with the files {key}.data_files names"
        ) from e
    return list(loaded), where, provenance.hub_dataset(loaded, source.hub_id, source.hub_config, split)


_FETCHED: dict[str, tuple[list[dict[str, Any]], str, Optional[dict[str, Any]]]] = {}


def _fetch_once(source: DictConfig, split: str, key: str) -> tuple[list[dict[str, Any]], str]:
    """:func:`_fetch`, memoised per process: the runs of a sweep read and parse each file once (and each
    run notes its origin)."""
    memo = json.dumps([OmegaConf.to_container(source, resolve=True), split], sort_keys=True, default=str)
    path = _local_file(source, split, key) if source.kind != "synthetic" else None
    if path is not None and path.is_file():
        memo += f"{path.stat().st_mtime_ns} {path.stat().st_size}"  # an edited file is read again
    if memo not in _FETCHED:
        _FETCHED[memo] = _fetch(source, split, key)
    records, where, origin = _FETCHED[memo]
    provenance.note_data(origin)
    return records, where


def load_records(source: DictConfig, split: str, key: str = "dataset.source") -> tuple[list[dict[str, Any]], str]:
    """The raw records of one split (renamed, filtered, decoded, subsampled) and where they came from;
    ``key`` is where ``source`` sits in the config, for error messages."""
    records, where = _fetch_once(source, split, key)
    if source.rename:
        rename = OmegaConf.to_container(
            source.rename, resolve=True
        )  # a plain dict: a DictConfig lookup per cell is slow
        records = [{rename.get(k, k): v for k, v in r.items()} for r in records]
    for column, value in source.where.items():
        records = [r for r in records if str(r.get(column)) == value]
    if not records:
        raise DataError(
            f"{where}: split {split!r} holds no records"
            + (f" that match {key}.where={dict(source.where)}" if source.where else "")
            + f". Check the file (a header alone is no record) or {key}.where"
        )
    if source.bytes_literals:
        records = [{k: _strip_bytes_literal(v) for k, v in r.items()} for r in records]
    if source.subsample is not None and len(records) > source.subsample:
        records = [records[i] for i in subsample_indices(source, split, len(records), key)]
    return records, where


# The order GLUE's loading script generated its splits in when llmft drew from them (train, validation, test):
# the Hub's metadata lists them in other orders in different versions of the dataset card.
DRAW_ORDER = ("train", "validation", "test")


def hub_split_sizes(source: DictConfig) -> dict[str, int]:
    """The Hub dataset's splits and their sizes, in its metadata's order (no rows are read)."""
    import datasets

    splits = datasets.load_dataset_builder(source.hub_id, source.hub_config).info.splits
    return {name: info.num_examples for name, info in splits.items()}


def subsample_indices(source: DictConfig, split: str, size: int, key: str) -> list[int]:
    """The records a subsampled split keeps. From the Hub, llmft's draw (its load_glue_datasets): numpy seeded
    once, then ``subsample`` drawn from every split in llmft's order (:data:`DRAW_ORDER`), each kept in the order
    drawn, so a split's rows depend on the draws of the splits before it. A local file is a sample of its own, not
    one of the Hub's splits: one draw from the seed, kept in file order."""
    rng = np.random.RandomState(source.subsample_seed)
    if _local_file(source, split, key) is not None:
        return sorted(rng.choice(size, source.subsample, replace=False))
    sizes = hub_split_sizes(source)
    order = sorted(sizes, key=lambda name: DRAW_ORDER.index(name) if name in DRAW_ORDER else len(DRAW_ORDER))
    for earlier in order[: order.index(split)]:
        rng.choice(sizes[earlier], source.subsample, replace=False)
    return rng.choice(size, source.subsample, replace=False).tolist()


def to_examples(
    records: list[dict[str, Any]],
    spec: DictConfig,
    label_map: DictConfig,
    drop_labels: list[str],
    where: str,
    prefix: str,
    group_by: Optional[str] = None,
) -> list[Example]:
    # Plain values read once: a DictConfig lookup per row is slow.
    field_names, label_field, generates = list(spec.fields), spec.label_field, spec.generation is not None
    labels = OmegaConf.to_container(label_map, resolve=True) if label_map else {}
    drop, num_classes = set(drop_labels), len(spec.verbalizers)
    examples = []
    for i, record in enumerate(records):
        missing = [f for f in [*field_names, label_field] if f not in record]
        if missing:
            raise DataError(
                f"{where}: record {i} lacks field(s) {missing}; it has {sorted(record)} "
                f"(dataset.source.rename maps columns to fields)"
            )
        raw = str(record[label_field])
        if raw in drop:
            continue
        group = str(record.get(group_by)) if group_by else None
        fields = {f: str(record[f]) for f in field_names}
        if generates:
            examples.append(Example(f"{prefix}-{i}", fields, None, group, target=raw))
            continue
        if labels:
            if raw not in labels:
                raise DataError(
                    f"{where}: record {i} has unknown label {raw!r}; dataset label_map knows {sorted(labels)}"
                )
            label = int(labels[raw])
        else:
            try:
                label = int(raw)
            except ValueError:
                raise DataError(
                    f"{where}: record {i} has label {raw!r}, which is not a class index; give the dataset a label_map"
                ) from None
        if not 0 <= label < num_classes:
            raise DataError(f"{where}: record {i} has label {label}, but there are {num_classes} verbalizers")
        examples.append(Example(f"{prefix}-{i}", fields, label, group))
    return examples


# ---------------------------------------------------------------- context and queries
def balanced_counts(k: int, num_classes: int) -> list[int]:
    """How many of k balanced draws each class gets: k/num_classes, the first classes one more for the remainder."""
    return [k // num_classes + (1 if c < k % num_classes else 0) for c in range(num_classes)]


def select_demos(
    pool: list[Example],
    k: int,
    balanced: bool,
    num_classes: int,
    rng: random.Random,
    shuffled: bool = True,
    key: str = "dataset.context.num_demos",
) -> list[Example]:
    """k demonstrations, k/num_classes per class when balanced, shuffled (seeded) or in the pool's order;
    ``key``: the setting that asks for k, named when the pool cannot give them."""
    if k > len(pool):
        raise DataError(f"{key}={k} is larger than the training pool ({len(pool)} examples)")
    if not shuffled:
        position = {e.uid: i for i, e in enumerate(pool)}
        return sorted(select_demos(pool, k, balanced, num_classes, rng, key=key), key=lambda e: position[e.uid])
    if not balanced:
        return rng.sample(pool, k)
    by_class = [[e for e in pool if e.label == c] for c in range(num_classes)]
    per_class = balanced_counts(k, num_classes)
    for c, (have, need) in enumerate(zip(by_class, per_class)):
        if need > len(have):
            raise DataError(f"{key}={k} needs {need} examples of class {c}, the training pool has {len(have)}")
    demos = [e for have, need in zip(by_class, per_class) for e in rng.sample(have, need)]
    rng.shuffle(demos)
    return demos


def draw_as_released(
    pool: list[Example], spec: DictConfig, balanced: bool, num_classes: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """The demonstrations and the training queries as the released code draws them from the same split.

    Both (llmft's eval_utils._select_random_subset, upadraj/In-context's copy of it) seed numpy's global state
    with the seed and draw num_demos / num_classes of each class's rows (np.random.choice, classes in order),
    or num_demos rows when not balanced, then keep them in the split's order (a filter over the split);
    llmft's ``--shuffle`` then shuffles them with datasets' ``Dataset.shuffle(seed)``. The queries: llmft's
    ft.py seeds numpy again and draws from the whole split; In-context draws on, from the split without the
    demonstrations. Both keep the queries in the order drawn."""
    k, draw = spec.context.num_demos, spec.context.draw
    state = np.random.RandomState(seed)
    if balanced:
        if k % num_classes:
            raise DataError(
                f"dataset.context.draw={draw} draws as many demonstrations of every class: "
                f"dataset.context.num_demos={k} is not a multiple of {num_classes}"
            )
        chosen = []
        for c in range(num_classes):
            rows = [i for i, e in enumerate(pool) if e.label == c]
            if k // num_classes > len(rows):
                raise DataError(f"dataset.context.num_demos={k} needs {k // num_classes} examples of class {c}")
            chosen.extend(state.choice(rows, k // num_classes, replace=False).tolist())
    else:
        chosen = state.choice(len(pool), k, replace=False).tolist()
    demos = [pool[i] for i in sorted(chosen)]
    if spec.context.shuffle_demos:
        demos = take(demos, None, seed)
    n = spec.num_train_queries
    if draw == "llmft":
        queries = np.random.RandomState(seed).choice(len(pool), n, replace=False).tolist()
    else:
        rest = sorted(set(range(len(pool))) - set(chosen))
        if n > len(rest):
            raise DataError(
                f"dataset.num_train_queries={n} is larger than the training pool left after the demonstrations "
                f"({len(rest)} examples)"
            )
        queries = [rest[j] for j in state.choice(len(rest), n, replace=False)]
    return demos, [pool[i] for i in queries]


def render_context(
    spec: DictConfig, demos: list[Example], instruction: Optional[str] = None, verbalizers: Optional[list] = None
) -> str:
    """The instruction and the demonstrations with their label words (the dataset's unless given), joined."""
    instruction = spec.context.instruction if instruction is None else instruction
    verbalizers = spec.verbalizers if verbalizers is None else verbalizers
    template = spec.demo_template or spec.template
    shots = [render_shot(template, d, verbalizers, spec.generation) for d in demos]
    parts = ([instruction] if instruction else []) + shots
    return spec.context.separator.join(parts)


def render_shot(template: str, demo: Example, verbalizers: list, generation) -> str:
    """One demonstration: its query and its answer (the label word, or the worked solution of a generative task,
    ``generation`` being its settings)."""
    answer = generation.demo_target.format(**demo.fields) if generation is not None else verbalizers[demo.label]
    return template.format(**demo.fields) + answer


def take(
    examples: list[Example],
    count: Optional[int],
    shuffle_seed: Optional[int],
    key: Optional[str] = None,
    where: str = "",
) -> list[Example]:
    """The first ``count`` examples (all for None): in file order, or after a shuffle with ``shuffle_seed``
    drawn as datasets' ``Dataset.shuffle(seed=...)`` draws it (numpy's ``default_rng(seed).permutation``).
    ``key``: the setting that asked for ``count``, named in a warning when there are fewer (``where``: of what)."""
    if key is not None and count is not None and count > len(examples):
        of = f" of {where}" if where else ""
        log.warning("%s=%d is more than the %d examples%s there are: all are used", key, count, len(examples), of)
    if shuffle_seed is not None:
        examples = [examples[i] for i in np.random.default_rng(shuffle_seed).permutation(len(examples))]
    return examples[:count]


def build_task(spec: DictConfig, seed: int) -> Task:
    """Load the splits, draw the demonstrations and the unlabelled training queries (seeded)."""
    train_records, where = load_records(spec.source, spec.train_split)
    pool = to_examples(train_records, spec, spec.label_map, spec.drop_labels, where, "train")
    data_seed = seed if spec.context.data_seed is None else spec.context.data_seed
    rng = random.Random(data_seed)
    balanced = spec.context.balanced and spec.generation is None  # free-text answers have no classes
    instructions = spec.context.instructions or [spec.context.instruction] * spec.context.num_contexts
    label_words = spec.context.demo_verbalizers or [spec.verbalizers] * spec.context.num_contexts
    if spec.context.draw != "python":
        demos, drawn = draw_as_released(pool, spec, balanced, len(spec.verbalizers), data_seed)
        contexts = [render_context(spec, demos, instructions[0], label_words[0])]
    else:
        # Several contexts (Snell et al.'s simultaneous distillation) draw disjoint demonstrations in turn.
        rest, contexts, demos = pool, [], []
        for index, (instruction, verbalizers) in enumerate(zip(instructions, label_words)):
            try:
                drawn_demos = select_demos(
                    rest, spec.context.num_demos, balanced, len(spec.verbalizers), rng, spec.context.shuffle_demos
                )
            except DataError as e:
                if not index:
                    raise
                # the pool it names is what the earlier contexts left, not the split
                raise DataError(
                    f"dataset.context.num_contexts={spec.context.num_contexts}: context {index + 1} draws its "
                    f"demonstrations from what the {index} before it left ({len(rest)} of {len(pool)} examples): "
                    f"{e}. Each context draws {spec.context.num_demos} demonstrations of its own; lower "
                    "dataset.context.num_contexts or dataset.context.num_demos"
                ) from None
            drawn_ids = {d.uid for d in drawn_demos}
            rest = [e for e in rest if e.uid not in drawn_ids]
            contexts.append(render_context(spec, drawn_demos, instruction, verbalizers))
            demos.extend(drawn_demos)
        if spec.num_train_queries > len(rest):
            raise DataError(
                f"dataset.num_train_queries={spec.num_train_queries} is larger than the training pool "
                f"left after the demonstrations ({len(rest)} examples)"
            )
        drawn = rng.sample(rest, spec.num_train_queries)
    # Distillation queries are unlabelled: the label is dropped here so no loss can read it.
    queries = [replace(e, label=None, target=None) for e in drawn]

    eval_records, where = load_records(spec.source, spec.eval_split)
    eval_sets = {
        "eval": take(
            to_examples(eval_records, spec, spec.label_map, spec.drop_labels, where, "eval"),
            spec.num_eval,
            spec.eval_shuffle_seed,
            "dataset.num_eval",
        )
    }
    for name, ood in spec.ood.items():  # out-of-domain sets may label and filter their own way
        records, where = load_records(ood.source, ood.split, f"dataset.ood.{name}.source")
        label_map = ood.label_map if ood.label_map is not None else spec.label_map
        drop = ood.drop_labels if ood.drop_labels is not None else spec.drop_labels
        examples = to_examples(records, spec, label_map, drop, where, name, ood.group_by)
        if ood.template is not None:
            examples = [replace(e, template=ood.template) for e in examples]
        eval_sets[name] = take(examples, ood.num_examples, ood.shuffle_seed, f"dataset.ood.{name}.num_examples")
    return Task(
        name=spec.name,
        template=spec.template,
        verbalizers=list(spec.verbalizers),
        f1_positive=spec.f1_positive,
        student_instruction=spec.student_instruction,
        context=contexts[0],
        contexts=contexts,
        separator=spec.context.separator,
        demos=demos,
        train_queries=queries,
        train_query_labels=[e.target if spec.generation is not None else e.label for e in drawn],
        eval_sets=eval_sets,
        generation=None
        if spec.generation is None
        else AnswerGeneration(
            spec.generation.answer_regex,
            spec.generation.max_new_tokens,
            spec.generation.max_answer_tokens,
            spec.generation.stop,
            spec.generation.demo_target,
        ),
        context_query_template=spec.context_query_template,
        demo_template=spec.demo_template,
        context_instruction=spec.context.instruction,
    )
