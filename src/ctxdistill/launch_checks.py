"""Checks of a command's inputs before anything is launched: the directory a run or sweep writes to, and the data
paths its overrides name. A wrong one is one message naming the key and the fix, instead of a traceback from
Hydra or the same failure in every cell of a sweep.

The ``ctxdistill`` command runs them as a Hydra callback (conf/config.yaml). The paper scripts, which launch one
multirun per dataset, check every dataset's overrides first, so that a wrong path in QQP_ARGS stops them before
MNLI's cells run:

    python -m ctxdistill.launch_checks dataset.ood.paws_qqp.source.data_dir=PATH ...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationKeyError, OmegaConfBaseException

from ctxdistill.config import ConfigError

# The last part of the keys that name data a run reads: a source's directory or file, MNLI's and RTE's HANS file.
DATA_DIRECTORIES = ("data_dir",)
DATA_FILES = ("file", "hans_file")


def resolved(config: DictConfig, key: str) -> Any:
    """A config value, or a message naming the key when an interpolation in it cannot be resolved (an unset
    ${oc.env:...})."""
    try:
        return OmegaConf.select(config, key)
    except OmegaConfBaseException as e:
        raise ConfigError(
            f"{key}: cannot resolve it ({str(e).splitlines()[0]}). Set the variable it reads, or give {key} a value"
        ) from e  # the cause tells an unknown key (override_value) from an unset variable


# The sweep dir's multirun.yaml and what it held before the sweep (None: it had none), which Hydra writes before the
# first cell: a sweep refused then (a cell that does not compose) puts it back as it was.
multirun_yaml: Optional[tuple[Path, Optional[bytes]]] = None
# The directories the checks made (the outermost one made, and the one asked for), which a refused sweep removes.
made: list[tuple[Path, Path]] = []


def writable_dir(key: str, path: str, write: bool = True) -> None:
    """Make the directory a run or sweep writes to (``write``; else one it may only read, such as a shared cache), or
    refuse with the key that names it."""
    directory = Path(path).expanduser()
    absolute = directory.absolute()
    outermost = next((d for d in reversed([absolute, *absolute.parents]) if not d.exists()), None)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if outermost is not None:
            made.append((outermost, absolute))
    except FileExistsError as e:
        problem = f"{e.filename} is a file, not a directory"
    except OSError as e:
        problem = f"cannot create {e.filename} ({e.strerror})"
    else:
        if not write or os.access(directory, os.W_OK | os.X_OK):
            return
        problem = f"cannot write to {directory} (Permission denied)"
    raise ConfigError(f"{key}: {problem}. Give it a directory you can write")


def remove_what_a_refused_sweep_made() -> None:
    """A sweep refused before its first cell leaves no directory that looks like a sweep that ran nothing: each
    directory the checks made goes, if it holds nothing or only the multirun.yaml Hydra writes before the first cell
    (never one that existed before, or holds anything else); a multirun.yaml the sweep overwrote is put back."""
    global multirun_yaml
    if multirun_yaml is not None:
        path, before = multirun_yaml
        multirun_yaml = None
        if before is not None:
            path.write_bytes(before)
        else:
            path.unlink(missing_ok=True)
    remove_empty_made_directories()


def remove_what_a_refused_run_made() -> None:
    """A single run refused before it wrote anything (a setting validation refuses) leaves no run directory behind:
    one the checks made goes, if it holds nothing but what Hydra writes before the run starts (.hydra/ and the run's
    log), and with it each directory the checks made that is empty then. Never one that existed before (a resumed
    run's), or that holds anything else."""
    import shutil

    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    hydra_files = {name for name in (hydra.output_subdir, f"{hydra.job.name}.log") if name}
    made_here = any(directory.resolve() == run_dir.resolve() for _, directory in made)
    if made_here and {p.name for p in run_dir.iterdir()} <= hydra_files:
        for name in hydra_files:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    remove_empty_made_directories()


def remove_empty_made_directories() -> None:
    """Each directory the checks made, and those above it up to the outermost one made, while empty."""
    while made:
        outermost, directory = made.pop()
        for current in [directory, *directory.parents]:
            if current.is_dir():
                try:
                    current.rmdir()
                except OSError:  # it holds something
                    break
            if current == outermost:
                break


def sweep_started() -> None:
    """A cell is running: what the sweep made is its own now, kept whatever happens next."""
    global multirun_yaml
    multirun_yaml = None
    made.clear()


def data_path_problem(key: str, value: Any) -> Optional[str]:
    """What is wrong with the path a data key (DATA_DIRECTORIES, DATA_FILES) is given (None: nothing, or no path:
    the data come from the Hub)."""
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    where = "" if path.is_absolute() else f" ({Path.cwd() / path})"  # relative paths are read from here
    directory = key.rsplit(".", 1)[-1] in DATA_DIRECTORIES
    if directory and not path.is_dir():
        return f"{key}={value}: no such directory{where}. Point it at the directory that holds the data files"
    if not directory and not path.is_file():
        return f"{key}={value}: no such file{where}. Point it at the data file"
    return None


def override_value(key: str, value: Any, config: Optional[DictConfig]) -> Any:
    """An override's value resolved on its own (an ${oc.env:...}), or in ``config`` where it refers to another
    key of it (${cache_dir}/...: None without one, left to the command's own check)."""
    alone = OmegaConf.create()
    OmegaConf.update(alone, key, value, force_add=True)
    try:
        return resolved(alone, key)
    except ConfigError as e:
        if not isinstance(e.__cause__, InterpolationKeyError):
            raise
    return resolved(config, key) if config is not None else None


def check_data_paths(overrides: list[str], config: Optional[DictConfig] = None) -> None:
    """Refuse the first data path the overrides give (each value of a swept one) that does not exist; ``config``
    is the command's composed config, where a value may refer to other keys."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if override.is_delete() or key.rsplit(".", 1)[-1] not in DATA_DIRECTORIES + DATA_FILES:
            continue
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())
        else:
            values = [override_value(key, override.value(), config)]
        for value in values:
            problem = data_path_problem(key, value)
            if problem:
                raise ConfigError(problem)


class LaunchChecks(Callback):
    """The ``ctxdistill`` command's checks before Hydra makes a directory or launches a cell."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        refuse_bad_inputs(config, "hydra.run.dir", status=1)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        refuse_bad_inputs(config, "hydra.sweep.dir", status=2)  # 2: a sweep refused before its first cell
        refuse_swept_experiments_with_sweeps_of_their_own(config)
        refuse_one_output_dir_for_several_cells(config)
        refuse_a_sweep_every_cell_of_which_fails(config)
        global multirun_yaml
        path = Path(resolved(config, "hydra.sweep.dir")).expanduser().absolute() / "multirun.yaml"
        multirun_yaml = (path, path.read_bytes() if path.is_file() else None)


def shared_cell_error(config: DictConfig) -> Optional[ConfigError]:
    """The error every cell of a multirun would fail with, when they all fail validation alike (a setting the whole
    sweep shares, such as trainer.batch_size=0): None as soon as one cell is valid (one composed, for a sound sweep),
    or when the cells fail differently (each value of a swept key: those cells fail, the others run). None too
    when the cells run on other machines (hydra/launcher=slurm): validation checks the devices of the machine it runs
    on, and a login node without GPUs would refuse a sweep of FSDP or FlashAttention cells meant for GPU nodes."""
    from hydra.core.global_hydra import GlobalHydra

    if "submitit" in str(OmegaConf.select(config, "hydra.launcher._target_", default="")):
        return None

    from ctxdistill.cli import sweep_cells
    from ctxdistill.config import validate

    overrides = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    loader = GlobalHydra.instance().config_loader()
    errors: dict[str, ConfigError] = {}
    try:
        cells = sweep_cells(overrides, OmegaConf.select(config, "hydra.sweeper.params") or {})
    except Exception:  # noqa: BLE001 - another sweeper's search space (Optuna's interval(...)): its cells are its own
        return None
    for cell in cells:
        try:
            cfg = loader.load_sweep_config(config, cell)
            with open_dict(cfg):
                del cfg["hydra"]  # as a cell's job sees its config
            validate(cfg)
        except ConfigError as e:
            errors.setdefault(str(e), e)
        except Exception:  # noqa: BLE001 - a cell that does not compose: the sweeper's own message names it
            return None
        else:
            return None
        if len(errors) > 1:
            return None
    return next(iter(errors.values()), None)


def refuse_one_output_dir_for_several_cells(config: DictConfig) -> None:
    """A multirun given one output_dir (not swept, not per cell): every cell wrote into it, the second refused as
    holding another config's run (or, with force=true, overwriting it), and the sweep's summary, which reads the
    sweep directory, saw neither."""
    from ctxdistill.cli import exit_with_message, sweep_cells

    if OmegaConf.is_interpolation(config, "output_dir") or config.output_dir is None:
        return  # the cell's own directory (the default), or a path built from the cell's settings
    overrides = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    try:
        cells = sweep_cells(overrides, OmegaConf.select(config, "hydra.sweeper.params") or {})
    except Exception:  # noqa: BLE001 - another sweeper's search space: its cells are its own
        return
    if len(cells) > 1:
        exit_with_message(
            ConfigError(
                f"output_dir={config.output_dir} is one directory for the sweep's {len(cells)} cells: each cell would "
                "find another's run there, and the sweep's summary reads none of them. Leave output_dir out (each "
                "cell writes to hydra.sweep.dir/<its overrides>) and name the sweep's directory with hydra.sweep.dir"
            ),
            2,
        )


def refuse_swept_experiments_with_sweeps_of_their_own(config: DictConfig) -> None:
    """A multirun over several experiments runs one cell per experiment: Hydra's sweeper reads the sweep of the
    command's one composed config, so each experiment's own (``hydra.sweeper.params``: demo's four methods) would be
    dropped without a word. Refused, naming each experiment's own sweep, unless the command sets all of its keys."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ctxdistill.cli import exit_with_message, unswept

    overrides = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    parsed = OverridesParser.create().parse_overrides(overrides)
    swept = next((o for o in parsed if o.is_sweep_override() and o.key_or_group == "experiment"), None)
    if swept is None:
        return
    given = {o.get_key_element().lstrip("+~") for o in parsed}
    loader = GlobalHydra.instance().config_loader()
    dropped = {}
    for experiment in swept.sweep_string_iterator():
        try:
            composed = loader.load_sweep_config(config, [*unswept(overrides), f"experiment={experiment}"])
        except Exception:  # noqa: BLE001 - an experiment that does not compose: its cell's own message names it
            continue
        own = OmegaConf.select(composed, "hydra.sweeper.params") or {}
        if any(key not in given for key in own):
            dropped[experiment] = " ".join(f"{key}={value}" for key, value in own.items())
    if dropped:
        sweeps = "; ".join(f"{experiment}: {params}" for experiment, params in dropped.items())
        exit_with_message(
            ConfigError(
                f"experiment: a multirun over several experiments runs one cell each, without each experiment's own "
                f"sweep ({sweeps}). Run one multirun per experiment: "
                + " ; ".join(f"ctxdistill -m experiment={e} ..." for e in dropped)
            ),
            2,
        )


def refuse_a_sweep_every_cell_of_which_fails(config: DictConfig) -> None:
    """One message, before the first cell, for a setting of the whole sweep that no cell accepts: not a failure per
    cell, and a list of them all, ending with the same command to re-run."""
    from ctxdistill.cli import exit_with_message

    error = shared_cell_error(config)
    if error is not None:
        exit_with_message(error, 2)


def refuse_bad_inputs(config: DictConfig, directory_key: str, status: int) -> None:
    """Exit with the message of the first bad input: Hydra turns an exception of a callback into a warning and goes
    on, so the exit is the check's own."""
    from ctxdistill.cli import exit_with_message, refuse_bases

    try:
        # the overrides as given: Hydra's record, unresolved (one may read an unset ${oc.env:...})
        overrides = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
        refuse_bases(overrides)
        check_data_paths(overrides, config)
        writable_dir(directory_key, resolved(config, directory_key))
        cache = Path(resolved(config, "cache_dir")).expanduser()
        filled = cache.is_dir() and any(cache.iterdir())  # a shared cache, filled, may be read-only
        writable_dir("cache_dir (CTXDISTILL_CACHE)", str(cache), write=not filled)
        # an output_dir of its own (by default it is the run's or the cell's directory)
        output_dir = None if OmegaConf.is_interpolation(config, "output_dir") else config.output_dir
        if output_dir is not None:
            writable_dir("output_dir", output_dir)
    except ConfigError as e:
        exit_with_message(e, status)


def main(argv: Optional[list[str]] = None) -> None:
    from ctxdistill.cli import exit_with_message, user_errors

    try:
        check_data_paths(sys.argv[1:] if argv is None else argv)
    except user_errors() as e:  # a path that does not exist, or an override Hydra cannot parse
        exit_with_message(e, 2)


if __name__ == "__main__":
    main()
