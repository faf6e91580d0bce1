"""opcd: on-policy distillation of a system prompt on GenPI's inputs; its loss, its prompts, the run end to end."""

import csv
import io
import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_genpi import GENPI, one_thread  # noqa: F401 (the tiny runs' settings; one thread)

from ctxdistill.config import ConfigError, validate
from ctxdistill.encoding import encode
from ctxdistill.losses import reverse_kl
from ctxdistill.models import ModelHandle, add_lora, load_model, load_tokenizer
from ctxdistill.results.cli import main as compare
from ctxdistill.run import run

OPCD = ["experiment=opcd/system_prompt", *[o for o in GENPI[1:] if "reason" not in o]]


def test_opcd_meets_genpi_on_the_same_data_model_and_trainer(make_cfg):
    opcd, genpi = make_cfg("experiment=opcd/system_prompt"), make_cfg("experiment=genpi/cpu_sized")
    assert OmegaConf.to_container(opcd.trainer) == OmegaConf.to_container(genpi.trainer)
    assert OmegaConf.to_container(opcd.model) == OmegaConf.to_container(genpi.model)
    shared = [k for k in opcd.method if k in genpi.method and k not in ("_target_", "name", "prompt_placement")]
    assert len(shared) == 18
    assert {k: opcd.method[k] for k in shared} == {k: genpi.method[k] for k in shared}
    # OPCD's placement: the prompt is the teacher's system message; the student has none
    assert opcd.method.prompt_placement == "system_message" and genpi.method.prompt_placement == "user_turn"
    assert opcd.method.divergence == "reverse_kl" and opcd.method.temperature == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.beta=2", "method.beta: must be in [0, 1], got 2"),
        ("method.lmbda=1.5", "method.lmbda: must be in [0, 1], got 1.5"),
        ("method.divergence=kl", "method.divergence"),
        ("method.max_reply_tokens=0", "method.max_reply_tokens: must be >= 1, got 0"),
        ("+method.sft_weight=0.5", "sft_weight"),  # GenPI's loss weight is not OPCD's: refused, never ignored
    ],
)
def test_bad_opcd_settings_fail_before_any_model_loads(make_cfg, override, message):
    with pytest.raises((ConfigError, Exception), match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(make_cfg(*OPCD, override))


def test_seeds_sharing_the_stages_draw_their_own_samples(make_cfg):
    """seed=S method.seed=0 (docs/papers/on-policy.md's seeds): the stages stay seed 0's, the samples and the
    lambda draws follow S; they followed method.seed, so every seed drew from one stream."""
    for seed in (1, 2):
        method = instantiate(make_cfg(*OPCD, f"seed={seed}", "method.seed=0").method, _convert_="all")
        assert (method.seed, method.on_policy.seed) == (0, seed)  # on_policy.start seeds its generators with it
    method = instantiate(make_cfg(*OPCD, "seed=1", "method.sample_seed=0").method, _convert_="all")
    assert method.on_policy.seed == 0  # the published seeds' setting, named


@pytest.mark.parametrize("lmbda, sampler", [(1.0, "student_prompts"), (0.0, "teacher_prompts")])
def test_the_loss_is_the_reverse_kl_to_the_prompted_teacher_at_every_sampled_token(make_cfg, lmbda, sampler):
    """The samples are fixed; the reference is two plain forwards (the student without the prompt, the base with
    it as its system message) over the whole sequences, and the reverse KL at the sampled tokens. lmbda says who
    samples: the student from its prompts (OPCD), or the teacher from the prompted ones (lmbda 0)."""
    cfg = make_cfg(*OPCD, f"method.lmbda={lmbda}")
    method = instantiate(cfg.method, _convert_="all")
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    model = add_lora(load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0), cfg.model).eval()  # no dropout
    handle = ModelHandle(student=model, base=model)
    torch.manual_seed(0)
    with torch.no_grad():  # a student that differs from the base: LoRA's B starts at zero
        for name, weight in handle.student.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.5)
    texts = ["What is photosynthesis?", "How do plants grow?"]
    method.on_policy.start(handle, tokenizer, [method.teacher_prompt(tokenizer, t) for t in texts])
    samples = [tokenizer(" Plants use light.", add_special_tokens=False).input_ids, tokenizer(" Slowly.").input_ids]
    sampled_from = []
    method.on_policy.sample = lambda model, prompts, prefix=None: sampled_from.append(prompts) or samples
    batch = {
        "student_prompts": [method.student_prompt(tokenizer, t) for t in texts],
        "teacher_prompts": [method.teacher_prompt(tokenizer, t) for t in texts],
    }
    assert "Answer in one sentence." in batch["teacher_prompts"][0]
    assert "Answer in one sentence." not in batch["student_prompts"][0]
    loss, parts = method.loss(handle, batch)

    terms = []
    with torch.no_grad():
        for student_prompt, teacher_prompt, sample in zip(batch["student_prompts"], batch["teacher_prompts"], samples):
            student = handle.student(**encode(tokenizer, [student_prompt], [sample + [0]])).logits[
                0, -len(sample) - 1 : -1
            ]
            with handle.teacher() as teacher:
                taught = teacher(**encode(tokenizer, [teacher_prompt], [sample + [0]])).logits[0, -len(sample) - 1 : -1]
            terms.append(reverse_kl(student.log_softmax(-1), taught.log_softmax(-1)))
    expected = torch.cat(terms).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4) and expected.item() > 0.01
    assert parts["on_policy"] == lmbda and sampled_from == [batch[sampler]]


def test_opcd_runs_end_to_end_on_genpis_stages(make_cfg, tmp_path, capsys):
    stages = tmp_path / "stages"
    genpi = run(
        make_cfg(
            *GENPI,
            "method.prompt_placement=system_message",
            f"method.stage_dir={stages}",
            output_dir=tmp_path / "genpi",
        )
    )
    inputs_stage = sorted(stages.glob("inputs-*.jsonl"))
    result = run(make_cfg(*OPCD, f"method.stage_dir={stages}", output_dir=tmp_path / "opcd"))
    assert sorted(stages.glob("inputs-*.jsonl")) == inputs_stage and len(inputs_stage) == 1  # GenPI's inputs
    used = {c["cache"] for c in result["provenance"]["caches"]}
    assert used == {"stage:inputs", "stage:replies"}  # no reasons: OPCD needs none
    assert result["train"]["steps"] == 1 and result["objective"] == "pseudo_heldout/task_success"
    rows = [json.loads(line) for line in (tmp_path / "opcd" / "predictions.jsonl").read_text().splitlines()]
    assert [r["set"] for r in rows] == ["eval"] * 8 + ["pseudo_heldout"] * 2
    theirs = [json.loads(line) for line in (tmp_path / "genpi" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["input"], r["teacher_reply"]) for r in rows] == [(r["input"], r["teacher_reply"]) for r in theirs]
    assert result["metrics"]["eval/task_success"] == sum(r["succeeds"] for r in rows[:8]) / 8
    assert genpi["train"]["steps"] == 1
    # the two objectives compared example by example: McNemar's test on the inputs both answered
    assert compare([str(tmp_path / "genpi"), str(tmp_path / "opcd"), "--vs", "genpi", "--format", "csv"]) == 0
    row = next(r for r in csv.DictReader(io.StringIO(capsys.readouterr().out)) if r["method"] == "opcd")
    assert row["eval/pairs_vs_genpi"] == "8" and 0 <= float(row["eval/p_vs_genpi"]) <= 1
