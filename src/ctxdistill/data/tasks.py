"""Task specs as data: loading, label mapping, demonstrations and prompt rendering.

A dataset config (``conf/dataset/*.yaml``) says where the records come from, which
fields the template reads, how raw labels map to classes, the answer word of each
class and the teacher's context. :func:`build_task` turns it into a :class:`Task`
that renders the teacher prompt (context + query) and the student prompt (query).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from hydra.utils import get_method
from omegaconf import DictConfig


class DataError(ValueError):
    """Bad data or a data spec that cannot be satisfied; the message names the source and the fix."""


@dataclass(frozen=True)
class Example:
    uid: str
    fields: dict[str, str]
    label: Optional[int]  # None for unlabelled queries: what distillation trains on


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
    eval_sets: dict[str, list[Example]]  # "eval" (in-domain) first, then out-of-domain sets

    @property
    def num_classes(self) -> int:
        return len(self.verbalizers)

    def query(self, example: Example) -> str:
        return self.template.format(**example.fields)

    def student_prompt(self, example: Example) -> str:
        if self.student_instruction:
            return self.student_instruction + self.separator + self.query(example)
        return self.query(example)

    def teacher_prompt(self, example: Example) -> str:
        return self.context + self.separator + self.query(example) if self.context else self.query(example)

    def prompt(self, example: Example, with_context: bool) -> str:
        return self.teacher_prompt(example) if with_context else self.student_prompt(example)


# ---------------------------------------------------------------- loading records
def _read_file(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}. Check dataset.source.data_files.")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        records = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not a JSON object per line ({e.msg})") from e
        return records
    if suffix in (".tsv", ".csv"):
        # GLUE-style TSVs contain stray quote characters: read them with quoting disabled.
        delimiter, quoting = ("\t", csv.QUOTE_NONE) if suffix == ".tsv" else (",", csv.QUOTE_MINIMAL)
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
            records = []
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    raise DataError(f"{path}:{reader.line_num}: expected {len(reader.fieldnames)} columns")
                records.append(row)
            return records
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .tsv or .csv")


def load_records(source: DictConfig, split: str) -> tuple[list[dict[str, Any]], str]:
    """The raw records of one split, and a description of where they came from."""
    if source.kind == "synthetic":
        size = source.split_sizes.get(split)
        if size is None:
            raise DataError(f"dataset.source.split_sizes has no size for split {split!r}")
        return get_method(source.generator)(num_examples=size, seed=source.seed, split=split), source.generator
    if source.kind == "files":
        if split not in source.data_files:
            raise DataError(f"dataset.source.data_files has no file for split {split!r} "
                            f"(has: {sorted(source.data_files)})")
        path = Path(source.data_files[split]).expanduser()
        return _read_file(path), str(path)
    import datasets  # slow import, only when the Hub is used

    where = f"{source.hub_id}" + (f"/{source.hub_config}" if source.hub_config else "") + f" [{split}]"
    try:
        return list(datasets.load_dataset(source.hub_id, source.hub_config, split=split)), where
    except Exception as e:  # noqa: BLE001 - network, missing split, missing dataset all end here
        raise DataError(f"could not load {where} with datasets.load_dataset: {e}. Without network, download it "
                        f"once where you have network, or give local files with dataset.source.kind=files "
                        f"and ++dataset.source.data_files.{split}=PATH") from e


def to_examples(records: list[dict[str, Any]], spec: DictConfig, label_map: Optional[DictConfig],
                where: str, prefix: str) -> list[Example]:
    examples = []
    for i, record in enumerate(records):
        missing = [f for f in [*spec.fields, spec.label_field] if f not in record]
        if missing:
            raise DataError(f"{where}: record {i} lacks field(s) {missing}; it has {sorted(record)}")
        raw = record[spec.label_field]
        if label_map:
            if str(raw) not in label_map:
                raise DataError(f"{where}: record {i} has unknown label {raw!r}; "
                                f"dataset label_map knows {sorted(label_map)}")
            label = int(label_map[str(raw)])
        else:
            label = int(raw)
        if not 0 <= label < len(spec.verbalizers):
            raise DataError(f"{where}: record {i} has label {label}, but there are "
                            f"{len(spec.verbalizers)} verbalizers")
        examples.append(Example(f"{prefix}-{i}", {f: str(record[f]) for f in spec.fields}, label))
    return examples


# ---------------------------------------------------------------- context and queries
def select_demos(pool: list[Example], k: int, balanced: bool, num_classes: int, rng: random.Random) -> list[Example]:
    """k demonstrations, k/num_classes per class when balanced, shuffled (seeded)."""
    if k > len(pool):
        raise DataError(f"dataset.context.num_demos={k} is larger than the training pool ({len(pool)} examples)")
    if not balanced:
        return rng.sample(pool, k)
    by_class = [[e for e in pool if e.label == c] for c in range(num_classes)]
    per_class = [k // num_classes + (1 if c < k % num_classes else 0) for c in range(num_classes)]
    for c, (have, need) in enumerate(zip(by_class, per_class)):
        if need > len(have):
            raise DataError(f"dataset.context.num_demos={k} needs {need} examples of class {c}, "
                            f"the training pool has {len(have)}")
    demos = [e for have, need in zip(by_class, per_class) for e in rng.sample(have, need)]
    rng.shuffle(demos)
    return demos


def render_context(spec: DictConfig, demos: list[Example]) -> str:
    shots = [spec.template.format(**d.fields) + spec.verbalizers[d.label] for d in demos]
    parts = ([spec.context.instruction] if spec.context.instruction else []) + shots
    return spec.context.separator.join(parts)


def build_task(spec: DictConfig, seed: int) -> Task:
    """Load the splits, draw the demonstrations and the unlabelled training queries (seeded)."""
    train_records, where = load_records(spec.source, spec.train_split)
    pool = to_examples(train_records, spec, spec.label_map, where, "train")
    rng = random.Random(seed)
    demos = select_demos(pool, spec.context.num_demos, spec.context.balanced, len(spec.verbalizers), rng)
    demo_ids = {d.uid for d in demos}
    rest = [e for e in pool if e.uid not in demo_ids]
    if spec.num_train_queries > len(rest):
        raise DataError(f"dataset.num_train_queries={spec.num_train_queries} is larger than the training pool "
                        f"left after the demonstrations ({len(rest)} examples)")
    # Distillation queries are unlabelled: the label is dropped here so no loss can read it.
    queries = [replace(e, label=None) for e in rng.sample(rest, spec.num_train_queries)]

    eval_records, where = load_records(spec.source, spec.eval_split)
    eval_sets = {"eval": to_examples(eval_records, spec, spec.label_map, where, "eval")[: spec.num_eval]}
    for ood in spec.ood:
        records, where = load_records(ood.source, ood.split)
        label_map = ood.label_map if ood.label_map is not None else spec.label_map  # OOD sets may relabel
        eval_sets[ood.name] = to_examples(records, spec, label_map, where, ood.name)[: ood.num_examples]
    return Task(
        name=spec.name,
        template=spec.template,
        verbalizers=list(spec.verbalizers),
        student_instruction=spec.student_instruction,
        context=render_context(spec, demos),
        separator=spec.context.separator,
        demos=demos,
        train_queries=queries,
        eval_sets=eval_sets,
    )
