"""The real bundled SmolLM2-135M-Instruct, end to end (converted once, then cached)."""

import pytest

from ctxdistill.models import converted_dir
from ctxdistill.run import run


@pytest.mark.slow
def test_bundled_model_learns_the_label_words_from_context_and_cd_trains_on_it(make_cfg, tmp_path):
    small = ["logger=none", "dataset.source.split_sizes.eval=40", "dataset.num_train_queries=16",
             "trainer.max_steps=4"]
    zero_shot = run(make_cfg("model=smollm2-135m", "method=zero_shot", *small, output_dir=tmp_path / "zs"))
    cfg = make_cfg("model=smollm2-135m", "method=cd", *small, output_dir=tmp_path / "cd")
    assert (converted_dir(cfg.model, cfg.cache_dir) / "model.safetensors").is_file()
    cd = run(cfg)
    # The teacher (the model with the context) knows which word means what; the bare model does not.
    assert cd["metrics"]["eval/teacher_accuracy"] >= zero_shot["metrics"]["eval/accuracy"] + 0.15
    assert (tmp_path / "cd" / "adapter" / "adapter_model.safetensors").is_file()
