"""GenPI: cached and resumable stages, the loss terms' targets and weights, the run end to end."""

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from ctxdistill.config import ConfigError, validate
from ctxdistill.encoding import encode
from ctxdistill.evaluation import generation_metrics, task_success
from ctxdistill.methods import genpi
from ctxdistill.methods.genpi import PG_TARGET, genpi_loss
from ctxdistill.models import load_tokenizer
from ctxdistill.results.records import collect
from ctxdistill.run import run
from ctxdistill.stage_cache import RowStore

QUESTIONS = [
    "What is photosynthesis?",
    "How many legs does a spider have?",
    "What should I eat for breakfast?",
    "Can you explain gravity?",
    "What is a good name for a cat?",
    "How do plants grow?",
    "Tell me about the moon.",
    "How can I sleep better?",
]
GENPI = [
    "experiment=genpi/cpu_sized",
    "model=tiny-random",
    "logger=none",
    "method.num_pseudo_inputs=4",
    "method.num_heldout_pseudo_inputs=2",
    "method.inputs_per_round=8",
    "method.max_input_tokens=8",
    "method.max_reply_tokens=6",
    "method.max_reason_tokens=6",
    "trainer.epochs=1",
    "trainer.batch_size=4",
    "trainer.eval_batch_size=8",
    f"method.heldout_inputs=[{','.join(repr(q) for q in QUESTIONS)}]",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Decoding a tiny model step by step is dominated by thread synchronisation on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def generate_calls(monkeypatch):
    """Counts the prompts of every generation call the pipeline makes (the real generation runs)."""
    calls = []
    real = genpi.generate

    def counting(model, tokenizer, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(genpi, "generate", counting)
    return calls


def tiny_method(make_cfg, *overrides: str) -> tuple[genpi.GenPI, object]:
    """The GenPI method of the tiny test run and its tokenizer (SmolLM2's)."""
    cfg = make_cfg(*GENPI, *overrides)
    return instantiate(cfg.method, _convert_="all"), load_tokenizer(cfg.model, str(Path(cfg.cache_dir).expanduser()))


def stage_rows(directory: Path) -> dict[str, list[dict]]:
    return {
        p.name: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted(directory.glob("*.jsonl"))
    }


class Killed(Exception):
    pass


def test_a_killed_stage_resumes_without_duplicating_or_losing_rows(tmp_path):
    keys = [f"input {i}" for i in range(10)]
    computed = []

    def compute(chunk, die_after=None):
        if die_after is not None and len(computed) >= die_after:
            raise Killed
        computed.extend(chunk)
        return [{"key": k, "reply": k.upper()} for k in chunk]

    with pytest.raises(Killed):
        RowStore(tmp_path, "replies", {"model": "m"}).fill(keys, lambda c: compute(c, die_after=6), 3, "replies")
    path = next(tmp_path.glob("replies-*.jsonl"))
    with path.open("a") as f:  # the kill also cut a line short
        f.write('{"key": "input 6", "rep')
    assert computed == keys[:6]

    computed.clear()
    resumed = RowStore(tmp_path, "replies", {"model": "m"})
    assert path.read_text().endswith("}\n")  # the cut line is gone before anything is appended
    rows = resumed.fill(keys, compute, 3, "replies")
    assert computed == keys[6:]
    assert rows == [{"key": k, "reply": k.upper()} for k in keys]
    on_disk = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["key"] for r in on_disk) == sorted(keys)
    # Other settings are another stage: nothing is shared with it.
    assert RowStore(tmp_path, "replies", {"model": "other"}).rows == {}


def test_a_json_lines_file_keeps_whole_records_and_names_a_broken_line(tmp_path):
    from ctxdistill.data.tasks import DataError
    from ctxdistill.stage_cache import JsonLines

    lines = JsonLines(tmp_path / "rows.jsonl")
    assert lines.resume() == [] and lines.read() == []
    lines.append([{"key": "a"}, {"key": "b"}])
    with lines.path.open("a") as f:
        f.write('{"key": "c"}')  # whole, but the kill took its newline
    assert lines.resume() == [{"key": "a"}, {"key": "b"}, {"key": "c"}]
    lines.append([{"key": "d"}])
    assert [r["key"] for r in lines.read()] == ["a", "b", "c", "d"]
    lines.path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(DataError, match=r"rows\.jsonl:2: not a JSON object"):
        lines.read()


def test_a_stage_file_is_resumed_only_between_another_cells_appends(tmp_path):
    # Sweep cells share a stage: one that opens it while another is appending must not take the batch being
    # written for a line a kill cut, and cut it off.
    import fcntl
    import threading

    from ctxdistill.stage_cache import JsonLines

    lines = JsonLines(tmp_path / "rows.jsonl")
    lines.append([{"key": "a"}])
    resumed = []
    with lines.path.open("ab") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)  # the other cell, mid-append
        writer.write(b'{"key": "b"')
        writer.flush()
        reader = threading.Thread(target=lambda: resumed.append(lines.resume()))
        reader.start()
        reader.join(0.3)
        assert reader.is_alive()  # it waits for the append to finish
        writer.write(b"}\n")
        writer.flush()
        fcntl.flock(writer, fcntl.LOCK_UN)
    reader.join(5)
    assert resumed == [[{"key": "a"}, {"key": "b"}]]


def test_rows_written_by_another_producer_version_are_never_read(tmp_path, monkeypatch):
    from ctxdistill import stage_cache

    RowStore(tmp_path, "replies", {"model": "m"}).append([{"key": "input", "reply": "written by older code"}])
    assert RowStore(tmp_path, "replies", {"model": "m"}).rows["input"]["reply"] == "written by older code"
    monkeypatch.setattr(stage_cache, "PRODUCER_VERSION", stage_cache.PRODUCER_VERSION + 1)
    assert RowStore(tmp_path, "replies", {"model": "m"}).rows == {}


def test_a_second_run_and_a_sweep_over_the_weights_generate_nothing_again(make_cfg, tmp_path, generate_calls):
    stages = tmp_path / "stages"
    first = run(make_cfg(*GENPI, f"method.stage_dir={stages}", output_dir=tmp_path / "a"))
    assert len(generate_calls) > 4  # inputs, teacher and base replies, reasons, the student's replies
    saved = stage_rows(stages)
    assert [name.split("-")[0] for name in saved] == ["inputs", "reasons", "replies"]
    generate_calls.clear()

    second = run(make_cfg(*GENPI, f"method.stage_dir={stages}", "method.sft_weight=1.0", output_dir=tmp_path / "b"))
    # Only the student's replies: 8 configured held-out inputs, then 2 held-out pseudo inputs.
    assert generate_calls == [8, 2]
    assert stage_rows(stages) == saved
    assert second["train"]["final_loss"] != first["train"]["final_loss"]
    # Both runs record the stage files they read (and the first wrote) under their keys: at sft_weight=1 the
    # reasons are not read (nor written, in a fresh stage directory: no prompt-generation term reads them).
    for result, read in ((first, saved), (second, [name for name in saved if not name.startswith("reasons")])):
        used = {(c["cache"], c["key"], Path(c["path"]).name) for c in result["provenance"]["caches"]}
        assert used == {(f"stage:{name.split('-')[0]}", Path(name).stem, name) for name in read}
    fresh = tmp_path / "fresh"
    alone = run(make_cfg(*GENPI, f"method.stage_dir={fresh}", "method.sft_weight=1.0", output_dir=tmp_path / "c"))
    assert [name.split("-")[0] for name in stage_rows(fresh)] == ["inputs", "replies"]
    assert alone["train"]["final_loss"] == second["train"]["final_loss"]

    metrics = second["metrics"]
    rows = [json.loads(line) for line in (tmp_path / "b" / "predictions.jsonl").read_text().splitlines()]
    assert [r["set"] for r in rows] == ["eval"] * 8 + ["pseudo_heldout"] * 2
    assert metrics["eval/rule_compliance"] == sum(r["complies"] for r in rows[:8]) / 8
    assert metrics["eval/task_success"] == sum(r["succeeds"] for r in rows[:8]) / 8
    # A sweep optimises task success on the held-out pseudo inputs, never on the reported set.
    assert second["objective"] == "pseudo_heldout/task_success"
    assert second["metrics"][second["objective"]] == sum(r["succeeds"] for r in rows[8:]) / 2
    method, tokenizer = tiny_method(make_cfg)
    saved_tokens = [
        len(tokenizer(method.teacher_prompt(tokenizer, r["input"])).input_ids)
        - len(tokenizer(method.student_prompt(tokenizer, r["input"])).input_ids)
        for r in rows[:8]
    ]
    assert metrics["eval/prompt_tokens_saved"] == sum(saved_tokens) / 8
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["dataset"] == "one_sentence"

    # The other prompt placement is another replies stage (and reasons); the pseudo inputs are the same.
    generate_calls.clear()
    run(
        make_cfg(
            *GENPI, f"method.stage_dir={stages}", "method.prompt_placement=system_message", output_dir=tmp_path / "c"
        )
    )
    placed = stage_rows(stages)
    assert len(placed) == len(saved) + 2
    assert {name: rows for name, rows in placed.items() if name.startswith("inputs")} == {
        name: rows for name, rows in saved.items() if name.startswith("inputs")
    }


def test_a_run_killed_mid_stage_continues_to_the_same_data(make_cfg, tmp_path, generate_calls, monkeypatch):
    run(make_cfg(*GENPI, f"method.stage_dir={tmp_path / 'whole'}", output_dir=tmp_path / "whole-run"))
    counting = genpi.generate
    generate_calls.clear()

    def dies_at_the_fourth_call(*args, **kwargs):
        if len(generate_calls) == 3:
            raise Killed
        return counting(*args, **kwargs)

    monkeypatch.setattr(genpi, "generate", dies_at_the_fourth_call)
    with pytest.raises(Killed):
        run(make_cfg(*GENPI, f"method.stage_dir={tmp_path / 'resumed'}", output_dir=tmp_path / "killed"))
    monkeypatch.setattr(genpi, "generate", counting)
    run(make_cfg(*GENPI, f"method.stage_dir={tmp_path / 'resumed'}", output_dir=tmp_path / "resumed-run"))
    assert stage_rows(tmp_path / "resumed") == stage_rows(tmp_path / "whole")


def test_each_loss_term_is_trained_on_its_own_target_tokens_only(make_cfg):
    method, tokenizer = tiny_method(make_cfg)
    method.kl_weight = 1.0
    method._records = {
        "a": {
            "input": "Where is Paris?",
            "teacher": "In France.",
            "teacher_complete": True,
            "base": "Paris is the capital of France. It lies on the Seine.",
            "reason": "One sentence was asked.",
        },
        "b": {
            "input": "Name a colour, please, any colour you like.",
            "teacher": "Blue, as the",
            "teacher_complete": False,
            "base": "Red.",
            "reason": "Brevity.",
        },
    }
    batch = method.collate(tokenizer, None, [genpi.Example(uid, {}, None) for uid in ("a", "b")])
    eos = tokenizer.eos_token

    def targets(part):
        return [tokenizer.decode(ids[mask]) for ids, mask in zip(batch[part]["answer_ids"], batch[part]["answer_mask"])]

    # A reply cut off by max_reply_tokens does not teach the student to end its turn there.
    assert targets("sft") == ["In France." + eos, "Blue, as the"]
    assert targets("teacher_sft") == targets("sft")
    assert targets("pg") == [
        PG_TARGET.format(prompt=method.prompt, reason="One sentence was asked.") + eos,
        PG_TARGET.format(prompt=method.prompt, reason="Brevity.") + eos,
    ]

    # The student's input is the base model's (the released system message and the bare input); the
    # teacher's has the prompt in its user turn. Each row is its prompt, then the target but its last token.
    def rows(part):
        return [
            tokenizer.decode(ids[mask.bool()])
            for ids, mask in zip(batch[part]["input_ids"], batch[part]["attention_mask"])
        ]

    inputs, fed = [r["input"] for r in method._records.values()], ["In France.", "Blue, as"]
    assert rows("sft") == [method.student_prompt(tokenizer, text) + reply for text, reply in zip(inputs, fed)]
    assert rows("teacher_sft") == [method.teacher_prompt(tokenizer, text) + reply for text, reply in zip(inputs, fed)]
    assert all(method.prompt not in row for row in rows("sft"))
    pg_rows = [tokenizer.decode(ids) for ids in batch["pg"]["input_ids"]]
    assert "It lies on the Seine." in pg_rows[0] and method.prompt not in pg_rows[0].split("### Context")[0]


def test_without_a_chat_template_a_reply_target_is_the_text_the_model_writes_after_the_colon(make_cfg):
    """Replies are stored stripped; the plain layout's target puts back the space after "Assistant:", so the
    student is trained on the tokens the teacher generated, not on the reply glued to the colon."""
    method, tokenizer = tiny_method(make_cfg)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = None
    prompt = method.student_prompt(tokenizer, "Where is Paris?")
    assert prompt.endswith("Assistant:")
    target = method._target(tokenizer, "In France.", True)
    assert tokenizer(prompt).input_ids + target == tokenizer(prompt + " In France.").input_ids + [
        tokenizer.eos_token_id
    ]
    assert method._target(tokenizer, "", False) == [tokenizer.eos_token_id]  # no lone space for an empty reply


# kaistAI/GenPI src/dataset_cls/agentbench/os/prompts.py (m2w and webshop alike), verbatim.
RELEASED_META_COGNITION_INPUT = """
When a certain Context and Input were provided together, the Bad Output changed to Good Output as shown below.
Guess which Context was provided and generate a Reason why the Output changed as shown below.

### Input:
{input}

### Bad Output:
{student_output}

### Good Output:
{teacher_output}
""".strip()


def test_the_prompt_generation_turn_is_the_released_meta_cognition_input(make_cfg):
    method, tokenizer = tiny_method(make_cfg)
    record = {
        "input": "Where is Paris?",
        "teacher": "In France.",
        "teacher_complete": True,
        "base": "Paris is the capital of France. It lies on the Seine.",
        "reason": "One sentence was asked.",
    }
    method._records = {"a": record}
    batch = method.collate(tokenizer, None, [genpi.Example("a", {}, None)])
    turn = RELEASED_META_COGNITION_INPUT.format(
        input=record["input"], student_output=record["base"], teacher_output=record["teacher"]
    )
    target = PG_TARGET.format(prompt=method.prompt, reason=record["reason"])
    fed = tokenizer.decode(batch["pg"]["input_ids"][0][batch["pg"]["attention_mask"][0].bool()])
    # The user turn as the released collator renders it (no system message), then the target but its end.
    assert fed == genpi.user_turn(tokenizer, turn) + target


def test_the_loss_mixes_the_two_cross_entropies_with_lambda():
    # Vocabulary of 2. SFT: one target token (1) at the last position, logits (0, ln 3): CE = ln(4/3).
    # PG: target tokens (0, 0), logits (0, 0) and (ln 3, 0): CE = ln 2 and ln(4/3), mean over the two.
    sft_logits = torch.tensor([[[50.0, -50.0], [0.0, math.log(3)]]])
    sft = {"answer_ids": torch.tensor([[0, 1]]), "answer_mask": torch.tensor([[False, True]])}
    pg_logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0]]])
    pg = {"answer_ids": torch.tensor([[0, 0]]), "answer_mask": torch.tensor([[True, True]])}
    loss, parts = genpi_loss(sft_logits, sft, pg_logits, pg, sft_weight=0.7)
    l_sft, l_pg = math.log(4 / 3), (math.log(2) + math.log(4 / 3)) / 2
    assert parts == pytest.approx({"loss_sft": l_sft, "loss_pg": l_pg})
    assert loss.item() == pytest.approx(0.3 * l_pg + 0.7 * l_sft)
    only_sft, _ = genpi_loss(sft_logits, sft, None, None, sft_weight=1.0)
    assert only_sft.item() == pytest.approx(l_sft)


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.rule='Ahoy(unclosed'", "method.rule"),
        ("method.prompt_placement=system", "method.prompt_placement"),
        ("method.reason_top_p=1.5", "method.reason_top_p"),
        ("method.num_heldout_pseudo_inputs=0", "method.num_heldout_pseudo_inputs"),
        ("method.sft_weight=1.5", "method.sft_weight"),
        ("method.pg_template='{input} {unknown}'", "method.pg_template"),
        ("method.num_pseudo_inputs=0", "method.num_pseudo_inputs"),
        ("method.heldout_inputs=[Why?,How?,Why?]", r"method.heldout_inputs: \['Why\?'\] appear more than once"),
        ("method.heldout_inputs=[]", r"method.heldout_inputs: is empty: the run's reported metrics"),
    ],
)
def test_bad_genpi_settings_fail_before_any_model_loads(make_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(*GENPI, override))


def test_genpi_without_a_prompt_names_what_to_set(make_cfg):
    with pytest.raises(ConfigError, match="method.task_name, method.prompt, method.rule"):
        validate(make_cfg("method=genpi", "method.task_name=???", "method.prompt=???", "method.rule=???"))


def test_the_stages_hold_the_teachers_and_base_models_greedy_replies_and_the_metrics_follow_them(
    make_cfg, tmp_path, behaving_model_dir, monkeypatch
):
    from rouge_score.rouge_scorer import RougeScorer
    from transformers import AutoModelForCausalLM

    from conftest import behaving_overrides

    # Stage 1 is pinned to lines of the behaving model's language: which lines it samples from GenPI's
    # generator prompt (and whether any have three numbers) depends on the CPU's float rounding.
    lines = ["3 5 1 6", "2 4 6 3", "1 1 2 3 5", "4 2 6 1", "5 5 3 1 4", "6 2 1 3"]
    monkeypatch.setattr(genpi.PromptInternalization, "_pseudo_inputs", lambda self, *args: lines)
    stages = tmp_path / "stages"
    cfg = make_cfg(
        *GENPI, *behaving_overrides(behaving_model_dir), f"method.stage_dir={stages}", "method.max_reply_tokens=8"
    )
    result = run(cfg)
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    method = instantiate(cfg.method, _convert_="all")
    model = AutoModelForCausalLM.from_pretrained(behaving_model_dir).eval()
    [replies] = [rows for name, rows in stage_rows(stages).items() if name.startswith("replies")]
    for row in replies:  # every pseudo input (training and held out) and every configured question
        for key, render in (("teacher", method.teacher_prompt), ("base", method.student_prompt)):
            batch = tokenizer([render(tokenizer, row["key"])], return_tensors="pt")
            out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            assert row[key] == tokenizer.decode(out[0, batch.input_ids.shape[1] :], skip_special_tokens=True).strip()
    assert {r["key"] for r in replies} == set(QUESTIONS) | set(lines)

    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    rule, scorer, metrics = re.compile(cfg.method.rule), RougeScorer(["rougeL"]), result["metrics"]
    by_input = {r["key"]: r for r in replies}
    for name in ("eval", "pseudo_heldout"):
        rows = [r for r in predictions if r["set"] == name]
        assert [(r["teacher_reply"], r["base_reply"]) for r in rows] == [
            (by_input[r["input"]]["teacher"], by_input[r["input"]]["base"]) for r in rows
        ]
        assert metrics[f"{name}/rule_compliance"] == sum(bool(rule.search(r["reply"])) for r in rows) / len(rows)
        assert metrics[f"{name}/task_success"] == sum(
            task_success(r["reply"], r["input"], r["base_reply"], rule) for r in rows
        ) / len(rows)
        base_complies = [bool(rule.search(r["base_reply"])) for r in rows]
        assert metrics[f"{name}/base_rule_compliance"] == sum(base_complies) / len(rows)
        assert metrics[f"{name}/rougeL_to_teacher"] == pytest.approx(
            sum(scorer.score(r["teacher_reply"], r["reply"])["rougeL"].fmeasure for r in rows) / len(rows)
        )


@pytest.mark.parametrize("kl_weight", [0.0, 0.5])
def test_full_weight_genpi_never_asks_the_trained_weights_to_teach(make_cfg, tmp_path, kl_weight):
    # Without an adapter to disable, the teacher is the initial weights: the references are all written
    # before training, and the KL term's per-step teacher is a frozen copy (asking the trained weights raises).
    stages = tmp_path / "stages"
    result = run(make_cfg(*GENPI, "model.adapter=full", f"method.kl_weight={kl_weight}", f"method.stage_dir={stages}"))
    assert result["train"]["steps"] == 1 and (tmp_path / "model" / "config.json").is_file()
    lora = run(
        make_cfg(*GENPI, f"method.kl_weight={kl_weight}", f"method.stage_dir={stages}", output_dir=tmp_path / "lora")
    )
    assert lora["train"]["steps"] == 1

    def references(directory):
        return [
            (r["input"], r["teacher_reply"], r["base_reply"])
            for r in map(json.loads, (directory / "predictions.jsonl").read_text().splitlines())
        ]

    assert references(tmp_path) == references(tmp_path / "lora")  # the same references as a LoRA run's


QUESTION = "How many legs does a spider have?"
BASE_REPLY = "Spiders have eight legs, attached to the front part of their body."  # the reference answer
PIRATE_RULE = re.compile(r"^\W*Ahoy")


def test_a_loop_that_follows_the_rule_is_a_failure(make_cfg):
    # The loop the pirate demo's teacher wrote on most inputs: it follows the pirate rule and answers nothing.
    assert PIRATE_RULE.search("Ahoy! Ahoy! Ahoy!")
    assert not task_success("Ahoy! Ahoy! Ahoy!", QUESTION, BASE_REPLY, PIRATE_RULE)
    assert task_success("Ahoy! A spider has eight legs.", QUESTION, BASE_REPLY, PIRATE_RULE)
    rule = re.compile(make_cfg(*GENPI).method.rule)  # the default prompt's: one complete sentence
    assert [
        task_success(reply, QUESTION, BASE_REPLY, rule)
        for reply in [
            "A spider has eight legs.",  # one sentence, about spiders' legs
            "Ahoy! Ahoy! Ahoy!",  # several sentences, and a loop
            "Legs, legs, legs, legs.",  # one sentence, but a loop
            "I like turtles.",  # one sentence about something else
            "Eight.",  # the reference answer's subject, without the question's words
            "A spider has eight legs. Insects have six.",  # two sentences
            "A spider has eight legs, and",  # cut off: no sentence end
        ]
    ] == [True, False, False, False, True, False, False]


MOON = "What is the moon?"
MOON_REFERENCE = "The moon is a rocky body that orbits the Earth."


@pytest.mark.parametrize(
    "request_, reference, reply, answers",
    [
        # The audit's replies that restate the request: an echo, a bare refusal, the topic alone.
        ("What is photosynthesis?", "Plants turn light into sugar.", "What is photosynthesis?", False),
        (MOON, MOON_REFERENCE, "I do not know about the moon.", False),
        (MOON, MOON_REFERENCE, "I don't know about the moon.", False),  # "don" and "t" are function words
        (MOON, MOON_REFERENCE, "Moon.", False),
        # Replies that answer: a word the reference shares, a word of the reply's own beside the request's.
        ("What is the capital of France?", "The capital of France is Paris.", "Paris.", True),
        (MOON, MOON_REFERENCE, "The moon is Earth's natural satellite.", True),
        (MOON, MOON_REFERENCE, "I'm not sure, but the moon is made of rock.", True),  # a hedge is no refusal
        # The bundled model's replies in GenPI's stage cache (the teacher's; the tautology is the base model's own,
        # its own reference), references shortened.
        ("Finish on a positive note.", "I'm sorry for any mistakes, but ...", "Finish on a positive note.", False),
        (
            "I'm planning a trip to Italy.",
            "A trip to Italy sounds like an adventure ...",
            "I'm planning a trip to Italy.",
            False,
        ),
        (
            "Make a gift giving pledge.",
            "A gift giving pledge is a gift giving pledge.",
            "A gift giving pledge is a gift giving pledge.",
            False,
        ),
        (
            "I have too many ideas.",
            "The eternal quest for inspiration. ...",
            "I'm not sure what to do with all the ideas I have.",  # "sure" is a function word
            False,
        ),
        (
            "How many legs does a spider have?",
            "The answer ... lies in the spider's anatomy. ...",
            "A spider has 8 legs.",
            True,
        ),
        (
            "What is a good name for a cat?",
            "... a good name for a cat can be tailored ...",
            'A good name for a cat is "Mia" or "Luna" in some languages.',
            True,
        ),
    ],
)
def test_a_reply_answers_only_with_a_content_word_the_request_lacks(make_cfg, request_, reference, reply, answers):
    rule = re.compile(make_cfg(*GENPI).method.rule)
    assert rule.search(reply)  # each follows the rule: only the answer check decides
    assert task_success(reply, request_, reference, rule) is answers


def test_generation_metrics_count_success_rule_and_loops_for_each_model():
    requests = [QUESTION, "What is the capital of France?", "Tell me a joke."]
    metrics = generation_metrics(
        requests,
        ["Ahoy! Ahoy! Ahoy!", "Ahoy! Paris, matey.", "Ahoy! I like turtles."],
        ["Ahoy! Eight legs, matey.", "Ahoy! Ahoy! Ahoy! Ahoy!", "Ahoy! A pirate joke."],
        [BASE_REPLY, "The capital of France is Paris.", "Why did the chicken cross?"],
        PIRATE_RULE,
    )
    assert {k: v for k, v in metrics.items() if "rouge" not in k} == {
        "task_success": 1 / 3,
        "rule_compliance": 1.0,
        "degenerate": 1 / 3,
        "teacher_task_success": 2 / 3,
        "teacher_rule_compliance": 1.0,
        "teacher_degenerate": 1 / 3,
        "base_task_success": 0.0,
        "base_rule_compliance": 0.0,
        "base_degenerate": 0.0,
    }


SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
SMOL_STUDENT = SMOL_SYSTEM + "<|im_start|>user\nWhat is photosynthesis?<|im_end|>\n<|im_start|>assistant\n"
AGENT_PROMPT = (
    "<USER>:\nYou act on a Linux shell. Reply with one bash command.\n\n<AGENT>:\nUnderstood.\n\n"
    "<USER>:\nNow, my problem is:"
)


@pytest.mark.parametrize(
    "placement, prompt, teacher, student",
    [
        # The released make_pseudo-output.py: the system message stays, the prompt and the input share the user turn
        # ("{context}\n\n{input}"); the base model gets the same system message and the bare input.
        (
            "user_turn",
            "Answer in one sentence.",
            (
                SMOL_SYSTEM + "<|im_start|>user\nAnswer in one sentence.\n\nWhat is photosynthesis?<|im_end|>\n"
                "<|im_start|>assistant\n"
            ),
            SMOL_STUDENT,
        ),
        # An AgentBench-style prompt: its <USER>:/<AGENT>: markers become turns, the input ends the last user turn.
        (
            "user_turn",
            AGENT_PROMPT,
            (
                SMOL_SYSTEM + "<|im_start|>user\nYou act on a Linux shell. Reply with one bash command.<|im_end|>\n"
                "<|im_start|>assistant\nUnderstood.<|im_end|>\n"
                "<|im_start|>user\nNow, my problem is:\n\nWhat is photosynthesis?<|im_end|>\n<|im_start|>assistant\n"
            ),
            SMOL_STUDENT,
        ),
        # The named alternative: the prompt replaces the system message; the student's input has none (SmolLM2's
        # template then writes its own).
        (
            "system_message",
            "Answer in one sentence.",
            (
                "<|im_start|>system\nAnswer in one sentence.<|im_end|>\n"
                "<|im_start|>user\nWhat is photosynthesis?<|im_end|>\n<|im_start|>assistant\n"
            ),
            (
                "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nWhat is photosynthesis?<|im_end|>\n<|im_start|>assistant\n"
            ),
        ),
    ],
    ids=["released", "released-agent-turns", "system-message"],
)
def test_the_teacher_and_student_prompts_are_placed_as_configured(make_cfg, placement, prompt, teacher, student):
    method, tokenizer = tiny_method(make_cfg, f"method.prompt_placement={placement}", f"method.prompt='{prompt}'")
    assert method.teacher_prompt(tokenizer, "What is photosynthesis?") == teacher
    assert method.student_prompt(tokenizer, "What is photosynthesis?") == student


def bos_adding_tokenizer():
    """A Llama-3-like tokenizer: it adds <s> to every text, and its chat template writes <s> as well."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
        "You",
        "are",
        "a",
        "helpful",
        "assistant.",
        "Answer",
        "in",
        "one",
        "sentence.",
        "What",
        "is",
        "photosynthesis?",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|end|>",
    ]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tokenizer.padding_side = "left"
    return tokenizer


def test_a_chat_prompt_tokenises_with_exactly_one_bos(make_cfg):
    method, _ = tiny_method(make_cfg)
    tokenizer = bos_adding_tokenizer()
    bos = tokenizer.bos_token_id
    messages = [
        {"role": "system", "content": genpi.RELEASED_SYSTEM_MESSAGE},
        {"role": "user", "content": "Answer in one sentence.\n\nWhat is photosynthesis?"},
    ]
    template_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer(template_text).input_ids[:2] == [bos, bos]  # the hazard: the template's BOS and the tokenizer's
    # The released training code's ids: one BOS, then the template's tokens.
    released = tokenizer(template_text, add_special_tokens=False).input_ids
    assert released[0] == bos and bos not in released[1:]
    teacher = method.teacher_prompt(tokenizer, "What is photosynthesis?")
    assert tokenizer(teacher).input_ids == released
    student = method.student_prompt(tokenizer, "What is photosynthesis?")
    batch = encode(tokenizer, [teacher, student])  # as training and generation tokenise them
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        kept = ids[mask.bool()].tolist()
        assert kept[0] == bos and bos not in kept[1:]


def test_the_released_experiment_holds_the_released_settings(make_cfg):
    # scripts/os/finetune_meta-cog_cot-stage1_conv_stage2_joint_loss.sh, src/make_reason.py, src/make_pseudo-input.py
    cfg = make_cfg("experiment=genpi/released")
    validate(cfg)
    assert (cfg.model.name_or_path, cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == (
        "meta-llama/Meta-Llama-3-8B-Instruct",
        16,
        32,
        0.05,
    )
    assert set(cfg.model.lora.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    t = cfg.trainer
    assert (
        t.lr,
        t.scheduler,
        t.warmup_ratio,
        t.epochs,
        t.batch_size * t.grad_accum_steps,
        t.max_grad_norm,
        t.mixed_precision,
    ) == (1e-4, "cosine", 0.03, 10, 32, 1.0, "bf16")
    m = cfg.method
    assert (m.sft_weight, m.prompt_placement, m.num_pseudo_inputs) == (0.7, "user_turn", 1000)
    assert (m.reason_temperature, m.reason_top_p, m.max_reason_tokens, m.max_reply_tokens) == (0.7, 0.9, 512, 512)
    assert "In about five sentences" in m.reason_template
    assert (m.generator_temperature, m.generator_top_p, m.generator_top_k) == (1.0, 0.9, None)
    cpu = make_cfg("experiment=genpi/cpu_sized")
    assert cpu.model.name == "smollm2-135m" and cpu.model.lora == cfg.model.lora
    assert (cpu.method.sft_weight, cpu.method.prompt_placement, cpu.method.reason_top_p) == (0.7, "user_turn", 0.9)


def test_the_sampled_stages_follow_the_methods_sample_batch_size_not_the_evaluations(make_cfg, tmp_path):
    # A batch's rows share one random stream, so the sampled stages depend on the batch size: a run with another
    # method.sample_batch_size samples its own rows; another trainer.eval_batch_size (say, an evaluation made again
    # with ctxdistill-eval) reads the same ones, so its held-out pseudo inputs are the training run's.
    def sampled(stages: Path) -> list[str]:
        return sorted(p.name for p in stages.glob("*.jsonl") if p.name.startswith(("inputs", "reasons")))

    runs = {}
    for name, overrides in (
        ("first", []),
        ("eval_batch", ["trainer.eval_batch_size=3"]),
        ("sample_batch", ["method.sample_batch_size=3"]),
    ):
        stages = tmp_path / "stages"
        runs[name] = run(make_cfg(*GENPI, *overrides, f"method.stage_dir={stages}", output_dir=tmp_path / name))
        if name == "eval_batch":
            assert len(sampled(stages)) == 2  # the first run's inputs and reasons, read again
    assert len(sampled(tmp_path / "stages")) == 4
    assert (
        runs["eval_batch"]["metrics"]["pseudo_heldout/examples"] == runs["first"]["metrics"]["pseudo_heldout/examples"]
    )


def test_a_run_with_more_training_inputs_samples_the_reasons_a_fresh_run_would(make_cfg, tmp_path):
    # Reasons are sampled a batch at a time, the batch's rows from one random stream: after a run with 3 training
    # inputs (one batch of 3), a run with 4 must not reuse those 3 rows and sample the 4th alone, but draw the
    # batch of 4 a run on an empty stage cache draws.
    def reasons(result) -> list[str]:
        [path] = [c["path"] for c in result["provenance"]["caches"] if c["cache"] == "stage:reasons"]
        return [json.loads(line)["reason"] for line in Path(path).read_text().splitlines()]

    shared = f"method.stage_dir={tmp_path / 'shared'}"
    assert len(reasons(run(make_cfg(*GENPI, shared, "method.num_pseudo_inputs=3", output_dir=tmp_path / "3")))) == 3
    after = reasons(run(make_cfg(*GENPI, shared, output_dir=tmp_path / "after")))
    fresh = reasons(run(make_cfg(*GENPI, f"method.stage_dir={tmp_path / 'fresh'}", output_dir=tmp_path / "fresh")))
    assert after == fresh and len(fresh) == 4


def test_a_run_read_back_from_wandb_is_named_as_its_metrics_json_names_it(make_cfg, tmp_path, monkeypatch):
    # GenPI's "dataset" is its prompt's task name, not that of the dataset section, which it does not read.
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logged = [o for o in GENPI if o != "logger=none"] + ["logger=wandb", "logger.mode=offline"]
    result = run(make_cfg(*logged, f"method.stage_dir={tmp_path / 'stages'}"))
    [record] = collect([tmp_path / "wandb"])
    identity = ("method", "model", "dataset", "seed", "paper")
    assert (
        [record[key] for key in identity]
        == [result[key] for key in identity]
        == [
            "genpi",
            "tiny-random",
            "one_sentence",
            0,
            "genpi",
        ]
    )
