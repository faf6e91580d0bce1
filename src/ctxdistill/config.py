"""Structured-config schemas for every config group, and value checks.

Each YAML file under ``conf/`` names its schema in its defaults list (``- base_cd``),
so a misspelt key or a wrong type fails while Hydra composes the config, before
any data or model is loaded. Checks that a type cannot express (a positive
learning rate, a known divergence) live in :func:`validate`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Collection, Iterator, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ctxdistill.data.tasks import balanced_counts


# ---------------------------------------------------------------- methods
def one_of(*allowed: Any, default: Any, fix: Optional[str] = None) -> Any:
    """A schema field whose value must be one of ``allowed`` (checked with the schema, see check_schema);
    ``fix`` says how to set it when that is not the field itself (a config group's option)."""
    return field(default=default, metadata={"one_of": allowed, "fix": fix})


@dataclass
class MethodConfig:
    """What every method's schema has. A method's schema is a subclass defined in its own module under
    ``ctxdistill.methods``, with its defaults (written once), its allowed values (:func:`one_of`), its
    checks (:meth:`check`) and its place among the config groups (the class variables below)."""

    _target_: str = MISSING
    name: str = MISSING
    #: the name the schema is registered under in the method group (its YAML files: defaults: [schema_name])
    schema_name: ClassVar[Optional[str]] = None
    #: the kinds of dataset the method runs on (None: it brings its own inputs and reads no dataset)
    dataset_kinds: ClassVar[Optional[tuple[str, ...]]] = ("classification", "generation")
    #: what to use instead when the dataset is of another kind
    dataset_example: ClassVar[str] = "dataset=synthetic"
    #: model.adapter values the method cannot train, and why
    refused_adapters: ClassVar[dict[str, str]] = {}
    #: settings that make the method what it is, set by its config file, each with what to run instead: another
    #: value given on the command line is refused (the run would be another method, recorded under this name)
    defining: ClassVar[dict[str, str]] = {}
    #: the model.architecture values of the model the method trains or runs (check_method refuses another)
    architectures: ClassVar[tuple[str, ...]] = ("causal_lm",)
    #: those of a separate teacher, any model config of its own (method.teacher_model, method.teacher): every
    #: teacher here writes or scores text token by token
    teacher_architectures: ClassVar[tuple[str, ...]] = ("causal_lm",)

    @classmethod
    def check(cls, m: DictConfig, cfg: DictConfig) -> None:
        """The method's checks that its types cannot express, before anything loads (raise ConfigError)."""

    @classmethod
    def check_training(cls, m: DictConfig, cfg: DictConfig) -> None:
        """Those of :meth:`check` that concern only how the method trains: an evaluation of a trained run
        (ctxdistill-eval, which trains nothing) skips them."""

    @classmethod
    def unread(cls, m: DictConfig) -> dict[str, str]:
        """The method's settings that its other settings leave unread, each with why: given on the command line,
        the run names them as ignored (a sweep over one would give rows that differ in name only)."""
        return {}


# ---------------------------------------------------------------- model
@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class TinyRandomSettings:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048


@dataclass
class ModelConfig:
    name: str = MISSING
    # hub: a Hub id or local directory; gguf: a GGUF file carried by a pip package;
    # random: a tiny randomly initialised model built from `tiny` (no download);
    # package: a Hugging Face model directory `package_dir` inside the installed pip package `package`.
    source: str = one_of("hub", "gguf", "random", "package", default="hub")
    name_or_path: str = MISSING
    # The model a bundled source (gguf, package, random) holds; a name_or_path naming another model loads
    # that one from the Hub or its local directory instead (an override is never ignored).
    bundles: Optional[str] = None
    revision: Optional[str] = None  # a Hub model's branch, tag or commit (null: the default branch)
    # The transformers Auto class: causal_lm (decoder LMs), masked_lm (BERT-like encoders), seq2seq_lm (T5, BART).
    architecture: str = one_of("causal_lm", "masked_lm", "seq2seq_lm", default="causal_lm")
    package: Optional[str] = None
    package_dir: Optional[str] = None
    gguf_package: Optional[str] = None
    gguf_file: Optional[str] = None
    # the package carries gguf_file in parts, which its assemble() joins and checks against its EXPECTED_SHA256
    gguf_assembled: bool = False
    pip_install: Optional[str] = None  # the command that installs gguf_package / package
    dtype: str = one_of("float32", "bfloat16", "float16", default="float32")
    attn_implementation: str = "sdpa"
    max_length: Optional[int] = None  # context window; default: the model config's
    # What a method that trains an adapter trains: lora | prefix (a trainable key/value prefix per layer,
    # initialised from the first prefix_tokens tokens of the teacher's context) | full (every weight).
    adapter: str = one_of("lora", "prefix", "full", default="lora")
    prefix_tokens: int = 32
    # positions at the prefix's head kept as initialised: Cartridges' default (num_frozen_tokens=1) keeps the
    # first, the attention sink, whose drift made their cartridges forget
    prefix_frozen_tokens: int = 1
    # Keep every n-th transformer layer (0, n, 2n, ...): a smaller student made from the model, the
    # DistilBERT initialisation (n=2 keeps half). 1 keeps them all.
    layer_stride: int = 1
    lora: LoraSettings = field(default_factory=LoraSettings)
    tiny: TinyRandomSettings = field(default_factory=TinyRandomSettings)


# ---------------------------------------------------------------- dataset
@dataclass
class SourceConfig:
    # synthetic: the project's generator; hub: datasets.load_dataset(hub_id, hub_config), or the
    # local files in `data_files` when `data_dir` is set; files: local files only.
    kind: str = one_of("synthetic", "hub", "files", default=MISSING)
    generator: Optional[str] = None
    generator_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the generator
    seed: int = 1234  # data generation seed, fixed across run seeds
    split_sizes: dict[str, int] = field(default_factory=dict)
    hub_id: Optional[str] = None
    hub_config: Optional[str] = None
    data_dir: Optional[str] = None  # a directory with the original files; data_files are relative to it
    data_files: dict[str, str] = field(default_factory=dict)  # split -> .jsonl/.json/.tsv/.csv file
    file: Optional[str] = None  # one local file read for the split instead of the Hub or data_dir/data_files
    rename: dict[str, str] = field(default_factory=dict)  # column -> template field (file layouts differ)
    where: dict[str, str] = field(default_factory=dict)  # keep only records with these column values
    # text columns hold Python bytes literals b'...' (llmft's PAWS-QQP), read as llmft reads them: the wrapper cut off
    bytes_literals: bool = False
    # How a local .tsv/.txt quotes its fields: none (GLUE's own files, whose quote characters are text) or csv
    # (an export written with CSV quoting: "..." wraps a field, "" is one quote). A .csv is always csv.
    quoting: str = one_of("none", "csv", default="none")
    subsample: Optional[int] = None  # keep this many records per split (numpy seed below), as llmft does
    subsample_seed: int = 123


@dataclass
class ContextConfig:
    instruction: str = ""
    num_demos: int = 8  # per context
    # Several contexts of num_demos disjoint demonstrations each, distilled simultaneously (Snell et al.
    # eq. 2): every query and eval example is taught by one of them, picked by a hash of its id.
    num_contexts: int = 1
    # One instruction per context, in place of ``instruction`` (as many as num_contexts): contexts that say
    # different things, e.g. contradicting instructions distilled one after another (Snell et al. §4).
    instructions: Optional[list[str]] = None
    # The label words of each context's demonstrations, in place of the dataset's verbalizers (as many as
    # num_contexts): a context that teaches another labelling. Evaluation keeps the dataset's verbalizers.
    demo_verbalizers: Optional[list[list[str]]] = None
    balanced: bool = True
    shuffle_demos: bool = True  # false: the drawn demonstrations in dataset order (Upadhayaya et al.'s code)
    separator: str = "\n\n"
    # Draws the demonstrations and queries (llmft's data_seed); null: the run's seed.
    data_seed: Optional[int] = None
    # How they are drawn: "python", a seeded random.Random; "llmft" and "in_context", the released code's numpy
    # draws (uds-lsv/llmft, upadraj/In-context), so that a seed picks their rows from the same split
    # (data.tasks.draw_as_released).
    draw: str = one_of("python", "llmft", "in_context", default="python")


@dataclass
class EvalSetConfig:
    """An out-of-domain evaluation set (conf/ood/NAME.yaml, at dataset.ood.NAME; NAME names its metrics)."""

    source: SourceConfig = field(default_factory=SourceConfig)
    split: str = "validation"
    label_map: Optional[dict[str, int]] = None  # default: the dataset's
    drop_labels: Optional[list[str]] = None  # default: the dataset's
    num_examples: Optional[int] = None
    # Which num_examples: null, the first rows in file order; a seed, the first rows after a shuffle with it
    # (numpy's default_rng(seed).permutation, what datasets' Dataset.shuffle(seed=...) does).
    shuffle_seed: Optional[int] = None
    group_by: Optional[str] = None  # a column whose values get their own accuracy (HANS: heuristic)
    # The set's query template, over the dataset's fields, with and without the context; null: the dataset's
    # (a set whose prompt names its own columns: Upadhayaya et al.'s HANS on RTE, conf/ood/hans_premise_hypothesis)
    template: Optional[str] = None


@dataclass
class PatternConfig:
    template: str = MISSING
    verbalizers: list[str] = MISSING
    demo_template: Optional[str] = None  # see DatasetConfig
    context_query_template: Optional[str] = None


@dataclass
class GenerationConfig:
    """Free-text answers scored by exact match of a generated answer, instead of a word per class."""

    demo_target: str = MISSING  # what follows a demonstration's query, over its fields: "{scratchpad}\n{answer}"
    # Group 1 is the final answer in a generation *with* the context (Snell's answer extractor f);
    # a generation without it (a direct answer) is its first line.
    answer_regex: str = "(.*)"
    max_new_tokens: int = 64  # budget of a generation with the context (a scratchpad and its answer)
    max_answer_tokens: int = 16  # budget of a direct answer
    stop: str = "\n\n"  # ends a generation with the context (a direct answer ends at its first newline)


@dataclass
class DatasetConfig:
    name: str = MISSING
    # classification: an answer word per class (verbalizers); generation: free-text answers, scored by
    # exact match of a generated answer (the generation block)
    kind: str = one_of("classification", "generation", default="classification")
    source: SourceConfig = field(default_factory=SourceConfig)
    fields: list[str] = MISSING  # template fields read from each record
    label_field: str = "label"
    label_map: dict[str, int] = field(default_factory=dict)  # raw label -> class; empty: labels are class ids
    drop_labels: list[str] = field(default_factory=list)  # raw labels whose records are left out
    # The class whose F1 every eval set reports beside accuracy (with its bootstrap interval), as GLUE scores a
    # paraphrase task (QQP, MRPC: 1, duplicate); null: accuracy only
    f1_positive: Optional[int] = None
    template: str = MISSING  # rendered query, ending in the answer cue
    verbalizers: list[str] = MISSING  # answer word per class, with its leading space
    # A demonstration's query before its answer word, and the query after the context; null: template.
    # (llmft renders its in-context prompts apart from its fine-tuning input.)
    demo_template: Optional[str] = None
    context_query_template: Optional[str] = None
    # Refuse a prompt whose answer would be scored as tokens the model never writes (see evaluation.
    # check_answer_tokenization); false reproduces prompts that do so on purpose (llmft's ICL query "? ").
    check_answer_tokens: bool = True
    # Named prompt patterns; template/verbalizers may interpolate the one `pattern` selects.
    pattern: Optional[str] = None
    patterns: dict[str, PatternConfig] = field(default_factory=dict)
    student_instruction: str = ""
    context: ContextConfig = field(default_factory=ContextConfig)
    train_split: str = "train"
    eval_split: str = "validation"
    num_train_queries: int = 64
    num_eval: Optional[int] = None
    eval_shuffle_seed: Optional[int] = None  # which num_eval rows, as an out-of-domain set's shuffle_seed
    ood: dict[str, EvalSetConfig] = field(default_factory=dict)  # the ood group's sets, by name
    # A local copy of HANS's heuristics_evaluation_set.txt (github.com/tommccoy1/hans), read by the HANS
    # out-of-domain sets instead of the Hub (whose copy is a loading script current datasets refuses).
    hans_file: Optional[str] = None
    generation: Optional[GenerationConfig] = None  # set: the label field holds free-text answers


@dataclass
class KGSourceConfig:
    layout: str = one_of("kgbert", "kgs2s", "plain", "synthetic", default=MISSING)
    data_dir: Optional[str] = None
    # Entity texts such as "stool, solid excretory product": the name is the part before this.
    name_separator: Optional[str] = None
    num_people: int = 60  # synthetic graph size
    seed: int = 1234  # synthetic graph generation seed


@dataclass
class KGDatasetConfig:
    name: str = MISSING
    kind: str = one_of("knowledge_graph", default="knowledge_graph")
    source: KGSourceConfig = field(default_factory=KGSourceConfig)
    num_train: Optional[int] = None  # training triples (seeded subsample); null: all
    eval_split: str = "test"
    num_eval: Optional[int] = None  # evaluation triples (seeded subsample); null: all
    # A split evaluated as its own set (named after it), e.g. valid, for trainer.selection; null: none
    validation_split: Optional[str] = None
    num_validation: Optional[int] = None  # its triples (seeded subsample); null: all
    # Ranking: null ranks against every entity (the paper's protocol); N against N sampled entities (CPU).
    eval_candidates: Optional[int] = None
    subsample_seed: int = 0
    # Contexts keyed by triple: written by the contextualization stage, read by the students' auxiliary task.
    contexts_file: Optional[str] = None
    # The KG-S2S directory whose entity2id.txt / relation2id.txt number the ids of a released
    # knowledge_context.txt; null: the contexts file's own directory (where the released writer puts it).
    contexts_id_dir: Optional[str] = None


@dataclass
class MixtureConfig:
    """A task mixture for in-context tuning (Huang et al. 2022): several classification datasets,
    each contributing a few-shot pool of labelled examples, from which every prompt draws its own
    k demonstrations."""

    name: str = MISSING
    kind: str = one_of("mixture", default="mixture")
    # multitask: train on a few examples of each task, evaluate on held-out queries of the same tasks.
    # meta: train on train_tasks, evaluate on eval_tasks, which training never sees.
    paradigm: str = "multitask"
    train_tasks: dict[str, DatasetConfig] = field(default_factory=dict)
    eval_tasks: dict[str, DatasetConfig] = field(default_factory=dict)  # meta only
    weights: dict[str, float] = field(default_factory=dict)  # sampling weight per training task (default 1)
    num_demos: int = 4  # k demonstrations in every prompt (training and evaluation)
    pool_size: int = 32  # n labelled examples per task: the training queries and every demonstration
    num_train_instances: int = 256  # (query, k demonstrations) training prompts, spread over tasks by weight
    num_votes: int = 1  # m: each held-out query is answered m times with fresh demonstrations, majority wins
    num_eval: int = 64  # held-out queries per evaluated task
    data_seed: Optional[int] = None  # draws the pools, demonstrations and queries; null: the run's seed


# ---------------------------------------------------------------- trainer / logger
@dataclass
class DistributedConfig:
    """How several processes (``accelerate launch`` / ``torchrun``) share the model."""

    # ddp: a full copy per process; fsdp: FSDP2 shards weights, gradients and optimiser state;
    # zero3: DeepSpeed ZeRO stage 3 (pip install deepspeed). One process: all are plain runs.
    strategy: str = one_of("ddp", "fsdp", "zero3", default="ddp", fix="Use trainer/distributed=ddp, fsdp or zero3")
    cpu_offload: bool = False  # fsdp/zero3: keep sharded parameters and optimiser state in CPU memory


@dataclass
class SelectionConfig:
    """Which trained checkpoint is tested: the final one, or the best on a validation set."""

    # {set}/{metric} of a declared metric of an eval set the run has, e.g. valid/mrr (a knowledge graph's
    # dataset.validation_split); null: the final model is tested
    metric: Optional[str] = None
    every_epochs: int = 1  # evaluated after epochs N, 2N, ... (Lightning's check_val_every_n_epoch)
    skip_epochs: int = 0  # ... but after none of the first M (KG-S2S's -skip_n_val_epoch)


@dataclass
class TrainerConfig:
    epochs: int = 3
    max_steps: Optional[int] = None  # overrides epochs when set
    # Epochs the LR schedule spans; null: the training length. Longer than epochs: training stops part-way
    # down the schedule (Li et al.'s released KG-BERT WN18RR script evaluates epoch 3 of a 5-epoch run).
    schedule_epochs: Optional[int] = None
    batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    # a transformers.get_scheduler name that needs no further arguments (the *_min_lr and warmup_stable_decay ones
    # do) and steps without a metric (reduce_lr_on_plateau and greedy do not)
    scheduler: str = one_of(
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
        "inverse_sqrt",
        default="linear",
    )
    warmup_ratio: float = 0.1
    # Optimiser steps the LR holds for before the schedule moves on, counted from each epoch's start (an epoch's
    # last group may be shorter); the schedule's length and warmup count these groups. Upadhayaya et al.'s
    # released code: 32, its schedule stepped once per "batch" of 32 examples at one optimiser step each.
    steps_per_lr_update: int = 1
    max_grad_norm: Optional[float] = 1.0
    shuffle: bool = True  # a new (seeded) order of the examples every epoch; false: the same order every epoch
    mixed_precision: str = one_of("no", "bf16", "fp16", default="no")  # fp16: GPU only
    # torch.compile the student's training passes (the passes with gradients; teacher, evaluation and generation
    # stay eager). The first step compiles (1-3 min for SmolLM2 on 2 CPU cores), every later one runs 1.1-1.3x
    # faster there: worth it for runs of thousands of steps (docs/performance.md).
    compile: bool = False
    eval_every: Optional[int] = None  # steps between periodic evaluations of the in-domain set
    # Evaluate every set (out-of-domain too) after each epoch but the last (whose evaluation is the final
    # one); periodic evaluations are saved as metrics.json's "curves" (llmft evaluates every epoch).
    eval_every_epoch: bool = False
    # The checkpoint tested: the best one on a validation set (KG-S2S's released protocol) or the final one
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    eval_batch_size: int = 16
    # Evaluate the trained model in train mode, dropout on, its masks drawn from the run's seed: Upadhayaya et
    # al.'s released code never calls model.eval() after training. The frozen teacher stays in eval mode.
    evaluate_with_dropout: bool = False
    save_model: bool = True
    # Resumable state every N optimiser steps and at the end of training (null: only on
    # SIGTERM/SIGUSR1). The run dir's checkpoints/ is removed once metrics.json is written.
    checkpoint_every: Optional[int] = 100
    keep_checkpoints: int = 1
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


@dataclass
class LoggerConfig:
    backend: str = one_of("wandb", "none", default="wandb", fix="Use logger=wandb or logger=none")
    project: str = "ctxdistill"
    entity: Optional[str] = None
    # auto: online if logged in, else offline
    mode: str = one_of("auto", "online", "offline", "disabled", default="auto")
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    job_type: str = "train"
    log_predictions: bool = True


@dataclass
class Config:
    method: Any = MISSING
    model: ModelConfig = MISSING
    dataset: Any = MISSING  # DatasetConfig or KGDatasetConfig
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    seed: int = 0
    output_dir: Optional[str] = "${hydra:runtime.output_dir}"  # None while Hydra only prints (--cfg)
    cache_dir: str = "${oc.env:CTXDISTILL_CACHE,'~/.cache/ctxdistill'}"
    paper: Optional[str] = None
    # A run whose output dir already holds a complete metrics.json is skipped (a re-run sweep
    # finishes only its missing cells); force=true runs it again and overwrites it.
    force: bool = False


SCHEMAS = {
    "model": {"base_model": ModelConfig},
    "dataset": {"base_dataset": DatasetConfig, "base_kg_dataset": KGDatasetConfig, "base_mixture": MixtureConfig},
    "ood": {"base_ood": EvalSetConfig},
    "trainer": {"base_trainer": TrainerConfig},
    "logger": {"base_logger": LoggerConfig},
}


def register_schemas() -> None:
    """Every schema in Hydra's ConfigStore: the groups' here, each method's from its own module."""
    from ctxdistill.methods import method_schemas

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, nodes in SCHEMAS.items():
        for name, node in nodes.items():
            cs.store(group=group, name=name, node=node)
    for schema in method_schemas():
        cs.store(group="method", name=schema.schema_name, node=schema)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def nearest_key(key: str, schema: type) -> str:
    """ ", did you mean X?" for the field of ``schema`` closest to ``key`` ("" if none is close)."""
    import dataclasses
    import difflib

    names = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []
    match = difflib.get_close_matches(key, names, n=1)
    if match:
        return f"; did you mean {match[0]}?"
    return f"; it has {', '.join(names)}" if names else ""


def check_schema(node: Any, path: str = "") -> None:
    """What a schema declares beyond types: every key of a schema-backed node is one of its fields (a key
    added with `+key=value` bypasses the schema, so a misspelt one would be silently ignored; dict-typed
    settings such as label maps and file lists are open-ended), and a :func:`one_of` field holds one of
    its allowed values."""
    import dataclasses

    if not isinstance(node, DictConfig):
        if OmegaConf.is_list(node):
            for i, item in enumerate(node):
                check_schema(item, f"{path}.{i}")
        return
    schema = OmegaConf.get_type(node)
    fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        full = f"{path}.{key}" if path else str(key)
        if fields is not None and key not in fields:
            raise ConfigError(
                f"{full}: no such setting{nearest_key(str(key), schema)} (a key added with + is "
                "not checked by Hydra, so a misspelt one would be ignored)"
            )
        if OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
            continue
        metadata = fields[key].metadata if fields is not None else {}
        allowed = metadata.get("one_of")
        if allowed is not None and node[key] not in allowed:
            fix = metadata["fix"] or f"Use one of: {', '.join(map(str, allowed))}"
            raise ConfigError(f"{full}: unknown value {node[key]!r}. {fix}")
        check_schema(node[key], full)


def require(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}. {fix}")


def require_count(value: Optional[int], key: str, fix: str = "") -> None:
    """A count or size that is at least 1, or null (which the setting's comment says what it means)."""
    require(value is None or value >= 1, key, f"must be >= 1 or null, got {value}", fix)


def _template_fields(template: str, key: str) -> set[str]:
    """The field names a str.format template reads ({premise}, {0} ...)."""
    import string

    try:
        return {name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(template) if name}
    except ValueError as e:
        raise ConfigError(f"{key}: {template!r} is not a format string ({e}). Double literal braces: {{{{ }}}}") from e


def require_seed(value: Optional[int], key: str) -> None:
    """A seed that numpy accepts too (``null`` where the setting allows it)."""
    require(value is None or 0 <= value < 2**32, key, f"must be in [0, 2**32), got {value}", f"Set e.g. {key}=0")


def _validate_source(source: DictConfig, key: str) -> None:
    """Checks of the records' source found at ``key`` (``dataset.source``, an out-of-domain set's)."""
    empty = sorted(split for split, size in source.split_sizes.items() if size < 1)
    require(
        not empty,
        f"{key}.split_sizes",
        f"{', '.join(f'{split}={source.split_sizes[split]}' for split in empty)}: a split must hold at least one "
        "example",
        "Give each split a size >= 1",
    )
    require_count(source.subsample, f"{key}.subsample", "null keeps every record")
    require_seed(source.seed, f"{key}.seed")
    require_seed(source.subsample_seed, f"{key}.subsample_seed")


def _validate_classification(d: DictConfig, key: str) -> None:
    """Checks of a classification or generation dataset config found at ``key`` (``dataset``, or a mixture's
    task)."""
    # first: the verbalizers and templates interpolate the pattern's, and an unknown one fails to resolve
    require(
        d.pattern is None or d.pattern in d.patterns,
        f"{key}.pattern",
        f"unknown pattern {d.pattern!r}",
        f"Use one of: {', '.join(d.patterns)}",
    )
    require(
        (d.kind == "generation") == (d.generation is not None),
        f"{key}.kind",
        f"is {d.kind}, and the config {'has' if d.generation is not None else 'has no'} generation block",
        "kind: generation goes with a generation block (free-text answers), kind: classification without one",
    )
    require(
        d.f1_positive is None or (d.kind == "classification" and 0 <= d.f1_positive < len(d.verbalizers)),
        f"{key}.f1_positive",
        f"is {d.f1_positive}, not a class of this {d.kind} task",
        f"name a class id, 0 to {len(d.verbalizers) - 1} (the verbalizers' order), or null for accuracy alone"
        if d.kind == "classification"
        else "leave it null: a generated answer has no classes",
    )
    require(d.context.num_demos >= 0, f"{key}.context.num_demos", f"must be >= 0, got {d.context.num_demos}", "")
    require(
        d.context.num_contexts >= 1, f"{key}.context.num_contexts", f"must be >= 1, got {d.context.num_contexts}", ""
    )
    require(
        d.context.instructions is None or len(d.context.instructions) == d.context.num_contexts,
        f"{key}.context.instructions",
        f"gives {len(d.context.instructions or [])} instructions for {d.context.num_contexts} contexts",
        f"Set {key}.context.num_contexts to the number of instructions",
    )
    per_context = d.context.demo_verbalizers
    require(
        per_context is None
        or (len(per_context) == d.context.num_contexts and all(len(v) == len(d.verbalizers) for v in per_context)),
        f"{key}.context.demo_verbalizers",
        f"needs one list of {len(d.verbalizers)} label words per context ({d.context.num_contexts})",
        f"Give {d.context.num_contexts} lists like {list(d.verbalizers)}",
    )
    require(
        d.context.draw == "python" or d.context.num_contexts == 1,
        f"{key}.context.draw",
        f"is {d.context.draw}, which draws one context, and num_contexts is {d.context.num_contexts}",
        f"Set {key}.context.draw=python for several contexts",
    )
    require(d.num_train_queries >= 1, f"{key}.num_train_queries", f"must be >= 1, got {d.num_train_queries}", "")
    _validate_source(d.source, f"{key}.source")
    require_seed(d.context.data_seed, f"{key}.context.data_seed")
    require_seed(d.eval_shuffle_seed, f"{key}.eval_shuffle_seed")
    require_count(d.num_eval, f"{key}.num_eval", f"Or {key}.num_eval=null to evaluate on every row")
    require(
        d.generation is not None or len(d.verbalizers) >= 2,
        f"{key}.verbalizers",
        "needs one answer word per class (at least two)",
        "Or give free-text answers a dataset.generation",
    )
    shared = [(i, j) for j, word in enumerate(d.verbalizers) for i in range(j) if d.verbalizers[i] == word]
    require(
        d.generation is not None or not shared,
        f"{key}.verbalizers",
        f"{d.verbalizers[shared[0][1]]!r} answers classes {shared[0][0]} and {shared[0][1]}" if shared else "",
        "Give each class its own answer word: scored by the same word, the classes cannot be told apart",
    )
    require(
        d.eval_split != d.train_split,
        f"{key}.eval_split",
        f"is the training split ({d.train_split}): the demonstrations and training queries are drawn from it, so "
        "the evaluation would score examples the model saw",
        f"Set {key}.eval_split to a held-out split",
    )
    for name, ood in d.ood.items():
        # what an experiment sets for a set that ood=[...] then leaves out is a set without a source
        require(
            not OmegaConf.is_missing(ood.source, "kind"),
            f"{key}.ood.{name}",
            "has settings but no source: the set is not selected",
            f"Select it (ood=[...,{name}]; the sets are conf/ood/*.yaml), or leave it out whole: ~dataset.ood.{name}",
        )
        _validate_source(ood.source, f"{key}.ood.{name}.source")
        require_seed(ood.shuffle_seed, f"{key}.ood.{name}.shuffle_seed")
        require_count(
            ood.num_examples,
            f"{key}.ood.{name}.num_examples",
            f"null evaluates every row; ~{key}.ood.{name} leaves the set out",
        )
        try:  # a set maps its columns onto the dataset's fields (HANS: two of them)
            OmegaConf.to_container(ood, resolve=True)
        except OmegaConfBaseException as e:
            problem = str(e).splitlines()[0]
            raise ConfigError(
                f"{key}.ood.{name}: does not fit dataset {d.name} ({problem}). Select sets made for its fields "
                f"{list(d.fields)}, or give the set its own rename"
            ) from None
    templates = {
        "template": d.template,
        "demo_template": d.demo_template,
        "context_query_template": d.context_query_template,
        "generation.demo_target": d.generation.demo_target if d.generation is not None else None,
        **{f"ood.{name}.template": ood.template for name, ood in d.ood.items()},
    }
    for name, text in templates.items():
        unknown = sorted(_template_fields(text, f"{key}.{name}") - set(d.fields)) if text else []
        require(
            not unknown,
            f"{key}.{name}",
            f"{text!r} names the field(s) {unknown}, which the records do not "
            f"give; they give {list(d.fields)} ({key}.fields)",
            f"Use those names, or add the field to {key}.fields (mapping a column with {key}.source.rename)",
        )
    if d.generation is not None:
        import re

        try:
            groups = re.compile(d.generation.answer_regex).groups
        except re.error as e:
            groups = f"invalid ({e})"
        require(
            groups == 1,
            f"{key}.generation.answer_regex",
            f"needs exactly one group, got {groups}",
            "Mark the answer with one (...) group, e.g. '</scratch>\\s*(.+)'",
        )
        require(
            d.generation.max_new_tokens >= 1 and d.generation.max_answer_tokens >= 1,
            f"{key}.generation",
            "max_new_tokens and max_answer_tokens must be >= 1",
            "",
        )


def unread_beta(m: DictConfig) -> dict[str, str]:
    """``method.beta`` as unread where the method's divergence does not mix (see MethodConfig.unread): the schemas
    with a divergence and a JSD weight share it."""
    if m.divergence == "jsd" or m.get("uld_hybrid"):
        return {}
    return {"method.beta": f"method.beta weighs divergence=jsd's mixture (method.divergence={m.divergence})"}


@dataclass
class SeparateTeacher:
    """The settings of a method that another model may teach, one from another model family too (cd,
    on_policy_cd); a schema mixes them in, and its check calls :meth:`check_separate_teacher`."""

    # another model as the frozen teacher (model@method.teacher_model=NAME); null: the student's base weights
    teacher_model: Optional[ModelConfig] = None
    # with divergence=uld: GOLD's hybrid (TRL's uld_use_hybrid_loss): the tokens both vocabularies spell alike are
    # compared directly by the generalised JSD (method.beta), only the others by the sorted distance
    uld_hybrid: bool = False
    # [shared, other]: the weights of those two terms; null: GOLD's adaptive weights (the share of the teacher's
    # vocabulary that the student's shares, and the rest)
    uld_hybrid_weights: Optional[list[float]] = None
    # with divergence=uld: the weight of the cross-entropy on the distilled text in the student's tokens, the term
    # that says which tokens (the sorted comparison forgets it); Boizard et al. add it at 1, TRL's GOLD at 0
    uld_crossentropy_weight: float = 1.0

    @classmethod
    def check_separate_teacher(cls, m: DictConfig) -> None:
        """GOLD's hybrid settings and the cross-entropy's weight belong to divergence=uld (the teacher is checked
        as every model config, its architecture by check_method)."""
        require(
            m.divergence == "uld" or not m.uld_hybrid,
            "method.uld_hybrid",
            f"is a variant of divergence=uld (method.divergence={m.divergence})",
            "Set method.divergence=uld, or method.uld_hybrid=false",
        )
        require(m.uld_crossentropy_weight >= 0, "method.uld_crossentropy_weight", "must be non-negative", "")
        default_weight = cls.uld_crossentropy_weight
        require(
            m.divergence == "uld" or m.uld_crossentropy_weight == default_weight,
            "method.uld_crossentropy_weight",
            f"weights a term of divergence=uld only (method.divergence={m.divergence})",
            f"Set method.divergence=uld, or leave method.uld_crossentropy_weight at {default_weight}",
        )
        weights = m.uld_hybrid_weights
        require(
            weights is None or (m.uld_hybrid and len(weights) == 2 and min(weights) >= 0),
            "method.uld_hybrid_weights",
            f"must be two non-negative weights [shared, other] of method.uld_hybrid=true, got {weights} "
            f"(uld_hybrid={m.uld_hybrid})",
            "Set method.uld_hybrid=true method.uld_hybrid_weights=[1.0,1.0], or leave the weights at null "
            "(GOLD's adaptive weights)",
        )


#: What each ``model.source`` reads beyond the settings every source reads: (needed, optional). A setting of another
#: source is refused, not ignored (``pip_install`` is not one: it is the text of the install hint).
SOURCE_SETTINGS = {
    "hub": ((), ("revision",)),
    "gguf": (("gguf_package", "gguf_file"), ("gguf_assembled",)),
    "package": (("package", "package_dir"), ()),
    "random": (("gguf_package", "gguf_file"), ("gguf_assembled", "tiny")),  # its tokenizer is the GGUF file's
}
#: A model config of each source, to copy from
SOURCE_EXAMPLES = {"hub": "opt-125m", "gguf": "smollm2-135m", "package": "minilm-l6", "random": "tiny-random"}
#: The settings a source reads for one architecture but not for another, and why: the random T5 has no
#: grouped-query attention (every head has its own keys and values)
ARCHITECTURE_UNREAD = {
    ("random", "seq2seq_lm"): {"tiny.num_key_value_heads": "its T5 has no grouped-query attention"},
}


def override_text(value: Any) -> str:
    """``value`` as an override writes it (null, true, 3, [q_proj,v_proj], ' positive': quoted where Hydra's grammar
    would read it otherwise)."""
    import re

    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return f"[{','.join(map(override_text, value))}]"
    text = str(value)
    return text if isinstance(value, (int, float)) or re.fullmatch(r"[\w./:@+-]+", text) else repr(text)


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The keys the overrides set (``+model.lora.r=4``: ``model.lora.r``)."""
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides]


def loads_from(spec: DictConfig) -> str:
    """The source the model loads from: its own, but the Hub (or a local directory) where a bundled model's config
    names another model (``name_or_path`` is not what it ``bundles``; models.honour_name_or_path switches it)."""
    return "hub" if spec.bundles and spec.name_or_path != spec.bundles else spec.source


def model_file(name: str) -> Optional[DictConfig]:
    """The model config NAME (conf/model/NAME.yaml, or one of a run's own config directories) composed alone: what
    its file and the files it builds on set, before an experiment or the command line changes it; None where no
    model config has that name."""
    import warnings

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    from ctxdistill.cli import CONFIG_DIR

    def composed() -> Optional[DictConfig]:
        with warnings.catch_warnings():  # a model file's defaults list is written for the whole config
            warnings.filterwarnings("ignore", message=r"In 'model/.*': Defaults list is missing `_self_`")
            return compose(f"model/{name}").get("model")

    try:
        if GlobalHydra.instance().is_initialized():  # a run's search path, with its own config directories
            return composed()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return composed()
    except MissingConfigException:
        return None


def table_label(spec: DictConfig) -> str:
    """How tables name the model a run loads: its config's name, or the ``name_or_path`` it loads where that is not
    the model its config's file names (model=tiny-random model.name_or_path=DIR is DIR's run, not tiny-random's; a
    ``model.name`` that names no model file is the user's own label and kept)."""
    own = model_file(spec.name)
    return spec.name if own is None or own.name_or_path == spec.name_or_path else spec.name_or_path


def model_label(spec: DictConfig, key: str = "model") -> str:
    """The model ``spec`` loads, as a message about it names it: its config (model=bert-base-cased), and the model it
    loads where ``name_or_path`` is not its model file's (model=bert-base-cased (model.name_or_path=DIR))."""
    own = model_file(spec.name)
    if own is not None and own.name_or_path == spec.name_or_path:
        return f"{key}={spec.name}"
    return f"{key}={spec.name} ({key}.name_or_path={spec.name_or_path})"


def check_model_source(spec: DictConfig, key: str, given: Collection[str] = ()) -> None:
    """The model's source has the settings it needs, and no setting that only another source reads: such a
    setting (model.gguf_file on a Hub model, model.revision on a bundled one) would be silently ignored.
    ``given``: the keys the command line set."""
    source = loads_from(spec)
    elsewhere = bool(spec.bundles) and source == "hub"
    needed, optional = SOURCE_SETTINGS[source]
    read = {*needed, *optional}
    require(
        source != "hub" or spec.revision is None or not os.path.isdir(os.path.expanduser(spec.name_or_path)),
        f"{key}.revision",
        f"{key}.name_or_path={spec.name_or_path} is a local directory, which has no revisions (got {spec.revision})",
        f"Leave {key}.revision out: it pins a Hub model's branch, tag or commit",
    )
    if elsewhere:
        # a bundled model's config naming another model loads it from the Hub or its directory
        # (honour_name_or_path): its file's bundled-source settings describe the bundled model and go unread, and
        # one set anywhere else (or its model.source) is refused
        if spec.source == "hub":
            loads = f"{key}={spec.name} loads {spec.name_or_path} from the Hub or its directory ({key}.source=hub)"
            bundled = f"{key}.source out to load the bundled model"
        else:
            loads = (
                f"{key}={spec.name} loads {spec.name_or_path} from the Hub or its directory (not the model it "
                f"bundles, {spec.bundles})"
            )
            bundled = f"{key}.name_or_path at {spec.bundles} to load the bundled model"
        unread = {name.split(".")[0] for name in source_setting_defaults()} - read
        set_apart = [k.removeprefix(f"{key}.") for k in given if k.startswith(f"{key}.")]
        # set in an experiment (any file but the model's own): a value other than the model file's
        own = model_file(spec.name)
        if own is not None and own.bundles == spec.bundles:
            compared = ["source", *source_setting_defaults()]
            set_apart += [name for name in compared if OmegaConf.select(spec, name) != OmegaConf.select(own, name)]
        for setting in set_apart:
            if setting == "source" and spec.source != "hub":
                raise ConfigError(f"{key}.source: {loads}, not from source {spec.source}. Leave it out, or {bundled}")
            if setting.split(".")[0] in unread:
                raise ConfigError(f"{key}.{setting}: {loads}, which does not read it. Leave it out, or {bundled}")
        return
    example = SOURCE_EXAMPLES[source]
    # a bundled source loads what its package (or the random initialisation) holds: name_or_path only says which model
    # that is (bundles); a config that names no bundled model, a Hub config given another source, would ignore it
    require(
        source == "hub" or spec.bundles,
        f"{key}.source",
        f"{key}={spec.name} names no bundled model ({key}.bundles is unset), so source {source} would load what "
        f"{'its package holds' if source != 'random' else 'it initialises at random'} and ignore {key}.name_or_path="
        f"{spec.name_or_path}",
        f"Leave {key}.source at hub to load {spec.name_or_path}, or use a model of source {source}, as "
        f"conf/model/{example}.yaml is (its {key}.bundles names the model it holds)",
    )
    for setting in needed:
        require(
            spec[setting] is not None,
            f"{key}.{setting}",
            f"{key}.source={source} needs it, and it is unset",
            f"Set it as conf/model/{example}.yaml does, or load a Hub id or a local directory: {key}.source=hub "
            f"{key}.name_or_path=...",
        )
    unread_here = ARCHITECTURE_UNREAD.get((source, spec.architecture), {})
    for name, default in source_setting_defaults().items():
        setting = name.split(".")[0]
        value = OmegaConf.select(spec, name)
        if (setting in read and name not in unread_here) or value == default:
            continue
        if name in unread_here:
            raise ConfigError(
                f"{key}.{name}: {key}={spec.name} (source {source}, architecture {spec.architecture}) does not read "
                f"it (got {override_text(value)}): {unread_here[name]}. Leave it at {key}.{name}="
                f"{override_text(default)}, or use a random causal LM, as conf/model/{example}.yaml is"
            )
        readers = [source for source, settings in SOURCE_SETTINGS.items() if setting in {*settings[0], *settings[1]}]
        raise ConfigError(
            f"{key}.{name}: {key}={spec.name} has source {spec.source}, which does not read it (got "
            f"{override_text(value)}); only source {' or '.join(readers)} does. Leave it at {key}.{name}="
            f"{override_text(default)}, or use a model of source {readers[0]}, as conf/model/"
            f"{SOURCE_EXAMPLES[readers[0]]}.yaml is"
        )


def source_setting_defaults() -> dict[str, Any]:
    """The schema's default of every setting in SOURCE_SETTINGS, by its key under ``model`` (the random model's sizes
    one by one)."""
    names = {s for needed, optional in SOURCE_SETTINGS.values() for s in (*needed, *optional)}
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in names - {"tiny"}}
    return defaults | {f"tiny.{f.name}": f.default for f in dataclasses.fields(TinyRandomSettings)}


def model_configs(cfg: DictConfig) -> Iterator[tuple[str, DictConfig]]:
    """Every model config of the run, by its key: the model, and the method's others (a separate teacher)."""
    yield "model", cfg.model
    for name in cfg.method:
        if OmegaConf.is_missing(cfg.method, name):  # the method's own check names what it lacks
            continue
        node = cfg.method[name]
        if isinstance(node, DictConfig) and OmegaConf.get_type(node) is ModelConfig:
            yield f"method.{name}", node


def check_attention(spec: DictConfig, key: str) -> None:
    """``attn_implementation`` is one transformers knows (or a Hub kernel, namespace/name), and a FlashAttention one
    (or flex_attention, which needs CUDA) can run here: either would otherwise be a traceback from transformers once
    the model loads."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available, is_flash_attn_4_available

    from ctxdistill import prefix_attention

    attention = spec.attn_implementation
    # the suite's own attention (scoring against a shared prefix) is called with the prefix, never set on a model
    known = ["eager", *sorted(set(ALL_ATTENTION_FUNCTIONS.valid_keys()) - {prefix_attention.NAME})]
    require(
        attention in known or "/" in attention,
        f"{key}.attn_implementation",
        f"unknown value {attention!r}",
        f"Use one of: {', '.join(known)}; or a Hub kernel (namespace/name)",
    )
    flash = {
        "flash_attention_2": is_flash_attn_2_available,
        "flash_attention_3": is_flash_attn_3_available,
        "flash_attention_4": is_flash_attn_4_available,
    }
    require(
        attention not in flash or flash[attention](kernels_fallback_ok=True),
        f"{key}.attn_implementation",
        f"{attention} needs a CUDA GPU and its FlashAttention package, and transformers finds none usable here",
        f"Use {key}.attn_implementation=sdpa (the default), or install FlashAttention on a GPU machine (pip install "
        "flash-attn, for flash_attention_2)",
    )
    import torch

    # transformers always runs flex_attention through torch.compile; on the CPU, inductor's flex-attention template
    # writes C++ that does not compile for the suite's prompts (torch 2.13: "'cur_qSplitSize0' was not declared"),
    # a traceback minutes into the run, after the model loads
    require(
        attention != "flex_attention" or torch.cuda.is_available(),
        f"{key}.attn_implementation",
        "flex_attention is compiled by torch.compile, and on a machine without a CUDA GPU (this one) its CPU kernel "
        "fails to compile mid-run",
        f"Use {key}.attn_implementation=sdpa (the default) on the CPU; flex_attention on a CUDA GPU",
    )


def validate_model(spec: DictConfig, key: str, given: Collection[str] = ()) -> None:
    """Checks of a model config found at ``key`` (``model``, or a method's separate teacher); ``given``: the keys
    the command line set."""
    check_model_source(spec, key, given)
    check_attention(spec, key)
    require(spec.prefix_tokens >= 1, f"{key}.prefix_tokens", f"must be >= 1, got {spec.prefix_tokens}", "")
    require(
        0 <= spec.prefix_frozen_tokens < spec.prefix_tokens,
        f"{key}.prefix_frozen_tokens",
        f"must be in [0, model.prefix_tokens={spec.prefix_tokens}), got {spec.prefix_frozen_tokens}",
        "At least one position of the prefix must be trained",
    )
    require(spec.lora.r >= 1, f"{key}.lora.r", f"must be >= 1, got {spec.lora.r}", "Or model.adapter=full")
    require(
        spec.lora.alpha > 0,
        f"{key}.lora.alpha",
        f"must be positive, got {spec.lora.alpha}",  # 0 scales the adapter's update, so training, to nothing
        "LoRA scales its update by alpha / r; e.g. model.lora.alpha=32 (twice model.lora.r)",
    )
    require(
        len(spec.lora.target_modules) > 0,
        f"{key}.lora.target_modules",
        "is empty: LoRA would adapt no layer",
        "Name the linear layers to adapt, e.g. model.lora.target_modules=[q_proj,v_proj], or use model.adapter=full",
    )
    require_count(  # 0 would silently mean the model's own window
        spec.max_length,
        f"{key}.max_length",
        "It is the context window in tokens; null reads it from the model's config",
    )
    if loads_from(spec) == "random":
        require(
            spec.architecture != "masked_lm",
            f"{key}.architecture",
            f"{key}.source=random builds causal_lm or seq2seq_lm models, not masked_lm",
            "Use a real encoder (e.g. model=minilm-l6)",
        )
        tiny = spec.tiny
        small = sorted(name for name, value in tiny.items() if value < 1)
        require(
            not small,
            f"{key}.tiny",
            f"{', '.join(f'{name}={tiny[name]}' for name in small)}: every size of the random model must be >= 1",
            "Keep the sizes of conf/model/tiny-random.yaml, or raise these",
        )
        require(
            tiny.hidden_size % tiny.num_attention_heads == 0,
            f"{key}.tiny.num_attention_heads",
            f"{tiny.num_attention_heads} does not divide tiny.hidden_size={tiny.hidden_size} (each head gets an "
            "equal share of it)",
            f"Use a divisor of {tiny.hidden_size}, or change tiny.hidden_size",
        )
        require(
            spec.architecture != "causal_lm" or tiny.num_attention_heads % tiny.num_key_value_heads == 0,
            f"{key}.tiny.num_key_value_heads",
            f"{tiny.num_key_value_heads} does not divide tiny.num_attention_heads={tiny.num_attention_heads} "
            "(grouped-query attention shares each key/value head among a group of query heads)",
            f"Use a divisor of {tiny.num_attention_heads}",
        )
    require(0 <= spec.lora.dropout < 1, f"{key}.lora.dropout", f"must be in [0, 1), got {spec.lora.dropout}", "")
    require(
        spec.layer_stride >= 1,
        f"{key}.layer_stride",
        f"must be >= 1, got {spec.layer_stride}",
        "1 keeps every layer, 2 every other one",
    )


def _validate_mixture(d: DictConfig) -> None:
    require(
        d.paradigm in ("multitask", "meta"),
        "dataset.paradigm",
        f"unknown value {d.paradigm!r}",
        "Use multitask or meta",
    )
    require(
        len(d.train_tasks) > 0,
        "dataset.train_tasks",
        "is empty",
        "Add tasks, e.g. - /dataset@train_tasks.NAME: synthetic",
    )
    for group in ("train_tasks", "eval_tasks"):
        for name, task in d[group].items():
            _validate_classification(task, f"dataset.{group}.{name}")
            require(
                task.generation is None,
                f"dataset.{group}.{name}",
                "has free-text answers; a task mixture is scored by answer words (verbalizers) and majority vote",
                "Use classification datasets",
            )
    unknown = sorted(set(d.weights) - set(d.train_tasks))
    require(
        not unknown,
        "dataset.weights",
        f"names tasks that are not training tasks: {unknown}",
        f"Use names from dataset.train_tasks: {sorted(d.train_tasks)}",
    )
    require(
        all(w > 0 for w in d.weights.values()),
        "dataset.weights",
        "must be positive",
        "Leave a task out of dataset.train_tasks instead of giving it weight 0",
    )
    if d.paradigm == "multitask":
        require(
            len(d.eval_tasks) == 0,
            "dataset.eval_tasks",
            "multitask in-context tuning evaluates on its training tasks",
            "Set dataset.paradigm=meta to evaluate on other tasks",
        )
    else:
        require(
            len(d.eval_tasks) > 0,
            "dataset.eval_tasks",
            "meta in-context tuning needs target tasks",
            "Add tasks, e.g. - /dataset@eval_tasks.NAME: synthetic_temperature",
        )
        for name, task in d.eval_tasks.items():
            same = [
                train_name
                for train_name, train in d.train_tasks.items()
                if train_name == name or train.source == task.source  # the same rows, whatever its name
            ]
            require(
                not same,
                f"dataset.eval_tasks.{name}",
                f"is also a training task ({same}); Meta-ICT evaluates only on tasks absent from training",
                "Remove it from one of the two lists",
            )
    require(d.num_demos >= 1, "dataset.num_demos", f"must be >= 1, got {d.num_demos}", "")
    require(
        d.pool_size > d.num_demos,
        "dataset.pool_size",
        f"must exceed dataset.num_demos ({d.num_demos}): a "
        f"training query draws its demonstrations from the rest of its pool, got {d.pool_size}",
        "",
    )
    for name, task in d.train_tasks.items():
        if not task.context.balanced:
            continue
        # A training query is a pool example: its class has one example fewer to draw its demonstrations from.
        pool, demos = (balanced_counts(n, len(task.verbalizers)) for n in (d.pool_size, d.num_demos))
        short = next((c for c, (have, need) in enumerate(zip(pool, demos)) if have - 1 < need), None)
        require(
            short is None,
            "dataset.pool_size",
            f"task {name}'s balanced pool of {d.pool_size} holds {pool} examples per class, so a training query "
            f"of class {short} leaves fewer than the {demos[short or 0]} demonstrations of its class that "
            f"dataset.num_demos={d.num_demos} draws",
            f"Set dataset.pool_size={len(task.verbalizers) * (max(demos) + 1)} or more",
        )
    for key in ("num_train_instances", "num_votes", "num_eval"):
        require(d[key] >= 1, f"dataset.{key}", f"must be >= 1, got {d[key]}", "")
    require_seed(d.data_seed, "dataset.data_seed")


def cpp_compiler() -> Optional[str]:
    """The C++ compiler torch.compile's CPU code would be built with (``CXX``, else the usual names), or None."""
    import shutil

    return next(filter(None, (shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++"))), None)


def missing_keys(node: DictConfig, path: str = "") -> Iterator[str]:
    """The keys left at ``???``, found without resolving an interpolation (``${hydra:...}`` needs a running app)."""
    for key in node.keys():
        if OmegaConf.is_missing(node, key):
            yield f"{path}{key}"
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_interpolation():
            yield from missing_keys(child, f"{path}{key}.")


def require_values(cfg: DictConfig) -> None:
    """Every key has a value: a schema picked as an option (model=base_model), or an option of your own, can leave
    one at ``???``. Checked after the checks that name such keys themselves (GenPI's prompt, an out-of-domain set)."""
    missing = sorted(key for key in missing_keys(cfg) if ".ood." not in key)
    if missing:
        more = f" (and {', '.join(missing[1:4])}{', ...' if len(missing) > 4 else ''})" if len(missing) > 1 else ""
        raise ConfigError(
            f"{missing[0]}: has no value{more}. The base_* configs are the schemas the options extend, not options: "
            f"pick an option that sets it (ctxdistill --help lists them), or set {missing[0]}=VALUE"
        )


def validate(cfg: DictConfig, overrides: Sequence[str] = (), trains: bool = True) -> None:
    """Value checks that run before any data or model is loaded; ``overrides``: the command line's, whose settings
    the config files' own may not silently replace; ``trains=False``: an evaluation of a trained run, which skips
    the method's checks of training alone."""
    from omegaconf.errors import MissingMandatoryValue

    try:
        validate_values(cfg, overrides, trains)
    except MissingMandatoryValue:  # a check read a key without a value: name them all, not the traceback
        require_values(cfg)
        raise
    require_values(cfg)


def validate_values(cfg: DictConfig, overrides: Sequence[str] = (), trains: bool = True) -> None:
    check_schema(cfg)
    t, d = cfg.trainer, cfg.dataset
    require(0 <= cfg.seed < 2**32, "seed", f"must be in [0, 2**32), got {cfg.seed}", "Set e.g. seed=0")
    require(t.lr > 0, "trainer.lr", f"must be positive, got {t.lr}", "Set e.g. trainer.lr=1e-3")
    require(t.batch_size >= 1, "trainer.batch_size", f"must be >= 1, got {t.batch_size}", "Set trainer.batch_size=8")
    require(
        t.eval_batch_size >= 1,
        "trainer.eval_batch_size",
        f"must be >= 1, got {t.eval_batch_size}",
        "Set trainer.eval_batch_size=16",
    )
    require(
        t.max_grad_norm is None or t.max_grad_norm > 0,
        "trainer.max_grad_norm",
        f"must be positive or null, got {t.max_grad_norm}",  # a negative norm would flip the gradient's sign
        "Set e.g. trainer.max_grad_norm=1.0, or null for no clipping",
    )
    require(t.weight_decay >= 0, "trainer.weight_decay", f"must be >= 0, got {t.weight_decay}", "")
    require(t.grad_accum_steps >= 1, "trainer.grad_accum_steps", f"must be >= 1, got {t.grad_accum_steps}", "")
    require(t.epochs >= 1, "trainer.epochs", f"must be >= 1, got {t.epochs}", "")
    require(  # (under trainer.max_steps the trainer checks it against the steps, once it knows an epoch's)
        t.schedule_epochs is None or t.max_steps is not None or t.schedule_epochs >= t.epochs,
        "trainer.schedule_epochs",
        f"must be >= trainer.epochs ({t.epochs}) or null, got {t.schedule_epochs}",
        "It is the length of the LR schedule, which training stops part-way down",
    )
    require_count(t.max_steps, "trainer.max_steps", "null trains trainer.epochs epochs")
    require_count(t.checkpoint_every, "trainer.checkpoint_every")
    require(t.keep_checkpoints >= 1, "trainer.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}", "")
    if t.distributed.strategy == "zero3":
        import importlib.util

        require(
            importlib.util.find_spec("deepspeed") is not None,
            "trainer.distributed.strategy",
            "zero3 needs DeepSpeed, which is not installed",
            "Install it with:  pip install deepspeed",
        )
    if t.distributed.strategy != "ddp":
        import torch

        require(
            torch.cuda.is_available(),
            "trainer.distributed.strategy",
            f"{t.distributed.strategy} shards the model over CUDA GPUs and none is visible (accelerate "
            "would quietly run plain data parallel)",
            "Use trainer/distributed=ddp on CPU",
        )
    require(0 <= t.warmup_ratio < 1, "trainer.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}", "")
    require(
        t.steps_per_lr_update >= 1,
        "trainer.steps_per_lr_update",
        f"must be >= 1, got {t.steps_per_lr_update}",
        "Set 1 to move the LR at every optimiser step",
    )
    require(
        t.scheduler != "constant" or t.warmup_ratio == 0,
        "trainer.warmup_ratio",
        f"is {t.warmup_ratio}, and trainer.scheduler=constant has no warmup (it would be ignored)",
        "Set trainer.scheduler=constant_with_warmup, or trainer.warmup_ratio=0",
    )
    require(
        t.selection.metric is None or t.distributed.strategy == "ddp",
        "trainer.selection",
        f"keeps the best checkpoint's weights whole, and trainer/distributed={t.distributed.strategy} shards them",
        "Use trainer/distributed=ddp, or test the final model: trainer.selection.metric=null",
    )
    selected_set, _, selected = (t.selection.metric or "").rpartition("/")
    require(  # before anything loads; whether the run reports the metric, its evaluator says (trainer.py)
        selected_set != "eval",
        "trainer.selection.metric",
        f"{t.selection.metric} selects the checkpoint on the set it reports, which overstates its score",
        "Select on a validation set (for a knowledge graph: dataset.validation_split=valid and "
        f"trainer.selection.metric=valid/{selected})",
    )
    require_count(t.selection.every_epochs, "trainer.selection.every_epochs")
    require(
        t.selection.skip_epochs >= 0,
        "trainer.selection.skip_epochs",
        f"must be >= 0, got {t.selection.skip_epochs}",
        "",
    )
    require_count(  # 0 would silently evaluate never, -n every n steps
        t.eval_every,
        "trainer.eval_every",
        "Set the steps between periodic evaluations, e.g. trainer.eval_every=50, or null for none",
    )
    if t.mixed_precision == "fp16":
        import torch

        require(
            torch.cuda.is_available(),
            "trainer.mixed_precision",
            "fp16 needs a CUDA GPU and none is visible",
            "Use trainer.mixed_precision=no (or bf16) on CPU",
        )
    if t.compile:
        import torch

        require(
            torch.cuda.is_available() or cpp_compiler() is not None,
            "trainer.compile",
            "torch.compile on the CPU writes C++ and no C++ compiler was found (CXX, g++, c++ or clang++)",
            "Install one (apt install g++) or use trainer.compile=false",
        )
    given = override_keys(overrides)
    for key, spec in model_configs(cfg):
        validate_model(spec, key, given)
    if d.kind == "mixture":
        _validate_mixture(d)
    elif d.kind == "knowledge_graph":
        for key in ("num_train", "num_eval", "num_validation", "eval_candidates"):
            require_count(d[key], f"dataset.{key}")
        require(
            d.validation_split != d.eval_split,
            "dataset.validation_split",
            f"is the evaluated split ({d.eval_split}): selecting a checkpoint on it overstates its score",
            "Use another split, e.g. dataset.validation_split=valid with dataset.eval_split=test",
        )
        require_seed(d.subsample_seed, "dataset.subsample_seed")
    else:
        _validate_classification(d, "dataset")
    check_method(cfg, trains)
    defining = OmegaConf.get_type(cfg.method).defining
    for key in override_keys(overrides):
        setting = key.removeprefix("method.")
        require(
            setting == key or setting not in defining,
            key,
            f"makes method={cfg.method.name} what it is (set by its config file); another value is another method, "
            "and its results would be recorded under this one's name",
            defining.get(setting, ""),
        )


def group_options(group: str) -> dict[str, tuple[Optional[str], dict[str, Any]]]:
    """The options of conf/GROUP/ (bases excepted), each as the schema its defaults list extends and the top-level
    settings it writes or takes from the option it extends (smollm2-135m-half: smollm2-135m's), read from the
    files without composing them."""
    import yaml

    from ctxdistill.cli import CONFIG_DIR, is_base

    def read(name: str) -> tuple[Optional[str], dict[str, Any]]:
        raw = yaml.safe_load((CONFIG_DIR / group / f"{name}.yaml").read_text()) or {}
        schema, settings = None, {}
        for entry in raw.get("defaults") or []:
            if not isinstance(entry, str) or "@" in entry or "/" in entry or entry == "_self_":
                continue  # another group's option, or a file placed elsewhere
            if (CONFIG_DIR / group / f"{entry}.yaml").is_file():
                schema, inherited = read(entry)
                settings |= inherited
            else:
                schema = entry
        return schema, settings | {k: v for k, v in raw.items() if k != "defaults"}

    return {p.stem: read(p.stem) for p in sorted((CONFIG_DIR / group).glob("*.yaml")) if not is_base(p.stem)}


def models_of(architectures: Collection[str]) -> list[str]:
    """The model options (conf/model/) of these architectures."""
    default = ModelConfig.architecture
    return [name for name, (_, s) in group_options("model").items() if s.get("architecture", default) in architectures]


def methods_for(architecture: str) -> list[str]:
    """The method options (conf/method/) whose schemas declare that they run a model of this architecture."""
    from ctxdistill.methods import method_schemas

    declared = {schema.schema_name: schema.architectures for schema in method_schemas()}
    return [name for name, (base, _) in group_options("method").items() if architecture in declared.get(base, ())]


def check_architectures(cfg: DictConfig, schema: type) -> None:
    """Every model config of the run is of an architecture the method declares for its role (the model, a separate
    teacher): another one would load and fail later with a message about something else, or not at all."""
    m = cfg.method
    for key, spec in model_configs(cfg):
        fits = schema.architectures if key == "model" else schema.teacher_architectures
        if spec.architecture in fits:
            continue
        wanted, choice = " or ".join(fits), "model" if key == "model" else f"model@{key}"
        if key == "model":
            need = f"method={m.name} runs a {wanted} model"
            # a causal LM runs with nearly every method; the others with the few that declare them
            others = methods_for(spec.architecture) if spec.architecture != ModelConfig.architecture else []
            elsewhere = f"; a {spec.architecture} model runs with method={', '.join(others)}" if others else ""
        else:
            need, elsewhere = f"method={m.name}'s teacher must be a {wanted} model", ""
            if fits == ("causal_lm",):
                need += " (a teacher predicts the next token)"
        raise ConfigError(
            f"{key}: {choice}={spec.name} is a {spec.architecture} model, and {need}. Use {choice}="
            f"{', '.join(models_of(fits))} (or a model of your own: {key}.name_or_path=... "
            f"{key}.architecture={fits[0]}){elsewhere}"
        )


def check_method(cfg: DictConfig, trains: bool = True) -> None:
    """The method's own checks (those of its training too where ``trains``), and the one place where the groups
    meet: the dataset kinds, model architectures (the model's and a separate teacher's) and model adapters the
    method's schema declares it can use."""
    m, schema = cfg.method, OmegaConf.get_type(cfg.method)
    check_architectures(cfg, schema)
    kinds = schema.dataset_kinds
    require(
        kinds is None or cfg.dataset.kind in kinds,
        "dataset",
        f"method={m.name} runs on datasets of kind {' or '.join(kinds or ())}, and dataset={cfg.dataset.name} is "
        f"of kind {cfg.dataset.kind}",
        f"Use {schema.dataset_example}",
    )
    reason = schema.refused_adapters.get(cfg.model.adapter)
    require(
        reason is None,
        "model.adapter",
        f"method={m.name} cannot train model.adapter={cfg.model.adapter}: {reason}",
        "Use model.adapter=lora or full",
    )
    require(
        not cfg.trainer.evaluate_with_dropout or (cfg.dataset.kind == "classification" and kinds is not None),
        "trainer.evaluate_with_dropout",
        f"keeps dropout on where a trained model's answer words are scored, and method={m.name} on dataset "
        f"{cfg.dataset.name} (kind {cfg.dataset.kind}) is evaluated otherwise (generated answers, rankings or inputs "
        "of its own)",
        "Drop the setting: it serves the label-word scoring of a classification dataset",
    )
    schema.check(m, cfg)
    if trains:
        schema.check_training(m, cfg)
