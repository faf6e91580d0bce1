"""Serving cost per query: prompt tokens, KV-cache bytes and latency, with the context and without it."""

import json
import time

import pytest
import torch
from accelerate.state import AcceleratorState
from omegaconf import OmegaConf

from ctxdistill import serving
from ctxdistill.encoding import encode
from ctxdistill.models import add_adapter, load_model, load_tokenizer
from ctxdistill.run import run

from conftest import TINY

PROMPTS = [
    "Review: a fine day\nSentiment:",
    "Review: no\nSentiment:",
    "Review: the show was lovely and the park was truly lousy\nSentiment:",
    "Review: ok\nSentiment:",
    "Review: a long and winding review of a long and winding road\nSentiment:",
]


@pytest.fixture(scope="module")
def tiny():
    from hydra import compose, initialize_config_dir

    from ctxdistill.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["model=tiny-random", "output_dir=unused", "model.adapter=prefix", "model.prefix_tokens=6"],
        )
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    return cfg, tokenizer, load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0).eval()


def cached_bytes(model, tokenizer, prompt: str) -> int:
    """What one unbatched forward pass over ``prompt`` leaves in the model's cache."""
    ids = torch.tensor([tokenizer(prompt).input_ids])
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).cache
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def test_kv_bytes_per_query_are_what_an_unpadded_forward_caches_and_a_prefix_adds_its_tokens(tiny):
    cfg, tokenizer, model = tiny
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * model.dtype.itemsize
    tokens = [len(ids) for ids in tokenizer(PROMPTS).input_ids]
    assert len(set(tokens)) > 2  # batches are left-padded: padding must not count

    bare = serving.measure(model, tokenizer, PROMPTS, batch_size=3)
    assert bare.prompt_tokens == sum(tokens) / len(tokens)
    assert bare.kv_bytes == sum(cached_bytes(model, tokenizer, p) for p in PROMPTS) / len(PROMPTS)
    assert bare.kv_bytes == per_token * sum(tokens) / len(tokens)

    prefixed = add_adapter(model, cfg.model, tokenizer, "An instruction and some demonstrations " * 4).eval()
    cost = serving.measure(prefixed, tokenizer, PROMPTS, batch_size=3)
    assert cost.prompt_tokens == bare.prompt_tokens  # the prefix is not read as text
    assert cost.kv_bytes == sum(cached_bytes(prefixed, tokenizer, p) for p in PROMPTS) / len(PROMPTS)
    assert cost.kv_bytes == bare.kv_bytes + per_token * 6


class Clockwork(torch.nn.Module):
    """Answers after a known delay, the first time slowly, with a real forward pass's output made beforehand
    (so the test's timing does not depend on the machine's load)."""

    def __init__(self, output, first: float, then: float):
        super().__init__()
        self.device_marker = torch.nn.Parameter(torch.zeros(1))
        self.output, self.delays, self.then = output, [first], then

    def forward(self, **kwargs):
        time.sleep(self.delays.pop() if self.delays else self.then)
        return self.output


def test_latency_is_a_timed_pass_per_query_without_the_warm_up(tiny):
    _, tokenizer, model = tiny
    prompts = PROMPTS[:4] * 2  # 8 queries in 2 batches of 4: 2 forward passes a pass
    batch = encode(tokenizer, prompts[:4])
    with torch.no_grad():
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=True)
    cost = serving.measure(Clockwork(output, first=0.5, then=0.05), tokenizer, prompts, batch_size=4)
    # 12.5 ms per query: a batch's time would be 50 ms, and the slow first call, counted in a pass, 62 ms more
    assert 2 * 50 / 8 <= cost.latency_ms < 40, cost


def test_the_sample_is_evenly_spaced_over_the_set():
    assert serving.sample(list(range(10))) == [0, 2, 5, 7]
    assert serving.sample([1, 2]) == [1, 2]


def test_serving_metrics_average_tasks_and_divide_teacher_by_student():
    pairs = [
        (serving.ServingCost(200, 8.0, 4000), serving.ServingCost(20, 2.0, 400)),
        (serving.ServingCost(100, 4.0, 2000), serving.ServingCost(10, 2.0, 200)),
    ]
    assert serving.serving_metrics(pairs) == {
        "serving/teacher_prompt_tokens": 150,
        "serving/student_prompt_tokens": 15,
        "serving/prompt_tokens_ratio": 10,
        "serving/teacher_latency_ms": 6.0,
        "serving/student_latency_ms": 2.0,
        "serving/latency_ratio": 3.0,
        "serving/teacher_kv_bytes": 3000,
        "serving/student_kv_bytes": 300,
        "serving/kv_bytes_ratio": 10,
    }
    assert serving.serving_metrics([]) == {}


def test_a_trained_prefix_is_served_without_the_context_and_pays_its_prefix_tokens(make_cfg, tmp_path, tiny):
    _, tokenizer, _ = tiny
    cfg = make_cfg(*TINY, "method=cd", "model.adapter=prefix", "model.prefix_tokens=5", "trainer.max_steps=1")
    result = run(cfg)
    metrics = result["metrics"]
    assert result["context_tokens_per_query"] == 5  # the prefix's positions, which every query attends to
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    student_prompts = serving.sample([r["prompt"] for r in rows])  # the student's prompts, as evaluated
    tokens = [len(ids) for ids in tokenizer(student_prompts).input_ids]
    assert metrics["serving/student_prompt_tokens"] == sum(tokens) / len(tokens)
    teacher_per_token = metrics["serving/teacher_kv_bytes"] / metrics["serving/teacher_prompt_tokens"]
    assert metrics["serving/student_kv_bytes"] == pytest.approx(teacher_per_token * (sum(tokens) / len(tokens) + 5))
    for quantity, ratio in (("prompt_tokens", "prompt_tokens"), ("latency_ms", "latency"), ("kv_bytes", "kv_bytes")):
        teacher, student = metrics[f"serving/teacher_{quantity}"], metrics[f"serving/student_{quantity}"]
        assert metrics[f"serving/{ratio}_ratio"] == pytest.approx(teacher / student, rel=1e-6)  # float32-rounded
    assert metrics["serving/prompt_tokens_ratio"] > 10 and metrics["serving/kv_bytes_ratio"] > 5
    assert OmegaConf.load(tmp_path / "config.yaml").model.adapter == "prefix"


def test_under_mixed_precision_the_trained_model_is_served_in_the_precision_the_teacher_was(make_cfg):
    # Trained in bf16 autocast, the model is evaluated and measured without it, as the teacher was: both caches
    # hold float32, so the bytes per token agree and the ratio is the prompt tokens' (before: a crash on the CPU,
    # and a bf16 student cache a quarter smaller on a GPU).
    AcceleratorState._reset_state(reset_partial_state=True)  # a process's accelerate state is set once
    try:
        metrics = run(make_cfg(*TINY, "method=cd", "trainer.max_steps=2", "trainer.mixed_precision=bf16"))["metrics"]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert metrics["serving/kv_bytes_ratio"] == pytest.approx(metrics["serving/prompt_tokens_ratio"], rel=1e-6)


def test_under_mixed_precision_the_evaluations_during_training_run_without_autocast(make_cfg, monkeypatch):
    """Found by the seventeenth audit: only the final evaluation left accelerate's autocast, so the curves and the
    checkpoint selection were bf16 figures and the final metrics of the same weights float32 ones."""
    import ctxdistill.run

    forwards = []  # (training?, autocast on?) of every forward of the model inside the adapter
    original_train = ctxdistill.run.train

    def recording_train(method, handle, *args, **kwargs):
        inner = handle.base.get_base_model()
        inner.register_forward_pre_hook(
            lambda module, _: forwards.append((module.training, torch.is_autocast_enabled("cpu")))
        )
        return original_train(method, handle, *args, **kwargs)

    monkeypatch.setattr(ctxdistill.run, "train", recording_train)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        run(make_cfg(*TINY, "method=cd", "trainer.max_steps=2", "trainer.eval_every=1", "trainer.mixed_precision=bf16"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert {autocast for training, autocast in forwards if training} == {True}  # training in bf16
    assert {autocast for training, autocast in forwards if not training} == {False}  # every evaluation without it
