"""Provenance: what produced a run, recorded in its metrics.json, and a sweep's versions for its README."""

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from omegaconf import OmegaConf

import ctxdistill
from ctxdistill import provenance
from ctxdistill.config import SourceConfig
from ctxdistill.data.synthetic import generate_examples
from ctxdistill.data.tasks import load_records
from ctxdistill.results.versions import versions_markdown
from ctxdistill.run import run
from ctxdistill.sweeps import config_changes, open_maps


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_split(path: Path, size: int, split: str) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in generate_examples(size, 1234, split)))
    return path


def git(directory: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, check=True).stdout


def test_a_runs_metrics_json_records_code_versions_device_config_data_caches_and_eval_sizes(make_cfg, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    train, evaluation = write_split(data / "train.jsonl", 48, "train"), write_split(data / "eval.jsonl", 20, "eval")
    files = f"{{train: {train.name}, eval: {evaluation.name}}}"
    cfg = make_cfg(
        "model=tiny-random",
        "logger=none",
        "method=cd",
        "trainer.max_steps=1",
        "dataset.num_train_queries=8",
        "dataset.source.kind=files",
        f"dataset.source.data_dir={data}",
        f"++dataset.source.data_files={files}",
        f"method.teacher_cache_dir={tmp_path / 'teacher'}",
        output_dir=tmp_path / "run",
    )
    run(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())["provenance"]

    source = Path(ctxdistill.__file__).resolve().parent
    if saved["code"]["commit"] is not None:  # tested from a checkout, as CI does
        assert saved["code"]["commit"] == git(source, "rev-parse", "HEAD").strip()
        assert saved["code"]["dirty"] == bool(git(source, "status", "--porcelain", "--untracked-files=no", "--", "."))
    assert saved["versions"]["torch"] == torch.__version__
    assert saved["versions"]["transformers"] == transformers.__version__
    assert set(saved["versions"]) == {"python", *provenance.LIBRARIES}
    assert saved["device"]["gpu_count"] == torch.cuda.device_count() and saved["device"]["cpu"]
    assert saved["device"]["used"] == ("cuda:0" if torch.cuda.is_available() else "cpu")

    stored_config = OmegaConf.to_container(OmegaConf.load(tmp_path / "run" / "config.yaml"))
    assert saved["config_sha256"] == provenance.config_hash(stored_config)
    assert saved["data"] == [
        {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256(path)} for path in (train, evaluation)
    ]
    [teacher_cache] = saved["caches"]
    assert teacher_cache["cache"] == "teacher" and Path(teacher_cache["path"]).is_file()
    assert Path(teacher_cache["path"]) == tmp_path / "teacher" / f"{teacher_cache['key']}.pt"
    assert saved["eval_set_sizes"] == {"eval": 20}


def test_a_data_files_hash_follows_its_content(tmp_path):
    path = write_split(tmp_path / "eval.jsonl", 6, "eval")
    source = OmegaConf.structured(SourceConfig(kind="files", file=str(path)))
    provenance.begin_run()
    load_records(source, "eval")
    before = provenance.inputs()["data"]
    path.write_text(path.read_text() + path.read_text().splitlines(keepends=True)[0])
    os.utime(path, ns=(1, 1))  # a new content, whatever the clock's resolution
    provenance.begin_run()
    load_records(source, "eval")
    after = provenance.inputs()["data"]
    assert before[0]["sha256"] != after[0]["sha256"] == sha256(path)


def test_a_hub_datasets_id_split_and_fingerprint_are_recorded(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "hub"
    folder.mkdir()
    write_split(folder / "train.jsonl", 4, "train")
    write_split(folder / "test.jsonl", 5, "eval")
    source = OmegaConf.structured(SourceConfig(kind="hub", hub_id=str(folder)))
    provenance.begin_run()
    load_records(source, "test")
    [noted] = provenance.inputs()["data"]
    loaded = datasets.load_dataset(str(folder), None, split="test")
    assert noted == {
        "hub_id": str(folder),
        "config": None,
        "split": "test",
        "version": str(loaded.info.version),
        "fingerprint": loaded._fingerprint,
        "rows": 5,
    }


def test_git_state_says_dirty_and_says_when_there_is_no_checkout(tmp_path):
    assert provenance.git_state(tmp_path)["commit"] is None
    assert "not a git checkout" in provenance.git_state(tmp_path)["checkout"]
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "code.py").write_text("x = 1\n")
    identity = ["-c", "user.name=t", "-c", "user.email=t@t"]
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, *identity, "commit", "-qm", "first")
    commit = git(repo, "rev-parse", "HEAD").strip()
    (repo / "pkg" / "notes.txt").write_text("untracked files do not make a tree dirty\n")
    assert provenance.git_state(repo / "pkg") == {"commit": commit, "dirty": False, "checkout": "git"}
    (repo / "pkg" / "code.py").write_text("x = 2\n")
    assert provenance.git_state(repo / "pkg")["dirty"] is True
    (repo / "installed").mkdir()  # e.g. a virtualenv's site-packages inside the repository
    assert provenance.git_state(repo / "installed")["commit"] is None


def test_the_config_hash_ignores_where_things_are_kept_and_follows_everything_else():
    config = {"output_dir": "/a", "cache_dir": "/c", "logger": {"mode": "offline"}, "trainer": {"lr": 1e-3}}
    moved = {**config, "output_dir": "/b", "cache_dir": "/d", "logger": {"mode": "online"}}
    assert provenance.config_hash(config) == provenance.config_hash(moved)
    assert provenance.config_hash(config) != provenance.config_hash({**config, "trainer": {"lr": 2e-3}})


@pytest.mark.parametrize("method", ["cd", "genpi", "opcd", "cheat_sheet", "contextualization"])
def test_a_methods_config_hashes_the_same_wherever_its_caches_are_kept(make_cfg, method):
    # every cache location follows cache_dir: teacher targets, GenPI's stages, cheat sheets, written contexts; a
    # sweep run again with another cache_dir skips its complete cells rather than calling them another config's
    configs = [OmegaConf.to_container(make_cfg(f"method={method}", f"cache_dir={d}"), resolve=True) for d in "ab"]
    assert provenance.config_hash(configs[0]) == provenance.config_hash(configs[1])
    assert config_changes(*configs) == []


def test_a_run_without_an_out_of_domain_set_the_config_now_selects_is_another_config(make_cfg):
    # Keys only one side has are new options at their defaults, except the out-of-domain sets: a complete run made
    # before an experiment added HANS reports no hans/ metrics and must not be reused as this config's.
    cfg = make_cfg("dataset=mnli", "ood=[hans,hans_all]")
    both, hans = (
        OmegaConf.to_container(make_cfg("dataset=mnli", f"ood=[{sets}]"), resolve=True)
        for sets in ("hans,hans_all", "hans")
    )
    maps = open_maps(cfg)
    assert config_changes(hans, both, maps) == config_changes(both, hans, maps) == ["dataset.ood.hans_all"]
    assert config_changes(both, both, maps) == []


def test_a_group_of_settings_set_where_it_was_null_or_a_label_maps_entries_changed_is_another_config(make_cfg):
    # a separate teacher (method.teacher_model) against none, and a label map keyed by other words: the keys
    # differ with nothing in common to compare, and each is a change; an option a later version adds is not
    alone = make_cfg("model=tiny-random", "method=cd")
    taught = make_cfg("model=tiny-random", "method=cd", "+model@method.teacher_model=tiny-random")
    stored, current = (OmegaConf.to_container(c, resolve=True) for c in (alone, taught))
    assert config_changes(stored, current, open_maps(taught)) == ["method.teacher_model"]
    assert config_changes(current, stored, open_maps(alone)) == ["method.teacher_model"]
    mnli = make_cfg("dataset=mnli")
    assert "dataset.label_map" in open_maps(mnli)
    original = OmegaConf.to_container(mnli, resolve=True)
    relabelled = {**original, "dataset": {**original["dataset"], "label_map": {"yes": 0, "no": 1}}}
    changes = config_changes(original, relabelled, open_maps(mnli))
    assert changes == ["dataset.label_map.0", "dataset.label_map.2", "dataset.label_map.contradiction"] + [
        "dataset.label_map.entailment",
        "dataset.label_map.no",
        "dataset.label_map.yes",
    ]
    older = OmegaConf.to_container(alone, resolve=True)
    del older["trainer"]["grad_accum_steps"]  # a run made before the option existed
    assert config_changes(older, stored, open_maps(alone)) == []


def record(method: str, seed: int, torch_version: str, commit: str, dirty: bool = False) -> dict:
    versions = {"python": "3.11.7", "torch": torch_version, "transformers": "5.24.0"}
    code = {"commit": commit, "dirty": dirty, "checkout": "git"}
    return {
        "method": method,
        "model": "m",
        "dataset": "d",
        "seed": seed,
        "provenance": {"versions": versions, "code": code},
    }


def test_a_sweeps_readme_states_the_shared_versions_and_lists_the_runs_that_differ():
    same = [record("cd", 0, "2.13.0", "a" * 40), record("icl", 0, "2.13.0", "a" * 40)]
    assert versions_markdown(same) == [
        "**Versions** (shared by all 2 runs that record them): python 3.11.7, torch 2.13.0, transformers 5.24.0, "
        "commit aaaaaaaaaaaa"
    ]
    mixed = [*same, record("ft", 1, "2.12.1", "b" * 40, dirty=True), {"method": "zero_shot", "seed": 0}]
    lines = versions_markdown(mixed)
    assert lines[0] == "**Versions** (shared by all 3 runs that record them): python 3.11.7, transformers 5.24.0"
    assert "**Versions differ** between runs (torch, commit):" in lines
    table = lines[lines.index("| method | model | dataset | seed | torch | commit |") :]
    assert table[2:5] == [
        "| ft | m | d | 1 | 2.12.1 | bbbbbbbbbbbb (dirty) |",
        "| cd | m | d | 0 | 2.13.0 | aaaaaaaaaaaa |",
        "| icl | m | d | 0 | 2.13.0 | aaaaaaaaaaaa |",
    ]
    assert lines[-1] == "1 run(s) record no versions (made before runs recorded their provenance)."


def test_eval_sets_a_method_makes_as_it_runs_are_counted_from_its_prediction_rows():
    """GenPI generates its held-out pseudo inputs after the run starts: its provenance named only `eval`."""
    rows = {"eval": [{}] * 64, "pseudo_heldout": [{}] * 48}
    assert provenance.with_made_sets({"eval": 64}, rows) == {"eval": 64, "pseudo_heldout": 48}
    mixture = {"sentiment/eval": 8, "topic/eval": 8}  # a mixture's sets are named per task; its rows per task
    assert provenance.with_made_sets(mixture, {"sentiment": [{}] * 8, "topic": [{}] * 8}) == mixture


def test_a_hub_dataset_of_another_fingerprint_is_changed_data(tmp_path, monkeypatch):
    """The nineteenth audit: only files were compared, so a sweep re-run after a Hub dataset (here a local dataset
    folder) changed skipped its cells as complete and kept the old data's results."""
    import datasets

    from ctxdistill import provenance

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "reviews"
    folder.mkdir()
    rows = [{"review": f"review {i}", "label": i % 2} for i in range(8)]
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = datasets.load_dataset(str(folder), None, split="validation")
    recorded = {"data": [provenance.hub_dataset(loaded, str(folder), None, "validation")]}
    provenance.hub_fingerprint.cache_clear()
    assert provenance.changed_data(recorded) == []
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    provenance.hub_fingerprint.cache_clear()  # another process: a sweep launched again
    assert provenance.changed_data(recorded) == [f"{folder} [validation]"]


def test_a_run_on_local_weights_changed_since_is_not_skipped_as_complete(make_cfg, behaving_model_dir, tmp_path):
    """The nineteenth audit: weights replaced at a local model's path (a teacher trained again into its directory)
    left the earlier run's results to be skipped as complete, read as the new weights'."""
    import shutil

    from ctxdistill.config import ConfigError
    from ctxdistill.run import run
    from ctxdistill.sweeps import completed_run

    from conftest import TINY, behaving_overrides

    local = tmp_path / "model"
    shutil.copytree(behaving_model_dir, local)
    cfg = make_cfg(*TINY, "method=zero_shot", *behaving_overrides(local), output_dir=tmp_path / "run")
    run(cfg)
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["provenance"]["data"]
    assert any(entry.get("path") == str(local) and entry["files"] for entry in recorded)
    assert completed_run(cfg)["status"] == "complete"  # unchanged: skipped
    (local / "model.safetensors").write_bytes((local / "model.safetensors").read_bytes()[:-1] + b" ")
    with pytest.raises(ConfigError, match=f"made from data that changed since: {local} "):
        completed_run(cfg)
