"""The guides' code runs as written (the add-a-method example, from its two files alone); the code map is the tree."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

GUIDES = Path(__file__).resolve().parents[1] / "docs" / "guides"
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# The guide's module joins the methods package from a directory of its own, as if it were in
# src/ctxdistill/methods/, and its config file joins Hydra's search path; nothing else is added.
CLI_WITH_MODULES_FROM = """
import sys
import ctxdistill.methods
ctxdistill.methods.__path__.append(sys.argv.pop(1))
from ctxdistill.cli import entry
entry()
"""


def code_block(guide: str, after_heading: str, language: str) -> str:
    """The first ```language block after the heading that starts with `after_heading`."""
    text = (GUIDES / guide).read_text()
    section = text[text.index(f"\n## {after_heading}") :]
    return re.search(rf"```{language}\n(.*?)```", section, re.DOTALL).group(1)


def test_the_add_a_method_guide_works_from_its_module_and_config_file_alone(tmp_path):
    modules, conf = tmp_path / "modules", tmp_path / "conf" / "method"
    modules.mkdir()
    conf.mkdir(parents=True)
    (modules / "hard_distill.py").write_text(code_block("add-a-method.md", "1. The module", "python"))
    (conf / "cd_hard.yaml").write_text(code_block("add-a-method.md", "2. The config file", "yaml"))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-c", CLI_WITH_MODULES_FROM, str(modules)]
    overrides = ["method=cd_hard", f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]
    tiny = ["model=tiny-random", "logger=none", "trainer.max_steps=2", "dataset.source.split_sizes.eval=16"]

    refused = subprocess.run([*command, *overrides, "method.min_confidence=2"], capture_output=True, text=True, env=ENV)
    assert refused.returncode != 0 and "method.min_confidence" in refused.stderr  # its own check
    assert "Traceback" not in refused.stderr

    # the guide's sweep beside cd on the demo (tests/test_docs_commands.py cannot load the module), every cell validated
    beside_cd = [*command, "-m", "experiment=demo", "method=cd,cd_hard", *overrides[1:], "--cfg", "job"]
    swept = subprocess.run(beside_cd, capture_output=True, text=True, env=ENV)
    assert swept.returncode == 0, swept.stderr[-3000:]
    assert swept.stdout.count("# cell ") == 2 and "name: cd_hard" in swept.stdout

    trained = subprocess.run(
        [*command, *overrides, *tiny, f"hydra.run.dir={run_dir}"], capture_output=True, text=True, env=ENV
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["method"] == "cd_hard" and saved["train"]["steps"] == 2
    assert saved["train"]["kept"] == saved["train"]["examples"]  # min_confidence 0 keeps every query
    assert (run_dir / "adapter").is_dir()
    assert "min_confidence: 0.0" in (run_dir / "config.yaml").read_text()  # the default, written once, in the module


def test_the_code_map_names_every_module_and_only_files_that_exist():
    """docs/layout.md names every module outside methods/ (a method's module is its own business: adding one
    touches no list) and every file it names exists."""
    root = GUIDES.parents[1]
    code_map = re.search(r"```\n(.*?)```", (root / "docs" / "layout.md").read_text(), re.DOTALL).group(1)
    named = set(re.findall(r"[\w.]+\.(?:py|sh|txt)\b", code_map))
    # the checkout's files as git sees them (tracked, and new ones not ignored): walking the tree would enter .venv/
    # and the directories other tests create and delete meanwhile
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    paths = [Path(p) for p in listed.split("\0") if p and (root / p).is_file()]  # not those deleted since
    package = Path("src", "ctxdistill")
    modules = {
        p.name
        for p in paths
        if p.suffix == ".py" and p.is_relative_to(package) and p.name != "__init__.py" and "methods" not in p.parts
    }
    assert modules - named == set()
    files = {p.name for p in paths}
    assert named - files == set()
