"""ctxdistill-eval: evaluate a finished run's model again, on other eval sets or sizes, without training it again.

    ctxdistill-eval RUN_DIR 'ood=[hans_all]'            # another out-of-domain set (conf/ood/)
    ctxdistill-eval RUN_DIR dataset.num_eval=null --name full-validation
    ctxdistill-eval SWEEP_DIR dataset.hans_file=PATH     # every cell of a sweep
    ctxdistill-eval RUN_DIR experiment=mine --config-dir DIR  # configs of your own directory

The run's config (its recorded Hydra overrides, or its config.yaml) plus the overrides given here
is the evaluation's config; the model is the run's base model with the weights the run saved
(adapter/ or model/). Metrics and predictions go to ``RUN_DIR/evaluations/NAME/``: the run's own
files are never touched, and an earlier evaluation of that name only with --force (one made with the same
overrides, data and config files is skipped: after Ctrl-C, the same command evaluates what is left).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf

from ctxdistill.results.cli import OneLineErrors
from ctxdistill.results.records import EVALUATIONS, unfinished_runs
from ctxdistill.results.run_files import files_under
from ctxdistill.sweeps import cell_dir

log = logging.getLogger(__name__)


def recorded_search_path(run_dir: Path) -> list[str]:
    """The config directories the run's command line added (--config-dir, hydra.searchpath=[...]), as Hydra
    recorded them beside the run (.hydra/hydra.yaml: a sweep cell, or a run in Hydra's own run directory)."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return []
    sources = OmegaConf.load(hydra_file).hydra.runtime.config_sources
    added = ("command-line", "hydra.searchpath in command-line")
    return [f"{source.schema}://{source.path}" for source in sources if source.provider in added]


def search_path_override(
    run_dir: Path, overrides: list[str], config_dirs: tuple[Path, ...]
) -> tuple[list[str], list[str]]:
    """One ``hydra.searchpath`` override holding the run's recorded config directories, ``config_dirs``
    (--config-dir) and any hydra.searchpath among ``overrides`` (a second override of it would replace the
    first); and ``overrides`` without that one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = [o for o in overrides if o.startswith("hydra.searchpath=")]
    parser = OverridesParser.create()
    searched = [
        *recorded_search_path(run_dir),
        *(f"file://{d.resolve()}" for d in config_dirs),
        *(path for o in given for path in parser.parse_override(o).value()),
    ]
    quoted = ",".join(f"'{path}'" for path in dict.fromkeys(searched))
    return ([f"hydra.searchpath=[{quoted}]"] if searched else []), [o for o in overrides if o not in given]


def evaluation_config(run_dir: Path, overrides: list[str], out: Path, config_dirs: tuple[Path, ...]) -> DictConfig:
    """The run's config with ``overrides``: recomposed from its recorded Hydra overrides when it has them
    (group choices such as dataset=... then work), else its config.yaml with dotted overrides. Configs are
    looked for in conf/, the directories the run's command line added, and ``config_dirs``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    from ctxdistill.cli import CONFIG_DIR, user_error_message
    from ctxdistill.config import ConfigError
    from ctxdistill.sweeps import recorded_overrides

    search, overrides = search_path_override(run_dir, overrides, config_dirs)
    recorded = recorded_overrides(run_dir)
    GlobalHydra.instance().clear()
    if recorded is not None:
        # the evaluation's own directory (quoted: a sweep cell's name holds = and ,), no tracking
        fixed = [f"output_dir='{out}'", "logger=none"]
        recorded = [o for o in recorded if not o.startswith(("hydra.", "output_dir="))]
        try:
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                return compose("config", overrides=[*search, *recorded, *overrides, *fixed])
        except MissingConfigException as e:
            raise ConfigError(
                f"{user_error_message(e)}\nA config from a directory of your own (ctxdistill --config-dir DIR)? "
                "Give it here too: ctxdistill-eval --config-dir DIR"
            ) from None
    groups = [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0]]
    if groups:
        raise ConfigError(
            f"{groups[0]}: {run_dir} records no overrides (overrides.yaml; it was not started by the "
            "ctxdistill command), so group choices cannot be recomposed; override keys instead "
            "(e.g. dataset.ood.hans.num_examples=200, dataset.num_eval=null)"
        )
    cfg = OmegaConf.load(run_dir / "config.yaml")
    # config.yaml holds values, not types: the method's schema (its checks) comes from its config group
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            schema_defaults = compose("config", overrides=[*search, f"method={cfg.method.name}"]).method
    except MissingConfigException:
        raise ConfigError(
            f"method.name={cfg.method.name} in {run_dir / 'config.yaml'} names no config in conf/method/; "
            "evaluate the run with the version of ctxdistill that trained it"
        ) from None
    cfg.method = OmegaConf.merge(schema_defaults, cfg.method)
    for override in [*overrides, f"output_dir={out}", "logger.backend=none"]:
        key, value = override.lstrip("+").split("=", 1)
        OmegaConf.update(cfg, key, yaml.safe_load(value), force_add=True)
    return cfg


# What the saved weights were trained on: an evaluation that changes one of them cannot load them.
RUN_MODEL_KEYS = (
    "name_or_path",
    "source",
    "revision",
    "architecture",
    "layer_stride",
    "package",
    "package_dir",
    "gguf_package",
    "gguf_file",
)


def check_same_model_and_method(run_dir: Path, cfg: DictConfig) -> None:
    """The evaluation evaluates the run's own method on the run's own model (its saved weights fit no other)."""
    from ctxdistill.config import ConfigError

    recorded_file = run_dir / "config.yaml"
    if not recorded_file.is_file():
        return
    recorded = OmegaConf.load(recorded_file)
    if recorded.method.name != cfg.method.name:
        raise ConfigError(
            f"method: {run_dir} is a run of method={recorded.method.name}, and this evaluation asks for "
            f"method={cfg.method.name}; ctxdistill-eval evaluates a run's own method and weights. Leave method out "
            f"of the overrides, or start a run of its own: ctxdistill method={cfg.method.name} ..."
        )
    keys = [*RUN_MODEL_KEYS, *(("tiny",) if recorded.model.source == "random" else ())]
    for key in keys:
        was, now = recorded.model.get(key), cfg.model.get(key)
        if OmegaConf.is_config(was):
            was, now = OmegaConf.to_container(was), OmegaConf.to_container(now)
        if was != now:
            raise ConfigError(
                f"model.{key}: {run_dir} trained its weights on model={recorded.model.name} ({key}={was}), and this "
                f"evaluation would load {key}={now}: the saved weights fit only the run's model. Leave model and "
                "model.* out of the overrides"
            )
    if recorded.model.source == "random" and recorded.seed != cfg.seed:  # the seed draws a random model's weights
        raise ConfigError(
            f"seed: {run_dir} ran on model={recorded.model.name}, a random model whose weights seed={recorded.seed} "
            f"drew, and this evaluation would draw them with seed={cfg.seed}: another model. Leave seed out of the "
            "overrides"
        )


def overridden_prefixes(overrides: list[str]) -> Optional[list[str]]:
    """The config keys ``overrides`` set (a group choice: its whole package); None where one replaces everything
    (an experiment)."""
    prefixes = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        group, _, package = key.partition("@")
        if group == "experiment":
            return None
        package = package or group.replace("/", ".")
        prefixes.append("dataset.ood" if package == "ood" else package)  # the ood group fills dataset.ood
    return prefixes


def check_configs_unchanged(run_dir: Path, recomposed: DictConfig, overrides: list[str]) -> None:
    """The run's recorded overrides, composed now (``recomposed``, with none of the evaluation's), give the config
    the run recorded (its config.yaml), as a sweep's complete-run check compares them: a config file edited since
    (conf/, an experiment of one's own) would otherwise change the evaluation of the run silently. Keys the
    evaluation's ``overrides`` set may differ."""
    from ctxdistill.config import ConfigError
    from ctxdistill.sweeps import config_changes, open_maps

    prefixes = overridden_prefixes(overrides)
    if prefixes is None or not (run_dir / "config.yaml").is_file():
        return
    stored = OmegaConf.load(run_dir / "config.yaml")
    current = OmegaConf.to_container(recomposed, resolve=True)
    changed = [
        key
        for key in config_changes(OmegaConf.to_container(stored), current, open_maps(recomposed))
        if not any(key == p or key.startswith(f"{p}.") for p in prefixes)
    ]
    if changed:

        def value(cfg: DictConfig, key: str) -> Any:
            found = OmegaConf.select(cfg, key)
            return OmegaConf.to_container(found, resolve=True) if OmegaConf.is_config(found) else found

        settings = ", ".join(f"{k}={value(recomposed, k)} (the run: {value(stored, k)})" for k in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        restore = " ".join(f"{k}={json.dumps(value(stored, k))}" for k in changed[:3])
        raise ConfigError(
            f"{run_dir}: its recorded overrides compose another config now: {settings}{more}. A config file "
            f"changed since the run (conf/, or a directory of your own). Restore it, or evaluate with the run's "
            f"values: ctxdistill-eval {run_dir} {restore}"
        )


def warn_unused_settings(overrides: list[str], cfg: DictConfig, method) -> None:
    """A setting given to ctxdistill-eval that it does not read: said, not silently dropped. Training's (it trains
    nothing and loads the run's saved adapter or weights as they are: the trainer's, and the method's own where they
    shape training alone), the logger's (it logs nothing to W&B), and those the evaluation's other settings leave
    unread (dataset.hans_file without an out-of-domain set reading it)."""
    from ctxdistill.config import override_keys
    from ctxdistill.run import training_settings_in, unread_entries

    unused = training_settings_in(overrides) + method.settings_evaluation_ignores(override_keys(overrides))
    if unused:
        log.warning("ctxdistill-eval trains nothing and loads the run's saved weights: ignoring %s", ", ".join(unused))
    keys = override_keys(overrides)
    logger = [k for k in keys if k.partition(".")[0] == "logger"]
    if logger:
        log.warning("ctxdistill-eval logs nothing to W&B (it writes evaluations/NAME/): ignoring %s", ", ".join(logger))
    for entry in unread_entries(cfg, [k for k in keys if k not in logger and k not in unused]):
        log.warning("%s", entry["warning"])


def checked_config(run_dir: Path, overrides: list[str], name: str, config_dirs: tuple[Path, ...]) -> DictConfig:
    """The evaluation's config, validated, and checked to load the run's weights as the run saved them (before any
    model loads)."""
    from ctxdistill.config import validate
    from ctxdistill.models import honour_name_or_path

    out = run_dir / EVALUATIONS / name
    cfg = evaluation_config(run_dir, overrides, out, config_dirs)
    validate(cfg, trains=False)  # the method's checks of how it trains do not bind an evaluation (one context, …)
    honour_name_or_path(cfg.model)
    check_same_model_and_method(run_dir, cfg)
    if overrides:  # without any, the run's config as the run's overrides compose it now (the same when unchanged)
        recomposed = evaluation_config(run_dir, [], out, config_dirs)
        honour_name_or_path(recomposed.model)
    else:
        recomposed = cfg
    check_configs_unchanged(run_dir, recomposed, overrides)
    return cfg


def evaluate_run(run_dir: Path, overrides: list[str], name: str, config_dirs: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Evaluate the run in ``run_dir`` under ``overrides`` (configs also from ``config_dirs``); returns what
    metrics.json holds."""
    import torch

    from ctxdistill import provenance
    from ctxdistill.config import ConfigError
    from ctxdistill.methods import build_method
    from ctxdistill.models import ModelHandle, load_tokenizer, teaching_identity
    from ctxdistill.run import (
        build_models,
        evaluation_dropout_seed,
        final_metrics,
        run_identity,
        save_results,
        separate_teacher_tokenizer,
    )

    out = run_dir / EVALUATIONS / name
    cfg = checked_config(run_dir, overrides, name, config_dirs)
    provenance.begin_run()
    method = build_method(cfg.method)
    warn_unused_settings(overrides, cfg, method)
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    task = method.build_task(cfg.dataset, cfg.seed)
    method.check_inputs(task, tokenizer, cfg)
    saved = next((run_dir / d for d in ("adapter", "model") if (run_dir / d).is_dir()), None) if method.trains else None
    if method.trains and saved is None:
        raise ConfigError(
            f"{run_dir} holds no trained weights (adapter/ or model/): the run was made with "
            "trainer.save_model=false, or did not finish. Train it again with trainer.save_model=true"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher_tokenizer = separate_teacher_tokenizer(cfg, method, task, tokenizer)
    model, teacher, parameters = build_models(cfg, method, tokenizer, task, device, saved, teacher_tokenizer)
    handle = ModelHandle(
        student=model,
        base=model,
        separate_teacher=teacher,
        teacher_tokenizer=teacher_tokenizer,
        identity=teaching_identity(
            method.teacher_model, cfg.model, cfg.seed, device, tokenizer if teacher_tokenizer is None else None
        ),
        evaluation_dropout_seed=evaluation_dropout_seed(cfg, method),
    )
    evaluator = method.evaluator(handle, tokenizer, task, cfg.trainer.eval_batch_size)
    metric_set = method.metric_set(evaluator)
    evaluator.prepare()
    metrics, predictions = final_metrics(method, evaluator)
    result = {
        **run_identity(cfg, task),
        "status": "complete",
        "metrics": metrics,
        "metric_set": metric_set.to_dict(),
        "objective": method.objective,
        "evaluated_run": str(run_dir),
        "weights": str(saved) if saved else None,
        "overrides": overrides,
        "model_parameters": parameters,
        "provenance": provenance.describe(OmegaConf.to_container(cfg, resolve=True), task, device, 1),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    sizes = result["provenance"]["eval_set_sizes"]
    result["provenance"]["eval_set_sizes"] = provenance.with_made_sets(sizes, predictions)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    save_results(out, result, predictions)
    log.info("%s: %s", out, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return result


def differs_from(out: Path, overrides: list[str], run_dir: Path, config_dirs: tuple[Path, ...]) -> Optional[str]:
    """How the evaluation in ``out`` differs from the one these overrides would make now; None where it is the same:
    complete, made with these overrides, from the same data (an eval set's file rewritten at its path is another
    evaluation) and the config they compose now (a config file of one's own edited since is another too)."""
    from ctxdistill.config import ConfigError
    from ctxdistill.provenance import changed_data
    from ctxdistill.sweeps import config_changes, open_maps

    try:
        made = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return "it is not complete"
    if made.get("status") != "complete" or made.get("overrides") != list(overrides):
        return "it was made with other overrides" if made.get("status") == "complete" else "it is not complete"
    changed = changed_data(made.get("provenance") or {})
    if changed:
        return f"it was made from data that changed since ({', '.join(changed)})"
    from ctxdistill.models import honour_name_or_path

    try:
        now = evaluation_config(run_dir, overrides, out, config_dirs)
        honour_name_or_path(now.model)  # as the evaluation saved its config
    except ConfigError:
        return None  # the evaluation itself names what no longer composes
    stored = OmegaConf.to_container(OmegaConf.load(out / "config.yaml")) if (out / "config.yaml").is_file() else {}
    keys = config_changes(stored, OmegaConf.to_container(now, resolve=True), open_maps(now))
    return f"its config composes otherwise now ({', '.join(keys[:3])})" if keys else None


def run_dirs(path: Path) -> list[Path]:
    """The finished runs under ``path``: itself, or every cell of a sweep (never an earlier evaluation)."""
    if (path / "metrics.json").is_file():
        return [path]
    return sorted(p.parent for p in files_under(path, "metrics.json") if EVALUATIONS not in p.relative_to(path).parts)


def argument_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(
        prog="ctxdistill-eval",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[1:]),
    )
    parser.add_argument("path", type=Path, help="a finished run's directory, or a sweep's")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the evaluation (key=value)")
    parser.add_argument(
        "--name", help="the evaluation's directory under RUN_DIR/evaluations/ (default: made from the overrides)"
    )
    parser.add_argument("--force", action="store_true", help="replace an evaluation of the same name")
    parser.add_argument(
        "--config-dir",
        type=Path,
        action="append",
        default=[],
        help="a config directory of your own, as ctxdistill --config-dir takes (a sweep cell's own are found from "
        "its record); repeatable",
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = argument_parser()
    args = parser.parse_intermixed_args(argv)  # overrides before or after the options
    # every check of the arguments before ctxdistill.cli, whose imports (torch, the methods) take seconds
    if not args.path.exists():
        parser.error(f"{args.path}: no such directory; give a finished run's directory, or a sweep's")
    unfinished = {args.path / cell: why for cell, why in unfinished_runs(args.path).items()}
    for run_dir, why in unfinished.items():  # a sweep's cells without results: said, not skipped quietly
        print(f"ctxdistill-eval: warning: left out {run_dir}, which has no results: {why}", file=sys.stderr)
    # a cell whose latest attempt failed is left out even beside an earlier complete metrics.json, as a sweep does
    runs = [run_dir for run_dir in run_dirs(args.path) if run_dir not in unfinished]
    if not runs:
        parser.error(f"no finished run (metrics.json) under {args.path}")
    for run_dir in runs:  # an earlier evaluation given as the run (RUN/evaluations): it has no weights of its own
        evaluated = json.loads((run_dir / "metrics.json").read_text()).get("evaluated_run")
        if evaluated:
            parser.error(f"{run_dir} is an evaluation of the run {evaluated}, not a run: give {evaluated}")
    for override in args.overrides:  # settings of the ctxdistill command that an evaluation has options for
        key = override.lstrip("+~").split("=", 1)[0]
        if key == "force":
            parser.error(f"{override}: an evaluation of the same name is replaced with --force")
        if key == "output_dir" or (key.startswith(("hydra.", "hydra/")) and key != "hydra.searchpath"):
            parser.error(f"{override}: an evaluation is written to RUN_DIR/evaluations/NAME/; name it with --name NAME")
    name = args.name or cell_dir(",".join(args.overrides)) or "again"
    # evaluations/NAME/ must stay one directory of evaluations/: "..", "/" or an absolute path would reach the run's
    # own metrics.json and config.yaml, or beyond the run
    if name in (".", "..") or Path(name).name != name:
        parser.error(f"--name {name}: give one plain directory name (no '/', '.' or '..'), e.g. --name full-validation")
    missing = [str(d) for d in args.config_dir if not d.is_dir()]
    if missing:
        parser.error(f"--config-dir {missing[0]}: no such directory")
    from ctxdistill.config import ConfigError
    from ctxdistill.launch_checks import check_data_paths

    try:  # a data file or directory that does not exist (dataset.hans_file=PATH), as the ctxdistill command checks
        check_data_paths(args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    made = [run_dir / EVALUATIONS / name for run_dir in runs if (run_dir / EVALUATIONS / name).exists()]
    # the same command again (after Ctrl-C, say) evaluates only the runs it had not finished
    differences = (
        {}
        if args.force
        else {out: differs_from(out, args.overrides, out.parent.parent, tuple(args.config_dir)) for out in made}
    )
    done = {out for out, difference in differences.items() if difference is None}
    made = [out for out in made if out not in done]
    if made and not args.force:
        parser.error(
            f"{made[0]}{f' (and {len(made) - 1} more)' if len(made) > 1 else ''} already holds an evaluation named "
            f"{name} ({differences[made[0]]}): pass --force to replace it, or another --name"
        )

    from ctxdistill.cli import exit_with_message, quiet_console, user_error_message, user_errors
    from ctxdistill.progress import BarSafeHandler, quiet_library_bars

    quiet_console()
    quiet_library_bars()
    # force: the handler writes to this call's stderr, not to one an earlier call in the process saw
    logging.basicConfig(
        level=logging.INFO,
        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
        handlers=[BarSafeHandler()],
        force=True,
    )
    todo = [run_dir for run_dir in runs if run_dir / EVALUATIONS / name not in done]
    for run_dir in todo if len(todo) > 1 else []:  # a sweep's every cell, before any model loads
        try:
            checked_config(run_dir, args.overrides, name, tuple(args.config_dir))
        except user_errors() as e:
            exit_with_message(ConfigError(f"{run_dir}: {user_error_message(e)}"))
    for number, run_dir in enumerate(runs):
        if run_dir / EVALUATIONS / name in done:
            log.info(
                "%s already holds this evaluation: skipped (--force evaluates it again)", run_dir / EVALUATIONS / name
            )
            continue
        try:
            evaluate_run(run_dir, args.overrides, name, tuple(args.config_dir))
        except user_errors() as e:
            exit_with_message(e)
        except KeyboardInterrupt:
            command = shlex.join(["ctxdistill-eval", *(sys.argv[1:] if argv is None else argv)])
            finished = f"; the {number} evaluation(s) finished before it are kept" if number else ""
            print(
                f"ctxdistill-eval: interrupted while evaluating {run_dir}: nothing of its evaluation was written, and "
                f"the run's own files are unchanged{finished}. The same command evaluates what is left: {command}",
                file=sys.stderr,
            )
            sys.exit(128 + signal.SIGINT)
    print(json.dumps({"evaluations": [str(r / EVALUATIONS / name) for r in runs]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
