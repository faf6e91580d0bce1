"""Structured-config schemas for every config group, and value checks.

Each YAML file under ``conf/`` names its schema in its defaults list (``- base_cd``),
so a misspelt key or a wrong type fails while Hydra composes the config, before
any data or model is loaded. Checks that a type cannot express (a positive
learning rate, a known divergence) live in :func:`validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


# ---------------------------------------------------------------- methods
@dataclass
class MethodConfig:
    _target_: str = MISSING
    name: str = MISSING


@dataclass
class PromptingConfig(MethodConfig):
    _target_: str = "ctxdistill.methods.prompting.Prompting"
    use_context: bool = False


@dataclass
class FinetuneConfig(MethodConfig):
    _target_: str = "ctxdistill.methods.finetune.Finetune"
    finetune: str = "lora"  # lora | full
    # demonstrations: the context's k demonstrations (balanced); labelled_queries: the task's training
    # queries with their labels (drawn at random, apart from the demonstrations, as llmft draws its examples)
    train_on: str = "demonstrations"
    objective: str = "eval/accuracy"  # what a sweeper optimises; llmft scores fine-tuning by eval/vocab_accuracy


@dataclass
class DistillConfig(MethodConfig):
    _target_: str = "ctxdistill.methods.distill.ContextDistillation"
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    beta: float = 0.5  # JSD mixture weight (TRL semantics: 0 = forward KL, 1 = reverse KL)
    temperature: float = 1.0
    top_k: Optional[int] = None  # distil (and cache) only the teacher's k most likely tokens
    # what happens to the rest of the teacher's mass with top_k: renormalize over the k (forward_kl
    # only, TRL's SDFT default) or bucket (one extra category for teacher and student, any divergence)
    top_k_rest: str = "renormalize"
    answer: str = "label_position"  # label_position | teacher_generation
    max_answer_tokens: int = 8  # span length for answer=teacher_generation
    # frozen: base weights, adapter disabled, eval mode (the papers' description). live: the adapted
    # model itself in train mode, as Upadhayaya et al.'s released code effectively does.
    teacher: str = "frozen"
    # the frozen teacher's targets: computed once and kept on disk for later runs too (disk), for
    # this run only (memory), or recomputed at every step (none). A live teacher is always per step.
    teacher_cache: str = "disk"
    teacher_cache_dir: str = "${cache_dir}/teacher_targets"


@dataclass
class GenPIConfig(MethodConfig):
    """Generative Prompt Internalization; see ctxdistill.methods.genpi for the stages and the loss."""

    _target_: str = "ctxdistill.methods.genpi.GenPI"
    task_name: str = MISSING  # names the prompt in results (the run's "dataset")
    prompt: str = MISSING  # internalised: in the teacher's input, never in the student's
    rule: str = MISSING  # a regular expression (re.search) that a reply following the prompt matches
    # user_turn: as the released code, every generation keeps the system message "You are a helpful assistant."
    # and the prompt opens the teacher's user turn (<USER>:/<AGENT>: markers split it into turns).
    # system_message: the prompt is the teacher's system message (the student's input has none).
    prompt_placement: str = "user_turn"
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
    # The prompt-generation turn (the released code's meta-cognition input).
    pg_template: str = (
        "### Input\n{input}\n\n### Bad Output\n{base}\n\n### Good Output\n{teacher}\n\n"
        "Guess which context was provided to produce the good output instead of the bad one, "
        "and give the reason why the output should change."
    )
    # lambda: L = (1 - lambda) * L_PG + lambda * L_SFT, the released stage2_ratio (0.7 for OS and WebShop,
    # 0.3 for Mind2Web)
    sft_weight: float = 0.7
    kl_weight: float = 0.0  # optional forward KL from the teacher with the prompt at the reply tokens
    stage_dir: str = "${cache_dir}/genpi"  # cached stages, shared by runs with the same settings
    seed: int = "${seed}"  # type: ignore[assignment]


@dataclass
class OnPolicyConfig(MethodConfig):
    _target_: str = "ctxdistill.methods.on_policy.OnPolicyDistillation"
    # At every sampled position: reverse_kl | jsd | forward_kl over the full vocabulary (GKD), or
    # sampled_reverse_kl, the sampled token's log-ratio as a policy gradient (on-policy distillation, SDFT).
    divergence: str = "reverse_kl"
    beta: float = 0.5  # JSD mixture weight (TRL semantics: 0 = forward KL, 1 = reverse KL)
    lmbda: float = 1.0  # GKD's lambda: the fraction of batches the student samples; the teacher samples the rest
    temperature: float = 1.0  # sampling only; the loss is taken at temperature 1, as in GKD
    top_k: Optional[int] = None  # sample among the k most likely tokens
    max_new_tokens: int = 8
    stop: Optional[str] = "\n"  # a sample ends with the first token containing it (or end-of-sequence)
    seed: int = 0  # the sampling generator and the lambda draws


@dataclass
class ScratchpadConfig(MethodConfig):
    _target_: str = "ctxdistill.methods.scratchpad.ScratchpadDistillation"
    num_samples: int = 8  # teacher samples per query; their extracted answers are the empirical target
    temperature: float = 1.0  # of the teacher's sampling; 0 = greedy (then one sample suffices)
    top_k: Optional[int] = None
    seed: int = 0


@dataclass
class ICLDistillConfig(MethodConfig):
    """In-context learning distillation (Huang et al. 2022); the loss is written out in
    ctxdistill.methods.icl_distill. A weight of 0 switches its term off; ICT is the hard ICL term alone."""

    _target_: str = "ctxdistill.methods.icl_distill.ICLDistillation"
    icl_hard_weight: float = 0.5  # cross-entropy of the gold answer after the k demonstrations
    icl_soft_weight: float = 0.5  # T^2 * KL(teacher || student) at the answer position
    lm_hard_weight: float = 0.0  # cross-entropy of the demonstration tokens (language modelling)
    lm_soft_weight: float = 0.0  # T^2 * KL(teacher || student) at every demonstration token
    temperature: float = 1.0
    top_k: int = 64  # the teacher's targets are kept as its k most likely tokens plus one bucket for the rest
    teacher: Optional[ModelConfig] = None  # the teacher's model config (a larger LM); null: no teacher (ICT)
    # the teacher's targets: kept on disk for later runs on the same prompts (disk), or for this run only (memory)
    teacher_cache: str = "disk"
    teacher_cache_dir: str = "${cache_dir}/teacher_targets"


@dataclass
class ContextualizationConfig(MethodConfig):
    """Stage 1 of Li et al. 2024: an instruction LM writes a paragraph per training triple."""

    _target_: str = "ctxdistill.methods.contextualization.Contextualization"
    # The released code's prompt ({head}/{tail}: entity names, {relation}: the relation's text).
    prompt: str = (
        "Given a triplet ({head} | {relation} | {tail}), please generate a paragraph at least 100 words "
        'to introduce "{head}" and "{tail}" respectively and reflect their relationship {relation}. '
        '"{head}" and "{tail}" must concluded in the generated text.'
    )
    chat_template: bool = True  # wrap the prompt in the model's chat template (instruction models)
    max_new_tokens: int = 200
    temperature: float = 0.7  # 0: greedy
    top_p: float = 1.0
    batch_size: int = 16


@dataclass
class KGCStudentConfig(MethodConfig):
    """Stage 2: a KGC student trained on the triples, with an auxiliary task on the contexts."""

    _target_: str = MISSING
    aux_weight: float = 1.0  # weight of the auxiliary loss on the contexts; 0: the baseline without it
    kgc_weight: float = 1.0
    max_length: int = 64  # tokens of a triple's input
    context_max_length: int = 128  # tokens of a context
    eval_batch_size: int = 256  # (query, candidate) pairs per forward pass


@dataclass
class KGBertConfig(KGCStudentConfig):
    """Discriminative (KG-BERT): triple classification plus masked-LM reconstruction of the context."""

    _target_: str = "ctxdistill.methods.kgc.KGBert"
    negatives: int = 5  # corrupted triples per positive: all its heads or all its tails (a coin flip per positive)
    # drawn_once (the released code): the positives and their negatives are rows drawn once before training,
    # shuffled together into batches of trainer.batch_size rows, each row with its own masked copy of its
    # positive's context (masked once too). fresh_per_batch: a batch is trainer.batch_size positives, each with
    # negatives drawn anew and one masked copy of its context (more distinct negatives, 1/(1+negatives) of
    # the reconstruction cost).
    training_rows: str = "drawn_once"
    # A training triple without a context: random (another triple's context, drawn once; the released code)
    # or error (stop before training). With no context at all the auxiliary task always stops.
    missing_context: str = "random"
    mlm_probability: float = 0.15  # of which 80% [MASK], 10% random, 10% kept
    use_descriptions: bool = True  # entity text = name + description, as KG-BERT


@dataclass
class KGS2SConfig(KGCStudentConfig):
    """Generative (KG-S2S): generate the missing entity (name and description), plus generating the context."""

    _target_: str = "ctxdistill.methods.kgc.KGS2S"
    max_target_length: int = 512
    # Entity descriptions in the query and in the target, as the released -src_descrip_max_length /
    # -tgt_descrip_max_length: N keeps the first N - 1 tokens (N counts T5's end-of-sequence token); 0: none.
    source_description_tokens: int = 40
    target_description_tokens: int = 10
    # What the contextualization task generates the context from: query (the link-prediction query, as the
    # released code does by mistake) or triple ("contextualize: h | r | t", its intent; easier, as it holds
    # the answer).
    context_input: str = "query"


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
    source: str = "hub"
    name_or_path: str = MISSING
    # The model a bundled source (gguf, package, random) holds; a name_or_path naming another model loads
    # that one from the Hub or its local directory instead (an override is never ignored).
    bundles: Optional[str] = None
    revision: Optional[str] = None  # a Hub model's branch, tag or commit (null: the default branch)
    # The transformers Auto class: causal_lm (decoder LMs), masked_lm (BERT-like encoders), seq2seq_lm (T5, BART).
    architecture: str = "causal_lm"
    package: Optional[str] = None
    package_dir: Optional[str] = None
    gguf_package: Optional[str] = None
    gguf_file: Optional[str] = None
    pip_install: Optional[str] = None  # the command that installs gguf_package / package
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"
    max_length: Optional[int] = None  # context window; default: the model config's
    # What a method that trains an adapter trains: lora | prefix (a trainable key/value prefix per layer,
    # initialised from the first prefix_tokens tokens of the teacher's context) | full (every weight).
    adapter: str = "lora"
    prefix_tokens: int = 32
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
    kind: str = MISSING
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
    bytes_literals: bool = False  # text columns hold Python bytes literals b'...' (llmft's PAWS-QQP)
    subsample: Optional[int] = None  # keep this many records per split (numpy seed below), as llmft does
    subsample_seed: int = 123


@dataclass
class ContextConfig:
    instruction: str = ""
    num_demos: int = 8  # per context
    # Several contexts of num_demos disjoint demonstrations each, distilled simultaneously (Snell et al.
    # eq. 2): every query and eval example is taught by one of them, picked by a hash of its id.
    num_contexts: int = 1
    balanced: bool = True
    shuffle_demos: bool = True  # false: the drawn demonstrations in dataset order (Upadhayaya et al.'s code)
    separator: str = "\n\n"
    # Draws the demonstrations and queries (llmft's data_seed); null: the run's seed.
    data_seed: Optional[int] = None


@dataclass
class EvalSetConfig:
    name: str = MISSING
    source: SourceConfig = field(default_factory=SourceConfig)
    split: str = "validation"
    label_map: Optional[dict[str, int]] = None  # default: the dataset's
    drop_labels: Optional[list[str]] = None  # default: the dataset's
    num_examples: Optional[int] = None
    # Which num_examples: null, the first rows in file order; a seed, the first rows after a shuffle with it
    # (numpy's default_rng(seed).permutation, what datasets' Dataset.shuffle(seed=...) does).
    shuffle_seed: Optional[int] = None
    group_by: Optional[str] = None  # a column whose values get their own accuracy (HANS: heuristic)


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
    source: SourceConfig = field(default_factory=SourceConfig)
    fields: list[str] = MISSING  # template fields read from each record
    label_field: str = "label"
    label_map: dict[str, int] = field(default_factory=dict)  # raw label -> class; empty: labels are class ids
    drop_labels: list[str] = field(default_factory=list)  # raw labels whose records are left out
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
    ood: list[EvalSetConfig] = field(default_factory=list)
    # A local copy of HANS's heuristics_evaluation_set.txt (github.com/tommccoy1/hans), read by the HANS
    # out-of-domain sets instead of the Hub (whose copy is a loading script current datasets refuses).
    hans_file: Optional[str] = None
    generation: Optional[GenerationConfig] = None  # set: the label field holds free-text answers


@dataclass
class KGSourceConfig:
    layout: str = MISSING  # kgbert | kgs2s | plain | synthetic
    data_dir: Optional[str] = None
    # Entity texts such as "stool, solid excretory product": the name is the part before this.
    name_separator: Optional[str] = None
    num_people: int = 60  # synthetic graph size
    seed: int = 1234  # synthetic graph generation seed


@dataclass
class KGDatasetConfig:
    name: str = MISSING
    source: KGSourceConfig = field(default_factory=KGSourceConfig)
    num_train: Optional[int] = None  # training triples (seeded subsample); null: all
    eval_split: str = "test"
    num_eval: Optional[int] = None  # evaluation triples (seeded subsample); null: all
    # Ranking: null ranks against every entity (the paper's protocol); N against N sampled entities (CPU).
    eval_candidates: Optional[int] = None
    subsample_seed: int = 0
    # Contexts keyed by triple: written by method=contextualization, read by the students' auxiliary task.
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
    strategy: str = "ddp"
    cpu_offload: bool = False  # fsdp/zero3: keep sharded parameters and optimiser state in CPU memory


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
    scheduler: str = "linear"  # any transformers.get_scheduler name
    warmup_ratio: float = 0.1
    max_grad_norm: Optional[float] = 1.0
    shuffle: bool = True  # a new (seeded) order of the examples every epoch; false: the same order every epoch
    mixed_precision: str = "no"  # no | bf16 | fp16 (GPU only)
    eval_every: Optional[int] = None  # steps between periodic evaluations of the in-domain set
    # Evaluate every set (out-of-domain too) after each epoch but the last (whose evaluation is the final
    # one); periodic evaluations are saved as metrics.json's "curves" (llmft evaluates every epoch).
    eval_every_epoch: bool = False
    eval_batch_size: int = 16
    save_model: bool = True
    # Resumable state every N optimiser steps and at the end of training (null: only on
    # SIGTERM/SIGUSR1). The run dir's checkpoints/ is removed once metrics.json is written.
    checkpoint_every: Optional[int] = 100
    keep_checkpoints: int = 1
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | none
    project: str = "ctxdistill"
    entity: Optional[str] = None
    mode: str = "auto"  # auto (online if logged in, else offline) | online | offline | disabled
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
    "method": {
        "base_prompting": PromptingConfig,
        "base_finetune": FinetuneConfig,
        "base_distill": DistillConfig,
        "base_genpi": GenPIConfig,
        "base_on_policy": OnPolicyConfig,
        "base_scratchpad": ScratchpadConfig,
        "base_icl_distill": ICLDistillConfig,
        "base_contextualization": ContextualizationConfig,
        "base_kgbert": KGBertConfig,
        "base_kgs2s": KGS2SConfig,
    },
    "model": {"base_model": ModelConfig},
    "dataset": {"base_dataset": DatasetConfig, "base_kg_dataset": KGDatasetConfig, "base_mixture": MixtureConfig},
    "trainer": {"base_trainer": TrainerConfig},
    "logger": {"base_logger": LoggerConfig},
}


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, nodes in SCHEMAS.items():
        for name, node in nodes.items():
            cs.store(group=group, name=name, node=node)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def nearest_key(key: str, schema: type) -> str:
    """ ", did you mean X?" for the field of ``schema`` closest to ``key`` ("" if none is close)."""
    import dataclasses
    import difflib

    names = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []
    match = difflib.get_close_matches(key, names, n=1)
    return f"; did you mean {match[0]}?" if match else f"; it has {', '.join(names)}"


def check_known_keys(node: Any, path: str = "") -> None:
    """Every key of a schema-backed node is one of its schema's fields: a key added with `+key=value`
    bypasses the schema, so a misspelt one would be silently ignored. Dict-typed settings (label maps,
    file lists, generator options ...) are open-ended and take any key."""
    import dataclasses

    if not isinstance(node, DictConfig):
        if OmegaConf.is_list(node):
            for i, item in enumerate(node):
                check_known_keys(item, f"{path}.{i}")
        return
    schema = OmegaConf.get_type(node)
    fields = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        full = f"{path}.{key}" if path else str(key)
        if fields is not None and key not in fields:
            raise ConfigError(
                f"{full}: no such setting{nearest_key(str(key), schema)} (a key added with + is "
                "not checked by Hydra, so a misspelt one would be ignored)"
            )
        if not OmegaConf.is_missing(node, key) and not OmegaConf.is_interpolation(node, key):
            check_known_keys(node[key], full)


def _require(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}. {fix}")


def _template_fields(template: str, key: str) -> set[str]:
    """The field names a str.format template reads ({premise}, {0} ...)."""
    import string

    try:
        return {name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(template) if name}
    except ValueError as e:
        raise ConfigError(f"{key}: {template!r} is not a format string ({e}). Double literal braces: {{{{ }}}}") from e


def _validate_classification(d: DictConfig, key: str) -> None:
    """Checks of a classification dataset config found at ``key`` (``dataset``, or a mixture's task)."""
    _require(
        d.source.kind in ("synthetic", "hub", "files"),
        f"{key}.source.kind",
        f"unknown value {d.source.kind!r}",
        "Use one of: synthetic, hub, files",
    )
    _require(d.context.num_demos >= 0, f"{key}.context.num_demos", f"must be >= 0, got {d.context.num_demos}", "")
    _require(
        d.context.num_contexts >= 1, f"{key}.context.num_contexts", f"must be >= 1, got {d.context.num_contexts}", ""
    )
    _require(d.num_train_queries >= 1, f"{key}.num_train_queries", f"must be >= 1, got {d.num_train_queries}", "")
    _require(
        d.pattern is None or d.pattern in d.patterns,
        f"{key}.pattern",
        f"unknown pattern {d.pattern!r}",
        f"Use one of: {', '.join(d.patterns)}",
    )
    _require(
        d.generation is not None or len(d.verbalizers) >= 2,
        f"{key}.verbalizers",
        "needs one answer word per class (at least two)",
        "Or give free-text answers a dataset.generation",
    )
    templates = {
        "template": d.template,
        "demo_template": d.demo_template,
        "context_query_template": d.context_query_template,
        "generation.demo_target": d.generation.demo_target if d.generation is not None else None,
    }
    for name, text in templates.items():
        unknown = sorted(_template_fields(text, f"{key}.{name}") - set(d.fields)) if text else []
        _require(
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
        _require(
            groups == 1,
            f"{key}.generation.answer_regex",
            f"needs exactly one group, got {groups}",
            "Mark the answer with one (...) group, e.g. '</scratch>\\s*(.+)'",
        )
        _require(
            d.generation.max_new_tokens >= 1 and d.generation.max_answer_tokens >= 1,
            f"{key}.generation",
            "max_new_tokens and max_answer_tokens must be >= 1",
            "",
        )


def _validate_model(spec: DictConfig, key: str) -> None:
    """Checks of a model config found at ``key`` (``model``, or a method's separate teacher)."""
    _require(
        spec.source in ("hub", "gguf", "random", "package"),
        f"{key}.source",
        f"unknown value {spec.source!r}",
        "Use one of: hub, gguf, random, package",
    )
    _require(
        spec.architecture in ("causal_lm", "masked_lm", "seq2seq_lm"),
        f"{key}.architecture",
        f"unknown value {spec.architecture!r}",
        "Use one of: causal_lm, masked_lm, seq2seq_lm",
    )
    _require(
        spec.adapter in ("lora", "prefix", "full"),
        f"{key}.adapter",
        f"unknown value {spec.adapter!r}",
        "Use one of: lora, prefix, full",
    )
    _require(spec.prefix_tokens >= 1, f"{key}.prefix_tokens", f"must be >= 1, got {spec.prefix_tokens}", "")
    _require(
        spec.dtype in ("float32", "bfloat16", "float16"),
        f"{key}.dtype",
        f"unknown value {spec.dtype!r}",
        "Use one of: float32, bfloat16, float16",
    )
    _require(
        spec.layer_stride >= 1,
        f"{key}.layer_stride",
        f"must be >= 1, got {spec.layer_stride}",
        "1 keeps every layer, 2 every other one",
    )


def _validate_mixture(d: DictConfig) -> None:
    _require(
        d.paradigm in ("multitask", "meta"),
        "dataset.paradigm",
        f"unknown value {d.paradigm!r}",
        "Use multitask or meta",
    )
    _require(
        len(d.train_tasks) > 0,
        "dataset.train_tasks",
        "is empty",
        "Add tasks, e.g. - /dataset@train_tasks.NAME: synthetic",
    )
    for group in ("train_tasks", "eval_tasks"):
        for name, task in d[group].items():
            _validate_classification(task, f"dataset.{group}.{name}")
            _require(
                task.generation is None,
                f"dataset.{group}.{name}",
                "has free-text answers; a task mixture is scored by answer words (verbalizers) and majority vote",
                "Use classification datasets",
            )
    unknown = sorted(set(d.weights) - set(d.train_tasks))
    _require(
        not unknown,
        "dataset.weights",
        f"names tasks that are not training tasks: {unknown}",
        f"Use names from dataset.train_tasks: {sorted(d.train_tasks)}",
    )
    _require(
        all(w > 0 for w in d.weights.values()),
        "dataset.weights",
        "must be positive",
        "Leave a task out of dataset.train_tasks instead of giving it weight 0",
    )
    if d.paradigm == "multitask":
        _require(
            len(d.eval_tasks) == 0,
            "dataset.eval_tasks",
            "multitask in-context tuning evaluates on its training tasks",
            "Set dataset.paradigm=meta to evaluate on other tasks",
        )
    else:
        _require(
            len(d.eval_tasks) > 0,
            "dataset.eval_tasks",
            "meta in-context tuning needs target tasks",
            "Add tasks, e.g. - /dataset@eval_tasks.NAME: synthetic_temperature",
        )
        for name, task in d.eval_tasks.items():
            same = [
                train_name
                for train_name, train in d.train_tasks.items()
                if train_name == name or (train.name == task.name and train.source == task.source)
            ]
            _require(
                not same,
                f"dataset.eval_tasks.{name}",
                f"is also a training task ({same}); Meta-ICT evaluates only on tasks absent from training",
                "Remove it from one of the two lists",
            )
    _require(d.num_demos >= 1, "dataset.num_demos", f"must be >= 1, got {d.num_demos}", "")
    _require(
        d.pool_size > d.num_demos,
        "dataset.pool_size",
        f"must exceed dataset.num_demos ({d.num_demos}): a "
        f"training query draws its demonstrations from the rest of its pool, got {d.pool_size}",
        "",
    )
    for key in ("num_train_instances", "num_votes", "num_eval"):
        _require(d[key] >= 1, f"dataset.{key}", f"must be >= 1, got {d[key]}", "")


def validate(cfg: DictConfig) -> None:
    """Value checks that run before any data or model is loaded."""
    check_known_keys(cfg)
    t, m, d = cfg.trainer, cfg.method, cfg.dataset
    _require(t.lr > 0, "trainer.lr", f"must be positive, got {t.lr}", "Set e.g. trainer.lr=1e-3")
    _require(t.batch_size >= 1, "trainer.batch_size", f"must be >= 1, got {t.batch_size}", "Set trainer.batch_size=8")
    _require(t.grad_accum_steps >= 1, "trainer.grad_accum_steps", f"must be >= 1, got {t.grad_accum_steps}", "")
    _require(t.epochs >= 1, "trainer.epochs", f"must be >= 1, got {t.epochs}", "")
    _require(
        t.schedule_epochs is None or t.schedule_epochs >= t.epochs,
        "trainer.schedule_epochs",
        f"must be >= trainer.epochs ({t.epochs}) or null, got {t.schedule_epochs}",
        "It is the length of the LR schedule, which training stops part-way down",
    )
    _require(t.max_steps is None or t.max_steps >= 1, "trainer.max_steps", f"must be >= 1, got {t.max_steps}", "")
    _require(
        t.checkpoint_every is None or t.checkpoint_every >= 1,
        "trainer.checkpoint_every",
        f"must be >= 1 or null, got {t.checkpoint_every}",
        "",
    )
    _require(t.keep_checkpoints >= 1, "trainer.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}", "")
    _require(
        t.distributed.strategy in ("ddp", "fsdp", "zero3"),
        "trainer.distributed.strategy",
        f"unknown value {t.distributed.strategy!r}",
        "Use trainer/distributed=ddp, fsdp or zero3",
    )
    if t.distributed.strategy == "zero3":
        import importlib.util

        _require(
            importlib.util.find_spec("deepspeed") is not None,
            "trainer.distributed.strategy",
            "zero3 needs DeepSpeed, which is not installed",
            "Install it with:  pip install deepspeed",
        )
    if t.distributed.strategy != "ddp":
        import torch

        _require(
            torch.cuda.is_available(),
            "trainer.distributed.strategy",
            f"{t.distributed.strategy} shards the model over CUDA GPUs and none is visible (accelerate "
            "would quietly run plain data parallel)",
            "Use trainer/distributed=ddp on CPU",
        )
    _require(0 <= t.warmup_ratio < 1, "trainer.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}", "")
    _require(
        t.mixed_precision in ("no", "bf16", "fp16"),
        "trainer.mixed_precision",
        f"unknown value {t.mixed_precision!r}",
        "Use one of: no, bf16, fp16",
    )
    if t.mixed_precision == "fp16":
        import torch

        _require(
            torch.cuda.is_available(),
            "trainer.mixed_precision",
            "fp16 needs a CUDA GPU and none is visible",
            "Use trainer.mixed_precision=no (or bf16) on CPU",
        )
    _validate_model(cfg.model, "model")
    if "verbalizers" in d:
        _validate_classification(d, "dataset")
    elif "train_tasks" in d:
        _validate_mixture(d)
    else:  # a knowledge graph
        _require(
            d.source.layout in ("kgbert", "kgs2s", "plain", "synthetic"),
            "dataset.source.layout",
            f"unknown value {d.source.layout!r}",
            "Use one of: kgbert, kgs2s, plain, synthetic",
        )
        for key in ("num_train", "num_eval", "eval_candidates"):
            _require(d[key] is None or d[key] >= 1, f"dataset.{key}", f"must be >= 1 or null, got {d[key]}", "")
    _require(
        cfg.logger.backend in ("wandb", "none"),
        "logger.backend",
        f"unknown value {cfg.logger.backend!r}",
        "Use logger=wandb or logger=none",
    )
    _require(
        cfg.logger.mode in ("auto", "online", "offline", "disabled"),
        "logger.mode",
        f"unknown value {cfg.logger.mode!r}",
        "Use one of: auto, online, offline, disabled",
    )
    if issubclass(OmegaConf.get_type(m), DistillConfig):
        _require(
            m.divergence in ("forward_kl", "reverse_kl", "jsd"),
            "method.divergence",
            f"unknown value {m.divergence!r}",
            "Use one of: forward_kl, reverse_kl, jsd",
        )
        _require(0 <= m.beta <= 1, "method.beta", f"must be in [0, 1], got {m.beta}", "")
        _require(m.temperature > 0, "method.temperature", f"must be positive, got {m.temperature}", "")
        _require(
            m.top_k_rest in ("renormalize", "bucket"),
            "method.top_k_rest",
            f"unknown value {m.top_k_rest!r}",
            "Use renormalize or bucket",
        )
        _require(
            m.top_k is None or m.top_k_rest == "bucket" or m.divergence == "forward_kl",
            "method.top_k",
            "a renormalised top-k teacher leaves zero-probability tokens, which only forward KL tolerates",
            "Set method.top_k_rest=bucket, method.divergence=forward_kl or method.top_k=null",
        )
        _require(
            m.teacher_cache in ("disk", "memory", "none"),
            "method.teacher_cache",
            f"unknown value {m.teacher_cache!r}",
            "Use disk, memory or none",
        )
        _require(m.top_k is None or m.top_k >= 1, "method.top_k", f"must be >= 1, got {m.top_k}", "")
        _require(
            m.answer in ("label_position", "teacher_generation"),
            "method.answer",
            f"unknown value {m.answer!r}",
            "Use label_position or teacher_generation",
        )
        _require(
            m.teacher in ("frozen", "live"), "method.teacher", f"unknown value {m.teacher!r}", "Use frozen or live"
        )
        _require(
            m.teacher == "frozen" or m.answer == "label_position",
            "method.teacher",
            "a live teacher is supported with answer=label_position only",
            "Set method.answer=label_position",
        )
    if "sft_weight" in m:
        import re

        unset = [k for k in ("task_name", "prompt", "rule") if OmegaConf.is_missing(m, k)]
        _require(
            not unset,
            "method",
            f"genpi needs {', '.join('method.' + k for k in unset)}",
            "Set them on the command line, or keep those of conf/method/genpi.yaml",
        )

        _require(0 <= m.sft_weight <= 1, "method.sft_weight", f"must be in [0, 1], got {m.sft_weight}", "")
        _require(m.kl_weight >= 0, "method.kl_weight", f"must be >= 0, got {m.kl_weight}", "")
        _require(bool(m.prompt.strip()), "method.prompt", "is empty; nothing to internalise", "Set method.prompt")
        for key in (
            "num_pseudo_inputs",
            "inputs_per_round",
            "max_rounds",
            "max_input_tokens",
            "max_reply_tokens",
            "max_reason_tokens",
        ):
            _require(m[key] >= 1, f"method.{key}", f"must be >= 1, got {m[key]}", "")
        _require(
            m.num_heldout_pseudo_inputs >= 1,
            "method.num_heldout_pseudo_inputs",
            f"must be >= 1, got {m.num_heldout_pseudo_inputs}: the run's objective (a sweep's) is measured on "
            "them, apart from the reported held-out inputs",
            "Set e.g. method.num_heldout_pseudo_inputs=8",
        )
        _require(
            m.prompt_placement in ("user_turn", "system_message"),
            "method.prompt_placement",
            f"unknown value {m.prompt_placement!r}",
            "Use user_turn (the released code's) or system_message",
        )
        for key in ("generator_top_p", "reason_top_p"):
            _require(m[key] is None or 0 < m[key] <= 1, f"method.{key}", f"must be in (0, 1] or null, got {m[key]}", "")
        try:
            re.compile(m.rule)
        except re.error as e:
            raise ConfigError(f"method.rule: {m.rule!r} is not a regular expression ({e}). Fix the pattern") from e
        for key, fields in (
            ("generator_template", ("prompt", "examples")),
            ("pg_template", ("input", "base", "teacher")),
            ("reason_template", ("input", "base", "teacher", "prompt")),
        ):
            try:
                m[key].format(**{f: "" for f in fields})
            except (KeyError, IndexError, ValueError) as e:
                raise ConfigError(
                    f"method.{key}: cannot fill it ({e!r}); it may use only "
                    f"{', '.join('{' + f + '}' for f in fields)} (double literal braces)"
                ) from e
    if issubclass(OmegaConf.get_type(m), OnPolicyConfig):
        _require(
            m.divergence in ("reverse_kl", "jsd", "forward_kl", "sampled_reverse_kl"),
            "method.divergence",
            f"unknown value {m.divergence!r}",
            "Use one of: reverse_kl, jsd, forward_kl, sampled_reverse_kl",
        )
        _require(0 <= m.beta <= 1, "method.beta", f"must be in [0, 1], got {m.beta}", "")
        _require(0 <= m.lmbda <= 1, "method.lmbda", f"must be in [0, 1], got {m.lmbda}", "")
        _require(
            m.temperature > 0,
            "method.temperature",
            f"must be positive, got {m.temperature}",
            "Sampling needs a positive temperature, e.g. method.temperature=1.0",
        )
        _require(m.top_k is None or m.top_k >= 1, "method.top_k", f"must be >= 1, got {m.top_k}", "")
        _require(
            m.top_k is None or m.divergence != "sampled_reverse_kl",
            "method.top_k",
            "top-k sampling never draws the tokens outside the k, so the sampled reverse KL cannot estimate "
            "the student's mass there (its gradient would be biased)",
            "Set method.top_k=null, or method.divergence=reverse_kl (exact at every sampled position)",
        )
        _require(m.max_new_tokens >= 1, "method.max_new_tokens", f"must be >= 1, got {m.max_new_tokens}", "")
    if issubclass(OmegaConf.get_type(m), ScratchpadConfig):
        _require(
            d.generation is not None,
            "dataset",
            f"method={m.name} needs free-text answers and an answer "
            f"extractor (dataset.generation), which dataset={d.name} lacks",
            "Use e.g. dataset=addition",
        )
        _require(m.num_samples >= 1, "method.num_samples", f"must be >= 1, got {m.num_samples}", "")
        _require(m.temperature >= 0, "method.temperature", f"must be >= 0, got {m.temperature}", "0 is greedy")
        _require(m.top_k is None or m.top_k >= 1, "method.top_k", f"must be >= 1, got {m.top_k}", "")
    if issubclass(OmegaConf.get_type(m), ICLDistillConfig):
        weights = {k: m[k] for k in ("icl_hard_weight", "icl_soft_weight", "lm_hard_weight", "lm_soft_weight")}
        _require(
            all(w >= 0 for w in weights.values()) and sum(weights.values()) > 0,
            "method",
            f"the loss weights must be >= 0 and not all 0, got {weights}",
            "",
        )
        _require(m.temperature > 0, "method.temperature", f"must be positive, got {m.temperature}", "")
        _require(m.top_k >= 1, "method.top_k", f"must be >= 1, got {m.top_k}", "")
        _require(
            m.teacher_cache in ("disk", "memory"),
            "method.teacher_cache",
            f"unknown value {m.teacher_cache!r}",
            "Use disk or memory",
        )
        _require(
            m.teacher is not None or (m.icl_soft_weight == 0 and m.lm_soft_weight == 0),
            "method.teacher",
            "the soft (distillation) terms need a teacher model",
            "Use method=ict, or give method.teacher (e.g. model@method.teacher=smollm2-135m)",
        )
        if m.teacher is not None:
            _validate_model(m.teacher, "method.teacher")
        _require(
            "train_tasks" in d,
            "dataset",
            f"method={m.name} trains on a task mixture and dataset={d.name} is a single dataset",
            "Use experiment=huang2022/multitask_ict or huang2022/meta_ict",
        )
        _require(
            cfg.model.adapter != "prefix",
            "model.adapter",
            "a trainable prefix stands for one fixed context, "
            "and in-context tuning draws new demonstrations for every prompt",
            "Use model.adapter=lora or full",
        )
    if issubclass(OmegaConf.get_type(m), ContextualizationConfig):
        _require(m.max_new_tokens >= 1, "method.max_new_tokens", f"must be >= 1, got {m.max_new_tokens}", "")
        _require(m.temperature >= 0, "method.temperature", f"must be >= 0, got {m.temperature}", "")
        _require(m.batch_size >= 1, "method.batch_size", f"must be >= 1, got {m.batch_size}", "")
    if issubclass(OmegaConf.get_type(m), KGCStudentConfig):
        _require(
            m.aux_weight >= 0 and m.kgc_weight >= 0,
            "method.aux_weight / method.kgc_weight",
            "must be >= 0",
            "Set method.aux_weight=0 for the baseline without the auxiliary task",
        )
    if issubclass(OmegaConf.get_type(m), KGBertConfig):
        _require(
            0 < m.mlm_probability < 1,
            "method.mlm_probability",
            f"must be in (0, 1), got {m.mlm_probability}",
            "The paper masks 0.15",
        )
        _require(m.negatives >= 1, "method.negatives", f"must be >= 1, got {m.negatives}", "")
        _require(
            m.training_rows in ("drawn_once", "fresh_per_batch"),
            "method.training_rows",
            f"unknown value {m.training_rows!r}",
            "Use drawn_once (the released code) or fresh_per_batch",
        )
        _require(
            m.missing_context in ("random", "error"),
            "method.missing_context",
            f"unknown value {m.missing_context!r}",
            "Use random (the released code) or error",
        )
    if issubclass(OmegaConf.get_type(m), KGS2SConfig):
        _require(
            m.context_input in ("query", "triple"),
            "method.context_input",
            f"unknown value {m.context_input!r}",
            "Use query (the released code) or triple (contextualize: h | r | t)",
        )
        for key in ("source_description_tokens", "target_description_tokens"):
            _require(m[key] >= 0, f"method.{key}", f"must be >= 0, got {m[key]}", "0 leaves descriptions out")
    if "finetune" in m:
        _require(m.finetune in ("lora", "full"), "method.finetune", f"unknown value {m.finetune!r}", "Use lora or full")
        _require(
            m.train_on in ("demonstrations", "labelled_queries"),
            "method.train_on",
            f"unknown value {m.train_on!r}",
            "Use demonstrations or labelled_queries",
        )
