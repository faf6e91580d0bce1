"""Every generation path against transformers' own generate on the whole prompt, on a model that behaves.

The reference is ``model.generate`` on the full prompts (left-padded, no shared cache). Sampling is
compared draw for draw: transformers samples from the global generator, so seeding it and the suite's
generator with the same seed gives the same stream. The behaving model (tests/behaving_model.py)
continues number lines whose every token depends on the two before it, so a decoder that loses part
of the prompt or of its own output writes something else.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ctxdistill.cli import CONFIG_DIR
from ctxdistill.data import Example, Task
from ctxdistill.data.tasks import AnswerGeneration
from ctxdistill.encoding import SharedPrefix
from ctxdistill.evaluation import GenerationEvaluator, Ranks
from ctxdistill.generation import end_tokens, generate, strip_stop
from ctxdistill.methods.distill import DistillConfig
from ctxdistill.methods.genpi import decoded_samples
from ctxdistill.methods.on_policy import OnPolicyConfig
from ctxdistill.methods.scratchpad import ScratchpadConfig
from ctxdistill.models import ModelHandle, TrainableContext, add_lora, load_model, load_tokenizer

from behaving_model import greedy_line
from conftest import behaving_overrides, method_of

# Demonstration lines shared by every teacher prompt, then each query's line start.
CONTEXT = " 1 1 2 3 5 1 6\n 2 4 6 3 2 5\n 4 4 1 5 6 4 3"
STARTS = ["3 5", "1 2 3", "6 6", "2 3 5 1", "5 4"]


@pytest.fixture(scope="module")
def behaving(behaving_model_dir):
    """(model config, tokenizer, model), loaded the way a run loads them."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["output_dir=unused", "logger=none", *behaving_overrides(behaving_model_dir)])
    GlobalHydra.instance().clear()
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    model = load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0).eval()
    return cfg, tokenizer, model


def reference(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    stop: Optional[str] = None,
    seed: int = 0,
    batch_size: int = 16,
    top_p: Optional[float] = None,
) -> list[list[int]]:
    """transformers' generate on the whole prompts, batch by batch, each row cut where it stopped."""
    torch.manual_seed(seed)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": top_k or 0, "top_p": top_p or 1.0}
        if temperature
        else {"do_sample": False}
    )
    if stop is not None:
        sampling.update(stop_strings=stop, tokenizer=tokenizer)
    rows = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
        for row in out[:, batch.input_ids.shape[1] :].tolist():
            rows.append(row[: row.index(tokenizer.pad_token_id)] if tokenizer.pad_token_id in row else row)
    return rows


def teacher_prompts(starts=STARTS) -> list[str]:
    return [f"{CONTEXT}\n {start}" for start in starts]


def test_the_behaving_model_continues_a_line_from_its_last_two_numbers(behaving):
    _, tokenizer, model = behaving
    continuation = generate(model, tokenizer, teacher_prompts(["3 5", "1 2 3"]), 8, stop="\n")
    assert tokenizer.batch_decode(continuation) == [greedy_line(3, 5), greedy_line(2, 3)] == [" 1 6\n", " 5 1 6\n"]


@pytest.mark.parametrize("shared_prefix", [True, False], ids=["shared-prefix", "whole-prompt"])
# top-p 0.7 cuts the behaving language's second continuation (probability 1/4): ignoring it would show.
@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(0.0, None, None), (1.0, None, None), (0.7, 5, None), (1.0, None, 0.7)],
    ids=["greedy", "sampled", "sampled-top5", "sampled-top-p0.7"],
)
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("stop", [None, "\n"], ids=["no-stop", "stop-newline"])
def test_generate_equals_transformers_generate(behaving, shared_prefix, temperature, top_k, top_p, batch_size, stop):
    _, tokenizer, model = behaving
    prompts = teacher_prompts()  # of different lengths: left padding within a batch
    prefix = SharedPrefix(model, tokenizer, prompts) if shared_prefix else None
    assert prefix is None or prefix.length > 20
    torch.manual_seed(7)
    ours = generate(
        model, tokenizer, prompts, 12, temperature, top_k, stop, prefix=prefix, batch_size=batch_size, top_p=top_p
    )
    expected = reference(
        model, tokenizer, prompts, 12, temperature, top_k, stop, seed=7, batch_size=batch_size, top_p=top_p
    )
    assert ours == expected
    if stop is not None:
        assert any(len(row) < 12 for row in ours)  # some rows ended at the stop string


def test_generation_ends_on_every_end_token_the_models_generation_config_lists(behaving):
    """transformers' generate stops on each end-of-sequence id the generation config lists (Llama 3 Instruct's
    <|eot_id|>, Gemma 3's <end_of_turn>); generate stopped on the tokenizer's alone and wrote past the turn's end."""
    _, tokenizer, model = behaving
    turn_end = tokenizer(" 6", add_special_tokens=False).input_ids[0]  # a token the greedy lines write
    prompts = teacher_prompts()
    configured = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, turn_end]
    try:
        ours = generate(model, tokenizer, prompts, 12, stop=None)
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = [
            row[: row.index(tokenizer.pad_token_id)] if tokenizer.pad_token_id in row else row
            for row in out[:, batch.input_ids.shape[1] :].tolist()
        ]
        assert ours == expected and sum(row[-1] == turn_end for row in ours) >= 2
        ends = end_tokens(model, tokenizer)
        assert [strip_stop(tokenizer, row, None, ends) for row in ours] == [
            row[:-1] if row[-1] in ends else row for row in ours
        ]
        # a trainable-prefix student, and its teacher view, are the model's too (they listed the tokenizer's alone)
        wrapped = TrainableContext.from_text(model, tokenizer, "A context.", 2)
        assert end_tokens(wrapped, tokenizer) == ends == {tokenizer.eos_token_id, turn_end}
        with wrapped.disable_adapter():
            assert end_tokens(wrapped, tokenizer) == ends
    finally:
        model.generation_config.eos_token_id = configured


def test_an_empty_stop_string_is_no_stop_string(behaving):
    _, tokenizer, model = behaving
    prompts = teacher_prompts()
    unstopped = generate(model, tokenizer, prompts, 12, stop=None)
    assert generate(model, tokenizer, prompts, 12, stop="") == unstopped
    assert [strip_stop(tokenizer, row, "") for row in unstopped] == [strip_stop(tokenizer, r, None) for r in unstopped]


class Scripted(torch.nn.Module):
    """Writes the given tokens one per step, whatever its input (then end-of-sequence): a stop string's tokens."""

    def __init__(self, script: list[int], vocabulary: int, eos: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # where generate finds the device
        self.script, self.vocabulary, self.eos = script, vocabulary, eos

    def forward(self, input_ids, cache=None, **kwargs):
        step = 0 if cache is None else cache + 1
        logits = torch.full((input_ids.shape[0], 1, self.vocabulary), -10.0)
        logits[:, 0, self.script[step] if step < len(self.script) else self.eos] = 10.0
        return SimpleNamespace(logits=logits, cache=step)


def test_a_stop_string_whose_character_takes_several_tokens_stops_where_transformers_stops(behaving):
    # found by the fifteenth audit: the last len(stop) tokens were decoded, one token for a one-character stop,
    # and a character written in several byte tokens (the parrot: 3) was never found
    from transformers import StopStringCriteria

    _, tokenizer, _ = behaving
    parrot = tokenizer("🦜", add_special_tokens=False).input_ids
    assert len(parrot) > 1
    script = [
        *tokenizer(" x", add_special_tokens=False).input_ids,
        *parrot,
        *tokenizer(" y z", add_special_tokens=False).input_ids,
    ]
    prompt = tokenizer("hello", add_special_tokens=False).input_ids
    criteria = StopStringCriteria(tokenizer, ["🦜"])
    stops_at = next(n for n in range(1, len(script) + 1) if criteria(torch.tensor([prompt + script[:n]]), None)[0])
    model = Scripted(script, len(tokenizer), tokenizer.eos_token_id)
    [ours] = generate(model, tokenizer, ["hello"], len(script), stop="🦜")
    assert ours == script[:stops_at] and tokenizer.decode(ours).endswith("🦜")
    assert strip_stop(tokenizer, ours, "🦜") == script[: stops_at - len(parrot)]  # its every token


def test_sampling_from_a_seeded_generator_is_the_global_streams_and_varies_with_the_seed(behaving):
    _, tokenizer, model = behaving
    prompts = teacher_prompts()
    prefix = SharedPrefix(model, tokenizer, prompts)

    def sample(seed):
        return generate(
            model, tokenizer, prompts, 12, 1.0, stop=None, prefix=prefix, generator=torch.Generator().manual_seed(seed)
        )

    assert sample(3) == reference(model, tokenizer, prompts, 12, 1.0, seed=3) == sample(3)
    assert sample(3) != sample(4)


def chain_task(starts=STARTS, generation: Optional[AnswerGeneration] = None) -> Task:
    examples = [
        Example(f"q{i}", {"start": start}, None, target=greedy_line(*map(int, start.split()[-2:])).strip())
        for i, start in enumerate(starts)
    ]
    return Task(
        name="chain",
        template=" {start}",
        verbalizers=[],
        student_instruction="",
        context=CONTEXT,
        separator="\n",
        demos=[],
        train_queries=examples,
        train_query_labels=[None] * len(examples),
        eval_sets={"eval": examples},
        generation=generation,
    )


def test_cd_teacher_answer_spans_are_the_teachers_greedy_answers(behaving):
    _, tokenizer, model = behaving
    task = chain_task()
    method = method_of(
        DistillConfig, name="cd", answer="teacher_generation", max_answer_tokens=8, teacher_cache="memory"
    )
    method.prepare(ModelHandle(student=model, base=model), tokenizer, task, task.train_queries, batch_size=3)
    expected = [
        strip_stop(tokenizer, row) for row in reference(model, tokenizer, teacher_prompts(), 8, stop="\n", batch_size=3)
    ]
    assert [method._spans[e.uid] for e in task.train_queries] == expected
    assert [tokenizer.decode(s) for s in expected[:2]] == [" 1 6", " 5 1 6"]


def test_exact_match_evaluation_generates_what_transformers_generates(behaving):
    _, tokenizer, model = behaving
    spec = AnswerGeneration(
        answer_regex=r"(.*)", max_new_tokens=10, max_answer_tokens=6, stop="\n", demo_target="{answer}"
    )
    task = chain_task(generation=spec)
    evaluator = GenerationEvaluator(
        ModelHandle(student=model, base=model), tokenizer, task, with_context=True, batch_size=2, ranks=Ranks()
    )
    answers = evaluator.answers(model, tokenizer, task.eval_sets["eval"], with_context=True, desc="test", worked=True)
    expected = reference(model, tokenizer, teacher_prompts(), 10, stop="\n", batch_size=2)
    assert answers.texts == tokenizer.batch_decode(expected)
    metrics, _ = evaluator.evaluate()
    assert metrics["eval/teacher_accuracy"] == 1.0  # the behaving teacher writes each line's greedy end


def test_exact_match_of_a_model_left_in_training_mode_is_scored_without_dropout(behaving):
    """The trainer leaves the model in training mode; its answers must be the eval-mode model's, shared context
    included (its cache once took dropout from a LoRA adapter, so the answers changed from call to call)."""
    cfg, tokenizer, _ = behaving
    spec = cfg.model.copy()
    spec.lora.dropout = 0.5
    student = add_lora(load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0), spec)
    torch.manual_seed(0)  # (peft's own initialisation of the adapter follows the order of a set of module names)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)  # an adapter that changes the answers, as a trained one does
    generation = AnswerGeneration(
        answer_regex=r"(.*)", max_new_tokens=10, max_answer_tokens=6, stop="\n", demo_target="{answer}"
    )
    task = chain_task(generation=generation)
    evaluator = GenerationEvaluator(
        ModelHandle(student=student, base=student), tokenizer, task, with_context=True, batch_size=2, ranks=Ranks()
    )
    expected = tokenizer.batch_decode(
        reference(student.eval(), tokenizer, teacher_prompts(), 10, stop="\n", batch_size=2)
    )
    student.train()
    for _ in range(3):  # each call draws its own dropout
        answers = evaluator.answers(
            student, tokenizer, task.eval_sets["eval"], with_context=True, desc="t", worked=True
        )
        assert answers.texts == expected
    assert student.training


def test_scratchpad_teacher_samples_are_transformers_samples(behaving):
    _, tokenizer, model = behaving
    spec = AnswerGeneration(
        answer_regex=r"(?s)(.*)", max_new_tokens=10, max_answer_tokens=6, stop="\n", demo_target="{answer}"
    )
    task = chain_task(generation=spec)
    method = method_of(ScratchpadConfig, name="scratchpad", num_samples=1, temperature=1.0, seed=11)
    method.prepare(ModelHandle(student=model, base=model), tokenizer, task, task.train_queries, batch_size=5)
    samples = reference(model, tokenizer, teacher_prompts(), 10, 1.0, stop="\n", seed=11, batch_size=5)
    expected = [spec.extract(tokenizer.decode(row, skip_special_tokens=True), worked=True) for row in samples]
    targets = [tokenizer.decode(next(iter(method._targets[e.uid]))) for e in task.train_queries]
    assert targets == [answer + "\n" for answer in expected]


def test_on_policy_teacher_sampled_batches_are_transformers_samples(behaving):
    cfg, tokenizer, model = behaving
    task = chain_task()
    student = add_lora(load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0), cfg.model)
    method = method_of(OnPolicyConfig, name="on_policy_cd", lmbda=0.0, max_new_tokens=8, seed=5)
    handle = ModelHandle(student=student, base=student)
    method.prepare(handle, tokenizer, task, task.train_queries, batch_size=5)
    with handle.teacher() as teacher:
        samples = method.sample(teacher, teacher_prompts(), method.prefix)
    assert samples == reference(model, tokenizer, teacher_prompts(), 8, 1.0, stop="\n", seed=5)


def test_genpi_pseudo_input_rounds_are_transformers_samples(behaving):
    _, tokenizer, model = behaving
    prompt = CONTEXT + "\n"  # GenPI's generator prompt, repeated: every row continues the same text
    prompts = [prompt] * 6
    texts = decoded_samples(
        model,
        tokenizer,
        prompts,
        10,
        1.0,
        50,
        "\n",
        torch.Generator().manual_seed(2),
        SharedPrefix(model, tokenizer, [prompt]),
        batch_size=6,
    )
    rows = reference(model, tokenizer, prompts, 10, 1.0, 50, "\n", seed=2)
    assert [text for text, _ in texts] == [
        tokenizer.decode(strip_stop(tokenizer, r), skip_special_tokens=True).strip() for r in rows
    ]
    assert len({text for text, _ in texts}) > 1


def test_a_prefix_student_of_a_bos_adding_tokenizer_generates_what_its_teacher_does(behaving):
    """On a model that behaves, with a tokenizer that starts every text with BOS: a trainable prefix initialised
    from the whole context generates, token for token, what transformers' generate writes from context + query."""
    from conftest import with_bos

    _, tokenizer, model = behaving
    tokenizer = with_bos(tokenizer)
    queries = [f"\n {start}" for start in STARTS]
    student = TrainableContext.from_text(model, tokenizer, CONTEXT, num_tokens=1000)
    assert student.query_bos_token_id == tokenizer.bos_token_id
    with torch.no_grad():
        ours = generate(student, tokenizer, queries, 10, stop=None)
    expected = reference(model, tokenizer, [CONTEXT + q for q in queries], 10)
    assert ours == expected and len({tuple(t) for t in ours}) > 1  # each query its own continuation
