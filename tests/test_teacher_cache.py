"""The teacher's targets computed once (cached in memory or on disk) equal the ones computed at every step."""

import pytest
import torch

from ctxdistill.data import build_task
from ctxdistill.methods.distill import DistillConfig
from ctxdistill.models import ModelHandle, add_lora, load_model, load_tokenizer, model_identity
from ctxdistill.run import run

from conftest import TINY, method_of, without_timings


@pytest.fixture(scope="module")
def setup():
    from hydra import compose, initialize_config_dir

    from ctxdistill.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny-random", "output_dir=unused", "dataset.num_train_queries=12"])
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    model = add_lora(load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0), cfg.model)
    torch.nn.init.normal_(model.base_model.model.model.layers[0].self_attn.q_proj.lora_B.default.weight, std=0.05)
    handle = ModelHandle(student=model, base=model, identity=model_identity(cfg.model, 0, "cpu"))
    return handle, tokenizer, build_task(cfg.dataset, seed=0)


def prepared(setup, **options):
    handle, tokenizer, task = setup
    method = method_of(DistillConfig, name="cd", **options)
    examples = method.train_examples(task)
    method.prepare(handle, tokenizer, task, examples, batch_size=5)
    return method


def loss_of(method, setup):
    handle, tokenizer, task = setup
    batch = method.collate(tokenizer, task, task.train_queries[3:9])
    with torch.no_grad():
        return method.loss(handle, batch)[0].item()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"answer": "teacher_generation", "max_answer_tokens": 3},
        {"top_k": 500, "top_k_rest": "bucket", "divergence": "jsd", "temperature": 0.5},
        {"top_k": 5, "answer": "teacher_generation", "max_answer_tokens": 3},
    ],
)
def test_cached_targets_give_the_loss_of_a_teacher_run_at_every_step(setup, options):
    cached = prepared(setup, teacher_cache="memory", **options)
    per_step = prepared(setup, teacher_cache="none", **options)
    assert cached.teacher_forwards == 3 and per_step.teacher_forwards == 0  # 12 queries in batches of 5
    expected = loss_of(per_step, setup)
    assert per_step.teacher_forwards == 1
    assert expected > 1e-5  # the student (no context) differs from the teacher
    assert loss_of(cached, setup) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert cached.teacher_forwards == 3  # no teacher forward at a training step


def test_a_later_run_reads_the_disk_cache_and_runs_no_teacher(setup, tmp_path):
    first = prepared(setup, teacher_cache="disk", teacher_cache_dir=str(tmp_path), top_k=4)
    assert first.teacher_forwards == 3 and len(list(tmp_path.glob("*.pt"))) == 1
    again = prepared(setup, teacher_cache="disk", teacher_cache_dir=str(tmp_path), top_k=4)
    assert again.teacher_forwards == 0
    assert loss_of(again, setup) == loss_of(first, setup)
    # Another setting that changes the targets is another key.
    hotter = prepared(setup, teacher_cache="disk", teacher_cache_dir=str(tmp_path), top_k=4, temperature=2.0)
    assert hotter.teacher_forwards == 3 and len(list(tmp_path.glob("*.pt"))) == 2


def test_an_unreadable_cache_file_is_recomputed_not_fatal(setup, tmp_path, caplog):
    prepared(setup, teacher_cache="disk", teacher_cache_dir=str(tmp_path))
    [path] = tmp_path.glob("*.pt")
    path.write_bytes(b"half a file")
    method = prepared(setup, teacher_cache="disk", teacher_cache_dir=str(tmp_path))
    assert method.teacher_forwards == 3 and "unreadable teacher cache" in caplog.text
    assert prepared(setup, teacher_cache="disk", teacher_cache_dir=str(tmp_path)).teacher_forwards == 0


def test_a_stopped_teacher_keeps_the_targets_of_its_finished_batches(setup, tmp_path, monkeypatch):
    """Ctrl-C during the teacher's targets: the batches that finished are on disk, and the run started again
    computes only the rest, to the same loss."""
    method_class = type(method_of(DistillConfig, name="cd"))
    targets_from_logits, batches = method_class._targets_from_logits, []

    def stopped_at_the_second_batch(self, *args):
        batches.append(args)
        if len(batches) == 2:
            raise KeyboardInterrupt
        return targets_from_logits(self, *args)

    monkeypatch.setattr(method_class, "_targets_from_logits", stopped_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        prepared(setup, teacher_cache="disk", teacher_cache_dir=str(tmp_path))
    monkeypatch.undo()
    resumed = prepared(setup, teacher_cache="disk", teacher_cache_dir=str(tmp_path))
    assert resumed.teacher_forwards == 2  # the 7 queries the first batch of 5 did not answer
    assert loss_of(resumed, setup) == loss_of(prepared(setup, teacher_cache="memory"), setup)


def test_a_run_with_the_cached_teacher_ends_where_the_per_step_teacher_ends(make_cfg, tmp_path):
    metrics = {}
    for cache in ("memory", "none"):
        cfg = make_cfg(
            *TINY, "method=cd", "trainer.max_steps=6", f"method.teacher_cache={cache}", output_dir=tmp_path / cache
        )
        metrics[cache] = run(cfg)
    assert metrics["memory"]["train"]["final_loss"] == pytest.approx(metrics["none"]["train"]["final_loss"], rel=1e-4)
    for key, value in without_timings(metrics["none"]["metrics"]).items():
        assert metrics["memory"]["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_full_weight_training_distils_from_the_initial_weights_at_every_step(make_cfg, tmp_path):
    # Only the cache setting differs: the per-step teacher must be the same frozen initial model that
    # filled the cache, never the weights being trained.
    metrics = {}
    for cache in ("memory", "none"):
        cfg = make_cfg(
            *TINY,
            "method=cd",
            "model.adapter=full",
            "trainer.max_steps=6",
            "trainer.lr=1e-2",
            f"method.teacher_cache={cache}",
            output_dir=tmp_path / cache,
        )
        metrics[cache] = run(cfg)
    assert metrics["none"]["train"]["final_loss"] == pytest.approx(metrics["memory"]["train"]["final_loss"], rel=1e-3)
    for key in ("eval/kl_to_teacher", "eval/teacher_agreement", "eval/accuracy"):
        assert metrics["none"]["metrics"][key] == pytest.approx(metrics["memory"]["metrics"][key], rel=1e-3), key
    assert (tmp_path / "none" / "model" / "config.json").is_file()


def test_targets_written_by_another_producer_version_are_never_read(setup, tmp_path, monkeypatch):
    from ctxdistill import teacher_cache

    first = prepared(setup, teacher_cache="disk", teacher_cache_dir=str(tmp_path))
    assert first.teacher_forwards == 3
    monkeypatch.setattr(teacher_cache, "PRODUCER_VERSION", teacher_cache.PRODUCER_VERSION + 1)
    assert prepared(setup, teacher_cache="disk", teacher_cache_dir=str(tmp_path)).teacher_forwards == 3
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_the_live_teacher_is_the_adapted_model_with_the_context_at_every_step(setup):
    handle, tokenizer, task = setup
    live = prepared(setup, teacher="live")
    frozen = prepared(setup, teacher_cache="none")
    # Before any update the live teacher is the frozen one (up to the shared cache's rounding); its
    # targets are computed at each step.
    assert loss_of(live, setup) == pytest.approx(loss_of(frozen, setup), rel=1e-2)
    assert live.teacher_forwards == 1
    lora_b = handle.base.base_model.model.model.layers[1].self_attn.v_proj.lora_B.default.weight
    saved = lora_b.detach().clone()
    with torch.no_grad():
        lora_b.add_(0.5)  # an optimiser step moves the adapter: the live teacher moves with it
    try:
        assert abs(loss_of(live, setup) - loss_of(frozen, setup)) > 0.1 * loss_of(frozen, setup)
    finally:
        with torch.no_grad():
            lora_b.copy_(saved)


def test_runs_writing_one_cache_file_at_once_keep_each_others_targets(tmp_path, monkeypatch):
    """The nineteenth audit: two runs that read the file before either saved (a parallel sweep's cells) each
    replaced it with their own entries, so the first one's were lost; a target once on disk now stays as written,
    which a run that read it finds again when it resumes."""
    from ctxdistill.teacher_cache import TeacherCache, TeacherTargets

    def target(value: float) -> TeacherTargets:
        return TeacherTargets([1], torch.full((1, 3), value), None)

    from filelock import FileLock, Timeout

    first, second = (TeacherCache(str(tmp_path), "model", {}, "context") for _ in range(2))
    read_stored = TeacherCache._stored

    def stored_under_the_lock(cache):  # what another process would find: the file locked while it is merged
        if cache is first:
            with pytest.raises(Timeout):
                FileLock(f"{cache.path}.lock", is_singleton=False).acquire(timeout=0)
        return read_stored(cache)

    monkeypatch.setattr(TeacherCache, "_stored", stored_under_the_lock)
    first.put("shared", target(1.0))
    first.put("first only", target(1.0))
    second.put("shared", target(2.0))  # the same prompt, computed in another batch
    second.put("second only", target(2.0))
    first.save()
    second.save()
    assert second.get("shared").logprobs[0, 0] == 2.0  # a run keeps the targets it trained on
    on_disk = TeacherCache(str(tmp_path), "model", {}, "context")
    assert {k: on_disk.get(k).logprobs[0, 0].item() for k in ("shared", "first only", "second only")} == {
        "shared": 1.0, "first only": 1.0, "second only": 2.0
    }  # fmt: skip
