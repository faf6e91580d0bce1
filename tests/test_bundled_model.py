"""The real bundled SmolLM2-135M-Instruct, end to end (converted once, then cached)."""

import pytest

from ctxdistill.models import converted_dir
from ctxdistill.run import run


@pytest.mark.slow
def test_bundled_model_learns_the_label_words_from_context_and_cd_trains_on_it(make_cfg, tmp_path):
    small = ["logger=none", "dataset.source.split_sizes.eval=40", "dataset.num_train_queries=16", "trainer.max_steps=4"]
    zero_shot = run(make_cfg("model=smollm2-135m", "method=zero_shot", *small, output_dir=tmp_path / "zs"))
    cfg = make_cfg("model=smollm2-135m", "method=cd", *small, output_dir=tmp_path / "cd")
    assert (converted_dir(cfg.model, cfg.cache_dir) / "model.safetensors").is_file()
    cd = run(cfg)
    # The teacher (the model with the context) knows which word means what; the bare model does not.
    assert cd["metrics"]["eval/teacher_accuracy"] >= zero_shot["metrics"]["eval/accuracy"] + 0.15
    assert (tmp_path / "cd" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_generation_over_the_shared_context_is_transformers_generate_on_the_bundled_model(make_cfg):
    import torch

    from ctxdistill.data import build_task
    from ctxdistill.encoding import SharedPrefix
    from ctxdistill.generation import generate
    from ctxdistill.models import load_model, load_tokenizer

    cfg = make_cfg("model=smollm2-135m", "logger=none")
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    model = load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0).eval()
    task = build_task(cfg.dataset, cfg.seed)
    prompts = [task.teacher_prompt(e) for e in task.train_queries[:4]]  # the demo's context, four reviews
    prefix = SharedPrefix(model, tokenizer, prompts)
    assert prefix.length > 200
    ours = generate(model, tokenizer, prompts, 12, stop=None, prefix=prefix)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert ours == reference[:, batch.input_ids.shape[1] :].tolist()
    # The label word, then the model goes on writing the next demonstration (the audit's broken decoder
    # wrote blank lines after the label word).
    assert all(text.startswith((" foo\n\nReview:", " bar\n\nReview:")) for text in tokenizer.batch_decode(ours))
