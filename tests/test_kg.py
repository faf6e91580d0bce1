"""Knowledge-graph completion (Li et al. 2024): loaders, filtered ranking, masking, contexts, both stages."""

import copy
import functools
import hashlib
import json
import shutil
import statistics
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from omegaconf import OmegaConf

from ctxdistill import provenance
from ctxdistill.config import ConfigError, validate
from ctxdistill.data.kg import (
    DataError,
    KGTask,
    KnowledgeGraph,
    _clean_names,
    build_kg_task,
    missing_contexts,
    read_contexts,
    read_kgbert,
    read_kgs2s,
    read_plain,
    synthetic_kg,
)
from ctxdistill.methods.contextualization import check_writable_contexts
from ctxdistill.methods.kgc import (
    ENTITY_AFTER,
    ENTITY_BEFORE,
    RELATION_AFTER,
    RELATION_BEFORE,
    KGBertConfig,
    KGS2SConfig,
    RelationPrompted,
    count_shared,
    fit_triple,
    mask_tokens,
    prompt_positions,
)
from ctxdistill.models import load_model, load_tokenizer
from ctxdistill.ranking import (
    LinkPredictionEvaluator,
    filtered_rank,
    link_prediction_metrics,
    ranking_metrics,
    triple_metrics,
)
from ctxdistill.results.cli import main as compare_main
from ctxdistill.results.records import collect
from ctxdistill.results.stats import example_mean_interval, t_interval, wilson
from ctxdistill.results.table import spreadless_notes, summarise
from ctxdistill.run import run

from conftest import method_of

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "kg"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason="the real knowledge-graph copies (../shared/data) are absent"
)

# Entity ids with leading zeros, as WN18RR's: they must survive as strings.
TRAIN = [("00001", "_hypernym", "00002"), ("00003", "_hypernym", "00002"), ("00001", "_part_of", "00004")]
VALID = [("00004", "_hypernym", "00002")]
TEST = [("00003", "_part_of", "00004")]
TEXTS = {
    "00001": "dog, a domestic animal",
    "00002": "animal, a living organism",
    "00003": "cat, a feline",
    "00004": "farm, a place with animals",
}
RELATIONS = {"_hypernym": "hypernym", "_part_of": "part of"}


def write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def write_kgbert(root: Path) -> Path:
    for file, triples in (("train", TRAIN), ("dev", VALID), ("test", TEST)):
        write(root / f"{file}.tsv", ["\t".join(t) for t in triples])
    write(root / "entity2text.txt", [f"{e}\t{t}" for e, t in TEXTS.items()])
    write(root / "relation2text.txt", [f"{r}\t{t}" for r, t in RELATIONS.items()])
    return root


def write_kgs2s(root: Path) -> Path:
    entities, relations = list(TEXTS), list(RELATIONS)
    write(root / "entity2id.txt", [str(len(entities)), *(f"{e}\t{i}" for i, e in enumerate(entities))])
    write(root / "relation2id.txt", [str(len(relations)), *(f"{r}\t{i}" for i, r in enumerate(relations))])
    write(
        root / "entityid2name.txt",
        [str(len(entities)), *(f"{i}\t{TEXTS[e].split(',')[0]} , NN , 1" for i, e in enumerate(entities))],
    )
    write(
        root / "entityid2description.txt",
        [str(len(entities)), *(f"{i}\t{TEXTS[e].split(', ')[1]}" for i, e in enumerate(entities))],
    )
    write(
        root / "relationid2name.txt", [str(len(relations)), *(f"{i}\t{RELATIONS[r]}" for i, r in enumerate(relations))]
    )
    for split, triples in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        write(
            root / f"{split}2id.txt",
            [
                str(len(triples)),
                *(f"{entities.index(h)} {entities.index(t)} {relations.index(r)}" for h, r, t in triples),
            ],
        )
    return root


def write_plain(root: Path) -> Path:
    for split, triples in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        write(root / f"{split}.txt", ["\t".join(t) for t in triples])
    return root


@pytest.mark.parametrize(
    "layout, writer, separator",
    [("kgbert", write_kgbert, ","), ("kgs2s", write_kgs2s, " , "), ("plain", write_plain, None)],
)
def test_every_layout_loads_the_same_graph_with_string_ids(make_cfg, tmp_path, layout, writer, separator):
    root = writer(tmp_path / layout)
    cfg = make_cfg(
        "dataset=wn18rr",
        f"dataset.source.layout={layout}",
        f"dataset.source.data_dir={root}",
        f"dataset.source.name_separator={repr(separator) if separator else 'null'}",
        f"dataset.contexts_file={tmp_path / 'none.jsonl'}",
    )
    provenance.begin_run()
    task = build_kg_task(cfg.dataset, seed=0)
    assert task.graph.splits == {"train": TRAIN, "valid": VALID, "test": TEST}
    read = {d["path"]: d["sha256"] for d in provenance.inputs()["data"]}  # every file, recorded with its hash
    assert read == {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in root.iterdir()}
    assert task.train_triples == TRAIN and task.eval_sets == {"eval": TEST}
    if layout == "plain":  # ids stand in for names
        assert task.graph.entity_names["00001"] == "00001"
    else:
        assert task.graph.entity_names["00001"] == "dog"
        assert task.entity_text("00001") == "dog, a domestic animal"
        assert task.relation_text("_part_of") == "part of"


def test_broken_files_are_reported_with_the_file_and_the_fix(tmp_path):
    root = write_kgs2s(tmp_path / "s2s")
    write(root / "test2id.txt", ["2", "0 1 0"])
    with pytest.raises(DataError, match=r"test2id.txt: the count line says 2 rows, the file holds 1"):
        read_kgs2s(root)
    root = write_kgbert(tmp_path / "bert")
    write(root / "test.tsv", ["00001\t_hypernym\t99999"])
    with pytest.raises(DataError, match="names entity '99999'"):
        from ctxdistill.data.kg import _check_known

        _check_known(read_kgbert(root), root)
    with pytest.raises(DataError, match="expected 3 fields"):
        write(root / "train.tsv", ["00001\t_hypernym"])
        read_kgbert(root)
    with pytest.raises(DataError, match="not found.*data_dir"):
        read_plain(tmp_path / "nowhere")


@functools.cache
def real_graph(directory: str, reader) -> KnowledgeGraph:
    return reader(SHARED / directory)


@needs_shared
@pytest.mark.parametrize(
    "directory, reader, sizes, first_train",
    [
        ("wn18rr/kgbert_format", read_kgbert, (86835, 3034, 3134), ("00260881", "_hypernym", "00260622")),
        ("wn18rr/kgs2s_processed", read_kgs2s, (86835, 3034, 3134), None),
        ("wn18rr/rotate_format", read_plain, (86835, 3034, 3134), ("00260881", "_hypernym", "00260622")),
        (
            "fb15k237n/kgbert_format",
            read_kgbert,
            (87282, 7041, 8226),
            ("/m/027rn", "/location/country/form_of_government", "/m/06cx9"),
        ),
        ("fb15k237n/kgs2s_processed", read_kgs2s, (87282, 7041, 8226), None),
    ],
)
def test_real_wn18rr_and_fb15k237n_copies_load_with_exact_split_sizes(directory, reader, sizes, first_train):
    graph = real_graph(directory, reader)
    assert tuple(len(graph.splits[s]) for s in ("train", "valid", "test")) == sizes
    if first_train:
        assert graph.splits["train"][0] == first_train
    assert all(isinstance(e, str) for triple in graph.splits["test"][:100] for e in triple)
    if directory.startswith("wn18rr"):
        assert len(graph.entity_names) == 40943 and any(e.startswith("0") for e in graph.entity_names)


@needs_shared
def test_wn18rr_layouts_agree_on_the_test_triples():
    kgbert = real_graph("wn18rr/kgbert_format", read_kgbert)
    kgs2s = real_graph("wn18rr/kgs2s_processed", read_kgs2s)
    assert kgbert.splits["test"] == kgs2s.splits["test"]


# ---------------------------------------------------------------- ranking
def test_filtered_rank_counts_higher_scores_and_half_the_ties_but_not_filtered_ones():
    scores = torch.tensor([0.9, 0.5, 0.7, 0.5, 0.95])
    assert filtered_rank(scores, 1, torch.zeros(5, dtype=torch.bool)) == 1 + 3 + 0.5  # 0.9, 0.7, 0.95 above; one tie
    assert filtered_rank(scores, 1, torch.tensor([True, False, False, False, True])) == 1 + 1 + 0.5
    assert filtered_rank(scores, 4, torch.zeros(5, dtype=torch.bool)) == 1
    metrics = ranking_metrics([1, 2, 4, 20])
    assert metrics == pytest.approx(
        {"mrr": (1 + 1 / 2 + 1 / 4 + 1 / 20) / 4, "hits@1": 0.25, "hits@3": 0.5, "hits@10": 0.75}
    )


def test_a_nan_score_ranks_last_not_first():
    """A diverged model's NaN scores: all alike they rank as a random guess does; a NaN target below the rest."""
    nothing = torch.zeros(5, dtype=torch.bool)
    assert filtered_rank(torch.full((5,), float("nan")), 2, nothing) == 1 + 4 / 2
    assert filtered_rank(torch.tensor([1.0, 2.0, float("nan"), 0.0, 3.0]), 2, nothing) == 5
    assert filtered_rank(torch.tensor([1.0, float("nan"), 0.5]), 0, torch.zeros(3, dtype=torch.bool)) == 1


def hand_built_task() -> KGTask:
    """Entities a..e; the test triple (a, r, b), with (a, r, c) known from training and (d, r, b) from valid."""
    names = {e: e for e in "abcde"}
    graph = KnowledgeGraph(
        names, {}, {"r": "r"}, {"train": [("a", "r", "c")], "valid": [("d", "r", "b")], "test": [("a", "r", "b")]}
    )
    return KGTask("hand", graph, graph.splits["train"], {"eval": graph.splits["test"]})


def test_filtered_ranking_of_a_hand_built_graph_gives_the_known_ranks():
    # Fixed plausibility per candidate: tails of (a, r, ?) and heads of (?, r, b).
    tail_scores = {"a": 0.1, "b": 0.6, "c": 0.9, "d": 0.8, "e": 0.2}  # c is filtered: true rank of b is 2 (d above)
    head_scores = {"a": 0.5, "b": 0.7, "c": 0.5, "d": 0.9, "e": 0.4}  # d is filtered; b above; tie with c: 2.5

    def scorer(queries, candidates):
        return [
            torch.tensor([(tail_scores if d == "tail" else head_scores)[e] for e in cands])
            for (_, d), cands in zip(queries, candidates)
        ]

    metrics, rows = LinkPredictionEvaluator(hand_built_task(), scorer).evaluate()
    assert rows["eval"][0] | {} == {
        "uid": "a|r|b",
        "head": "a",
        "relation": "r",
        "tail": "b",
        "head_rank": 2.5,
        "tail_rank": 2.0,
        "reciprocal_rank": pytest.approx(0.45),  # the triple's term of the MRR: (1/2.5 + 1/2) / 2
    }
    assert metrics["eval/tail_mrr"] == 0.5 and metrics["eval/head_mrr"] == pytest.approx(0.4)
    assert metrics["eval/mrr"] == pytest.approx(0.45)
    assert metrics["eval/hits@1"] == 0 and metrics["eval/hits@3"] == 1.0 and metrics["eval/hits@10"] == 1.0


def test_hits_at_k_intervals_count_each_triple_once_not_its_head_and_tail_queries_twice():
    """A triple's two rankings are one example: two queries of one triple that both hit are not two successes in
    two independent tries (Wilson's interval over 2 would claim [0.342, 1.0] from the one triple)."""
    from ctxdistill.results.stats import wilson
    from ctxdistill.results.table import summarise

    metrics, rows = LinkPredictionEvaluator(hand_built_task(), lambda q, c: [torch.zeros(len(e)) for e in c]).evaluate()
    assert metrics["eval/examples"] == len(rows["eval"]) == 1  # the triples, as --vs pairs them
    assert metrics["eval/hits@3"] == 1.0  # 4 candidates all tied: rank 2.5 both ways
    record = {"method": "m", "model": "m", "dataset": "d", "seed": 0, "metrics": metrics}
    [table] = summarise([record | {"metric_set": link_prediction_metrics().to_dict()}])
    assert table.rows[0].cells["eval/hits@3"].interval == wilson(1, 1)


#: eight test triples' head and tail ranks, and each triple's mean of its two queries' values, by hand
HEAD_RANKS, TAIL_RANKS = [1, 2, 4, 20, 1, 3, 11, 2], [1, 5, 3, 1, 2, 12, 1, 1]
PER_TRIPLE = {
    "hits@1": [1, 0, 0, 0.5, 0.5, 0, 0.5, 0.5],
    "hits@3": [1, 0.5, 0.5, 0.5, 1, 0.5, 0.5, 1],
    "hits@10": [1, 1, 1, 0.5, 1, 0.5, 0.5, 1],
    "mrr": [(1 / h + 1 / t) / 2 for h, t in zip(HEAD_RANKS, TAIL_RANKS)],
}
#: scipy.stats.t.interval(0.95, 7, loc=mean, scale=scipy.stats.sem(values)) of each metric's per-triple values
SCIPY_T_INTERVALS = {
    "hits@1": (0.079421968550902, 0.670578031449098),
    "hits@3": (0.4711590331601311, 0.9038409668398689),
    "hits@10": (0.5961590331601311, 1.0288409668398688),
    "mrr": (0.32765862491368825, 0.7774550114499482),
}


def kg_record(metrics: dict, seed: int = 0, metric_set: Optional[dict] = None) -> dict:
    return {
        "method": "kgbert",
        "model": "minilm-l6",
        "dataset": "wn18rr",
        "seed": seed,
        "status": "complete",
        "metric_set": metric_set or link_prediction_metrics().to_dict(),
        "metrics": metrics,
    }


def test_hits_and_mrr_intervals_are_t_over_the_triples_of_each_triples_mean_of_its_two_queries(tmp_path):
    """A triple's head and tail ranking are one example: its value is the mean of its two queries' (hits, reciprocal
    rank), and one run's interval is Student's t over the triples (scipy's, computed from the values by hand), in
    place of Wilson's over the triples of the queries' mean hits (up to sqrt(2) too wide)."""
    metrics = triple_metrics(HEAD_RANKS, TAIL_RANKS)
    for name, values in PER_TRIPLE.items():
        assert metrics[name] == pytest.approx(statistics.fmean(values))
        assert metrics[f"{name}_sd"] == pytest.approx(statistics.stdev(values))
    assert metrics["mrr"] == pytest.approx(ranking_metrics(HEAD_RANKS + TAIL_RANKS)["mrr"])  # the 16 queries' mean
    (tmp_path / "metrics.json").write_text(
        json.dumps(kg_record({f"eval/{k}": v for k, v in metrics.items()} | {"eval/examples": 8}))
    )
    [table] = summarise(collect([tmp_path]))
    cells = table.rows[0].cells
    for name, (low, high) in SCIPY_T_INTERVALS.items():
        assert cells[f"eval/{name}"].interval == pytest.approx((low, min(high, 1.0)))  # a mean of hits is <= 1
    assert spreadless_notes([table]) == []
    # not Wilson's over the 8 triples of the queries' mean hits, as before: [0.137, 0.694] treats a mean of two
    # hits as one success or failure, though it may be a half
    assert cells["eval/hits@1"].interval != pytest.approx(wilson(0.375 * 8, 8))
    # every example on one bound: the values are successes, Wilson's over the triples (not t's width 0)
    perfect = triple_metrics([1] * 8, [1] * 8)
    assert perfect["hits@1"] == perfect["mrr"] == 1.0 and perfect["hits@1_sd"] == 0.0
    assert example_mean_interval(1.0, 0.0, 8) == wilson(8, 8)


def test_link_prediction_runs_evaluated_before_per_triple_spreads_read_back_and_say_how(tmp_path, capsys):
    """A run written before the spreads (Hits@k declared a share of ``examples``, the 2 queries per triple before
    82c8739; MRR a plain value): read as means without a spread, one run of it gets no interval (Wilson's over the
    queries was too narrow) and a note says why and how to give it one; seeds that differ keep their t-interval."""
    declared = link_prediction_metrics().to_dict()
    for metric in declared["metrics"]:
        if metric["name"].startswith("hits@"):
            metric.update(kind="proportion", lowest=None, highest=None)
        elif metric["name"] == "mrr":
            metric["kind"] = "value"
    old = {"eval/mrr": 0.5, "eval/hits@1": 0.375, "eval/hits@3": 0.6875, "eval/hits@10": 1.0, "eval/examples": 16}
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "metrics.json").write_text(json.dumps(kg_record(old, metric_set=declared)))
    [table] = summarise(collect([tmp_path / "one"]))
    assert {key: cell.interval for key, cell in table.rows[0].cells.items()} == {
        "eval/examples": None, "eval/mrr": None, "eval/hits@1": None, "eval/hits@3": None, "eval/hits@10": None
    }  # fmt: skip
    assert compare_main([str(tmp_path / "one")]) == 0
    out, err = capsys.readouterr()
    assert "0.375  " in out and "0.375 [" not in out
    assert (
        "note: kgbert / minilm-l6 / wn18rr: eval/hits@1, eval/hits@10, eval/hits@3, eval/mrr come from runs evaluated "
        "before they reported the spread of their values per example" in err
    )
    assert "ctxdistill-eval RUN_DIR" in err
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "metrics.json").write_text(
        json.dumps(kg_record(old | {"eval/hits@1": 0.4}, seed=1, metric_set=declared))
    )
    [table] = summarise(collect([tmp_path]))
    assert table.rows[0].cells["eval/hits@1"].interval == pytest.approx(t_interval([0.375, 0.4]))


def test_sampled_candidates_never_hold_a_true_answer_and_name_their_metrics():
    seen = []

    def scorer(queries, candidates):
        seen.extend(candidates)
        return [torch.arange(len(c), dtype=torch.float) for c in candidates]  # the target (first) scores lowest

    task = hand_built_task()
    task.eval_candidates, task.seed = 2, 3
    metrics, _ = LinkPredictionEvaluator(task, scorer).evaluate()
    assert set(metrics) >= {"eval/sampled2_mrr", "eval/sampled2_hits@10", "eval/sampled2_head_mrr"}
    tail_candidates, head_candidates = seen
    assert tail_candidates[0] == "b" and not {"b", "c"} & set(tail_candidates[1:]) and len(tail_candidates) == 3
    assert head_candidates[0] == "a" and not {"a", "d"} & set(head_candidates[1:])
    assert metrics["eval/sampled2_mrr"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------- reconstruction masking
def test_masking_picks_15_percent_of_maskable_tokens_and_replaces_80_10_10():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (200, 500), generator=generator)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = maskable[:, -1] = False  # [CLS] / [SEP]
    inputs, labels = mask_tokens(ids, maskable, mask_token_id=3, vocab_size=50, probability=0.15, generator=generator)
    chosen = labels != -100
    assert chosen.float().sum() / maskable.sum() == pytest.approx(0.15, abs=0.005)
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    masked = (inputs[chosen] == 3).float().mean()
    randomised = (inputs[chosen] < 50).float().mean() - masked  # random ids are drawn below vocab_size
    kept = (inputs[chosen] == ids[chosen]).float().mean()
    assert masked == pytest.approx(0.8, abs=0.01)
    assert randomised == pytest.approx(0.1, abs=0.01) and kept == pytest.approx(0.1, abs=0.01)
    short = mask_tokens(torch.tensor([[5, 6, 7]]), torch.tensor([[False, True, False]]), 3, 50, 1e-9, generator)[1]
    assert short.tolist() == [[-100, 6, -100]]  # every context contributes a prediction


# ---------------------------------------------------------------- contexts
def test_contexts_load_without_a_cut_line_or_rows_about_other_names_and_the_released_format_loads(tmp_path):
    graph = KnowledgeGraph({"00001": "dog", "00002": "animal", "00003": "cat"}, {}, {"_hypernym": "hypernym"}, {})
    path = tmp_path / "contexts.jsonl"
    rows = [
        {"head": "00001", "relation": "_hypernym", "tail": "00002", "context": "A dog is an animal."},  # a person's
        {
            "head": "00003",
            "relation": "_hypernym",
            "tail": "00002",
            "text": "cat | hypernym | animal",
            "context": "Cat",
        },
        # Stage 1 wrote it about other names under the same ids (another graph): not this graph's context.
        {"head": "00001", "relation": "_hypernym", "tail": "00003", "text": "wolf | hypernym | cat", "context": "W"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"head": "00004", "relation": "_hyp')  # killed
    assert read_contexts(path, graph) == {
        ("00001", "_hypernym", "00002"): "A dog is an animal.",
        ("00003", "_hypernym", "00002"): "Cat",
    }
    assert len(read_contexts(path)) == 3  # without a graph to compare the names with
    with pytest.raises(ConfigError, match="did not write.*never overwrites.*another JSON-lines file"):
        check_writable_contexts(path)  # a person's contexts are an input, never overwritten
    released = tmp_path / "knowledge_context.txt"
    released.write_text("dog |**| animal |**| _hypernym |**| Dogs are animals.\n")
    graph = KnowledgeGraph({"00001": "dog", "00002": "animal"}, {}, {"_hypernym": "hypernym"}, {})
    assert read_contexts(released, graph) == {("00001", "_hypernym", "00002"): "Dogs are animals."}


def test_a_context_line_naming_a_shared_name_goes_to_the_entity_of_the_training_triple(tmp_path):
    # Two synsets named "bank"; only the second makes a training triple with "money".
    graph = KnowledgeGraph(
        {"01": "bank", "02": "bank", "03": "money", "04": "river"},
        {},
        {"_related": "related"},
        {"train": [("02", "_related", "03"), ("01", "_related", "04")]},
    )
    path = tmp_path / "contexts.txt"
    path.write_text(
        "bank |**| money |**| _related |**| Banks keep money.\nbank |**| river |**| _related |**| Shores.\n"
    )
    assert read_contexts(path, graph) == {
        ("02", "_related", "03"): "Banks keep money.",
        ("01", "_related", "04"): "Shores.",
    }


@needs_shared
def test_wn18rr_contexts_keyed_by_bare_lemmas_reach_every_training_triple(tmp_path):
    # 12,873 of WN18RR's entities share their bare lemma: a name stood for the last of them, which left
    # 36,992 of the 86,835 training triples without their context.
    graph = _clean_names(real_graph("wn18rr/kgbert_format", read_kgbert), ",")
    train = graph.splits["train"]
    path = tmp_path / "contexts.txt"
    names = graph.entity_names
    path.write_text("".join(f"{names[h]} |**| {names[t]} |**| {r} |**| {h} {r} {t}\n" for h, r, t in train))
    contexts = read_contexts(path, graph)
    assert not missing_contexts(KGTask("wn18rr", graph, train, {}, contexts=contexts))
    # each context names the ids of the line it came from: it must be about the same text as the triple it reached
    written_about = {context: graph.triple_text(tuple(context.split())) for context in set(contexts.values())}
    assert all(written_about[contexts[t]] == graph.triple_text(t) for t in train)


def test_contexts_keyed_by_a_shared_name_go_to_the_training_triples_of_that_text(tmp_path):
    # Two entities named "dog" (as WN18RR's bare lemmas: a third of its entities share one): the line is about the
    # training triple whose names it gives, not about whichever entity came last.
    names = {"00001": "dog", "00002": "animal", "00005": "dog", "00006": "cat"}
    graph = KnowledgeGraph(names, {}, {"_hypernym": "hypernym"}, {"train": [("00001", "_hypernym", "00002")]})
    released = tmp_path / "knowledge_context.txt"
    released.write_text("dog |**| animal |**| _hypernym |**| Dogs are animals.\n")
    assert read_contexts(released, graph) == {("00001", "_hypernym", "00002"): "Dogs are animals."}
    graph.splits["train"].append(("00005", "_hypernym", "00002"))  # both dogs: one context for the text, as stage 1
    assert set(read_contexts(released, graph)) == set(graph.splits["train"])
    released.write_text("cat |**| dog |**| _hypernym |**| Not in the graph.\n")  # kept (a context to borrow)
    assert read_contexts(released, graph) == {("00006", "_hypernym", "00001"): "Not in the graph."}


def test_kgs2s_students_read_the_contexts_stage_one_wrote_with_the_kgbert_layout(make_cfg, tmp_path):
    # li2024/wn18rr writes the contexts about bare lemmas (the released writer's names: the KG-S2S name
    # "dog , NN , 1" cut at its first comma); li2024/wn18rr_kgs2s reads the same file, naming its entities
    # "dog , NN , 1".
    contexts = tmp_path / "contexts.jsonl"
    rows = [
        {"head": "00001", "relation": "_hypernym", "tail": "00002", "text": "dog | hypernym | animal", "context": "D"},
        {"head": "00003", "relation": "_hypernym", "tail": "00002", "text": "cat | hypernym | animal", "context": "C"},
        {"head": "00001", "relation": "_part_of", "tail": "00004", "text": "dog | part of | farm", "context": "F"},
    ]
    contexts.write_text("".join(json.dumps({**row, "writer": "w", "stage": "s"}) + "\n" for row in rows))
    cfg = make_cfg(
        "experiment=li2024/wn18rr_kgs2s",
        f"dataset.source.data_dir={write_kgs2s(tmp_path / 's2s')}",
        f"dataset.contexts_file={contexts}",
    )
    task = build_kg_task(cfg.dataset, seed=0)
    assert task.graph.entity_names["00001"] == "dog , NN , 1"
    assert task.contexts == {(r["head"], r["relation"], r["tail"]): r["context"] for r in rows}
    # A row written about other entities under the same ids is still left out.
    contexts.write_text(json.dumps({**rows[0], "text": "wolf | hypernym | animal", "writer": "w"}) + "\n")
    assert build_kg_task(cfg.dataset, seed=0).contexts == {}


def write_released_contexts(path: Path, lines: list[str], count: int | None = None) -> Path:
    """knowledge_context.txt as the released writer (KGE-LLM/distill_palm.py) leaves it: the number of
    contexts, then one ' |**| '-joined line per triple: the KG-S2S integer ids of head, tail, relation, the text."""
    write(path, [str(len(lines) if count is None else count), *lines])
    return path


def test_the_released_knowledge_context_file_loads_with_its_kgs2s_ids_mapped(make_cfg, tmp_path):
    s2s = write_kgs2s(tmp_path / "s2s")  # entity ids 0..3 = 00001..00004, relations 0 = _hypernym, 1 = _part_of
    released = write_released_contexts(
        s2s / "knowledge_context.txt",
        ["0 |**| 1 |**| 0 |**| A dog is an animal.", "2 |**| 1 |**| 0 |**| A cat is an animal."],
    )
    expected = {
        ("00001", "_hypernym", "00002"): "A dog is an animal.",
        ("00003", "_hypernym", "00002"): "A cat is an animal.",
    }
    assert read_contexts(released) == expected
    # A dataset in another layout reads it through the KG-S2S id files named by dataset.contexts_id_dir.
    elsewhere = tmp_path / "contexts" / "knowledge_context.txt"
    elsewhere.parent.mkdir()
    elsewhere.write_text(released.read_text())
    cfg = make_cfg(
        "dataset=wn18rr",
        f"dataset.source.data_dir={write_kgbert(tmp_path / 'bert')}",
        f"dataset.contexts_file={elsewhere}",
        f"dataset.contexts_id_dir={s2s}",
    )
    task = build_kg_task(cfg.dataset, seed=0)
    assert task.contexts == expected and missing_contexts(task) == [("00001", "_part_of", "00004")]
    with pytest.raises(DataError, match=r"needs entity2id.txt and relation2id.txt.*dataset\.contexts_id_dir"):
        read_contexts(elsewhere)
    write_released_contexts(released, ["0 |**| 1 |**| 0 |**| A dog is an animal."], count=2)
    with pytest.raises(DataError, match="the count line says 2 contexts, the file holds 1"):
        read_contexts(released)
    write_released_contexts(released, ["0 |**| 9 |**| 0 |**| Nothing."])
    with pytest.raises(DataError, match=r"knowledge_context.txt:2: id 9 is not in the KG-S2S entity2id.txt"):
        read_contexts(released)
    with pytest.raises(ConfigError, match="released knowledge_context.txt.*another JSON-lines file"):
        check_writable_contexts(released)  # appending would leave its count line stale


# ---------------------------------------------------------------- KG-BERT's training rows
def synthetic_task(make_cfg, *overrides: str) -> KGTask:
    return build_kg_task(make_cfg("dataset=kg_synthetic", *overrides).dataset, seed=0)


@pytest.mark.parametrize("people", [24, 60])
def test_every_held_out_triple_of_the_generated_graph_names_entities_training_shows(people):
    """With kg_synthetic's 24 people, valid held ('Alice Lind', profession, pilot) where no training triple names
    a pilot: a triple that cannot follow from training. It is left out; the training triples stay as drawn."""
    graph = synthetic_kg(people)
    trained = {entity for h, _, t in graph.splits["train"] for entity in (h, t)}
    for split in ("valid", "test"):
        assert graph.splits[split] and all(h in trained and t in trained for h, _, t in graph.splits[split])
    assert (len(graph.splits["train"]), len(graph.splits["test"])) == ((88, 7) if people == 24 else (210, 18))


def test_kgbert_cuts_a_long_triple_as_kg_bert_does():
    # The strictly longest part loses a token; on a tie the tail does (KG-BERT's _truncate_seq_triple).
    assert fit_triple([30, 3, 30], 46) == [22, 3, 21]
    assert fit_triple([5, 3, 60], 46) == [5, 3, 38]
    assert fit_triple([40, 3, 10], 46) == [33, 3, 10]
    assert fit_triple([10, 3, 10], 46) == [10, 3, 10]


def test_kgbert_draws_five_negatives_per_positive_once_all_on_the_head_or_all_on_the_tail(make_cfg):
    task = synthetic_task(make_cfg)
    method = method_of(KGBertConfig, name="kgbert")
    rows = method.train_examples(task)
    assert len(rows) == 6 * len(task.train_triples) == 6 * 88
    assert rows == method.train_examples(task)  # drawn once: every epoch and a resumed run see the same rows
    known, sides = set(task.train_triples), set()
    for start in range(0, len(rows), 6):
        positive, *negatives = rows[start : start + 6]
        assert positive.label == 1.0 and positive.triple == positive.positive
        assert [n.label for n in negatives] == [0.0] * 5 and {n.positive for n in negatives} == {positive.triple}
        h, r, t = positive.triple
        heads_replaced = all(n.triple[0] != h and n.triple[1:] == (r, t) for n in negatives)
        tails_replaced = all(n.triple[:2] == (h, r) and n.triple[2] != t for n in negatives)
        assert heads_replaced or tails_replaced
        assert not {n.triple for n in negatives} & known
        sides.add("head" if heads_replaced else "tail")
    assert sides == {"head", "tail"}  # a coin flip per positive


def test_more_sampled_candidates_than_a_query_has_entities_to_sample_is_refused_naming_the_full_ranking(make_cfg):
    """Only the graph's size was checked: 40 candidates on kg_synthetic ranked some queries against 37 (those with
    9 known answers), under the name sampled40_."""
    from ctxdistill.ranking import LinkPredictionEvaluator

    for asked in (46, 40):
        with pytest.raises(DataError, match=rf"eval_candidates={asked}, but kg_synthetic has 46 entities and one of "
                           r"its evaluated queries 9 known answers.*at most 37.*eval_candidates=null"):  # fmt: skip
            synthetic_task(make_cfg, f"dataset.eval_candidates={asked}")
    task = synthetic_task(make_cfg, "dataset.eval_candidates=37")
    evaluator = LinkPredictionEvaluator(task, scorer=None)
    ranked = [evaluator._query(t, d, i)[0] for i, t in enumerate(task.eval_sets["eval"]) for d in ("head", "tail")]
    assert {len(candidates) for candidates in ranked} == {38}  # the target and 37 others, for every query


def test_kgbert_negatives_are_no_triple_of_the_whole_training_split_when_it_trains_on_a_subsample(make_cfg):
    task = synthetic_task(make_cfg, "dataset.num_train=30")
    left_out = set(task.graph.splits["train"]) - set(task.train_triples)
    rows = method_of(KGBertConfig, name="kgbert", negatives=40).train_examples(task)
    drawn = {row.triple for row in rows if row.label == 0.0}
    assert len(task.train_triples) == 30 and len(drawn) > 300
    assert not drawn & left_out  # a true triple the subsample left out is no negative


def composed(model: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ctxdistill.cli import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", "output_dir=unused"])
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture(scope="module")
def minilm():
    cfg = composed("minilm-l6")
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    return tokenizer, load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0)


def test_kgbert_rows_carry_their_own_masked_copy_of_the_positive_context(make_cfg, minilm, caplog):
    tokenizer, model = minilm
    task = synthetic_task(make_cfg)
    long_context = " ".join(["the city lies on a river and its people work as painters"] * 10)
    task.contexts = {t: f"{i} {long_context}" for i, t in enumerate(task.train_triples[1:])}
    method = method_of(KGBertConfig, name="kgbert_cd", aux_weight=1.0, max_length=50, context_max_length=50)
    method.wrap_model(model, tokenizer)
    method.check_inputs(task, tokenizer, make_cfg("dataset=kg_synthetic"))
    assert "1 of the 88 training triples have no context" in caplog.text
    rows = method.train_examples(task)
    method.prepare(None, tokenizer, task, rows, 8)
    borrowed = method._contexts[task.train_triples[0]]  # a random one of the file's, drawn once
    assert borrowed in task.contexts.values()
    method.prepare(None, tokenizer, task, rows, 8)
    assert method._contexts[task.train_triples[0]] == borrowed
    batch = method.collate(tokenizer, task, rows[:32])  # 32 rows: 5 positives and some of their negatives
    context = batch["context"]
    assert batch["labels"].tolist() == [r.label for r in rows[:32]] and context["input_ids"].shape == (32, 50)
    assert (context["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    assert (context["input_ids"][:, 49] == tokenizer.sep_token_id).all()  # [CLS] + 48 context tokens + [SEP]
    again = method.collate(tokenizer, task, rows[:32])
    assert torch.equal(again["context"]["input_ids"], context["input_ids"])  # masked once, for every epoch
    assert torch.equal(again["context"]["labels"], context["labels"])
    copies = {tuple(labels.tolist()) for labels in context["labels"][6:12]}  # the second positive's 6 rows
    assert len(copies) == 6  # each row its own masking
    method.missing_context = "error"
    with pytest.raises(ConfigError, match="1 of the 88 training triples have no context"):
        method.check_inputs(task, tokenizer, make_cfg("dataset=kg_synthetic"))
    # the sixteenth audit: a subsample's contexts (the same default file) left the full set borrowing random ones
    method.missing_context = "random"
    task.contexts = dict(list(task.contexts.items())[:44])  # 44 of 88 missing: gaps, filled
    method.check_inputs(task, tokenizer, make_cfg("dataset=kg_synthetic"))
    task.contexts = dict(list(task.contexts.items())[:43])
    with pytest.raises(
        ConfigError, match=r"45 of the 88 training triples have no context in .*: it holds the contexts of another"
    ):
        method.check_inputs(task, tokenizer, make_cfg("dataset=kg_synthetic"))


def test_kgbert_reconstruction_needs_a_tokenizer_with_a_mask_token_before_the_model_loads(make_cfg, seq2seq_tokenizer):
    # SmolLM2's tokenizer has none; the architecture itself is checked in validation (tests/test_configs.py)
    task = synthetic_task(make_cfg)
    task.contexts = {t: "the city lies on a river" for t in task.train_triples}
    cfg = make_cfg("dataset=kg_synthetic", "model=tiny-random")
    with pytest.raises(ConfigError, match=r"model=tiny-random: its tokenizer has no mask token, which reconstruction"):
        method_of(KGBertConfig, name="kgbert_cd", aux_weight=1.0).check_inputs(task, seq2seq_tokenizer, cfg)
    method_of(KGBertConfig, name="kgbert", aux_weight=0.0).check_inputs(task, seq2seq_tokenizer, cfg)  # masks nothing


def test_a_message_about_the_loaded_tokenizer_names_the_model_that_name_or_path_loads(make_cfg, seq2seq_tokenizer):
    """model=bert-base-cased model.name_or_path=DIR loads DIR's tokenizer: a message that named bert-base-cased alone
    blamed a model the run never loaded."""
    task = synthetic_task(make_cfg)
    task.contexts = {t: "the city lies on a river" for t in task.train_triples}
    cfg = make_cfg("dataset=kg_synthetic", "model=bert-base-cased", "model.name_or_path=/some/t5")
    with pytest.raises(ConfigError) as refused:
        method_of(KGBertConfig, name="kgbert_cd", aux_weight=1.0).check_inputs(task, seq2seq_tokenizer, cfg)
    assert str(refused.value).startswith(
        "model=bert-base-cased (model.name_or_path=/some/t5): its tokenizer has no mask token, which reconstruction"
    )


def test_kgbert_fresh_per_batch_rows_batch_positives_with_new_negatives(make_cfg, minilm):
    tokenizer, model = minilm
    task = synthetic_task(make_cfg)
    task.contexts = {t: "a short context" for t in task.train_triples}
    method = method_of(KGBertConfig, name="kgbert_cd", aux_weight=1.0, training_rows="fresh_per_batch", negatives=2)
    method.wrap_model(model, tokenizer)
    triples = method.train_examples(task)
    assert triples == task.train_triples
    method.prepare(None, tokenizer, task, triples, 8)
    first, second = (method.collate(tokenizer, task, triples[:4]) for _ in range(2))
    assert first["labels"].tolist() == [1.0] * 4 + [0.0] * 8 and first["context"]["input_ids"].shape[0] == 4
    assert not torch.equal(first["triples"]["input_ids"], second["triples"]["input_ids"])  # negatives drawn anew


# ---------------------------------------------------------------- KG-S2S's inputs
def kgs2s_task() -> KGTask:
    names = {"04": "tombstone , NN , 1", "07": "memorial , NN , 2", "09": "memorial , NN , 1"}
    descriptions = {"04": "a stone that is used to mark a grave", "07": "a structure erected to commemorate"}
    graph = KnowledgeGraph(
        names, descriptions, {"_hypernym": "hypernym"}, {"train": [("04", "_hypernym", "07")], "valid": [], "test": []}
    )
    task = KGTask("wn", graph, graph.splits["train"], {"eval": []})
    task.contexts = {("04", "_hypernym", "07"): "A tombstone is a kind of memorial."}
    return task


@pytest.fixture(scope="module")
def seq2seq_tokenizer():
    cfg = composed("tiny-random-seq2seq")
    return load_tokenizer(cfg.model, cfg.cache_dir)


def test_kgs2s_queries_and_targets_are_the_released_strings(seq2seq_tokenizer):
    tokenizer, task = seq2seq_tokenizer, kgs2s_task()
    triple = task.train_triples[0]
    cd = method_of(
        KGS2SConfig, name="kgs2s_cd", kgc_weight=0.5, aux_weight=0.5
    )  # 40 / 10 description tokens, as on WN18RR
    assert cd.source(tokenizer, task, triple, "tail") == (
        "predict: tombstone , NN , 1 [a stone that is used to mark a grave] | hypernym | <extra_id_0>"
    )
    assert cd.source(tokenizer, task, triple, "head") == (
        "predict: <extra_id_0> | hypernym | memorial , NN , 2 [a structure erected to commemorate]"
    )
    baseline = method_of(
        KGS2SConfig, name="kgs2s", aux_weight=0.0, source_description_tokens=0, target_description_tokens=4
    )
    assert baseline.source(tokenizer, task, triple, "tail") == "tombstone , NN , 1  | hypernym | <extra_id_0>"
    target = baseline.entity_target(tokenizer, task, "04")  # 4 tokens: 3 and the end of sequence, as released
    assert tokenizer.decode(target[:-1]) == "<extra_id_0>tombstone , NN , 1[a stone that]<extra_id_1>"
    assert target[-1] == tokenizer.eos_token_id
    undescribed = baseline.entity_target(tokenizer, task, "09")
    assert tokenizer.decode(undescribed[:-1]) == "<extra_id_0>memorial , NN , 1[]<extra_id_1>"
    queries = cd.train_examples(task)
    assert queries == [(triple, "tail"), (triple, "head")]  # batched as separate rows
    batch = cd.collate(tokenizer, task, queries)
    assert torch.equal(batch["context"]["input_ids"], batch["kgc"]["input_ids"])  # the released code's input
    intended = method_of(KGS2SConfig, name="kgs2s_cd", kgc_weight=0.5, aux_weight=0.5, context_input="triple")
    sources = intended.collate(tokenizer, task, queries)["context"]["input_ids"]
    assert tokenizer.batch_decode(sources) == ["contextualize: tombstone , NN , 1 | hypernym | memorial , NN , 2"] * 2


def test_kgs2s_hides_query_tokens_from_attention_but_never_the_separators_or_the_sentinel(seq2seq_tokenizer):
    # The released -seq_dropout (KG-S2S/models/model.py, training_step): every source token is hidden with the
    # probability, but T5's "|" (1820) and <extra_id_0> (32099) stay; the context's input is never touched.
    tokenizer, task = seq2seq_tokenizer, kgs2s_task()
    queries = [(task.train_triples[0], d) for d in ("tail", "head")] * 64
    method = method_of(KGS2SConfig, name="kgs2s_cd", kgc_weight=0.5, aux_weight=0.5, source_token_dropout=0.3)
    method.generator.manual_seed(0)
    batch = method.collate(tokenizer, task, queries)
    kept, full = batch["kgc"]["attention_mask"], batch["context"]["attention_mask"]
    assert torch.equal(batch["kgc"]["input_ids"], batch["context"]["input_ids"]) and bool((kept <= full).all())
    hidden = (full == 1) & (kept == 0)
    marks = torch.tensor(sorted(set(tokenizer(" | <extra_id_0>", add_special_tokens=False).input_ids)))
    protected = torch.isin(batch["kgc"]["input_ids"], marks)
    assert protected.any() and not (hidden & protected).any()
    assert abs(hidden.sum().item() / ((full == 1) & ~protected).sum().item() - 0.3) < 0.03
    without = method_of(KGS2SConfig, name="kgs2s_cd", kgc_weight=0.5, aux_weight=0.5).collate(tokenizer, task, queries)
    assert torch.equal(without["kgc"]["attention_mask"], full)


@pytest.mark.parametrize("direction", ["tail", "head"])
def test_kgs2s_relation_prompts_sit_where_the_released_code_puts_them(direction):
    # KG-S2S/helper.py, get_soft_prompt_pos: for a query of n tokens (the last one T5's end of sequence) whose "|"
    # tokens are sep1 and sep2, the encoder reads source_ids[input_index] with the four prompts written over the
    # positions soft_prompt_index, in the order (rel_embed3, rel_embed4, rel_embed1, rel_embed2)
    n = 12
    if direction == "tail":
        sep1, sep2 = 4, 7
        input_index = [0, *range(sep1), 0, sep1, 0, *range(sep1 + 1, sep2), 0, *range(sep2, n)]
        soft_prompt_index = [0, sep1 + 1, sep1 + 3, sep2 + 3]
    else:
        sep1, sep2 = 1, 4
        input_index = [*range(sep1 + 1), 0, *range(sep1 + 1, sep2), 0, sep2, 0, *range(sep2 + 1, n - 1), 0, n - 1]
        soft_prompt_index = [sep2 + 3, n + 2, sep1 + 1, sep2 + 1]
    prompts = dict(zip(soft_prompt_index, (ENTITY_BEFORE, ENTITY_AFTER, RELATION_BEFORE, RELATION_AFTER)))
    released = [("prompt", prompts[i]) if i in prompts else index for i, index in enumerate(input_index)]
    before = prompt_positions(direction, sep1, sep2, n - 1)
    ours = [item for p in range(n) for item in ([("prompt", before[p])] if p in before else []) + [p]]
    assert ours == released


def test_kgs2s_relation_prompts_wrap_the_entity_and_the_relation_and_train(seq2seq_tokenizer):
    tokenizer, task = seq2seq_tokenizer, kgs2s_task()
    triple = task.train_triples[0]
    method = method_of(KGS2SConfig, name="kgs2s_cd", kgc_weight=0.5, aux_weight=0.5, relation_prompts=True)
    method.relation_index = {"_hypernym": 0, "_part_of": 1}
    queries = [(triple, "tail"), (triple, "head")]
    batch = method.collate(tokenizer, task, queries)
    kgc = batch["kgc"]
    pieces = []
    for row in range(2):
        ids = kgc["input_ids"][row][kgc["attention_mask"][row].bool()].tolist()
        prompts = torch.nonzero(kgc["prompt_mask"][row]).flatten().tolist()
        bounds = [-1, *prompts, len(ids)]
        pieces.append([tokenizer.decode(ids[a + 1 : b]).strip() for a, b in zip(bounds, bounds[1:])])
    entity = "predict: tombstone , NN , 1 [a stone that is used to mark a grave]"
    assert pieces[0] == ["", entity, "|", "hypernym", "| <extra_id_0>"]
    assert pieces[1] == [
        "predict: <extra_id_0> |",
        "hypernym",
        "|",
        "memorial , NN , 2 [a structure erected to commemorate]",
        "",
    ]
    assert kgc["prompt_ids"].tolist() == [[2, 3, 0, 1], [0, 1, 2, 3]]  # relation 0's four, in position order
    assert "prompt_ids" not in batch["context"]
    # The wrapped model reads the prompts' trained embeddings at their positions, the tokens' everywhere else.
    cfg = composed("tiny-random-seq2seq")
    t5 = load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0).eval()
    student = method.wrap_model(t5, tokenizer).eval()
    assert student.prompts.num_embeddings == 8
    embeds = t5.get_input_embeddings()(kgc["input_ids"]).detach().clone()
    embeds[kgc["prompt_mask"]] = student.prompts.weight[kgc["prompt_ids"].flatten()]
    expected = t5(inputs_embeds=embeds, attention_mask=kgc["attention_mask"], labels=kgc["labels"]).loss
    loss = student(**kgc).loss
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert student.prompts.weight.grad[:4].abs().sum(-1).gt(0).all() and not student.prompts.weight.grad[4:].any()
    context = {k: v for k, v in batch["context"].items()}
    torch.testing.assert_close(student(**context).loss, t5(**context).loss)


def test_kgs2s_reconstruction_hides_three_token_spans_behind_sentinels_in_reading_order():
    import random

    from ctxdistill.methods.kgc import corrupt_spans

    ids = [*range(100, 140), 1]  # 41 tokens, the last the end-of-sequence: int(41 * 0.15) = 6, two spans
    sentinels = [-1, -2]
    for seed in range(50):
        corrupted, spans = corrupt_spans(ids, sentinels, random.Random(seed))
        assert len(spans) == 2 and all(len(span) == 3 for span in spans)
        assert corrupted[-2:] == ids[-2:]  # never the last two tokens, as released
        rebuilt = [t for token in corrupted for t in (spans[-token - 1] if token < 0 else [token])]
        assert rebuilt == ids and [t for t in corrupted if t < 0] == sentinels  # numbered in reading order
    assert corrupt_spans([5, 6, 7, 8, 9, 1], sentinels, random.Random(0)) == ([5, 6, 7, 8, 9, 1], [])  # too short


def test_kgs2s_reconstruction_trains_on_the_released_target_or_the_hidden_tokens(seq2seq_tokenizer):
    from ctxdistill.methods.kgc import sentinel_tokens

    tokenizer = copy.deepcopy(seq2seq_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": sentinel_tokens(100)})  # T5's vocabulary has them
    task, triple = kgs2s_task(), kgs2s_task().train_triples[0]
    spans = [[100, 101, 102], [110, 111, 112]]
    released = method_of(
        KGS2SConfig, name="kgs2s", aux_weight=0.0, reconstruction_weight=0.5, reconstruction_target="id_digits"
    )
    # KG-S2S/data.py, build_reconstruction: the target spells the hidden ids in decimal after each sentinel
    expected = "<extra_id_0> 100 101 102 <extra_id_1> 110 111 112 <extra_id_2>"
    assert released.reconstruction_ids(tokenizer, spans) == tokenizer(expected).input_ids
    method = method_of(KGS2SConfig, name="kgs2s", aux_weight=0.0, reconstruction_weight=0.5)
    s0, s1, s2 = tokenizer.convert_tokens_to_ids(sentinel_tokens(3))
    assert method.reconstruction_ids(tokenizer, spans) == [s0, 100, 101, 102, s1, 110, 111, 112, s2, 2]
    # with reconstruction alone the query starts with "predict: " (released: -contextualization or -reconstruction)
    assert method.source(tokenizer, task, triple, "tail").startswith("predict: tombstone")
    method.prepare(None, tokenizer, task, [], 1)
    batch = method.collate(tokenizer, task, [(triple, "tail"), (triple, "head")])
    assert "context" not in batch  # aux_weight is 0
    context_ids = tokenizer("A tombstone is a kind of memorial.", add_special_tokens=False).input_ids + [2]
    corruption = batch["reconstruction"]
    for source, mask, labels in zip(*(corruption[k].tolist() for k in ("input_ids", "attention_mask", "labels"))):
        labels = [t for t in labels if t != -100]  # sentinel, 3 hidden tokens, ..., the last sentinel, eos
        hidden = {labels[i]: labels[i + 1 : i + 4] for i in range(0, len(labels) - 2, 4)}
        source = [token for token, kept in zip(source, mask) if kept]
        assert [t for token in source for t in hidden.get(token, [token])] == context_ids
    cfg = composed("tiny-random-seq2seq")
    t5 = load_model(cfg.model, cfg.cache_dir, seq2seq_tokenizer, seed=0)
    t5.resize_token_embeddings(len(tokenizer))
    t5.eval()  # no dropout: the two computations see the same model
    loss, extra = method.loss(SimpleNamespace(student=t5), batch)
    kgc, reconstruction = (t5(**batch[key]).loss for key in ("kgc", "reconstruction"))
    torch.testing.assert_close(loss, kgc + 0.5 * reconstruction)
    assert extra["reconstruction_loss"] == pytest.approx(reconstruction.item())
    # a tokenizer without T5's sentinels is refused before training
    with pytest.raises(ConfigError, match="lacks <extra_id_0>.*reconstruction_weight=0"):
        method.check_inputs(task, seq2seq_tokenizer, composed("tiny-random-seq2seq"))


def test_kgs2s_refuses_a_query_its_relation_prompts_would_lose_to_a_cut(seq2seq_tokenizer):
    # The prompts sit around the query's separators; a query cut at method.max_length may have lost them.
    task = kgs2s_task()
    method_of(KGS2SConfig, name="kgs2s", aux_weight=0.0, max_length=8).check_inputs(task, seq2seq_tokenizer, None)
    prompted = method_of(KGS2SConfig, name="kgs2s", aux_weight=0.0, max_length=8, relation_prompts=True)
    with pytest.raises(ConfigError, match=r"a query of \d+ tokens .* exceeds method.max_length=8"):
        prompted.check_inputs(task, seq2seq_tokenizer, None)


def test_kgs2s_refuses_descriptions_the_files_do_not_give(seq2seq_tokenizer):
    # the sixteenth audit: li2024/fb15k237n_kgs2s on files of names only (the shared FB15k-237N copy) ran with an
    # empty "[]" in every query and target, as if with the released descriptions
    task = kgs2s_task()
    task.graph.entity_descriptions.clear()
    with pytest.raises(
        ConfigError,
        match=r"method.source_description_tokens=40 and method.target_description_tokens=10 ask for entity "
        r"descriptions, and the wn files give none .* method.source_description_tokens=0 "
        r"method.target_description_tokens=0",
    ):
        method_of(KGS2SConfig, name="kgs2s", aux_weight=0.0).check_inputs(task, seq2seq_tokenizer, None)
    method_of(
        KGS2SConfig, name="kgs2s", aux_weight=0.0, source_description_tokens=0, target_description_tokens=0
    ).check_inputs(task, seq2seq_tokenizer, None)


@needs_shared
def test_the_shared_fb15k237n_copy_names_its_entities_without_descriptions():
    graph = real_graph("fb15k237n/kgs2s_processed", read_kgs2s)
    assert not graph.entity_descriptions and len(graph.entity_names) == 14541  # so its KG-S2S run is refused


def test_kgs2s_warns_when_entities_share_a_target(seq2seq_tokenizer, caplog):
    task = kgs2s_task()
    task.graph.entity_names["09"] = "memorial , NN , 2"
    method_of(KGS2SConfig, name="kgs2s", aux_weight=0.0, target_description_tokens=0).check_inputs(
        task, seq2seq_tokenizer, None
    )
    assert "2 of the 3 entities (66.7%) share their target with another entity" in caplog.text


def namesakes_task() -> KGTask:
    """kgs2s_task with 10, a namesake of 09 (no description either: the students cannot tell them apart), and 11,
    whose long name pads the batch it falls in."""
    task = kgs2s_task()
    task.graph.entity_names["10"] = task.graph.entity_names["09"]
    task.graph.entity_names["11"] = "a long name that goes " + "on and " * 12 + "on"
    return task


def assert_namesakes_tie(method, model, tokenizer):
    """09 and its namesake 10, scored in batches of two with different padding (the long 11 beside 09), get the
    very same score, so the one ranks half a place below the other (the ties rule), not a whole place by chance."""
    task, handle = namesakes_task(), SimpleNamespace(base=model)
    names = ["09", "11", "10"]
    for direction in ("tail", "head"):
        [scores] = method.score(handle, tokenizer, task, [(task.train_triples[0], direction)], [names], 2)
        assert scores[0].item() == scores[2].item() != scores[1].item()
        assert filtered_rank(scores, 0, torch.zeros(3, dtype=torch.bool)) == 1 + int(scores[1] > scores[0]) + 0.5


def test_candidates_the_kgs2s_student_cannot_tell_apart_tie(seq2seq_tokenizer):
    cfg = composed("tiny-random-seq2seq")
    model = load_model(cfg.model, cfg.cache_dir, seq2seq_tokenizer, seed=0)
    method = method_of(KGS2SConfig, name="kgs2s", aux_weight=0.0, target_description_tokens=0)
    assert_namesakes_tie(method, model, seq2seq_tokenizer)


def test_candidates_the_kgbert_student_cannot_tell_apart_tie(minilm):
    tokenizer, model = minilm
    method = method_of(KGBertConfig, name="kgbert", aux_weight=0.0)
    assert_namesakes_tie(method, method.wrap_model(model, tokenizer), tokenizer)


def test_the_students_score_trainer_eval_batch_size_candidates_per_forward_pass(minilm):
    # The candidates per pass were a method setting of their own (256) while trainer.eval_batch_size, which the
    # li2024 experiments set, did nothing in a knowledge-graph run.
    tokenizer, model = minilm
    method = method_of(KGBertConfig, name="kgbert", aux_weight=0.0)
    scorer, task = method.wrap_model(model, tokenizer), namesakes_task()
    rows = []
    scorer.register_forward_hook(
        lambda _module, _args, kwargs, _out: rows.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    evaluator = method.evaluator(SimpleNamespace(base=scorer), tokenizer, task, batch_size=2)
    evaluator.scorer([(task.train_triples[0], "tail")], [["07", "09", "11", "10"]])
    assert rows == [2, 1]  # three distinct candidate texts (10 is 09's namesake), two per pass


@needs_shared
def test_wn18rr_kgs2s_names_are_unique_where_bare_lemmas_are_shared_by_31_percent(make_cfg):
    graph = real_graph("wn18rr/kgs2s_processed", read_kgs2s)
    assert count_shared(graph.entity_names.values()) == 0 and len(graph.entity_names) == 40943
    lemmas = _clean_names(graph, ",").entity_names  # "tombstone , NN , 1" -> "tombstone", the kgbert layout's name
    assert count_shared(lemmas.values()) == 12873  # 31.4% of the entities
    kgbert = real_graph("wn18rr/kgbert_format", read_kgbert)
    assert count_shared(_clean_names(kgbert, ",").entity_names.values()) == 12873
    cfg = make_cfg("experiment=li2024/wn18rr_kgs2s", f"dataset.source.data_dir={SHARED / 'wn18rr/kgs2s_processed'}")
    assert (cfg.dataset.source.layout, cfg.dataset.source.name_separator) == ("kgs2s", None)


# ---------------------------------------------------------------- both stages, end to end
KG_TINY = [
    "dataset=kg_synthetic",
    "logger=none",
    "dataset.source.num_people=8",
    "dataset.num_eval=3",
    "trainer.eval_batch_size=8",
]


def test_stage_one_samples_with_the_top_k_it_records(make_cfg, tmp_path, monkeypatch):
    # the sixteenth audit: transformers filled in top_k=50, which neither the settings nor the stage's key named
    from transformers.generation import logits_process

    cuts = []
    real = logits_process.TopKLogitsWarper.__call__

    def recording(self, input_ids, scores):
        cuts.append(self.top_k)
        return real(self, input_ids, scores)

    monkeypatch.setattr(logits_process.TopKLogitsWarper, "__call__", recording)
    common = [*KG_TINY, "method=contextualization", "model=tiny-random", "method.max_new_tokens=2"]
    common += [f"method.stage_dir={tmp_path / 'stage'}", f"dataset.contexts_file={tmp_path / 'contexts.jsonl'}"]
    run(make_cfg(*common, output_dir=tmp_path / "top50"))
    assert set(cuts) == {50}
    cuts.clear()
    whole = run(make_cfg(*common, "method.top_k=null", output_dir=tmp_path / "whole"))
    assert cuts == [] and whole["metrics"]["contexts/reused"] == 0  # another key: written again, uncut


def test_stage_one_writes_a_context_per_training_triple_and_resumes(make_cfg, tmp_path):
    contexts, stage = tmp_path / "contexts.jsonl", tmp_path / "stage"
    common = [
        *KG_TINY,
        "method=contextualization",
        "model=tiny-random",
        "method.max_new_tokens=4",
        "method.batch_size=4",
        f"method.stage_dir={stage}",
        f"dataset.contexts_file={contexts}",
    ]
    first = run(make_cfg(*common, output_dir=tmp_path / "first"))
    lines = contexts.read_text().splitlines()
    triples = {tuple(json.loads(line)[k] for k in ("head", "relation", "tail")) for line in lines}
    assert first["metrics"]["contexts/written"] == len(lines) == len(triples) > 10
    assert first["metrics"]["contexts/covered"] == 1.0
    [rows] = stage.glob("contexts-*.jsonl")
    written = rows.read_text().splitlines()
    rows.write_text("\n".join(written[:8]) + "\n" + written[8][:30])  # killed while writing the third batch
    second = run(make_cfg(*common, output_dir=tmp_path / "second"))
    assert (second["metrics"]["contexts/reused"], second["metrics"]["contexts/written"]) == (8, len(lines) - 8)
    assert contexts.read_text().splitlines() == lines  # what an uninterrupted run wrote
    assert run(make_cfg(*common, output_dir=tmp_path / "third"))["metrics"]["contexts/written"] == 0


def test_stage_one_writes_with_its_own_settings_whatever_the_writers_generation_config_holds(
    make_cfg, tmp_path, behaving_model_dir
):
    """transformers fills what generate() is not given from the model's generation_config.json: a Hub writer's
    repetition penalty changed every context, unrecorded in the stage's key."""
    from conftest import behaving_overrides

    penalised = tmp_path / "penalised"
    shutil.copytree(behaving_model_dir, penalised)
    (penalised / "generation_config.json").write_text(json.dumps({"repetition_penalty": 10.0, "min_new_tokens": 6}))
    written = []
    for writer in (behaving_model_dir, penalised):
        contexts = tmp_path / f"{writer.name}.jsonl"
        overrides = [*KG_TINY, "method=contextualization", "method.max_new_tokens=6", "method.temperature=0"]
        overrides.append("method.chat_template=false")
        run(
            make_cfg(
                *overrides,
                *behaving_overrides(writer),
                f"method.stage_dir={tmp_path / 'stage'}",
                f"dataset.contexts_file={contexts}",
                output_dir=tmp_path / writer.name,
            )
        )
        written.append([json.loads(line)["context"] for line in contexts.read_text().splitlines()])
    assert written[0] == written[1] and any(written[0])


def test_covered_counts_the_training_triples_given_a_context_that_is_not_empty(make_cfg, tmp_path):
    """A writer that ends at once leaves a triple nothing to reconstruct; covered was every triple's share, always 1."""
    from ctxdistill.methods.contextualization import replace_contexts

    task = synthetic_task(make_cfg, f"dataset.contexts_file={tmp_path / 'contexts.jsonl'}")
    n = len(task.train_triples)
    contexts = ["a paragraph"] * (n - 3) + ["", " \n", "one"]
    metrics, _ = replace_contexts(task, contexts, "writer", "stage", set())
    assert metrics["contexts/covered"] == (n - 2) / n and metrics["contexts/written"] == 0


@pytest.mark.parametrize(
    "override",
    ["method.temperature=0", "method.max_new_tokens=5", "method.prompt='About {head}, {relation}, {tail}.'"],
)
def test_stage_one_rewrites_every_context_when_a_setting_changes_what_it_writes(make_cfg, tmp_path, override):
    common = [*KG_TINY, "method=contextualization", "model=tiny-random", "method.max_new_tokens=4"]
    common += [f"method.stage_dir={tmp_path / 'stage'}", f"dataset.contexts_file={tmp_path / 'contexts.jsonl'}"]
    first = run(make_cfg(*common, output_dir=tmp_path / "first"))
    changed = run(make_cfg(*common, override, output_dir=tmp_path / "changed"))
    assert changed["metrics"]["contexts/written"] == first["metrics"]["contexts/written"] > 10
    assert changed["metrics"]["contexts/reused"] == 0


@pytest.mark.parametrize("temperature", [0.7, 0])
def test_stage_one_reads_a_sampled_context_only_where_the_same_triples_were_drawn_with_it(
    make_cfg, tmp_path, temperature
):
    # A batch's rows share one random stream, seeded by its first triple: a sampled context depends on the triples
    # batched with it, so other training triples (a subsample, another order) write their own. Greedy ones do not.
    common = [*KG_TINY, "method=contextualization", "model=tiny-random", "method.max_new_tokens=4"]
    common += ["method.batch_size=4", f"method.temperature={temperature}", f"method.stage_dir={tmp_path / 'stage'}"]
    common += [f"dataset.contexts_file={tmp_path / 'contexts.jsonl'}"]
    assert run(make_cfg(*common, output_dir=tmp_path / "all"))["metrics"]["contexts/written"] > 10
    subsample = run(make_cfg(*common, "dataset.num_train=6", output_dir=tmp_path / "subsample"))["metrics"]
    assert (subsample["contexts/reused"], subsample["contexts/written"]) == ((0, 6) if temperature else (6, 0))


def test_stage_one_rewrites_the_contexts_of_triples_whose_names_changed(make_cfg, tmp_path):
    # Another generator seed gives the same entity ids to other people: ('E012', 'born_in', 'T008') is about
    # someone else, and its context must be written anew; the cities' triples keep their names and (greedy, written
    # whatever the triples batched with them) their contexts.
    contexts = tmp_path / "contexts.jsonl"
    common = [*KG_TINY, "method=contextualization", "model=tiny-random", "method.max_new_tokens=4"]
    common += ["method.temperature=0"]
    common += [f"method.stage_dir={tmp_path / 'stage'}", f"dataset.contexts_file={contexts}"]
    run(make_cfg(*common, output_dir=tmp_path / "first"))
    first = {(r["head"], r["relation"], r["tail"]): r for r in map(json.loads, contexts.read_text().splitlines())}
    reseeded = make_cfg(*common, "dataset.source.seed=7", output_dir=tmp_path / "reseeded")
    task = build_kg_task(reseeded.dataset, seed=0)
    texts = {t: task.graph.triple_text(t) for t in task.train_triples}
    about_others = {t for t in task.train_triples if t in first and first[t]["text"] != texts[t]}
    assert about_others and not about_others & set(task.contexts)  # stage 2 would not read them
    kept = {t for t in task.train_triples if t in first and first[t]["text"] == texts[t]}
    assert kept and set(task.contexts) & set(task.train_triples) == kept

    metrics = run(reseeded)["metrics"]
    assert metrics["contexts/reused"] == len({texts[t] for t in kept}) and metrics["contexts/written"] > 0
    rows = [json.loads(line) for line in contexts.read_text().splitlines()]
    assert [(r["head"], r["relation"], r["tail"]) for r in rows] == task.train_triples
    assert all(r["text"] == texts[(r["head"], r["relation"], r["tail"])] for r in rows)
    assert all(
        r["context"] == first[t]["context"] for t in kept for r in rows if (r["head"], r["relation"], r["tail"]) == t
    )


@needs_shared
def test_description_contexts_are_the_entity2text_lines_of_head_and_tail(make_cfg, tmp_path):
    # The reference stage 1 (docs/effects.md: WordNet's definitions as the contexts), against the files themselves.
    data = SHARED / "wn18rr/kgbert_format"
    lines = dict(line.split("\t", 1) for line in (data / "entity2text.txt").read_text().splitlines())
    contexts = tmp_path / "definitions.jsonl"
    common = ["experiment=li2024/wn18rr_subsample", "method=description_contexts", "model=tiny-random", "logger=none"]
    common += [f"dataset.source.data_dir={data}", "dataset.num_train=12", f"dataset.contexts_file={contexts}"]
    result = run(make_cfg(*common, output_dir=tmp_path / "run"))
    rows = [json.loads(line) for line in contexts.read_text().splitlines()]
    assert [r["context"] for r in rows] == [f"{lines[r['head']]}. {lines[r['tail']]}." for r in rows]
    assert len(rows) == result["metrics"]["contexts/written"] == 12 and result["metrics"]["contexts/covered"] == 1
    assert {r["writer"] for r in rows} == {"entity descriptions"}
    stage_two = make_cfg(*common, "method=kg_decoder_cd", "experiment=li2024/wn18rr_subsample_decoder")
    task = build_kg_task(stage_two.dataset, seed=0)
    assert [task.contexts[t] for t in task.train_triples] == [r["context"] for r in rows]  # what stage 2 reads


def test_description_contexts_are_refused_for_entities_without_a_description(make_cfg, tmp_path):
    root = write_plain(tmp_path / "plain")  # ids only: nothing describes the entities
    cfg = make_cfg(
        "dataset=wn18rr",
        "dataset.source.layout=plain",
        f"dataset.source.data_dir={root}",
        "dataset.source.name_separator=null",
        f"dataset.contexts_file={tmp_path / 'contexts.jsonl'}",
        "method=description_contexts",
        "model=tiny-random",
        "logger=none",
        output_dir=tmp_path / "run",
    )
    with pytest.raises(
        ConfigError, match=r"entities of the training triples have no description.*method=contextualization"
    ):
        run(cfg)
    assert not (tmp_path / "contexts.jsonl").exists()


def test_students_train_with_their_auxiliary_task_and_rank(make_cfg, tmp_path):
    contexts = tmp_path / "contexts.jsonl"
    cfg = make_cfg(*KG_TINY, "method=kgbert_cd", "model=minilm-l6", f"dataset.contexts_file={contexts}")
    with pytest.raises(ConfigError, match="have no context.*method=contextualization.*method.aux_weight=0"):
        run(cfg)
    task = build_kg_task(cfg.dataset, seed=0)
    names = task.graph.entity_names
    contexts.write_text(
        "".join(
            json.dumps(
                {"head": h, "relation": r, "tail": t, "context": f"{names[h]} {task.relation_text(r)} {names[t]}."}
            )
            + "\n"
            for h, r, t in task.train_triples
        )
    )
    for method, model in (("kgbert_cd", "minilm-l6"), ("kgs2s_cd", "tiny-random-seq2seq")):
        result = run(
            make_cfg(
                *KG_TINY,
                f"method={method}",
                f"model={model}",
                f"dataset.contexts_file={contexts}",
                "trainer.max_steps=2",
                "trainer.batch_size=4",
                "dataset.eval_candidates=5",
                output_dir=tmp_path / method,
            )
        )
        assert result["train"]["steps"] == 2 and result["objective"] == "eval/sampled5_mrr"
        rows = [json.loads(line) for line in (tmp_path / method / "predictions.jsonl").read_text().splitlines()]
        ranks = [r[f"{d}_rank"] for r in rows for d in ("head", "tail")]
        assert rows and all(1 <= rank <= 6 for rank in ranks)  # 5 sampled candidates and the answer
        assert result["metrics"]["eval/sampled5_mrr"] == pytest.approx(sum(1 / r for r in ranks) / len(ranks))
        assert result["metrics"]["eval/sampled5_hits@1"] == pytest.approx(sum(r <= 1 for r in ranks) / len(ranks))
        assert (tmp_path / method / "model" / "config.json").is_file()
    assert (tmp_path / "kgbert_cd" / "model" / "triple_head.pt").is_file()


def test_a_student_with_relation_prompts_saves_them_and_is_evaluated_again_from_its_run(make_cfg, tmp_path):
    from ctxdistill.evaluate_run import evaluate_run

    overrides = ["method=kgs2s", "model=tiny-random-seq2seq", "method.relation_prompts=true"]
    overrides += ["method.source_token_dropout=0.2", "trainer.max_steps=2", "dataset.eval_candidates=5"]
    result = run(make_cfg(*KG_TINY, *overrides, output_dir=tmp_path / "run"))
    prompts = torch.load(tmp_path / "run" / "model" / "relation_prompts.pt", weights_only=True)["weight"]
    assert prompts.shape[0] == 4 * len(build_kg_task(make_cfg(*KG_TINY).dataset, seed=0).graph.relation_names)
    cfg = composed("tiny-random-seq2seq")
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    reloaded = RelationPrompted(load_model(cfg.model, cfg.cache_dir, tokenizer, seed=1), len(prompts) // 4)
    reloaded.load_trained(tmp_path / "run" / "model")
    assert torch.equal(reloaded.prompts.weight, prompts)
    again = evaluate_run(tmp_path / "run", [], "again")
    assert again["metrics"] == result["metrics"]


def test_the_students_wrappers_save_from_a_gathered_state_dict_as_from_their_own(minilm, seq2seq_tokenizer, tmp_path):
    # Under FSDP or ZeRO-3 the run hands save_pretrained the whole module's gathered state_dict.
    tokenizer, mlm = minilm
    cfg = composed("tiny-random-seq2seq")
    t5 = load_model(cfg.model, cfg.cache_dir, seq2seq_tokenizer, seed=0)
    kgbert = method_of(KGBertConfig, name="kgbert", aux_weight=0.0)
    wrappers = {  # each wrapper, and how a fresh one is built around the model it saved
        "kgbert": (
            kgbert.wrap_model(mlm, tokenizer),
            lambda path: kgbert.wrap_model(type(mlm).from_pretrained(path), tokenizer),
        ),
        "kgs2s": (RelationPrompted(t5, 2), lambda path: RelationPrompted(type(t5).from_pretrained(path), 2)),
    }
    for name, (wrapper, rebuild) in wrappers.items():
        own_part = next(p for n, p in wrapper.named_parameters() if n.startswith(("head", "prompts")))
        torch.nn.init.normal_(own_part)  # not the values a fresh wrapper starts from
        for gathered in (None, wrapper.state_dict()):
            path = tmp_path / f"{name}-{'own' if gathered is None else 'gathered'}"
            wrapper.save_pretrained(path, state_dict=gathered)
            copy = rebuild(path)
            copy.load_trained(path)
            for (key, mine), theirs in zip(wrapper.state_dict().items(), copy.state_dict().values()):
                assert torch.equal(mine, theirs), key


def test_a_periodic_evaluation_leaves_the_student_training_as_it_was(make_cfg, tmp_path):
    # T5's dropout draws from the global generator and ranking draws nothing: evaluating after every
    # step must not change a single training loss (it used to leave the student in eval mode).
    common = [
        *KG_TINY,
        "method=kgs2s",
        "model=tiny-random-seq2seq",
        "trainer.max_steps=4",
        "trainer.batch_size=4",
        "dataset.eval_candidates=5",
    ]
    plain = run(make_cfg(*common, output_dir=tmp_path / "plain"))
    evaluated = run(make_cfg(*common, "trainer.eval_every=1", output_dir=tmp_path / "evaluated"))
    assert evaluated["train"]["final_loss"] == plain["train"]["final_loss"]
    assert evaluated["metrics"] == plain["metrics"]


SELECTED = [  # 8 training triples (16 queries), 2 steps an epoch; the validation split ranked after epochs 2 and 3
    *KG_TINY,
    "method=kgs2s",
    "model=tiny-random-seq2seq",
    "dataset.num_train=8",
    "dataset.eval_candidates=5",
    "dataset.validation_split=valid",
    "trainer.batch_size=8",
    "trainer.epochs=3",
    "trainer.lr=3e-2",
    "trainer.selection.metric=valid/sampled5_mrr",
    "trainer.selection.skip_epochs=1",
    "trainer.checkpoint_every=null",
]


def test_the_checkpoint_best_on_the_validation_split_is_tested_and_a_resumed_run_selects_the_same(
    make_cfg, tmp_path, monkeypatch
):
    import signal

    from test_faults import send_at_call

    from ctxdistill.methods.kgc import KGS2S

    result = run(make_cfg(*SELECTED, output_dir=tmp_path / "uninterrupted"))
    curves, train = result["curves"], result["train"]
    assert [c["epoch"] for c in curves] == [2, 3] and [c["step"] for c in curves] == [4, 6]
    values = [c["valid/sampled5_mrr"] for c in curves]
    chosen = curves[values.index(max(values))]  # the first of equal bests
    assert (train["selected_epoch"], train["selected_step"]) == (chosen["epoch"], chosen["step"])
    assert chosen["epoch"] == 2, "the test needs a run whose best checkpoint is not its final model"
    # the tested model is the selected checkpoint: its final validation figures are those it had then
    # (each rounded to what float32 holds, the curves as the final metrics)
    assert result["metrics"]["valid/sampled5_mrr"] == chosen["valid/sampled5_mrr"] == train["selected_value"]
    # (8 people: one of valid's two triples names a profession no training triple shows, and is left out)
    assert result["metrics"]["valid/examples"] == 1 and "eval/sampled5_mrr" in result["metrics"]
    assert not (tmp_path / "uninterrupted" / "checkpoints").exists()

    with monkeypatch.context() as patched:
        send_at_call(patched, 5, signal.SIGTERM, KGS2S)  # after epoch 2 was evaluated
        with pytest.raises(SystemExit):
            run(make_cfg(*SELECTED, output_dir=tmp_path / "resumed"))
    assert len(list((tmp_path / "resumed" / "checkpoints").glob("best-*.safetensors"))) == 1
    resumed = run(make_cfg(*SELECTED, output_dir=tmp_path / "resumed"))
    assert resumed["train"]["resumed_from_step"] == 5
    assert resumed["curves"] == curves and resumed["metrics"] == result["metrics"]


def test_best_weights_keep_the_best_checkpoint_and_the_one_the_latest_checkpoint_names(tmp_path):
    from accelerate import Accelerator

    from ctxdistill.checkpoint import BestWeights, Progress

    model, accelerator, progress = torch.nn.Linear(2, 1), Accelerator(cpu=True), Progress()
    best = BestWeights(tmp_path, progress, higher_is_better=False)  # a loss: lower is better
    weights = {}
    for step, value in ((1, 0.5), (2, 0.4), (3, 0.4), (4, float("nan")), (5, 0.45)):
        torch.nn.init.normal_(model.weight)
        weights[step] = model.weight.detach().clone()
        kept = best.consider({"step": step, "epoch": step, "value": value}, model, accelerator)
        assert kept == (step in (1, 2))  # a tie keeps the earlier, NaN is never best
        if step == 1:
            best.checkpointed(accelerator)
        files = sorted(p.name for p in (tmp_path / "checkpoints").glob("best-*"))
        assert files == (
            ["best-step-00000001.safetensors"] if step == 1 else [f"best-step-0000000{i}.safetensors" for i in (1, 2)]
        )
    best.checkpointed(accelerator)  # the next checkpoint names step 2: step 1's file goes
    assert [p.name for p in (tmp_path / "checkpoints").glob("best-*")] == ["best-step-00000002.safetensors"]
    best.restore(model)
    assert torch.equal(model.weight, weights[2]) and progress.best == {"step": 2, "epoch": 2, "value": 0.4}


def test_no_metric_is_logged_twice_at_one_step_when_the_selected_checkpoint_is_tested(make_cfg, tmp_path, monkeypatch):
    # found by the fifteenth audit: the final metrics (the selected checkpoint's) were logged at the last step,
    # where the selection had logged the last model's validation figures, and W&B kept the later: its curve showed
    # the selected epoch's value at the last epoch. They go to the summary alone.
    from ctxdistill.tracking import Tracker

    logged: list[tuple[int, str, float]] = []
    monkeypatch.setattr(Tracker, "log", lambda self, metrics, step: logged.extend((step, *m) for m in metrics.items()))
    result = run(make_cfg(*SELECTED, output_dir=tmp_path))
    keys = [(step, key) for step, key, _ in logged]
    assert len(keys) == len(set(keys))
    last = result["curves"][-1]
    at_last_step = {key: value for step, key, value in logged if step == last["step"]}
    assert all(at_last_step[key] == value for key, value in last.items() if key.startswith("valid/"))
    assert "eval/sampled5_mrr" in at_last_step  # what no curve holds is still logged at the last step


def test_a_selection_the_run_cannot_make_is_refused_before_training(make_cfg, tmp_path):
    for overrides, message in (
        (
            ["trainer.selection.metric=valid/sampled5_mrr", "dataset.validation_split=null"],
            "no such metric.*validation_split=valid",
        ),
        (["trainer.selection.metric=valid/accuracy"], "no such metric.*sampled5_mrr"),
        (["trainer.selection.metric=eval/sampled5_mrr"], "the set it reports"),
        (
            ["trainer.selection.skip_epochs=3"],
            r"after epochs 4, 5, \.\.\., and training runs 3 complete epoch.*no checkpoint would be evaluated",
        ),
    ):
        with pytest.raises(ConfigError, match=message):
            run(make_cfg(*SELECTED, *overrides, output_dir=tmp_path / "refused"))
        assert not (tmp_path / "refused" / "checkpoints").exists()


def test_selection_is_refused_with_sharded_weights(make_cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # FSDP needs GPUs; the check comes after
    with pytest.raises(ConfigError, match="trainer.selection: keeps the best checkpoint's weights whole.*fsdp"):
        validate(make_cfg(*SELECTED, "trainer/distributed=fsdp"))


def test_a_method_refuses_a_dataset_of_the_other_kind(make_cfg):
    # Declared kinds, checked before anything loads: the method's schema names the kinds it runs on.
    with pytest.raises(
        ConfigError,
        match="method=kgbert runs on datasets of kind knowledge_graph, and "
        "dataset=synthetic is of kind classification. Use dataset=kg_synthetic",
    ):
        validate(make_cfg("method=kgbert", "model=minilm-l6", "logger=none"))
    with pytest.raises(
        ConfigError,
        match="method=cd runs on datasets of kind classification or generation, and "
        "dataset=kg_synthetic is of kind knowledge_graph",
    ):
        validate(make_cfg("method=cd", "model=tiny-random", *KG_TINY))


def test_the_comparison_table_shows_ranking_metrics_for_kg_runs(tmp_path):
    from ctxdistill.results.files import write_results
    from ctxdistill.results.table import summarise

    def kg_run(method, mrr, seed):
        return {
            "method": method,
            "model": "minilm-l6",
            "dataset": "wn18rr",
            "seed": seed,
            "metric_set": link_prediction_metrics("sampled100_").to_dict(),
            "metrics": {
                "eval/sampled100_mrr": mrr,
                "eval/sampled100_hits@10": 0.5,
                "eval/sampled100_hits@1": 0.1,
                "eval/sampled100_head_mrr": 0.0,
            },
        }

    [table] = summarise([kg_run("kgbert", 0.2, 0), kg_run("kgbert_cd", 0.3, 0), kg_run("kgbert_cd", 0.4, 1)])
    assert [c.key for c in table.columns] == [
        "eval/sampled100_mrr",
        "eval/sampled100_hits@1",
        "eval/sampled100_hits@10",
    ]
    cd = table.rows[1]
    assert cd.method == "kgbert_cd" and cd.seeds == [0, 1]
    assert [(cd.cells[c.key].mean, cd.cells[c.key].std) for c in table.columns] == [
        pytest.approx((0.35, 0.0707107)),
        (0.1, 0.0),
        (0.5, 0.0),
    ]
    readme = write_results(tmp_path, [kg_run("kgbert", 0.2, 0)], title="kg")  # no accuracy plot to draw
    assert "sampled100 MRR" in readme.read_text()


@pytest.mark.parametrize(
    "experiment, methods",
    [
        *(
            (e, ("contextualization", "kgbert", "kgbert_cd", "kgs2s_cd"))
            for e in ("li2024/synthetic", "li2024/wn18rr_subsample", "li2024/wn18rr", "li2024/fb15k237n")
        ),
        *((e, ("kgs2s", "kgs2s_cd")) for e in ("li2024/wn18rr_kgs2s", "li2024/fb15k237n_kgs2s")),
    ],
)  # stage 2 only
def test_li2024_experiments_compose_for_their_stages(make_cfg, experiment, methods):
    # each stage with a model it runs (the KG-BERT experiments' encoder cannot write contexts nor be a T5 student)
    fitting = {"contextualization": ["model=smollm2-135m"], "kgs2s_cd": ["model=t5-base"]}
    for method in methods:
        validate(make_cfg(f"experiment={experiment}", f"method={method}", *fitting.get(method, [])))


def test_li2024_experiments_hold_the_released_settings(make_cfg):
    kgbert = make_cfg("experiment=li2024/wn18rr")
    assert kgbert.model.name_or_path == "google-bert/bert-base-cased"
    assert {
        k: kgbert.trainer[k] for k in ("epochs", "schedule_epochs", "batch_size", "lr", "warmup_ratio", "weight_decay")
    } == {"epochs": 3, "schedule_epochs": 5, "batch_size": 32, "lr": 5e-5, "warmup_ratio": 0.1, "weight_decay": 0.01}
    assert {
        k: kgbert.method[k]
        for k in ("negatives", "training_rows", "missing_context", "max_length", "context_max_length", "aux_weight")
    } == {
        "negatives": 5,
        "training_rows": "drawn_once",
        "missing_context": "random",
        "max_length": 50,
        "context_max_length": 50,
        "aux_weight": 1.0,
    }
    assert make_cfg("experiment=li2024/fb15k237n").trainer.schedule_epochs is None  # the final model of 5 epochs
    # KG-S2S/train_*.sh at the released b4aade6 (the one with the context loss): -batch_size 32 / 16 rows (a
    # triple's tail and head queries are a row each), -seq_dropout
    for experiment, epochs, batch, descriptions, dropout in (
        ("wn18rr_kgs2s", 100, 32, 40, 0.1),
        ("fb15k237n_kgs2s", 50, 16, 80, 0.2),
    ):
        cfg = make_cfg(f"experiment=li2024/{experiment}")
        assert cfg.model.name_or_path == "google-t5/t5-base" and cfg.dataset.source.layout == "kgs2s"
        assert {
            k: cfg.trainer[k]
            for k in ("epochs", "batch_size", "lr", "scheduler", "warmup_ratio", "weight_decay", "max_grad_norm")
        } == {
            "epochs": epochs,
            "batch_size": batch,
            "lr": 1e-3,
            "scheduler": "constant",
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": None,
        }  # constant Adam
        assert (cfg.method.kgc_weight, cfg.method.aux_weight, cfg.method.context_input) == (0.5, 0.5, "query")
        assert (cfg.method.source_description_tokens, cfg.method.source_token_dropout) == (descriptions, dropout)
        assert cfg.method.relation_prompts  # -use_soft_prompt -use_rel_prompt_emb
        # the best validation MRR of the checkpoints after epochs 33, 36, ... (check_val_every_n_epoch=3,
        # -skip_n_val_epoch 30) is tested, not the final model
        assert cfg.dataset.validation_split == "valid" and cfg.dataset.num_validation is None
        assert OmegaConf.to_container(cfg.trainer.selection) == {
            "metric": "valid/mrr",
            "every_epochs": 3,
            "skip_epochs": 30,
        }
    fb15k237n = make_cfg("experiment=li2024/fb15k237n_kgs2s").method
    assert fb15k237n.target_description_tokens == 80
    # its script's "-reconstruction false" parses as True: 0.5 * L_rec, with the released id-digits target
    assert (fb15k237n.reconstruction_weight, fb15k237n.reconstruction_target) == (0.5, "id_digits")
    assert make_cfg("experiment=li2024/wn18rr_kgs2s").method.reconstruction_weight == 0


def test_training_stops_part_way_down_a_longer_schedule(make_cfg, tmp_path):
    # 4 positives and their 5 negatives each: 24 rows, 3 batches of 8 per epoch; the schedule spans 2 epochs.
    result = run(
        make_cfg(
            *KG_TINY,
            "method=kgbert",
            "model=minilm-l6",
            "dataset.num_train=4",
            "trainer.epochs=1",
            "trainer.schedule_epochs=2",
            "trainer.batch_size=8",
            "dataset.eval_candidates=2",
            "dataset.num_eval=1",
            "trainer.save_model=false",
        )
    )
    assert (result["train"]["examples"], result["train"]["steps"], result["train"]["schedule_steps"]) == (24, 3, 6)


@pytest.mark.parametrize(
    "override, key",
    [
        ("method=kgbert_cd model=minilm-l6 method.mlm_probability=1.5", "method.mlm_probability"),
        ("method=kgs2s model=t5-base method.aux_weight=-1", "method.aux_weight"),
        ("method=contextualization method.max_new_tokens=0", "method.max_new_tokens"),
        ("dataset=wn18rr dataset.eval_candidates=0", "dataset.eval_candidates"),
        ("dataset=wn18rr dataset.source.layout=csv", "dataset.source.layout"),
        ("method=kgbert method.training_rows=sometimes", "method.training_rows"),
        ("method=kgbert method.missing_context=skip", "method.missing_context"),
        ("method=kgs2s_cd method.context_input=answer", "method.context_input"),
        ("method=kgs2s model=t5-base method.target_description_tokens=-1", "method.target_description_tokens"),
        ("trainer.epochs=5 trainer.schedule_epochs=3", "trainer.schedule_epochs"),
        ("dataset.validation_split=test", "dataset.validation_split"),
        ("dataset.num_validation=0", "dataset.num_validation"),
        ("trainer.selection.every_epochs=0", "trainer.selection.every_epochs"),
    ],
)
def test_bad_kg_values_are_named(make_cfg, override, key):
    kg = ["dataset=kg_synthetic"] if "dataset=" not in override else ["method=kgbert"]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(make_cfg(*kg, *override.split()))


def test_hub_encoders_load_from_a_local_directory_with_right_padding(make_cfg):
    from ctxdistill.models import load_model, load_tokenizer, weights_location

    local = weights_location(make_cfg("model=minilm-l6").model, "")
    cfg = make_cfg("model=bert-base-uncased", f"model.name_or_path={local}")
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    model = load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0)
    assert tokenizer.padding_side == "right" and type(model).__name__ == "BertForMaskedLM"
