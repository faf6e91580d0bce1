"""GenPI: cached and resumable stages, the loss terms' targets and weights, the run end to end."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from ctxdistill.config import ConfigError, validate
from ctxdistill.methods import genpi
from ctxdistill.methods.genpi import PG_TARGET, chat_prompt, genpi_loss
from ctxdistill.models import load_tokenizer
from ctxdistill.run import run
from ctxdistill.stage_cache import RowStore

QUESTIONS = ["What is photosynthesis?", "How many legs does a spider have?", "What should I eat for breakfast?",
             "Can you explain gravity?", "What is a good name for a cat?", "How do plants grow?",
             "Tell me about the moon.", "How can I sleep better?"]
GENPI = ["experiment=genpi/pirate", "model=tiny-random", "logger=none", "method.num_pseudo_inputs=4",
         "method.num_heldout_pseudo_inputs=2", "method.inputs_per_round=8", "method.max_input_tokens=8",
         "method.max_reply_tokens=6", "method.max_reason_tokens=6", "trainer.epochs=1", "trainer.batch_size=4",
         "trainer.eval_batch_size=8", f"method.heldout_inputs=[{','.join(repr(q) for q in QUESTIONS)}]"]


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


def stage_rows(directory: Path) -> dict[str, list[dict]]:
    return {p.name: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted(directory.glob("*.jsonl"))}


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
    rows = RowStore(tmp_path, "replies", {"model": "m"}).fill(keys, compute, 3, "replies")
    assert computed == keys[6:]
    assert rows == [{"key": k, "reply": k.upper()} for k in keys]
    on_disk = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["key"] for r in on_disk) == sorted(keys)
    # Other settings are another stage: nothing is shared with it.
    assert RowStore(tmp_path, "replies", {"model": "other"}).rows == {}


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

    metrics = second["metrics"]
    rows = [json.loads(line) for line in (tmp_path / "b" / "predictions.jsonl").read_text().splitlines()]
    assert [r["set"] for r in rows] == ["eval"] * 8 + ["pseudo_heldout"] * 2
    assert metrics["eval/rule_compliance"] == sum(r["complies"] for r in rows[:8]) / 8
    tokenizer = load_tokenizer(make_cfg(*GENPI).model, str(Path("~/.cache/ctxdistill").expanduser()))
    prompt = make_cfg(*GENPI).method.prompt
    saved_tokens = [len(tokenizer(chat_prompt(tokenizer, r["input"], prompt)).input_ids)
                    - len(tokenizer(chat_prompt(tokenizer, r["input"])).input_ids) for r in rows[:8]]
    assert metrics["eval/prompt_tokens_saved"] == sum(saved_tokens) / 8
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["dataset"] == "pirate"


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
    cfg = make_cfg(*GENPI)
    tokenizer = load_tokenizer(cfg.model, str(Path(cfg.cache_dir).expanduser()))
    method = instantiate(cfg.method, _convert_="all")
    method.kl_weight = 1.0
    method._records = {
        "a": {"input": "Where is Paris?", "teacher": "Ahoy! In France.", "teacher_complete": True,
              "base": "Paris is in France.", "reason": "Pirates greet first."},
        "b": {"input": "Name a colour, please, any colour you like.", "teacher": "Ahoy! Blue, as the",
              "teacher_complete": False, "base": "Red.", "reason": "The persona."},
    }
    batch = method.collate(tokenizer, None, [genpi.Example(uid, {}, None) for uid in ("a", "b")])
    eos = tokenizer.eos_token

    def targets(part):
        return [tokenizer.decode(ids[mask]) for ids, mask in zip(batch[part]["answer_ids"], batch[part]["answer_mask"])]

    # A reply cut off by max_reply_tokens does not teach the student to end its turn there.
    assert targets("sft") == ["Ahoy! In France." + eos, "Ahoy! Blue, as the"]
    assert targets("teacher_sft") == targets("sft")
    assert targets("pg") == [PG_TARGET.format(prompt=method.prompt, reason="Pirates greet first.") + eos,
                             PG_TARGET.format(prompt=method.prompt, reason="The persona.") + eos]
    rows = [tokenizer.decode(ids) for ids in batch["sft"]["input_ids"]]
    assert all(method.prompt not in row and "Ahoy" not in row.split("<|im_start|>assistant")[0] for row in rows)
    teacher_rows = [tokenizer.decode(ids) for ids in batch["teacher_sft"]["input_ids"]]
    assert all(method.prompt in row for row in teacher_rows)
    pg_rows = [tokenizer.decode(ids) for ids in batch["pg"]["input_ids"]]
    assert "Paris is in France." in pg_rows[0] and method.prompt not in pg_rows[0].split("### Context")[0]


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


@pytest.mark.parametrize("override, message", [
    ("method.rule='Ahoy(unclosed'", "method.rule"),
    ("method.sft_weight=1.5", "method.sft_weight"),
    ("method.pg_template='{input} {unknown}'", "method.pg_template"),
    ("method.num_pseudo_inputs=0", "method.num_pseudo_inputs"),
])
def test_bad_genpi_settings_fail_before_any_model_loads(make_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(*GENPI, override))


def test_genpi_without_a_prompt_names_what_to_set(make_cfg):
    with pytest.raises(ConfigError, match="method.task_name, method.prompt, method.rule"):
        validate(make_cfg("method=genpi", "method.task_name=???", "method.prompt=???", "method.rule=???"))


def test_the_stages_hold_the_teachers_and_base_models_greedy_replies_and_the_metrics_follow_them(
        make_cfg, tmp_path, behaving_model_dir):
    from rouge_score.rouge_scorer import RougeScorer
    from transformers import AutoModelForCausalLM

    from conftest import behaving_overrides

    stages = tmp_path / "stages"
    cfg = make_cfg(*GENPI, *behaving_overrides(behaving_model_dir), f"method.stage_dir={stages}",
                   "method.max_reply_tokens=8")
    result = run(cfg)
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    model = AutoModelForCausalLM.from_pretrained(behaving_model_dir).eval()
    [replies] = [rows for name, rows in stage_rows(stages).items() if name.startswith("replies")]
    prompt = cfg.method.prompt
    for row in replies:  # every pseudo input (training and held out) and every configured question
        for key, system in (("teacher", prompt), ("base", None)):
            batch = tokenizer([chat_prompt(tokenizer, row["key"], system)], return_tensors="pt")
            out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            assert row[key] == tokenizer.decode(out[0, batch.input_ids.shape[1]:], skip_special_tokens=True).strip()
    assert {r["key"] for r in replies} >= set(QUESTIONS)

    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    rule, scorer, metrics = re.compile(cfg.method.rule), RougeScorer(["rougeL"]), result["metrics"]
    by_input = {r["key"]: r for r in replies}
    for name in ("eval", "pseudo_heldout"):
        rows = [r for r in predictions if r["set"] == name]
        assert [(r["teacher_reply"], r["base_reply"]) for r in rows] == [
            (by_input[r["input"]]["teacher"], by_input[r["input"]]["base"]) for r in rows]
        assert metrics[f"{name}/rule_compliance"] == sum(bool(rule.search(r["reply"])) for r in rows) / len(rows)
        base_complies = [bool(rule.search(r["base_reply"])) for r in rows]
        assert metrics[f"{name}/base_rule_compliance"] == sum(base_complies) / len(rows)
        assert metrics[f"{name}/rougeL_to_teacher"] == pytest.approx(
            sum(scorer.score(r["teacher_reply"], r["reply"])["rougeL"].fmeasure for r in rows) / len(rows))


@pytest.mark.parametrize("kl_weight", [0.0, 0.5])
def test_full_weight_genpi_never_asks_the_trained_weights_to_teach(make_cfg, tmp_path, kl_weight):
    # Without an adapter to disable, the teacher is the initial weights: the references are all written
    # before training, and the KL term's per-step teacher is a frozen copy (asking the trained weights raises).
    stages = tmp_path / "stages"
    result = run(make_cfg(*GENPI, "model.adapter=full", f"method.kl_weight={kl_weight}", f"method.stage_dir={stages}"))
    assert result["train"]["steps"] == 1 and (tmp_path / "model" / "config.json").is_file()
    lora = run(make_cfg(*GENPI, f"method.kl_weight={kl_weight}", f"method.stage_dir={stages}",
                        output_dir=tmp_path / "lora"))
    assert lora["train"]["steps"] == 1

    def references(directory):
        return [(r["input"], r["teacher_reply"], r["base_reply"])
                for r in map(json.loads, (directory / "predictions.jsonl").read_text().splitlines())]

    assert references(tmp_path) == references(tmp_path / "lora")  # the same references as a LoRA run's
