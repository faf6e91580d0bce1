"""Shared fixtures: compose configs the way `ctxdistill` does, offline and without W&B."""

from __future__ import annotations

import json
import os
from copy import deepcopy
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ctxdistill.cli import CONFIG_DIR
from ctxdistill.config import register_schemas

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

# Under pytest-xdist (tests/run.sh runs one worker per core) each worker gets its share of the cores, so
# workers do not oversubscribe the CPU; subprocesses a test starts inherit it.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

register_schemas()


@pytest.fixture
def make_cfg(tmp_path: Path):
    """compose(overrides) -> a run config whose output_dir is a fresh temporary directory."""

    def make(*overrides: str, output_dir: Path | None = None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("config", overrides=[f"output_dir={output_dir or tmp_path}", *overrides])

    yield make
    GlobalHydra.instance().clear()


def own_ood_set(config_dir: Path, name: str, data_file: Path, **settings) -> list[str]:
    """Overrides that select an out-of-domain set of one's own, read from the split ``test`` of ``data_file``:
    ``config_dir/ood/NAME.yaml`` joins the config search path, as a user's --config-dir does."""
    (config_dir / "ood").mkdir(parents=True, exist_ok=True)
    body = {"defaults": ["base_ood", "_self_"], "split": "test", **settings}
    body["source"] = {"kind": "files", "data_files": {"test": str(data_file)}}
    (config_dir / "ood" / f"{name}.yaml").write_text(f"# @package dataset.ood.{name}\n{yaml.safe_dump(body)}")
    return [f"hydra.searchpath=[file://{config_dir}]", f"ood=[{name}]"]


# Small, fast settings for runs on the tiny random model.
TINY = [
    "model=tiny-random",
    "logger=none",
    "dataset.source.split_sizes.eval=48",
    "dataset.num_train_queries=32",
    "trainer.eval_batch_size=16",
]


# A resumable cd run: 16 queries in batches of 4 make 4 steps per epoch, so 6 steps cross an
# epoch boundary (a reshuffle); a checkpoint after every step. Its teacher's targets are its own (in memory): a
# disk cache other tests share may hold targets computed in other batches, whose last bits differ.
RESUMABLE = [
    "model=tiny-random",
    "logger=none",
    "method=cd",
    "method.teacher_cache=memory",
    "dataset.source.split_sizes.eval=16",
    "dataset.num_train_queries=16",
    "trainer.batch_size=4",
    "trainer.eval_batch_size=16",
    "trainer.max_steps=6",
    "trainer.checkpoint_every=1",
]


def compose_run(output_dir: Path, *overrides: str):
    """The RESUMABLE run's config (plus overrides) writing to output_dir; with another method (method=NAME among the
    overrides), without cd's own settings."""
    own_method = any(o.startswith("method=") for o in overrides)
    base = [o for o in RESUMABLE if not (own_method and o.startswith("method."))]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={output_dir}", *base, *overrides])
    GlobalHydra.instance().clear()
    return cfg


def without_timings(metrics: dict) -> dict:
    """Metrics without the measured serving latencies, which no two runs share."""
    return {k: v for k, v in metrics.items() if not (k.startswith("serving/") and "latency" in k)}


def outcome(run_dir: Path) -> dict:
    """Everything a run reports except its timings (and whether it was resumed)."""
    saved = json.loads((run_dir / "metrics.json").read_text())
    train = {k: v for k, v in saved["train"].items() if not k.endswith("_seconds") and k != "resumed_from_step"}
    metrics = without_timings(saved["metrics"])
    return {"metrics": metrics, "train": train, "predictions": (run_dir / "predictions.jsonl").read_text()}


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> dict:
    """The RESUMABLE run, in one process, never interrupted: what every resumed or distributed run must match."""
    from ctxdistill.run import run

    out = tmp_path_factory.mktemp("uninterrupted")
    run(compose_run(out))
    assert not (out / "checkpoints").exists()  # removed once metrics.json is written
    return outcome(out)


# The behaving test model (tests/behaving_model.py) as a model config: a local transformers checkpoint.
def behaving_overrides(directory: Path) -> list[str]:
    return ["model=tiny-random", "model.name=behaving", "model.source=hub", f"model.name_or_path={directory}"]


# The behaving test model as a separate teacher (its own 264-token tokenizer).
def behaving_teacher_overrides(directory: Path) -> list[str]:
    teacher = ("name=behaving", "source=hub", f"name_or_path={directory}")
    return ["+model@method.teacher_model=tiny-random", *(f"method.teacher_model.{k}" for k in teacher)]


@pytest.fixture(scope="session")
def behaving_model_dir(request, tmp_path_factory) -> Path:
    """A tiny model trained on a synthetic language whose every token depends on the two before it (about
    20 s on 2 cores, then kept in pytest's cache under the training code's version)."""
    import shutil

    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import behaving_model

    name = f"behaving-model-{behaving_model.code_version()}"
    cache = getattr(request.config, "cache", None)
    directory = Path(cache.mkdir(name)) if cache else tmp_path_factory.mktemp(name)
    with FileLock(f"{directory}.lock"):  # pytest-xdist's workers: one trains, the others wait for it
        if not (directory / "config.json").is_file():
            staging = tmp_path_factory.mktemp("behaving-staging")
            behaving_model.train(staging)
            # another worker's cache.mkdir(name) may recreate the directory between these two: copy into it
            shutil.rmtree(directory, ignore_errors=True)
            shutil.copytree(staging, directory, dirs_exist_ok=True)
    share = behaving_model.follows_its_language(
        AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    )
    if share < 0.9:
        pytest.fail(
            f"the behaving test model follows its language on {share:.0%} of line starts (90% needed); "
            f"delete {directory} and look at tests/behaving_model.py's training"
        )
    return directory


def method_of(schema: type, **fields):
    """The method a schema (a MethodConfig subclass) with these fields describes, built as a run builds it:
    the schema's defaults fill the rest, and its interpolations (cache_dir, seed) resolve against a run's."""
    from omegaconf import OmegaConf

    from ctxdistill.methods import build_method

    root = OmegaConf.create({"cache_dir": "~/.cache/ctxdistill", "seed": 0, "method": schema(**fields)})
    return build_method(root.method)


def with_bos(tokenizer):
    """A copy of ``tokenizer`` that starts every text with its BOS token, as Gemma's, OPT's and Llama's do."""
    from tokenizers.processors import TemplateProcessing

    bos_adding = deepcopy(tokenizer)
    bos = (tokenizer.bos_token, tokenizer.bos_token_id)
    bos_adding._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos[0]} $A", pair=f"{bos[0]} $A $B", special_tokens=[bos]
    )
    assert bos_adding("").input_ids == [bos[1]]
    return bos_adding
