"""The ``ctxdistill`` command: a Hydra app over conf/ (``ctxdistill --help`` lists the groups)."""

from __future__ import annotations

import os
import re
import signal
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode, Node, StringNode

from ctxdistill.config import ConfigError, register_schemas
from ctxdistill.sweeps import cell_dir

register_schemas()

_launched: Optional[datetime] = None


def launch_time(pattern: str) -> str:
    """Hydra's ``${now:}``, except that all processes of one distributed launch share one instant
    (each would otherwise resolve its own and write to its own run directory)."""
    global _launched
    _launched = _launched or datetime.now()
    return _launched.strftime(pattern)


OmegaConf.register_new_resolver("launch_time", launch_time, use_cache=True, replace=True)


OmegaConf.register_new_resolver("cell_dir", cell_dir, replace=True)
# ${add:${seed},1}: a seed derived from the run's (Upadhayaya et al. shuffle HANS with seed + 1).
OmegaConf.register_new_resolver("add", lambda *numbers: sum(numbers), replace=True)


def join_distributed_launch(argv: list[str]) -> list[str]:
    """Under ``accelerate launch`` / ``torchrun`` (WORLD_SIZE > 1): take rank 0's launch time, and keep
    the other ranks from writing Hydra's files and log into the shared run directory."""
    global _launched
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return argv
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=not __import__("torch").cuda.is_available())
    _launched = broadcast_object_list([datetime.now()], from_process=0)[0]
    if state.is_main_process:
        return argv
    # Beside the user's overrides: Hydra reads them as one run of arguments, wherever the options are.
    _, parsed, _ = hydra_arguments(argv)
    at = argv.index(parsed.overrides[0]) + len(parsed.overrides) if parsed.overrides else 0
    return [*argv[:at], "hydra.output_subdir=null", "hydra/job_logging=stdout", *argv[at:]]


def join_slurm_tasks() -> None:
    """With ``hydra/launcher=slurm`` and ``tasks_per_node`` > 1, each SLURM task of an array job is one
    rank of one multi-GPU run: export the variables torch.distributed reads."""
    if (
        os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
        and int(os.environ.get("SLURM_NTASKS", "1")) > 1
        and "RANK" not in os.environ
    ):
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


# conf/ sits at the repository root, beside src/ (the package is installed editable).
# A wheel (pip install .) carries the configs inside the package (pyproject.toml: ctxdistill.conf is conf/);
# a checkout (the editable install) reads its own conf/. Either way from any directory.
_PACKAGED_CONF = Path(__file__).resolve().parent / "conf"
CONFIG_DIR = _PACKAGED_CONF if _PACKAGED_CONF.is_dir() else Path(__file__).resolve().parents[2] / "conf"


def is_base(option: str) -> bool:
    """A config file whose name starts with "_" (dataset=category/_base, experiment=genpi/_cpu_base) is a base: the
    settings options share, which they build on in their defaults lists. It is no option of its own."""
    return Path(option).name.startswith("_")


def subgroups(group: str) -> list[str]:
    """The config groups inside ``group`` (trainer/distributed), which its options pick in their defaults lists
    (``distributed: ddp``): a run picks one with ``trainer/distributed=ddp``, not ``trainer=distributed/ddp``."""
    import yaml

    found = set()
    for path in (CONFIG_DIR / group).glob("*.yaml"):
        for entry in (yaml.safe_load(path.read_text()) or {}).get("defaults", []):
            if isinstance(entry, dict):
                found |= {key for key in entry if (CONFIG_DIR / group / key).is_dir()}
    return sorted(found)


def check_subgroup_choices(overrides: list[str]) -> None:
    """``trainer=distributed/ddp`` would load the strategy's settings as the trainer's, and ``logger=null`` was
    Hydra's traceback; name the override, with the fix."""
    for override in overrides:
        key, _, value = override.partition("=")
        group = key.lstrip("+~")
        if value == "null" and not key.startswith("~") and (CONFIG_DIR / group).is_dir():
            none = f"{group}=none for none; " if (CONFIG_DIR / group / "none.yaml").is_file() else ""
            raise ConfigError(
                f"{override}: {group} is a config group: pick one of its options ({none}ctxdistill --help lists "
                f"them), or leave {group} out for its default"
            )
        sub = value.split("/")[0]
        if "/" in value and (CONFIG_DIR / group).is_dir() and sub in subgroups(group):
            raise ConfigError(
                f"{override}: {group}/{sub} is a config group of its own. Pick its option with "
                f"{group}/{sub}={value.split('/', 1)[1]}"
            )


def built_on(base: str) -> list[str]:
    """The options (``group=option``) of conf/ that build on ``base`` (``group/option``), directly or through
    another base."""
    import yaml

    users = []
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        here = path.relative_to(CONFIG_DIR).with_suffix("")
        for entry in (yaml.safe_load(path.read_text()) or {}).get("defaults") or []:
            name = entry.split("@")[0].strip() if isinstance(entry, str) else ""
            if name and (name[1:] if name.startswith("/") else (here.parent / name).as_posix()) == base:
                group, _, option = here.as_posix().partition("/")
                users += built_on(here.as_posix()) if is_base(option) else [f"{group}={option}"]
    return users


def refuse_bases(overrides: list[str]) -> None:
    """A base picked as an option (experiment=genpi/_cpu_base, each value of a swept one): one message naming the
    options that build on it, before any run starts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        group = override.key_or_group.lstrip("+~")
        if override.is_delete() or not (CONFIG_DIR / group).is_dir():
            continue
        value = list(override.sweep_string_iterator()) if override.is_sweep_override() else override.value()
        for option in value if isinstance(value, list) else [value]:
            if is_base(str(option)):
                # a base of one's own (--config-dir) may have no user in conf/: the listed options instead
                instead = ", ".join(built_on(f"{group}/{option}")) or f"ctxdistill --help lists the {group} options"
                raise ConfigError(
                    f"{group}={option}: a base that options build on (its name starts with _), not an option of its "
                    f"own. Pick one that builds on it: {instead}"
                )


def run_unless_complete(cfg: DictConfig) -> dict:
    """The run, or the complete result already in its output dir (unless force=true)."""
    from ctxdistill.sweeps import completed_run

    # checked before torch and transformers are imported: re-running a finished sweep takes seconds
    done = completed_run(cfg)
    if done:
        return done
    from ctxdistill.progress import quiet_library_bars
    from ctxdistill.run import run

    quiet_library_bars()

    return run(cfg)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ctxdistill.launch_checks import remove_what_a_refused_run_made, sweep_started
    from ctxdistill.sweeps import run_cell

    quiet_console()  # here, in the process that runs the job: a launcher's workers (joblib, SLURM) start afresh
    join_slurm_tasks()
    # In a sweep a failing cell is recorded and the others go on; a single run raises.
    try:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            sweep_started()  # a sweep stopped from here on is no refused one: what it made stays
            result = run_cell(cfg, run_unless_complete)
        else:
            warn_of_an_unrun_sweep(HydraConfig.get())
            try:
                result = run_unless_complete(cfg)
            except user_errors() as e:  # before Hydra prints "Error executing job" and its stack
                remove_what_a_refused_run_made()
                exit_with_message(e)
    except KeyboardInterrupt:  # Ctrl-C during training saves a checkpoint and exits 130 (SystemExit), not here
        note_interrupted(cfg)
        raise
    # The return value is what Hydra sweepers (e.g. Optuna) optimise.
    # Runs completed before `objective` was recorded optimised eval/accuracy.
    return result["metrics"].get(result.get("objective", "eval/accuracy")) if result else None


def warn_of_an_unrun_sweep(hydra_config: DictConfig) -> None:
    """A single run of a config that sweeps (an experiment's ``hydra.sweeper.params``) runs one cell of it, with the
    config's own value of each swept key the command does not set: said, since -m runs the sweep."""
    import logging

    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(hydra_config.overrides.task))
    given = {o.get_key_element().lstrip("+~") for o in overrides}
    params = OmegaConf.select(hydra_config, "sweeper.params") or {}
    unrun = {key: value for key, value in params.items() if key not in given}
    if unrun:
        logging.getLogger(__name__).warning(
            "this config sweeps %s (hydra.sweeper.params); a single run runs one value of each, its default. "
            "Run the sweep with: ctxdistill -m ...",
            ", ".join(f"{key} over {value}" for key, value in unrun.items()),
        )


def unswept(overrides: list[str]) -> list[str]:
    """The overrides of a multirun that every cell shares (those without a swept value)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [o.input_line for o in OverridesParser.create().parse_overrides(overrides) if not o.is_sweep_override()]


def sweep_cells(overrides: list[str], sweeper_params: dict) -> list[list[str]]:
    """The cells of a multirun over ``overrides`` and the ``hydra.sweeper.params`` its composed config holds
    (an experiment's; those the overrides do not set), as Hydra's basic sweeper splits them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    given = {o.get_key_element().lstrip("+~") for o in parsed}
    parsed += parser.parse_overrides([f"{key}={value}" for key, value in sweeper_params.items() if key not in given])
    return [list(cell) for cell in BasicSweeper.split_arguments(parsed, None)[0]]


def check_the_config_to_print(argv: list[str]) -> None:
    """``ctxdistill ... --cfg job|all``: the config Hydra prints passes the checks a run makes (a typo, a bad value,
    a base picked as an option), as each cell of a multirun's does. Not with options of Hydra's own (--config-dir),
    whose configs Hydra composes."""
    from hydra import compose, initialize_config_dir

    from ctxdistill.config import validate

    _, parsed, _ = hydra_arguments(argv)
    own = parsed.config_dir or parsed.config_path or parsed.config_name or parsed.package
    if parsed.cfg == "hydra" or own:
        return
    refuse_bases(parsed.overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        validate(compose("config", overrides=parsed.overrides), parsed.overrides)


def print_sweep_configs(argv: list[str]) -> None:
    """``ctxdistill -m ... --cfg job|hydra|all``: Hydra refuses the pair, so print the sweep's Hydra config (its
    launcher and sweeper: hydra, all) and compose, validate and print every cell (job, all)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from ctxdistill.config import validate
    from ctxdistill.launch_checks import refuse_swept_experiments_with_sweeps_of_their_own

    _, parsed, _ = hydra_arguments(argv)
    shown, overrides = parsed.cfg, parsed.overrides
    refuse_bases(overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        shared = compose("config", overrides=unswept(overrides), return_hydra_config=True)
        with open_dict(shared):  # the command's own overrides, as the launch checks read them
            shared.hydra.overrides.task = overrides
        refuse_swept_experiments_with_sweeps_of_their_own(shared)  # the sweep would be refused: no cells to show
        if shown in ("hydra", "all"):  # what a sweep adds to its cells' own Hydra configs
            launch = {key: shared.hydra[key] for key in ("launcher", "sweeper", "sweep")}
            print(f"# the sweep's launcher, sweeper and directory\n{OmegaConf.to_yaml({'hydra': launch})}")
        if shown == "hydra":
            return
        for number, cell in enumerate(sweep_cells(overrides, shared.hydra.sweeper.params or {})):
            cfg = compose("config", overrides=cell)
            validate(cfg, cell)
            print(f"# cell {number}: {' '.join(cell)}\n{OmegaConf.to_yaml(cfg)}")


def quiet_console() -> None:
    """Keep the console to progress bars, the run's own log lines and one W&B line (bars: `ctxdistill.progress`;
    transformers' own: `ctxdistill.progress.quiet_library_bars`, once a run imports transformers)."""
    # PEFT calls a transformers method that transformers deprecates, once per model: not the user's to fix.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def user_error_message(error: Exception) -> str:
    """One line (or a few) for a config, data or model error: what, which key or file, the fix."""
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
        SearchPathException,
    )
    from omegaconf import DictConfig
    from omegaconf.errors import ValidationError

    from ctxdistill.config import nearest_key

    if isinstance(error, OverrideParseException):  # Hydra's grammar reads braces, brackets and quotes
        return (
            f"{error.override}: Hydra cannot parse this override ({error.message.splitlines()[0]}). Quote a value "
            "that holds braces, brackets, commas or spaces inside the shell's quotes: 'key=\"{premise} ...\"'"
        )
    if isinstance(error, SearchPathException):  # --config-dir DIR that does not exist
        return f"{str(error).splitlines()[0]}: give --config-dir a directory that holds your configs"
    # an override's error is the composition error's cause; a config file's (one of your own --config-dir) its context
    cause = error.__cause__ or error.__context__
    merged = re.match(r"Error merging override [+~]*([\w.]+)=", str(error))
    new_entry = isinstance(cause, ValidationError) and cause.child_node is None and "not a subclass of" in str(cause)
    if merged and new_entry:
        # +dataset.ood.NAME.split=eval: a mapping of configs (eval sets, patterns) gets no new entry from an override
        parts = merged.group(1).split(".")
        at = parts.index(str(cause.key)) if str(cause.key) in parts else len(parts) - 1
        mapping, entry = ".".join(parts[:at]), parts[at]
        own = own_entry(mapping, entry)
        return f"{mapping}.{entry}: no such entry of {mapping}, and an override cannot add one; {own}"
    if isinstance(error, ConfigCompositionException) and getattr(cause, "full_key", None):
        # "In 'dataset/mine': ..." names the config file that holds the key (not an override)
        source = re.match(r"In '([^']+)'", str(error))
        where = f" (in the config file {source.group(1)}.yaml)" if source and source.group(1) != "config" else ""
        if "not in" in str(cause) or "not found" in str(cause):  # a misspelt key
            hint = nearest_key(str(cause.key), cause.object_type)
            parent = getattr(cause, "parent_node", None)
            if not hint and isinstance(parent, DictConfig) and len(parent):  # a dict's keys (dataset.ood's sets)
                hint = f"; it has {', '.join(map(str, parent.keys()))}"
            elif not hint and isinstance(parent, DictConfig) and parent._metadata.element_type in (int, float, str):
                hint = f". A mapping gets a new key with ++: ++{cause.full_key}=VALUE"  # dataset.label_map
            mapping, _, entry = str(cause.full_key).rpartition(".")
            if mapping == "dataset.ood" and not (CONFIG_DIR / "ood" / f"{entry}.yaml").exists():  # a set of no file
                hint += f"; {own_entry(mapping, entry)}"
            return f"{cause.full_key}{where}: no such setting{hint}"
        if isinstance(cause, ValidationError) and cause.child_node is not None:  # a value of another type
            return f"{cause.full_key}{where}: {wrong_type(cause.full_key, cause.child_node, cause.value)}"
        return f"{cause.full_key}{where}: {str(cause).splitlines()[0]}"
    message = str(error).split("\nConfig search path")[0].strip()  # an unknown option: keep the list of options
    if "Available options in '" in message:
        message = without_schemas(message)
    missing = getattr(error, "missing_cfg_file", None) if isinstance(error, MissingConfigException) else None
    if missing and "Available options" not in message and "/" in missing:
        # an option in a list (ood=[hans,hanz]) gets no list of the options from Hydra: the group's own configs
        group = missing.rsplit("/", 1)[0]
        options = sorted(
            str(p.relative_to(CONFIG_DIR / group).with_suffix(""))
            for p in (CONFIG_DIR / group).glob("*.yaml")
            if not is_base(p.stem)
        )
        if options:
            message += f"\n\nAvailable options in '{group}':\n\t" + "\n\t".join(options)
    return message


def own_entry(mapping: str, entry: str) -> str:
    """How a config of one's own joins ``mapping`` (an override can set an entry's settings, not add an entry)."""
    if mapping == "dataset.ood":
        return f"a set of your own is a file of the ood group, DIR/ood/{entry}.yaml: --config-dir DIR 'ood=[{entry}]'"
    return "an entry of your own is written in a config file of your own (--config-dir DIR)"


# What a setting of each kind expects, and an example of it for a setting the config leaves at null.
EXPECTED = {
    IntegerNode: ("an integer", 10),
    FloatNode: ("a number", 0.5),
    BooleanNode: ("true or false", True),
    ListConfig: ("a list", ["a", "b"]),
}


def wrong_type(key: str, node: Node, given: Any) -> str:
    """What a setting given a value of another type expects (the message after ``key: ``): the type, the value given
    and an example of a valid value (the config's own, where it holds one)."""
    from ctxdistill.config import SCHEMAS, override_text

    if isinstance(node, DictConfig):  # a group of settings, given one value
        group = key.replace(".", "/")
        if (CONFIG_DIR / group).is_dir():  # trainer.distributed: a config group of its own
            return f"is a config group, and {given!r} is a value. Pick an option with a slash: {group}={given}"
        picked = next((g for g, schemas in SCHEMAS.items() if node._metadata.ref_type in schemas.values()), None)
        if picked:  # method.teacher_model: a config of the model group
            return f"takes a whole {picked} config, and {given!r} is a value. Pick an option: +{picked}@{key}={given}"
        held = [
            (k, v)
            for k, v in ({} if node._is_none() else node).items()
            if v is not None and not isinstance(v, DictConfig)
        ]
        example = f", e.g. {key}.{held[0][0]}={override_text(held[0][1])}" if held else ""
        names = ", ".join(map(str, node.keys()))
        return f"is a group of settings ({names}), not a value (got {given!r}). Set them one by one{example}"
    if isinstance(node, StringNode):  # Hydra's grammar read brackets or braces in the value
        return (
            f"expects text, got the {type(given).__name__} {given!r}. Quote the value inside the shell's quotes: "
            f"'{key}=\"...\"'"
        )
    expected, fallback = next((e for kind, e in EXPECTED.items() if isinstance(node, kind)), ("another type", None))
    held = None if node._is_none() or node._is_missing() else OmegaConf.to_container(OmegaConf.create({"v": node}))["v"]
    null = " (or null)" if node._metadata.optional else ""
    return (
        f"expects {expected}{null}, got {override_text(given)}. Give one, e.g. "
        f"{key}={override_text(held if held not in (None, []) else fallback)}"
    )


def without_schemas(message: str) -> str:
    """Hydra's "Could not find 'group/name'" with its list of the group's options, less the schemas (``base_*``) and
    bases (``_*``), which the option files extend and no run selects, and the option nearest to the one asked for."""
    import difflib

    head, _, listed = message.partition("\n\nAvailable options in '")
    group, _, rest = listed.partition("':")
    schemas = schema_names(group)
    inner = tuple(f"{sub}/" for sub in subgroups(group))  # trainer/distributed's options are no trainer's
    options = [
        o
        for o in (line.strip() for line in rest.splitlines())
        if o and o not in schemas and not is_base(o) and not o.startswith(inner)
    ]
    # Hydra lists a group's own options only: experiment=upadhayaya2024/mnli's siblings are in subdirectories
    options += [
        option
        for option in (
            str(p.relative_to(CONFIG_DIR / group).with_suffix(""))
            for p in sorted((CONFIG_DIR / group).glob("*/**/*.yaml"))
        )
        if not is_base(option) and not option.startswith(inner)
    ]
    asked = re.search(rf"Could not find '{re.escape(group)}/([^']+)'", head)
    near = difflib.get_close_matches(asked.group(1), options, n=1) if asked else []
    return (
        head
        + (f"; did you mean {group}={near[0]}?" if near else "")
        + f"\n\nAvailable options in '{group}':\n\t"
        + "\n\t".join(options)
    )


def schema_names(group: str) -> set[str]:
    """The ConfigStore schemas of a config group (``base_model``, ``base_distill``, ...): the options extend them."""
    from hydra.core.config_store import ConfigStore

    return {Path(name).stem for name in (ConfigStore.instance().repo.get(group) or {}) if name.endswith(".yaml")}


def hide_schemas_in_help() -> None:
    """``ctxdistill --help`` lists each group's options without its schemas and bases, which no run selects."""
    from hydra._internal.hydra import Hydra

    listed = Hydra.format_config_groups

    def format_config_groups(self, predicate, compact: bool = True) -> str:
        text = listed(self, predicate, compact)
        if not compact:
            return text
        lines = []
        for line in text.splitlines():
            group, _, options = line.partition(": ")
            schemas = schema_names(group)
            shown = [o for o in options.split(", ") if o not in schemas and not is_base(o)]
            if shown:  # a folder of bases alone (method/prompts) is no group to pick from
                lines.append(f"{group}: {', '.join(shown)}")
        return "\n".join(lines) + "\n"

    Hydra.format_config_groups = format_config_groups


def check_config_dirs(argv: list[str]) -> None:
    """A config directory of your own that does not exist: Hydra refuses --config-dir with its traceback, and skips
    a missing ``hydra.searchpath`` entry, so that its configs are then "not found" without the reason."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    for arg in argv:
        if not arg.startswith("hydra.searchpath="):
            continue
        try:
            entries = OverridesParser.create().parse_override(arg).value()
        except OverrideParseException:
            continue  # Hydra's own message names the override
        for entry in entries if isinstance(entries, list) else [entries]:
            path = str(entry)[len("file://") :] if str(entry).startswith("file://") else None
            if path is not None and not Path(path).expanduser().is_dir():
                raise ConfigError(
                    f"hydra.searchpath: {entry}: no such directory. Give file://DIR with the directory that holds "
                    "your configs (an absolute path, or one relative to where you run ctxdistill)"
                )


def hydra_arguments(argv: list[str]):
    """Hydra's reading of the command line, with argparse's usage-and-exit turned into one message."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def refuse(message: str) -> None:
        raise ConfigError(f"{message}; ctxdistill --help lists the options")

    parser.error = refuse
    return parser, *parser.parse_known_args(argv)


def check_options(argv: list[str]) -> None:
    """An unknown option (--multrun), an option's value Hydra does not take (--cfg jobb) and an override after an
    option that follows other overrides (Hydra reads the overrides as one run of arguments) were argparse's usage
    and "unrecognized arguments". Name each, with the fix."""
    import difflib
    import shlex

    parser, parsed, unknown = hydra_arguments(argv)
    check_subgroup_choices(parsed.overrides)
    for option in (arg for arg in unknown if arg.startswith("-")):
        near = difflib.get_close_matches(option.split("=")[0], parser._option_string_actions, n=1)
        raise ConfigError(
            f"{option}: no such option" + (f" (did you mean {near[0]}?)" if near else "") + "; ctxdistill --help "
            "lists the options"
        )
    stranded = [arg for arg in unknown if not arg.startswith("-")]
    if not stranded:
        return
    overrides = [*parsed.overrides, *stranded]
    options = list(argv)
    for override in overrides:
        options.remove(override)
    first = argv.index(overrides[0])
    option = next(arg for arg in argv[first:] if arg.startswith("-"))
    raise ConfigError(
        f"{stranded[0]}: an override after an option ({option}) that follows other overrides. Options go before "
        f"the overrides: ctxdistill {' '.join(map(shlex.quote, [*options, *overrides]))}"
    )


def note_interrupted(cfg: DictConfig) -> None:
    """Ctrl-C outside training's own handling (loading, evaluation, a second Ctrl-C): say in the console and the run's
    log (cli.log, in its directory) what was kept and the command that finishes the run."""
    import logging

    from ctxdistill.checkpoint import latest_checkpoint, resume_hint

    out = Path(cfg.output_dir)
    checkpoint = latest_checkpoint(out) if out.is_dir() else None
    if checkpoint:
        kept = f"its latest checkpoint ({checkpoint.name}) is kept and the run resumes from it"
    elif trains(cfg):  # a second Ctrl-C before the first checkpoint loses the steps trained since the start
        kept = "no checkpoint was saved yet, so its training starts again from the first step"
    else:
        kept = "it trains nothing, so nothing is lost"
    logging.getLogger(__name__).warning(
        "Ctrl-C: the run stopped before it finished (no metrics.json); %s; %s", kept, resume_hint(out)
    )


def trains(cfg: DictConfig) -> bool:
    """Whether the run's method trains (taken to, when its config does not build)."""
    from ctxdistill.methods import build_method

    try:
        return build_method(cfg.method).trains
    except Exception:  # noqa: BLE001 - only the wording of a note depends on it
        return True


def user_errors() -> tuple[type[Exception], ...]:
    """Errors a user can fix from the message alone: printed without a traceback."""
    from hydra.errors import ConfigCompositionException, OverrideParseException, SearchPathException

    from ctxdistill.data.tasks import DataError
    from ctxdistill.evaluation import NonFiniteScores
    from ctxdistill.models import ModelLoadError

    return (
        ConfigError,
        DataError,
        ModelLoadError,
        NonFiniteScores,
        ConfigCompositionException,
        OverrideParseException,
        SearchPathException,
    )


def exit_with_message(error: Exception, status: int = 1) -> None:
    """Print a user error's message and exit; HYDRA_FULL_ERROR=1 (developers) keeps the traceback."""
    if _developer:
        raise error
    print(f"ctxdistill: {user_error_message(error)}", file=sys.stderr)
    sys.exit(status)


_developer = os.environ.get("HYDRA_FULL_ERROR") == "1"


def entry() -> None:
    argv = sys.argv[1:]
    multirun = bool({"-m", "--multirun"} & set(argv))
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its stack: the message is ours
    try:
        check_options(argv)
        check_config_dirs(argv)
        if {"--help", "-h"} & set(argv):
            hide_schemas_in_help()
        if hydra_arguments(argv)[1].cfg:  # --cfg job, --cfg=job, -cjob
            if multirun:
                print_sweep_configs(argv)
                return
            check_the_config_to_print(argv)
        sys.argv[1:] = join_distributed_launch(argv)
        main()
    except KeyboardInterrupt:  # outside training, or a second Ctrl-C: no checkpoint, no traceback
        from ctxdistill.progress import close_bars

        close_bars()  # the message on a line of its own, not after an open bar's
        print("ctxdistill: interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except SystemExit as stop:  # a launch check's refusal (exit_with_message)
        if multirun and stop.code not in (0, None):
            from ctxdistill.launch_checks import remove_what_a_refused_sweep_made

            remove_what_a_refused_sweep_made()
        raise
    except user_errors() as e:  # a real bug keeps its traceback
        if multirun:  # a cell that does not compose: refused after Hydra wrote multirun.yaml
            from ctxdistill.launch_checks import remove_what_a_refused_sweep_made

            remove_what_a_refused_sweep_made()
        # A sweep refused before its first cell (a cell's error fails only the cell) exits 2, not 1 as one with failed
        # cells: the sweep scripts stop there, where each of their other multiruns would be refused alike.
        exit_with_message(e, 2 if multirun else 1)
    from ctxdistill.sweeps import failed_cells

    if failed_cells:  # listed by the sweep's end-of-run summary
        sys.exit(1)


if __name__ == "__main__":
    # `python -m ctxdistill.cli`: run the package's module, not this copy of it (__main__), whose state (whether
    # HYDRA_FULL_ERROR was the user's, read as it is imported) the checks that import ctxdistill.cli would not share:
    # a base picked as an option warned and ran on instead of being refused.
    from ctxdistill.cli import entry as package_entry

    package_entry()
