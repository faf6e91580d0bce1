"""Beyond the context window: sequential distillation (its teachers, its rounds, resuming a round), the
cheat-sheet baseline (its prompts against the released code's, its cache), contexts with their own
instructions and label words, the out-of-domain phrasing, and the learning curve's statistics."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from matplotlib.axes import Axes

from ctxdistill.config import ConfigError, validate
from ctxdistill.data import build_task, synthetic
from ctxdistill.data.synthetic import generate_examples
from ctxdistill.data.tasks import DataError
from ctxdistill.encoding import answer_logits, encode
from ctxdistill.evaluate_run import main as evaluate_main
from ctxdistill.learning_curve import main as learning_curve
from ctxdistill.methods import build_method
from ctxdistill.methods import cheat_sheet as cs
from ctxdistill.methods.distill import ContextDistillation
from ctxdistill.models import ModelHandle, add_adapter, load_model, load_tokenizer, model_identity
from ctxdistill.run import run

from conftest import TINY, behaving_teacher_overrides, without_timings

SEQUENTIAL = [
    *TINY,
    "method=sequential_cd",
    "dataset.context.num_demos=4",
    "dataset.context.num_contexts=2",
    "dataset.num_train_queries=8",
    "dataset.source.split_sizes.eval=8",
    "trainer.batch_size=4",
    "trainer.max_steps=2",
    "trainer.checkpoint_every=1",
]


def test_each_round_is_taught_by_the_last_rounds_student_with_its_own_context(make_cfg, tmp_path):
    cfg = make_cfg(*SEQUENTIAL, "method.teacher_cache=memory")
    method = build_method(cfg.method)
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    task = build_task(cfg.dataset, cfg.seed)
    base = load_model(cfg.model, cfg.cache_dir, tokenizer, cfg.seed)
    model = add_adapter(base, cfg.model, tokenizer, task.context)
    handle = ModelHandle(student=model, base=model, identity="tiny")
    queries = task.train_queries
    assert method.rounds(task) == 2 and len(set(task.contexts)) == 2

    def reference(with_adapter: bool, context: str) -> torch.Tensor:
        """The next-token log-probabilities after context + query, from a plain forward pass of the whole text."""
        batch = encode(tokenizer, [task.teacher_prompt(q, context) for q in queries], [[0]] * len(queries))
        model.eval()
        with torch.no_grad():
            if with_adapter:
                logits = answer_logits(model, batch)
            else:
                with model.disable_adapter():
                    logits = answer_logits(model, batch)
        return logits[:, -1].float().log_softmax(-1)

    def targets() -> torch.Tensor:
        return torch.stack([method._targets[q.uid].logprobs[-1] for q in queries])

    method.begin_round(0)
    method.prepare(handle, tokenizer, task, queries, 4)
    torch.testing.assert_close(targets(), reference(False, task.contexts[0]), atol=1e-4, rtol=0)
    with torch.no_grad():  # what a round of training does to the adapter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    method.begin_round(1)
    method.prepare(handle, tokenizer, task, queries, 4)
    taught = targets()
    torch.testing.assert_close(taught, reference(True, task.contexts[1]), atol=1e-4, rtol=0)
    assert (taught - reference(False, task.contexts[1])).abs().max() > 1e-2  # not the base model's


@pytest.mark.slow  # three runs; the teachers of each round are checked above
def test_sequential_rounds_log_their_metrics_and_a_failure_in_round_two_resumes_there(make_cfg, tmp_path, monkeypatch):
    cache = (
        f"method.teacher_cache_dir={tmp_path / 'targets'}"  # its own (the shared cache_dir keeps the converted model)
    )
    whole = tmp_path / "whole"
    run(make_cfg(*SEQUENTIAL, cache, output_dir=whole))
    saved = json.loads((whole / "metrics.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [1, 2]
    assert all(r["train"]["steps"] == 2 and "eval/accuracy" in r["metrics"] for r in saved["rounds"])
    assert saved["rounds"][-1]["metrics"] == saved["metrics"]
    assert saved["train"]["steps_all_rounds"] == 4 and not (whole / "rounds").exists()
    # its student evaluated on a task of one context, as the learning curve's forgetting column does
    assert evaluate_main([str(whole), "dataset.context.num_contexts=1", "--name", "forgetting"]) == 0
    assert "eval/accuracy" in json.loads((whole / "evaluations" / "forgetting" / "metrics.json").read_text())["metrics"]

    real_loss, calls = ContextDistillation.loss, []

    def failing_in_round_two(self, handle, batch):
        calls.append(self.round)
        if len(calls) == 4:  # round 2's second step, after its first checkpoint
            raise RuntimeError("injected")
        return real_loss(self, handle, batch)

    broken = tmp_path / "broken"
    monkeypatch.setattr(ContextDistillation, "loss", failing_in_round_two)
    with pytest.raises(RuntimeError, match="injected"):
        run(make_cfg(*SEQUENTIAL, cache, output_dir=broken))
    assert (broken / "rounds" / "1" / "round.json").is_file() and not (broken / "rounds" / "2" / "round.json").exists()
    calls.clear()
    monkeypatch.setattr(
        ContextDistillation, "loss", lambda self, h, b: calls.append(self.round) or real_loss(self, h, b)
    )
    run(make_cfg(*SEQUENTIAL, cache, output_dir=broken))
    assert calls == [1]  # round 1 was not trained again; round 2 resumed after its first step
    resumed = json.loads((broken / "metrics.json").read_text())

    assert without_timings(resumed["metrics"]) == without_timings(saved["metrics"])
    assert [without_timings(r["metrics"]) for r in resumed["rounds"]] == [
        without_timings(r["metrics"]) for r in saved["rounds"]
    ]


def test_a_run_failing_before_round_twos_first_checkpoint_draws_the_dropout_of_the_uninterrupted_run(
    make_cfg, tmp_path, monkeypatch
):
    """Round 2 restarted from round 1's saved weights must continue round 1's random streams (LoRA's dropout
    masks), as the uninterrupted run does, not the streams of a process that has not trained round 1."""
    settings = [*SEQUENTIAL, "model.lora.dropout=0.1", "trainer.checkpoint_every=null"]
    real_loss, losses = ContextDistillation.loss, []

    def recorded(self, handle, batch):
        if fail and len(losses) == 2:  # round 2's first step
            raise RuntimeError("injected")
        value, extra = real_loss(self, handle, batch)
        losses.append(round(value.item(), 6))
        return value, extra

    monkeypatch.setattr(ContextDistillation, "loss", recorded)
    fail = False
    run(make_cfg(*settings, output_dir=tmp_path / "whole"))
    uninterrupted, losses[:] = list(losses), []
    fail = True
    with pytest.raises(RuntimeError, match="injected"):
        run(make_cfg(*settings, output_dir=tmp_path / "broken"))
    fail = False
    run(make_cfg(*settings, output_dir=tmp_path / "broken"))
    assert losses == uninterrupted
    whole, resumed = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "broken"))
    assert without_timings(resumed["metrics"]) == without_timings(whole["metrics"])


def test_each_rounds_periodic_evaluations_are_in_metrics_json(make_cfg, tmp_path):
    """W&B got every round's periodic evaluations; metrics.json kept only the last round's."""
    saved = run(make_cfg(*SEQUENTIAL, "trainer.eval_every=1", "trainer.checkpoint_every=null"))
    written = json.loads((tmp_path / "metrics.json").read_text())
    curves = [r["curves"] for r in written["rounds"]]
    assert [[point["step"] for point in curve] for curve in curves] == [[1], [1]]  # the last step's is the final one
    assert all("eval/accuracy" in point for curve in curves for point in curve)
    assert curves[-1] == written["curves"] == saved["curves"]


def test_a_finished_round_of_other_settings_is_refused_not_taken_as_this_runs(make_cfg, tmp_path, monkeypatch):
    """A run stopped after round 1 and started again with another setting (here the learning rate) took the
    round's weights as its own: its metrics.json named the new rate for a round trained at the old."""
    real_loss = ContextDistillation.loss

    def failing_in_round_two(self, handle, batch):
        if self.round == 1:
            raise RuntimeError("injected")
        return real_loss(self, handle, batch)

    monkeypatch.setattr(ContextDistillation, "loss", failing_in_round_two)
    settings = [*SEQUENTIAL, "trainer.checkpoint_every=null"]
    with pytest.raises(RuntimeError, match="injected"):
        run(make_cfg(*settings))
    assert (tmp_path / "rounds" / "1" / "round.json").is_file()
    with pytest.raises(ConfigError) as refused:
        run(make_cfg(*settings, "trainer.lr=0.05"))
    assert str(refused.value) == (
        f"{tmp_path / 'rounds' / '1' / 'round.json'} was written by a run with other settings (trainer.lr). Run with "
        "the settings it was made with to resume it, pass force=true to start it over, or give it another output_dir."
    )
    # force=true starts over: the finished round is trained again, under the new settings
    monkeypatch.undo()
    assert run(make_cfg(*settings, "trainer.lr=0.05", "force=true"))["train"]["rounds"] == 2
    assert not (tmp_path / "rounds").exists()


def test_sequential_distillation_refuses_what_cannot_teach_round_by_round(make_cfg):
    with pytest.raises(ConfigError, match="method.sequential"):
        validate(make_cfg(*SEQUENTIAL, "method.teacher_cache=none"))
    with pytest.raises(ConfigError, match="model.adapter"):
        validate(make_cfg(*SEQUENTIAL, "model.adapter=prefix"))
    with pytest.raises(ConfigError, match="instructions"):
        validate(make_cfg(*SEQUENTIAL, "dataset.context.instructions=[a,b,c]"))
    with pytest.raises(ConfigError, match="method.teacher_model"):
        validate(make_cfg(*SEQUENTIAL, "+model@method.teacher_model=tiny-random"))


def test_sequential_distillation_of_a_single_context_is_refused_naming_the_key_and_the_fix(make_cfg):
    """One round of one context is plain cd, which sequential_cd ran without a word (the newcomer's first hour)."""
    with pytest.raises(ConfigError) as refused:
        validate(make_cfg(*SEQUENTIAL, "dataset.context.num_contexts=1"))
    assert str(refused.value) == (
        "dataset.context.num_contexts: is 1, and method.sequential=true (method=sequential_cd) distils one context per "
        "round: with one context it is plain cd. Give two or more contexts (dataset.context.num_contexts=2), or use "
        "method=cd"
    )


def test_more_contexts_than_the_pool_holds_are_refused_naming_the_contexts_before_the_model_loads(make_cfg):
    """One round per context: asking for more rounds than the training split holds disjoint contexts named
    num_demos and a pool of what the earlier contexts had left, as if num_demos alone were too large."""
    with pytest.raises(DataError) as refused:
        run(make_cfg(*SEQUENTIAL, "dataset.context.num_contexts=200"))
    assert str(refused.value) == (
        "dataset.context.num_contexts=200: context 129 draws its demonstrations from what the 128 before it left "
        "(0 of 512 examples): dataset.context.num_demos=4 is larger than the training pool (0 examples). Each "
        "context draws 4 demonstrations of its own; lower dataset.context.num_contexts or dataset.context.num_demos"
    )


def test_contexts_with_their_own_instruction_and_label_words(make_cfg):
    cfg = make_cfg(
        "experiment=instruction_override", "model=tiny-random", "dataset.context.num_demos=2", "dataset.num_eval=4"
    )
    validate(cfg)
    task = build_task(cfg.dataset, 0)
    first, second = task.contexts
    assert first.startswith('Classify the sentiment of each review. Answer " foo" if it is positive')
    assert second.startswith('Classify the sentiment of each review. Answer " bar" if it is positive')
    demos = {d.uid: d for d in task.demos}
    for context, words in ((first, (" foo", " bar")), (second, (" bar", " foo"))):
        for shot in context.split("\n\n")[1:]:
            review = shot.split("\n")[0].removeprefix("Review: ")
            label = next(d.label for d in demos.values() if d.fields["review"] == review)
            assert shot.endswith(words[label])
    assert task.verbalizers == [" foo", " bar"]  # evaluation keeps the dataset's (the first context's) words


def test_the_other_phrasing_uses_no_sentence_frame_of_the_reviews():

    def pattern(form: str) -> re.Pattern:
        return re.compile(re.sub(r"\\{[a-z]+\\}", ".*", re.escape(form)) + "$")

    review_frames = [pattern(form) for form in synthetic._FORMS]
    other = generate_examples(64, 1, "eval", phrasing="other")
    assert not [e["review"] for e in other if any(p.match(e["review"]) for p in review_frames)]
    assert all(any(pattern(f).match(e["review"]) for f in synthetic._OTHER_FORMS) for e in other)
    assert [e["label"] for e in other] == [i % 2 for i in range(64)]
    with pytest.raises(ValueError, match="phrasing"):
        generate_examples(2, 1, "eval", phrasing="poems")


# The released request (CyberAgentAILab/cheat-sheet-icl, src/data_utils.py, get_cheat_prompt for non-math
# tasks), the released separator and the released context layout (src/cheatsheet_api.py), as written there.
RELEASED_SEP = "\n###\n"


def released_cheat_prompt(dataset_str: str) -> str:
    return f"Create a cheat sheet based on the examples below. You will be asked to answer questions similar to these examples during the test, without being allowed to refer to the examples at that time. Your task here is to make a cheat sheet that will help you answer such problems correctly. First, carefully read the examples below and identify which ones you find most difficult to answer.\n\n{dataset_str}\n\nNow, create a cheat sheet to help you solve the difficult examples. Exclude any content that is easy for you, and only include specific, detailed points to address the challenging ones.\n\n"  # noqa: E501


def released_context(response: str, dataset_cat: list[str]) -> str:
    show_example = RELEASED_SEP.join(dataset_cat[:2])
    return f"{response}\n\nFollow the format of the examples below in your response.\n\n{show_example}"


def test_cheat_sheet_prompts_are_the_released_ones_and_sheets_are_cached(make_cfg, tmp_path, monkeypatch):
    overrides = [
        *TINY,
        "method=cheat_sheet",
        "method.chunk_demos=4",
        "method.max_sheet_tokens=6",
        "dataset.context.num_demos=12",
        "dataset.source.split_sizes.eval=8",
        f"method.sheet_dir={tmp_path / 'cheat_sheets'}",
    ]
    requests: list[str] = []
    real_generate = cs.generate

    def recording(model, tokenizer, prompts, *args, **kwargs):
        requests.extend(prompts)
        return real_generate(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(cs, "generate", recording)
    result = run(make_cfg(*overrides, output_dir=tmp_path / "first"))
    cfg = make_cfg(*overrides)
    task = build_task(cfg.dataset, cfg.seed)
    shots = [task.query(d) + task.verbalizers[d.label] for d in task.demos]
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    assert len(requests) == 3  # 12 demonstrations, 4 per request
    rows = [json.loads(line) for p in (tmp_path / "cheat_sheets").glob("*.jsonl") for line in p.open()]
    sheets = {row["key"]: row["sheet"] for row in rows}
    sheet = ""
    for index, prompt in enumerate(requests):
        request = released_cheat_prompt(RELEASED_SEP.join(shots[4 * index : 4 * index + 4]))
        if sheet:
            request = cs.UPDATE.format(sheet=sheet) + request
        assert prompt == cs.render_chat(tokenizer, [{"role": "user", "content": request}])
        sheet = sheets[prompt] or sheet
    predictions = [json.loads(line) for line in (tmp_path / "first" / "predictions.jsonl").open()]
    demonstrations = len(tokenizer(task.context + "\n\n").input_ids) - len(
        tokenizer(task.context_instruction).input_ids
    )
    assert predictions and 0 < result["context_tokens_per_query"] < demonstrations
    query = task.eval_sets["eval"][0]
    cs.use_sheet(task, sheet, 2)
    expected = task.context_instruction + "\n\n" + released_context(sheet, shots) + RELEASED_SEP + task.query(query)
    assert task.teacher_prompt(query) == expected

    requests.clear()
    cfg_task = build_task(cfg.dataset, cfg.seed)
    handle = ModelHandle(student=None, base=None, identity=model_identity(cfg.model, cfg.seed, "cpu"))
    assert build_method(cfg.method).write_sheet(handle, tokenizer, cfg_task, 4) == sheet
    assert requests == []  # every sheet read from the cache (the model is never asked)


def test_cheat_sheet_writes_the_demonstrations_as_icl_does_in_the_datasets_demonstration_template(make_cfg):
    # a dataset whose in-context pattern differs from its query template (llmft's, mosbach2023/*): the sheet is
    # written from, and shown, the demonstrations ICL sees, ahead of a query in the same pattern
    cfg = make_cfg(
        *TINY,
        "method=cheat_sheet",
        "dataset.context.num_demos=4",
        "dataset.demo_template='R: {review} =>'",
        "dataset.context_query_template='R: {review} =>'",
    )
    task = build_task(cfg.dataset, cfg.seed)
    shots = [f"R: {d.fields['review']} =>" + task.verbalizers[d.label] for d in task.demos]
    assert task.context.endswith("\n\n".join(shots))  # ICL's context
    assert released_cheat_prompt(RELEASED_SEP.join(shots)) == cs.sheet_request(cs.REQUEST, task, task.demos)
    query = task.eval_sets["eval"][0]
    cs.use_sheet(task, "SHEET", 2)
    assert task.teacher_prompt(query).endswith(
        released_context("SHEET", shots) + RELEASED_SEP + f"R: {query.fields['review']} =>"
    )


def test_cheat_sheet_reads_every_demonstration_in_one_released_request_by_default(make_cfg):
    # cheatsheet_api.py makes one call: dataset_str = SEP.join(dataset_cat); get_cheat_prompt(dataset_str, args.task)
    cfg = make_cfg(*TINY, "method=cheat_sheet", "dataset.context.num_demos=12")
    task = build_task(cfg.dataset, cfg.seed)
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    method = build_method(cfg.method)
    method.check_inputs(task, tokenizer, cfg)  # the request fits the model's window
    shots = [task.query(d) + task.verbalizers[d.label] for d in task.demos]
    assert method.chunks(task) == [task.demos]
    request = released_cheat_prompt(RELEASED_SEP.join(shots))
    assert method.prompt(tokenizer, task, task.demos, "") == cs.render_chat(
        tokenizer, [{"role": "user", "content": request}]
    )


@pytest.mark.parametrize(
    "override, message",
    [
        (  # was a traceback from the window check (max() of no requests)
            "dataset.context.num_demos=0",
            "dataset.context.num_demos: is 0: a cheat sheet is written from the demonstrations, and there are none. "
            "Set dataset.context.num_demos to at least 1 (method=zero_shot evaluates without a context)",
        ),
        # offered null, which the schema then refused
        ("method.max_sheet_tokens=0", "method.max_sheet_tokens: must be >= 1, got 0. "),
        (  # the second context's demonstrations were written into the sheet with the first one's label words
            "experiment=instruction_override",
            "dataset.context.demo_verbalizers: contexts with instructions or label words of their own (e.g. "
            "experiment=instruction_override) cannot be read as one set of demonstrations in the dataset's words. "
            "Set dataset.context.instructions=null and dataset.context.demo_verbalizers=null with method=cheat_sheet",
        ),
    ],
)
def test_bad_cheat_sheet_settings_are_one_message_before_the_model_loads(make_cfg, override, message):
    with pytest.raises(ConfigError) as refused:
        run(make_cfg(override, *TINY, "method=cheat_sheet"))
    assert str(refused.value) == message


def test_a_cheat_sheet_written_by_another_model_is_its_greedy_text_read_by_the_evaluated_model(
    make_cfg, behaving_model_dir, tmp_path
):
    """method.teacher_model writes the sheet in its own tokens (the behaving model: another tokenizer); the
    evaluated model (tiny-random) reads it and is the run's teacher; the cache is keyed by the writer."""
    overrides = [
        *TINY,
        "method=cheat_sheet",
        "method.chat=false",  # the behaving model has no chat template
        "method.chunk_demos=2",
        "method.max_sheet_tokens=6",
        "dataset.context.num_demos=4",
        "dataset.source.split_sizes.eval=8",
        f"method.sheet_dir={tmp_path / 'sheets'}",
        *behaving_teacher_overrides(behaving_model_dir),
    ]
    result = run(make_cfg(*overrides, output_dir=tmp_path / "run"))
    cfg = make_cfg(*overrides)
    task = build_task(cfg.dataset, cfg.seed)
    writer_tokenizer = load_tokenizer(cfg.method.teacher_model, cfg.cache_dir)
    writer = load_model(cfg.method.teacher_model, cfg.cache_dir, writer_tokenizer, cfg.seed).eval()
    sheets = {
        row["key"]: row["sheet"] for p in (tmp_path / "sheets").glob("*.jsonl") for row in map(json.loads, p.open())
    }
    sheet = ""
    for chunk in (task.demos[:2], task.demos[2:]):
        request = cs.sheet_request(cs.REQUEST, task, chunk, cs.UPDATE, sheet)
        ids = writer_tokenizer(request, return_tensors="pt")
        written = writer.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=writer_tokenizer.pad_token_id)
        text = writer_tokenizer.decode(written[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
        assert sheets[request] == cs.clean_sheet(text)
        sheet = sheets[request] or sheet
    assert sheet  # the writer wrote something the evaluated model reads
    # the evaluated model reading the sheet is the teacher; the writer is never scored
    assert result["metrics"]["eval/accuracy"] == result["metrics"]["eval/teacher_accuracy"]
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    cs.use_sheet(task, sheet, 2)
    assert result["context_tokens_per_query"] == len(tokenizer(task.context + cs.SEPARATOR).input_ids)

    with pytest.raises(ConfigError, match="more than the writer's window of 1024"):  # the writer's tokens count
        run(make_cfg(*overrides, "method.chunk_demos=null", "dataset.context.num_demos=24"))


def test_a_separate_writer_sharing_the_vocabulary_is_prompted_in_its_own_chat_template(make_cfg, tmp_path, monkeypatch):
    """The eighteenth audit: a writer with the evaluated model's vocabulary (the handle then carries no tokenizer of
    its own) was prompted in the evaluated model's template (here none: a plain User/Assistant text), while its
    window was checked with its own."""
    import copy

    cfg = make_cfg(
        *TINY, "method=cheat_sheet", "+model@method.teacher_model=tiny-random", "dataset.context.num_demos=4"
    )
    method, task = build_method(cfg.method), build_task(cfg.dataset, cfg.seed)
    writer_tokenizer = load_tokenizer(cfg.method.teacher_model, cfg.cache_dir)
    assert writer_tokenizer.chat_template  # SmolLM2's ChatML
    plain = copy.deepcopy(writer_tokenizer)
    plain.chat_template = None  # the evaluated model's: no template
    method.check_teacher(cfg, task, plain, writer_tokenizer)
    method.sheet_dir = str(tmp_path)
    prompts = []
    monkeypatch.setattr(
        cs, "generate", lambda model, tokenizer, batch, *a, **k: prompts.extend(batch) or [[]] * len(batch)
    )
    model = load_model(cfg.model, cfg.cache_dir, plain, cfg.seed)
    method.write_sheet(ModelHandle(student=model, base=model, separate_teacher=model), plain, task, 4)
    assert prompts and all(p.startswith("<|im_start|>") for p in prompts), prompts[0][:80]


def test_a_sheet_longer_in_the_evaluated_models_tokens_than_its_window_leaves_is_refused_not_cut(make_cfg, monkeypatch):
    """Another model's max_sheet_tokens are its own tokens; the evaluated model's may be more."""
    monkeypatch.setattr(cs.CheatSheet, "write_sheet", lambda *args: "word " * 5000)
    with pytest.raises(
        ConfigError,
        match=r"the sheet the writer wrote takes 500\d of the evaluated model's tokens, more than the \d+ its window",
    ):
        run(make_cfg(*TINY, "method=cheat_sheet", "dataset.context.num_demos=4", "dataset.source.split_sizes.eval=8"))


def test_cheat_sheet_cleaning_drops_a_preamble_as_released():
    assert cs.clean_sheet("  Certainly! Here you go\n- foo is good\n") == "- foo is good"
    assert cs.clean_sheet("Intro\nHere is a **sheet**\n- a\n- b") == "- a\n- b"
    assert cs.clean_sheet(" - a\n- b ") == "- a\n- b"


def write_run_config(run_dir: Path, method: str, adapter: str = "lora", num_contexts: int = 2) -> None:
    """config.yaml as a run of ``method`` writes it (its method resolved), over contexts of 12 demonstrations."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from ctxdistill.cli import CONFIG_DIR

    GlobalHydra.instance().clear()
    overrides = [f"output_dir={run_dir}", f"method={method}", f"model.adapter={adapter}", "model=tiny-random"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"dataset.context.num_contexts={num_contexts}"])
    GlobalHydra.instance().clear()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def write_prefix_run(run_dir: Path, seed: int, accuracy: float, forgetting: float = 0.5) -> None:
    """A finished cd run into a prefix over 2 contexts of 12 demonstrations (48 eval and 32 ood examples), with
    its forgetting evaluation (64 examples)."""
    write_run_config(run_dir, "cd", "prefix")
    metrics = {
        **{"eval/accuracy": accuracy, "eval/examples": 48, "ood/accuracy": 0.5, "ood/examples": 32},
        **{"train_queries/context_accuracy": 0.1, "train_queries/examples": 32},
    }
    record = {"seed": seed, "metrics": metrics, "trainable_parameters": 10, "context_tokens_per_query": 0}
    (run_dir / "metrics.json").write_text(json.dumps(record))
    (run_dir / "evaluations" / "forgetting").mkdir(parents=True)
    forgotten = {"metrics": {"eval/accuracy": forgetting, "eval/examples": 64}}
    (run_dir / "evaluations" / "forgetting" / "metrics.json").write_text(json.dumps(forgotten))


def test_the_interval_is_students_t_and_the_curve_is_tabulated(tmp_path: Path):
    for seed, accuracy in enumerate([0.5, 0.6, 0.7]):
        write_prefix_run(tmp_path / "runs" / f"cd-{seed}", seed, accuracy, forgetting=accuracy)
    (tmp_path / "before").mkdir()
    (tmp_path / "before" / "metrics.json").write_text(json.dumps({"metrics": {"eval/accuracy": 0.75}}))
    assert (
        learning_curve([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--before", str(tmp_path / "before")])
        == 0
    )
    table = (tmp_path / "out" / "learning_curve.md").read_text().splitlines()
    header = "| method | demos | seeds | eval | ood | context tokens/query | trainable params | other task after"
    assert table[0] == header + " (before: 0.750) |"
    # 0.6 -/+ t(0.975, 2 df) 4.3027 x sd 0.1 / sqrt(3) = 0.2484; ood's seeds agree: Wilson's for 16 of 32
    cells = "0.600 [0.352, 0.848] | 0.500 [0.336, 0.664] | 0 | 10 | 0.600 [0.352, 0.848]"
    assert table[2] == f"| cd (prefix) | 24 | 3 | {cells} |"
    assert (tmp_path / "out" / "learning_curve.png").stat().st_size > 1000


def test_seeds_that_agree_get_wilsons_interval_and_a_t_interval_past_1_is_cut(tmp_path: Path, monkeypatch):
    """Seeds that agreed had an interval of width 0 (``0.500 ± 0.000``) and a t-interval ran past 1 (``0.646 ±
    0.583``, and error bars above 1 in the plot)."""
    for seed, accuracy in enumerate([0.5, 1.0, 1.0]):
        write_prefix_run(tmp_path / "runs" / f"cd-{seed}", seed, accuracy)
    bars, draw = [], Axes.errorbar

    def recording_errorbar(self, x, y, yerr, **kwargs):
        bars.append((list(y), [*yerr[0], *yerr[1]]))  # below the means, then above
        return draw(self, x, y, yerr=yerr, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", recording_errorbar)
    assert learning_curve([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    # eval: 5/6 -/+ 4.3027 x sd sqrt(1/12) / sqrt(3) = 0.8333 -/+ 0.7171 = [0.1162, 1.5504], cut at 1;
    # ood, 16 of 32, and the other task, 32 of 64: Wilson's centre 0.5, half z / (1 + z^2/n) sqrt(1/(4n) + z^2/(4n^2))
    low, ood, other = 5 / 6 - 0.717109, (0.336309, 0.663691), (0.381021, 0.618979)
    table = (tmp_path / "out" / "learning_curve.md").read_text().splitlines()
    cells = "0.833 [0.116, 1.000] | 0.500 [0.336, 0.664] | 0 | 10 | 0.500 [0.381, 0.619]"
    assert table[2] == f"| cd (prefix) | 24 | 3 | {cells} |"
    with (tmp_path / "out" / "learning_curve.csv").open() as f:
        (row,) = csv.DictReader(f)
    assert [float(row[k]) for k in ("eval_mean", "eval_low", "eval_high")] == pytest.approx([5 / 6, low, 1.0], abs=1e-6)
    assert [float(row[k]) for k in ("ood_low", "ood_high", "forgetting_low", "forgetting_high")] == pytest.approx(
        [*ood, *other], abs=1e-6
    )
    # the bars reach from the mean to each end: down to the t-interval's low end, up to 1
    (eval_means, eval_bars), (_, ood_bars) = bars
    assert eval_means == pytest.approx([5 / 6]) and eval_bars == pytest.approx([5 / 6 - low, 1 / 6], abs=1e-6)
    assert ood_bars == pytest.approx([0.5 - ood[0], ood[1] - 0.5], abs=1e-6)


def test_a_seed_run_twice_into_the_sweep_is_refused_not_counted_twice(tmp_path: Path, capsys):
    """A cell run again into another directory of the sweep (another setting, a renamed cell) was averaged in:
    the row said 4 seeds of 3 and its interval narrowed."""
    for seed, accuracy in enumerate([0.5, 0.6, 0.7]):
        write_prefix_run(tmp_path / "runs" / f"cd-{seed}", seed, accuracy)
    write_prefix_run(tmp_path / "runs" / "again" / "cd-0", 0, 0.9)
    with pytest.raises(SystemExit) as refused:
        learning_curve([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert refused.value.code == 2 and not (tmp_path / "out").exists()
    runs = tmp_path / "runs"
    assert capsys.readouterr().err.endswith(
        "error: two runs of the same point; remove the one that should not count:\n"
        f"  {runs / 'cd-0'} repeats {runs / 'again' / 'cd-0'} (cd (prefix), 24 demonstrations, seed 0)\n"
    )


def test_the_sheets_room_is_sized_with_the_query_as_it_follows_the_context(make_cfg):
    """The nineteenth audit: the room left for the sheet was sized with the plain template, while the evaluated
    prompt writes each query in dataset.context_query_template after the sheet."""
    long_query = "Review: {review}\n" + "Read the review above carefully once more. " * 20 + "Sentiment:"
    rooms = []
    for template in (None, long_query):
        cfg = make_cfg(*TINY, "method=cheat_sheet", "dataset.context.num_demos=4")
        cfg.dataset.context_query_template = template
        method, task = build_method(cfg.method), build_task(cfg.dataset, cfg.seed)
        tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
        method.check_inputs(task, tokenizer, cfg)
        rooms.append(method.sheet_room)
    tokens = load_tokenizer(cfg.model, cfg.cache_dir)
    extra = len(tokens(long_query.format(review="")).input_ids) - len(
        tokens(cfg.dataset.template.format(review="")).input_ids
    )
    assert rooms[0] - rooms[1] == pytest.approx(extra, abs=2)


def test_context_tokens_per_query_count_the_context_not_the_query_templates_difference(make_cfg):
    """The query after a context may be written in its own template (llmft's in-context prompt): its words are
    the query's, not the context's."""
    from ctxdistill.run import context_tokens_per_query

    cfg = make_cfg(*TINY, "method=icl", "dataset.context.num_demos=4", "dataset.source.split_sizes.eval=8")
    cfg.dataset.context_query_template = "Review: {review}\nIs the review above positive or negative?\nSentiment:"
    task, tokenizer = build_task(cfg.dataset, cfg.seed), load_tokenizer(cfg.model, cfg.cache_dir)
    expected = len(tokenizer(task.context + task.separator).input_ids)
    assert context_tokens_per_query(task, tokenizer, with_context=True) == pytest.approx(expected, abs=1)


def test_the_curves_x_is_what_each_method_read_of_the_demonstrations(tmp_path: Path):
    """The nineteenth audit: ICL over 4 contexts was put at 48 demonstrations, though each query reads one context
    of 12, and zero-shot at 12 and 48, though it reads none."""
    for method, contexts, expected in (("icl", 4, 12), ("zero_shot", 4, 0), ("cd", 4, 48), ("cheat_sheet", 4, 48)):
        run_dir = tmp_path / "runs" / f"{method}-{contexts}"
        write_run_config(run_dir, method, num_contexts=contexts)
        record = {"seed": 0, "metrics": {"eval/accuracy": 0.5, "eval/examples": 48}, "trainable_parameters": 0}
        (run_dir / "metrics.json").write_text(json.dumps(record))
    # a run saved before some of its method's settings existed (the review: a traceback)
    cd = tmp_path / "runs" / "cd-4" / "config.yaml"
    cd.write_text(cd.read_text().replace("  uld_hybrid: false\n", "").replace("  sequential: false\n", ""))
    assert learning_curve([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    rows = [line.split(" | ")[:2] for line in (tmp_path / "out" / "learning_curve.md").read_text().splitlines()[2:]]
    assert sorted(rows) == [["| cd", "48"], ["| cheat_sheet", "48"], ["| icl", "12"], ["| zero_shot", "0"]]
