"""Shared fixtures: compose configs the way `ctxdistill` does, offline and without W&B."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ctxdistill.cli import CONFIG_DIR
from ctxdistill.config import register_schemas

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

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


# Small, fast settings for runs on the tiny random model.
TINY = ["model=tiny-random", "logger=none", "dataset.source.split_sizes.eval=48", "dataset.num_train_queries=32",
        "trainer.eval_batch_size=16"]
