"""Benchmark loaders on the original file formats: files the tests write, and the real copies in ../shared/data."""

from pathlib import Path

import numpy as np
import pytest

from ctxdistill.data import build_task, tasks
from ctxdistill.data.tasks import load_records

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="the real benchmark copies (../shared/data) are absent")


@needs_shared
def test_mnli_dev_matched_loads_every_row_and_drops_neutral(make_cfg):
    cfg = make_cfg("dataset=mnli", f"dataset.source.data_dir={SHARED / 'glue/mnli'}", "ood=[]")
    records, _ = load_records(cfg.dataset.source, "validation_matched")
    assert len(records) == 9815  # quoting disabled: default csv quoting loses 101 rows
    task = build_task(cfg.dataset, seed=0)
    assert len(task.eval_sets["eval"]) == 6692
    assert sorted(d.label for d in task.demos) == [0] * 8 + [1] * 8
    first = task.eval_sets["eval"][0]  # row 1 of the file; row 0 is neutral
    assert task.student_prompt(first) == (
        "This site includes a list of all award winners and a searchable database of Government Executive "
        "articles. The Government Executive articles housed on the website are not able to be searched. ?"
    )
    assert first.label == 1
    assert not {e.fields["premise"] for e in task.demos} & {q.fields["premise"] for q in task.train_queries}


@needs_shared
def test_paws_qqp_reads_bytes_literals_as_llmft_does(make_cfg):
    cfg = make_cfg(
        "dataset=qqp",
        f"dataset.source.data_dir={SHARED / 'glue/qqp'}",
        f"dataset.ood.paws_qqp.source.data_dir={SHARED / 'paws_qqp'}",
    )
    task = build_task(cfg.dataset, seed=0)
    paws = task.eval_sets["paws_qqp"]
    assert len(paws) == 677 and sum(e.label for e in paws) == 191
    assert paws[0].fields["question1"].startswith("What were the major effects of the cambodia earthquake")
    assert not any(e.fields["question1"].startswith(("b'", 'b"')) for e in paws)
    # llmft's load_paws_qqp_dataset (and upadraj/In-context's copy) cuts the wrapper off, sentence[2:-1]: the one
    # escaped character (a UTF-8 "π") stays the eight characters of its escape
    escaped = [e.fields["question1"] for e in paws if "tan term in nth" in e.fields["question1"]]
    assert escaped == [
        r"The sum of n terms of the series whose tan term in nth ^ -1 ( 1/2n ^ 2 ) is TN ^ -1 ( 2n + 1 ) -\xcf\x80/4 ?"
    ]
    assert len(task.eval_sets["eval"]) == 1000  # subsampled like llmft


HANS_HEADER = (
    "gold_label\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\t"
    "sentence1\tsentence2\tpairID\theuristic\tsubcase\ttemplate\n"
)


def write_hans(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    """A file in the layout of HANS's heuristics_evaluation_set.txt: (gold label, premise, hypothesis, heuristic)."""
    path.write_text(
        HANS_HEADER
        + "".join(f"{g}\t(x)\t(y)\t(X)\t(Y)\t{a}\t{b}\tex{i}\t{h}\tsub\ttemp\n" for i, (g, a, b, h) in enumerate(rows))
    )
    return path


@needs_shared
def test_rte_dev_has_277_rows_and_hans_out_of_domain(make_cfg, tmp_path):
    hans = write_hans(
        tmp_path / "hans.txt",
        [
            ("entailment", "The cat saw the dog .", "The cat saw the dog .", "lexical_overlap"),
            ("non-entailment", "The dog saw the cat .", "The cat saw the dog .", "lexical_overlap"),
        ],
    )
    cfg = make_cfg("dataset=rte", f"dataset.source.data_dir={SHARED / 'glue/rte'}", f"dataset.hans_file={hans}")
    task = build_task(cfg.dataset, seed=0)
    assert len(task.eval_sets["eval"]) == 277
    assert {e.label for e in task.eval_sets["eval"]} == {0, 1}
    # The files are written with CSV quoting: a field's wrapping quotes and doubled "" are not its text.
    assert task.eval_sets["eval"][13].fields["sentence2"] == 'Jack Kevorkian is the real name of "Dr. Death".'
    texts = [v for e in [*task.demos, *task.train_queries, *task.eval_sets["eval"]] for v in e.fields.values()]
    assert not [t for t in texts if '""' in t or (t.startswith('"') and t.endswith('"'))]
    assert task.student_prompt(task.eval_sets["hans"][1]) == "The dog saw the cat . The cat saw the dog . ?"
    assert [e.label for e in task.eval_sets["hans"]] == [0, 1]


@needs_shared
def test_rte_reads_lm_bffs_kshot_copy_as_its_config_says(make_cfg):
    # rte.yaml: LM-BFF's k-shot copies hold quotes as text (quoting=none) and name their labels
    kshot = SHARED / "glue/kshot/RTE/16-13"
    cfg = make_cfg(
        "dataset=rte",
        f"dataset.source.data_dir={kshot}",
        "dataset.source.quoting=none",
        "ood=[]",
        "dataset.context.num_demos=4",
        "dataset.num_train_queries=8",
        "++dataset.label_map.entailment=0",
        "++dataset.label_map.not_entailment=1",
    )
    task = build_task(cfg.dataset, seed=0)
    with open(kshot / "dev.tsv", encoding="utf-8") as f:
        gold = [line.rstrip("\n").split("\t")[-1] for line in f][1:]
    assert [e.label for e in task.eval_sets["eval"]] == [("entailment", "not_entailment").index(g) for g in gold]


def test_a_hans_format_file_fills_the_out_of_domain_slot(make_cfg, tmp_path):
    rows = [
        ("entailment", "The cat saw the dog .", "The cat saw the dog .", "lexical_overlap"),
        ("non-entailment", "The dog saw the cat .", "The cat saw the dog .", "lexical_overlap"),
        ("non-entailment", "If the cat ran , the dog slept .", "The dog slept .", "constituent"),
    ]
    hans = write_hans(tmp_path / "heuristics_evaluation_set.txt", rows)
    mnli = tmp_path / "mnli"
    mnli.mkdir()
    (mnli / "train.jsonl").write_text(
        "".join(
            f'{{"text_a": "P{i}", "text_b": "H{i}", "label": "{lab}"}}\n'
            for i, lab in enumerate(["entailment", "neutral", "contradiction"] * 4)
        )
    )
    (mnli / "dev.tsv").write_text('index\tpremise\thypothesis\tgold_label\n0\tA "quoted\tB\tentailment\n')
    cfg = make_cfg(
        "dataset=mnli",
        f"dataset.source.data_dir={mnli}",
        "dataset.source.data_files.train=train.jsonl",
        "dataset.source.data_files.validation_matched=dev.tsv",
        "dataset.context.num_demos=2",
        "dataset.num_train_queries=4",
        f"dataset.hans_file={hans}",
    )  # one override, both HANS sets
    task = build_task(cfg.dataset, seed=0)
    assert [e.group for e in task.eval_sets["hans_all"]] == ["lexical_overlap", "lexical_overlap", "constituent"]
    assert [(e.fields["premise"], e.label) for e in task.eval_sets["hans"]] == [
        ("The cat saw the dog .", 0),
        ("The dog saw the cat .", 1),
    ]  # lexical_overlap only
    assert task.eval_sets["eval"][0].fields["premise"] == 'A "quoted'
    assert len(task.train_queries) == 4 and all(q.label is None for q in task.train_queries)


def tiny_mnli(directory: Path) -> list[str]:
    """Overrides that read a small MNLI written in its original layouts (train sample JSON lines, dev TSV)."""
    directory.mkdir()
    (directory / "train.jsonl").write_text(
        "".join(
            f'{{"text_a": "P{i}", "text_b": "H{i}", "label": "{lab}"}}\n'
            for i, lab in enumerate(["entailment", "neutral", "contradiction"] * 30)
        )
    )
    (directory / "dev.tsv").write_text(
        "index\tpremise\thypothesis\tgold_label\n"
        + "".join(f"{i}\tP{i}\tH{i}\t{lab}\n" for i, lab in enumerate(["entailment", "contradiction"] * 60))
    )
    return [
        f"dataset.source.data_dir={directory}",
        "dataset.source.data_files.train=train.jsonl",
        "dataset.source.data_files.validation_matched=dev.tsv",
    ]


def test_upadhayaya_hans_subset_is_their_seed_plus_one_shuffle_and_holds_both_labels(make_cfg, tmp_path):
    import datasets

    # Like the real file: ordered by subcase, so its first lexical-overlap rows are all one label.
    rows = [
        (
            "non-entailment" if i < 500 else "entailment",
            f"The doctor {i} saw the actor .",
            "The actor saw the doctor .",
            "lexical_overlap",
        )
        for i in range(1000)
    ] + [("entailment", "If so , X .", "X .", "constituent")] * 20
    hans = write_hans(tmp_path / "hans.txt", rows)
    for seed in (0, 3):
        cfg = make_cfg(
            "experiment=upadhayaya2024/mnli",
            f"seed={seed}",
            *tiny_mnli(tmp_path / f"mnli{seed}"),
            f"dataset.hans_file={hans}",
        )
        subset = build_task(cfg.dataset, seed=seed).eval_sets["hans"]
        # Their code: the lexical-overlap rows as a datasets.Dataset, .shuffle(seed + 1), the first 100.
        lexical = datasets.Dataset.from_list([{"premise": a} for _, a, _, h in rows if h == "lexical_overlap"])
        expected = lexical.shuffle(seed=seed + 1).select(range(100))
        assert [e.fields["premise"] for e in subset] == expected["premise"]
        assert sorted({e.label for e in subset}) == [0, 1]
    first_rows = build_task(
        make_cfg(
            "experiment=upadhayaya2024/mnli",
            "dataset.ood.hans.shuffle_seed=null",
            *tiny_mnli(tmp_path / "plain"),
            f"dataset.hans_file={hans}",
        ).dataset,
        seed=0,
    ).eval_sets["hans"]
    assert {e.label for e in first_rows} == {1}  # what the first 100 rows would have been


def test_upadhayaya_rte_hans_prompt_is_their_codes_with_one_override(make_cfg, tmp_path):
    rte = tmp_path / "rte"
    rte.mkdir()
    rows = "".join(f"First {i} .\tSecond {i} .\t{i % 2}\t{i}\n" for i in range(60))
    for name in ("train.tsv", "dev.tsv"):
        (rte / name).write_text("sentence1\tsentence2\tlabel\tidx\n" + rows)
    hans = write_hans(
        tmp_path / "hans.txt",
        [("non-entailment", "The doctor saw the actor .", "The actor saw the doctor .", "lexical_overlap")],
    )
    common = ["experiment=upadhayaya2024/rte", f"dataset.source.data_dir={rte}", f"dataset.hans_file={hans}"]
    released = build_task(make_cfg(*common, "ood=[hans_premise_hypothesis]").dataset, seed=0)
    # upadraj/In-context create_hans_batch_token: create_few_shot_context("hans", [row], ...,
    # teacher_description=student_prompt, remove_label=True) writes f"{description}\n\n", then
    # f"{Premise}: {premise}\n{Hypothesis}: {hypothesis}" + "\nLabel: \n\n", and strips the whole
    assert released.student_prompt(released.eval_sets["hans"][0]) == (
        "Are the following sentences examples of entailment, yes or no?\n\n"
        "Premise: The doctor saw the actor .\nHypothesis: The actor saw the doctor .\nLabel:"
    )
    # RTE's own rows keep their keys, as their training and validation prompts did
    assert released.student_prompt(released.eval_sets["eval"][0]).endswith(
        "\n\nSentence1: First 0 .\nSentence2: Second 0 .\nLabel:"
    )
    default = build_task(make_cfg(*common).dataset, seed=0)  # the experiment: one template per task
    assert default.student_prompt(default.eval_sets["hans"][0]).endswith(
        "\n\nSentence1: The doctor saw the actor .\nSentence2: The actor saw the doctor .\nLabel:"
    )


def test_a_missing_hans_file_is_named_with_its_out_of_domain_slot(make_cfg, tmp_path):
    from ctxdistill.data.tasks import DataError

    cfg = make_cfg("dataset=mnli", *tiny_mnli(tmp_path / "mnli"), f"dataset.hans_file={tmp_path / 'nowhere.txt'}")
    with pytest.raises(DataError, match=r"dataset\.ood\.hans\.source: data file not found: .*nowhere\.txt"):
        build_task(cfg.dataset, seed=0)


@pytest.mark.parametrize(
    "dataset, pattern, prompt, answers",
    [
        ("mnli", "minimal", "A man sleeps. A person rests. ?", [" Yes", " No"]),
        ("mnli", "gpt3", "A man sleeps. question: A person rests. Yes or No? answer:", [" Yes", " No"]),
        (
            "mnli",
            "eval_harness",
            r"A man sleeps. \nQuestion: A person rests. True or False? \nAnswer:",  # as bash passes "\n"
            [" True", " False"],
        ),
        ("qqp", "minimal", "A man sleeps. A person rests. ?", [" No", " Yes"]),
        (
            "qqp",
            "eval_harness",
            r"Question 1: A man sleeps.\nQuestion 2: A person rests.\n"
            "Question: Do both questions ask the same thing? Answer:",
            [" No", " Yes"],
        ),
        ("rte", "gpt3", "A man sleeps. question: A person rests. Yes or No? answer:", [" Yes", " No"]),
    ],
)
def test_llmft_patterns_render_exactly(make_cfg, tmp_path, dataset, pattern, prompt, answers):
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(
            f'{{"text_a": "A man sleeps.", "text_b": "A person rests.", "label": "{lab}", '
            f'"sentence1": "A man sleeps.", "sentence2": "A person rests."}}\n'
            for lab in (["0", "2"] if dataset == "mnli" else ["0", "1"]) * 3
        )
    )  # MNLI: 1 = neutral
    files = [
        f"dataset.source.data_dir={tmp_path}",
        f"++dataset.source.data_files.train={train}",
        f"++dataset.source.data_files.{'validation_matched' if dataset == 'mnli' else 'validation'}={train}",
    ]
    cfg = make_cfg(
        f"dataset={dataset}",
        f"dataset.pattern={pattern}",
        "ood=[]",
        "dataset.context.num_demos=2",
        "dataset.num_train_queries=1",
        *files,
    )
    task = build_task(cfg.dataset, seed=0)
    assert task.student_prompt(task.eval_sets["eval"][0]) == prompt
    assert task.verbalizers == answers
    demo = task.demos[0]
    assert task.context.startswith(prompt + answers[demo.label])


def test_mosbach_fine_tuning_is_llmfts_full_parameter_pattern_based_run(make_cfg):
    # llmft's experiments/pattern_verbalizer_ft/run.sh: "mnli 128 40 0.5 4 8 1e-5" (samples, epochs, warmup
    # ratio, batch per GPU, GPUs, lr), weight decay 0.0, constant LR after warmup (WarmupLR), the HF Trainer's
    # gradient clipping of 1.0; scored by the argmax over the whole vocabulary.
    for dataset in ("mnli", "qqp"):
        cfg = make_cfg(f"experiment=mosbach2023/{dataset}", "method=pbft")
        assert (cfg.method.finetune, cfg.method.train_on, cfg.method.objective) == (
            "full",
            "labelled_queries",
            "eval/vocab_accuracy",
        )
        t = cfg.trainer
        assert (t.epochs, t.warmup_ratio, t.lr, t.weight_decay, t.scheduler, t.max_grad_norm) == (
            40,
            0.5,
            1e-5,
            0.0,
            "constant_with_warmup",
            1.0,
        )
        assert t.batch_size == cfg.dataset.num_train_queries == 16  # the 16 examples in one batch
        assert cfg.model.dtype == "float32" and cfg.dataset.template.endswith(" ?")
    # llmft's experiments/pattern_verbalizer_ft/lora.sh: "mnli 32 80 0.25 4 8 2e-4 facebook/opt-30b 8" (samples,
    # epochs, warmup ratio, batch per GPU, GPUs, lr, model, rank) through scripts/pattern_verbalizer_ft/mnli/lora.sh,
    # which is ft.py as run.sh runs it: 32 rows drawn from the whole split, scored by the vocabulary's argmax
    lora = make_cfg("experiment=mosbach2023/mnli_lora")
    assert (lora.method.name, lora.method.finetune, lora.method.train_on, lora.method.objective) == (
        "pbft",
        "lora",
        "labelled_queries",
        "eval/vocab_accuracy",
    )
    assert (lora.dataset.num_train_queries, lora.trainer.batch_size, lora.dataset.context.draw) == (32, 32, "llmft")
    assert (lora.model.lora.r, lora.trainer.epochs, lora.trainer.warmup_ratio, lora.trainer.lr) == (8, 80, 0.25, 2e-4)
    assert make_cfg("experiment=mosbach2023/mnli", "method=icl").method.name == "icl"


# llmft's (pattern, target prefix, answer words) of its in-context scripts, and its fine-tuning patterns, as the
# scripts' bash double quotes pass them: "\n" stays a backslash and an "n" (raw strings here).
SEPARATE_SHOTS_BY = r"\n\n"  # --separate_shots_by "\n\n"
LLMFT_MNLI = {
    "minimal": ("{text1} {text2} ?", " ", ["Yes", "No"], "{text1} {text2} ?"),
    "gpt3": (
        "{text1} question: {text2} Yes or No?",
        " answer: ",
        ["Yes", "No"],
        "{text1} question: {text2} Yes or No? answer:",
    ),
    "eval_harness": (
        r"{text1} \nQuestion: {text2} True or False?",
        r"\nAnswer: ",
        ["True", "False"],
        r"{text1} \nQuestion: {text2} True or False? \nAnswer:",
    ),
}


@pytest.mark.parametrize("num_demos", [4, 0])  # 0: eval.py still ends the query with its target prefix
@pytest.mark.parametrize("pattern", list(LLMFT_MNLI))
def test_mosbach_prompts_are_llmfts_in_context_prompt_for_icl_and_its_input_for_fine_tuning(
    make_cfg, tmp_path, pattern, num_demos
):
    icl_pattern, target_prefix, words, ft_pattern = LLMFT_MNLI[pattern]
    cfg = make_cfg(
        "experiment=mosbach2023/mnli",
        f"dataset.pattern={pattern}",
        *tiny_mnli(tmp_path / "mnli"),
        "ood=[]",
        f"dataset.context.num_demos={num_demos}",
    )
    task = build_task(cfg.dataset, seed=0)
    query = task.eval_sets["eval"][0]

    def fill(text, example):
        return text.format(text1=example.fields["premise"], text2=example.fields["hypothesis"])

    # eval_utils.create_few_shot_context: pattern + target prefix + answer word (its "Ġ" dropped) + separator per
    # demonstration; eval.py: context + pattern, then " " + target_prefix.strip() when there is a prefix.
    context = "".join(f"{fill(icl_pattern, d)}{target_prefix}{words[d.label]}{SEPARATE_SHOTS_BY}" for d in task.demos)
    assert task.teacher_prompt(query) == f"{context}{fill(icl_pattern, query)} {target_prefix.strip()}"
    assert task.student_prompt(query) == fill(ft_pattern, query)  # ft.py: --pattern as the scripts give it
    assert task.verbalizers == [f" {w}" for w in words]  # the "Ġ" target tokens


def test_distilling_llmfts_empty_context_is_refused_as_nothing_to_distil(make_cfg, tmp_path):
    """0 demonstrations: the teacher's query ends with llmft's space (its 0-shot prompt), the student's not; a
    teacher that reads nothing more was let through by that blank (the eighteenth audit's review)."""
    from ctxdistill.config import ConfigError
    from ctxdistill.methods.base import check_context_to_distil

    cfg = make_cfg(
        "experiment=mosbach2023/mnli", *tiny_mnli(tmp_path / "mnli"), "ood=[]", "dataset.context.num_demos=0"
    )
    task = build_task(cfg.dataset, seed=0)
    assert task.teacher_prompt(task.train_queries[0]) == task.student_prompt(task.train_queries[0]) + " "
    with pytest.raises(ConfigError, match="nothing to distil"):
        check_context_to_distil(task, task.train_queries, None)


def released_draws(rows: list[dict], num_shots: int, num_queries: int, seed: int) -> dict[str, list[int]]:
    """The rows (their idx) the released code draws from a split: llmft's eval_utils._select_random_subset
    (balanced) and its --shuffle, llmft's ft.py, and upadraj/In-context's create_train_batch_token, copied
    with the datasets library they use."""
    import datasets

    dataset = datasets.Dataset.from_list(rows)
    np.random.seed(seed)
    indices = []
    for label in (0, 1):
        subset = dataset.filter(lambda s: s["label"] == label)
        indices += list(np.random.choice(subset["idx"], size=num_shots // 2, replace=False))
    demos = dataset.filter(lambda s: s["idx"] in indices)
    candidates = dataset.filter(lambda s: s["idx"] not in indices)
    in_context_queries = np.random.choice(np.array(candidates["idx"]), num_queries, replace=False).tolist()
    np.random.seed(seed)
    ft_rows = dataset.select(np.random.choice(range(len(dataset)), size=num_queries, replace=False))
    return {
        "llmft demos": demos.shuffle(seed)["idx"],
        "llmft ft": ft_rows["idx"],
        "in_context demos": demos["idx"],
        "in_context queries": in_context_queries,
    }


@pytest.mark.parametrize("seed", [0, 3])
def test_mosbach_and_upadhayaya_draw_the_released_codes_rows_for_a_seed(make_cfg, tmp_path, seed):
    files = tiny_mnli(tmp_path / "mnli")
    labels = {"entailment": 0, "contradiction": 1}
    # tiny_mnli's training split, neutral left out as both loaders do; idx is the row's place in the file
    rows = [
        {"idx": i, "label": labels[lab]}
        for i, lab in enumerate(["entailment", "neutral", "contradiction"] * 30)
        if lab != "neutral"
    ]

    def idx(examples):
        return [int(e.fields["premise"][1:]) for e in examples]

    mosbach = build_task(
        make_cfg("experiment=mosbach2023/mnli", *files, "ood=[]", f"dataset.context.data_seed={seed}").dataset, 0
    )
    released = released_draws(rows, 16, 16, seed)
    assert idx(mosbach.demos) == released["llmft demos"]
    assert idx(mosbach.train_queries) == released["llmft ft"]  # pbft's 16 examples
    released = released_draws(rows, 16, 32, seed)
    for shuffled in (False, True):
        cfg = make_cfg(
            "experiment=upadhayaya2024/mnli",
            f"seed={seed}",
            *files,
            "~dataset.ood.hans",
            f"dataset.context.shuffle_demos={shuffled}",
            "dataset.context.draw=in_context",  # their rows, an override (the paper names no generator)
        )
        upadhayaya = build_task(cfg.dataset, seed)
        assert idx(upadhayaya.train_queries) == released["in_context queries"]
        assert sorted(idx(upadhayaya.demos)) == released["in_context demos"]
        assert (idx(upadhayaya.demos) == released["in_context demos"]) != shuffled


def test_qqp_from_the_hub_keeps_llmfts_rows_in_llmfts_order(make_cfg, monkeypatch):
    """llmft's load_glue_datasets: np.random.seed(123) once, then 1000 drawn from each split in the dataset's
    order (train, validation, test), each kept in the order drawn."""
    sizes = {"train": 363846, "validation": 40430, "test": 390965}  # GLUE QQP
    monkeypatch.setattr(tasks, "hub_split_sizes", lambda source: sizes)
    source = make_cfg("dataset=qqp").dataset.source
    np.random.seed(123)
    released = {split: np.random.choice(np.arange(n), size=1000, replace=False).tolist() for split, n in sizes.items()}
    for split, n in sizes.items():
        assert tasks.subsample_indices(source, split, n, "dataset.source") == released[split]
    # an older dataset card lists the splits test, train, validation: the draws stay llmft's (the sixteenth audit)
    monkeypatch.setattr(tasks, "hub_split_sizes", lambda source: {s: sizes[s] for s in ("test", "train", "validation")})
    for split, n in sizes.items():
        assert tasks.subsample_indices(source, split, n, "dataset.source") == released[split]
    # A local file (the offline samples) is one draw from the seed, in file order.
    local = make_cfg("dataset=qqp", f"dataset.source.data_dir={SHARED / 'glue/qqp'}").dataset.source
    kept = tasks.subsample_indices(local, "train", 8999, "dataset.source")
    assert kept == sorted(np.random.RandomState(123).choice(8999, 1000, replace=False))


def released_reading(tokenizer, generated: list[int]) -> str:
    """upadraj/In-context ``predict``: the whole generated sequence decoded, the text after its last "Label:",
    stripped, cut at its first ".", stripped."""
    return tokenizer.decode(generated, skip_special_tokens=True).split("Label:")[-1].strip().split(".")[0].strip()


def test_a_decoded_answer_reads_every_token_as_the_released_code_reads_the_whole_generation(make_cfg):
    import torch

    from ctxdistill.evaluation import decoded_answers
    from ctxdistill.models import load_tokenizer

    cfg = make_cfg("experiment=upadhayaya2024/mnli", "model=tiny-random")  # SmolLM2's real tokenizer
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    prompt = tokenizer("Premise: A man sleeps.\nHypothesis: A person rests.\nLabel:").input_ids
    every_token = torch.arange(len(tokenizer))
    ours = decoded_answers(tokenizer, every_token)
    assert ours == [released_reading(tokenizer, [*prompt, t]) for t in every_token.tolist()]
    # More tokens read as an answer word than the answer word's token that vocab_accuracy requires.
    read_as_yes = {tokenizer.convert_ids_to_tokens(t) for t, text in enumerate(ours) if text == "yes"}
    assert {"Ġyes", "yes"} <= read_as_yes


@pytest.mark.slow
def test_decoded_accuracy_is_the_released_codes_greedy_one_token_answer(make_cfg, tmp_path):
    import json

    import torch

    from ctxdistill.models import load_model, load_tokenizer
    from ctxdistill.run import run

    # The released schedule holds the LR at 0 for 32 steps: the trained model is the base model, which the
    # reference below loads and runs as upadraj/In-context's predict does, one prompt at a time. The bundled
    # model behaves: with the context it answers yes or no (right on 5 of the 16 queries when written),
    # without it " No", which their reading (case-sensitive) counts wrong.
    cfg = make_cfg(
        "experiment=upadhayaya2024/mnli",
        "model=smollm2-135m",
        "logger=none",
        *tiny_mnli(tmp_path / "mnli"),
        "~dataset.ood.hans",
        "dataset.num_eval=8",
        "dataset.num_train_queries=16",
        "trainer.steps_per_lr_update=32",
        "trainer.max_steps=1",
        output_dir=tmp_path / "run",
    )
    metrics = run(cfg)["metrics"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    model = load_model(cfg.model, cfg.cache_dir, tokenizer, seed=cfg.seed).eval()

    def predict(prompt: str) -> str:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_length=inputs.input_ids.shape[-1] + 1,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        return released_reading(tokenizer, output[0].tolist())

    words = ["yes", "no"]  # their labels: the ClassLabel names
    assert [r["decoded_answer"] for r in rows] == [predict(r["prompt"]) for r in rows]
    assert metrics["eval/decoded_accuracy"] == sum(predict(r["prompt"]) == words[r["label"]] for r in rows) / 8
    task = build_task(cfg.dataset, cfg.seed)
    queries = zip(task.train_queries, task.train_query_labels)
    teacher = [predict(task.teacher_prompt(e)) == words[label] for e, label in queries]
    assert metrics["train_queries/context_decoded_accuracy"] == sum(teacher) / len(teacher)
    assert 0 < sum(teacher) < len(teacher), "the check needs answers both right and wrong"
