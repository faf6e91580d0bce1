"""The generative KGC student on a decoder LM: its strings, its loss and its ranking against hand computations."""

import pytest
import torch
import torch.nn.functional as F
from test_kg import KG_TINY, assert_namesakes_tie, composed, kgs2s_task

from ctxdistill.config import ConfigError, validate
from ctxdistill.methods.kg_decoder import KGDecoderConfig
from ctxdistill.models import load_model, load_tokenizer

from conftest import method_of


@pytest.fixture(scope="module")
def tiny_decoder():
    cfg = composed("tiny-random")
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    return tokenizer, load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0).eval()


def test_the_decoder_student_continues_the_released_query_with_the_entity_name(tiny_decoder):
    tokenizer, _ = tiny_decoder
    task, triple = kgs2s_task(), kgs2s_task().train_triples[0]
    cd = method_of(KGDecoderConfig, name="kg_decoder_cd", aux_weight=0.5, source_description_tokens=0)
    assert cd.prompt(cd.source(tokenizer, task, triple, "tail")) == "predict: tombstone , NN , 1  | hypernym | ?\n"
    assert cd.prompt(cd.source(tokenizer, task, triple, "head")) == "predict: ? | hypernym | memorial , NN , 2 \n"
    target = cd.entity_target(tokenizer, task, "07")
    assert tokenizer.decode(target[:-1]) == "memorial , NN , 2" and target[-1] == tokenizer.eos_token_id
    batch = cd.collate(tokenizer, task, cd.train_examples(task))
    context = batch["context"]  # the context follows the query (the released input), up to its end of sequence
    written = context["answer_ids"][0][context["answer_mask"][0]].tolist()
    assert (
        tokenizer.decode(written[:-1]) == "A tombstone is a kind of memorial." and written[-1] == tokenizer.eos_token_id
    )


def test_the_decoder_loss_is_the_mean_cross_entropy_of_the_target_tokens(tiny_decoder):
    tokenizer, model = tiny_decoder
    task = kgs2s_task()
    method = method_of(KGDecoderConfig, name="kg_decoder", aux_weight=0.0)
    queries = method.train_examples(task)  # a tail row and a head row, targets of different lengths
    batch = method.collate(tokenizer, task, queries)
    losses = []  # by hand: each row unpadded, every target token's cross-entropy, their mean over the batch
    for triple, direction in queries:
        prompt = tokenizer(method.prompt(method.source(tokenizer, task, triple, direction))).input_ids
        target = method.entity_target(tokenizer, task, triple[2] if direction == "tail" else triple[0])
        logits = model(torch.tensor([prompt + target])).logits[0]
        losses.append(F.cross_entropy(logits[len(prompt) - 1 : -1], torch.tensor(target), reduction="none"))
    expected = torch.cat(losses).mean()
    assert method.kgc_loss(model, batch, "cpu").item() == pytest.approx(expected.item(), rel=1e-4)


def test_the_decoder_ranks_candidates_by_their_summed_log_likelihood_after_the_query(tiny_decoder):
    tokenizer, model = tiny_decoder
    task = kgs2s_task()
    method = method_of(KGDecoderConfig, name="kg_decoder", aux_weight=0.0)
    triple, names = task.train_triples[0], ["07", "09", "04"]
    for direction in ("tail", "head"):
        prompt = tokenizer(method.prompt(method.source(tokenizer, task, triple, direction))).input_ids
        expected = []
        for entity in names:  # by hand: the whole sequence run at once, no cache
            target = method.entity_target(tokenizer, task, entity)
            logprobs = model(torch.tensor([prompt + target])).logits[0].log_softmax(-1)
            expected.append(sum(logprobs[len(prompt) - 1 + j, token].item() for j, token in enumerate(target)))
        scores = method.score_query(model, tokenizer, task, triple, direction, names, 2, "cpu")  # chunks of 2
        assert scores.tolist() == pytest.approx(expected, abs=1e-4)
        assert len(set(expected)) == 3  # distinct names, distinct scores


def test_candidates_the_decoder_student_cannot_tell_apart_tie(tiny_decoder):
    tokenizer, model = tiny_decoder
    assert_namesakes_tie(method_of(KGDecoderConfig, name="kg_decoder", aux_weight=0.0), model, tokenizer)


def test_the_decoder_student_refuses_a_seq2seq_model_and_a_query_longer_than_max_length(make_cfg, tiny_decoder):
    with pytest.raises(
        ConfigError,
        match="tiny-random-seq2seq is a seq2seq_lm model, and method=kg_decoder runs a "
        "causal_lm model.*a seq2seq_lm model runs with method=description_contexts, kgs2s",
    ):
        validate(make_cfg(*KG_TINY, "method=kg_decoder", "model=tiny-random-seq2seq"))
    tokenizer, _ = tiny_decoder
    method = method_of(KGDecoderConfig, name="kg_decoder", aux_weight=0.0, max_length=8)
    with pytest.raises(ConfigError, match="a query of .* tokens .* exceeds method.max_length=8"):
        method.check_inputs(kgs2s_task(), tokenizer, None)


@pytest.mark.parametrize(
    "overrides, unread",
    [
        (["method=kg_decoder_cd"], ["method.reconstruction_target"]),  # the decoder has no reconstruction task
        (  # the baseline: no auxiliary task
            ["method=kg_decoder"],
            ["method.context_max_length", "method.context_input", "method.reconstruction_target"],
        ),
        (["method=kgs2s", "model=tiny-random-seq2seq", "method.reconstruction_weight=0.5"], ["method.context_input"]),
        (
            ["method=kgbert", "model=minilm-l6", "method.aux_weight=0"],
            ["method.context_max_length", "method.mlm_probability", "method.missing_context"],
        ),
    ],
)
def test_the_students_settings_no_task_reads_are_named_as_ignored(make_cfg, overrides, unread):
    """The nineteenth audit: method.context_input at aux_weight=0, or the decoder's reconstruction_target, were
    taken and read by nothing (a sweep over one gave rows that differ in name only)."""
    from ctxdistill.run import unread_entries

    keys = ["method.context_max_length", "method.context_input", "method.reconstruction_target"]
    keys += ["method.mlm_probability", "method.missing_context"]
    cfg = make_cfg("dataset=kg_synthetic", *overrides)
    assert [k for entry in unread_entries(cfg, keys) for k in entry["keys"]] == unread
