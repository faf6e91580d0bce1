"""One source for each paper's sweep grid: ``sweeps/grids/<paper>.yaml``. The paper's shell script reads
it and its W&B sweep files (``sweeps/wandb/<paper>_<dataset>.yaml``) are generated from it, so the two
cannot drift (tests/test_sweeps.py regenerates them and compares).

    python -m ctxdistill.grids experiments sweeps/grids/mosbach2023.yaml     # the experiments, one a line
    python -m ctxdistill.grids overrides sweeps/grids/mosbach2023.yaml model=opt-125m,opt-350m   # a multirun a line
    python -m ctxdistill.grids wandb sweeps/grids/mosbach2023.yaml --out sweeps/wandb       # write the W&B files

A grid file holds ``experiments`` (one Hydra multirun each), ``params`` (key: a value or a list of values,
the same for every experiment), ``models`` (a model's own settings, such as a sharding strategy: its cells run
in a multirun, and a W&B file, of their own, since neither Hydra's sweeper nor W&B's ties one param's value to
another's) and ``wandb`` (per experiment, settings only a W&B agent needs, such as a local data path the shell
script takes from its command line, read from the worker's environment: ``${oc.env:PAWS_QQP_DIR}``).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import yaml

from ctxdistill.config import ConfigError

WANDB_HEADER = """\
# Generated from {grid} (python -m ctxdistill.grids wandb {grid} --out {out}): edit the grid, not this file.
# W&B's sweep controller over the {name} part of {script} ({runs} runs):
#   wandb sweep {path}     # prints the sweep id
#   {variables}wandb agent ENTITY/ctxdistill/SWEEP_ID     # on each worker, from the repository root
# Each run is one `{launch} -m ctxdistill key=value ...`, a single Hydra run in outputs/wandb_sweeps/SWEEP_ID/RUN_ID.
"""


# Each agent run's own directory, named by the ids the agent gives it: the default one (the launch second, method,
# model and dataset) is shared by agents that start cells differing in another setting in the same second.
AGENT_RUN_DIR = "hydra.run.dir=outputs/wandb_sweeps/${oc.env:WANDB_SWEEP_ID}/${oc.env:WANDB_RUN_ID}"
# A grid's wandb settings read what differs between workers (a local data path) from the environment.
ENVIRONMENT_VARIABLE = re.compile(r"\$\{oc\.env:(\w+)\}")


def load_grid(path: Path) -> dict[str, Any]:
    try:
        grid = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror}); the grids are sweeps/grids/*.yaml") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not YAML ({str(e).splitlines()[0]}); the grids are sweeps/grids/*.yaml") from None
    if not isinstance(grid, dict):
        raise ConfigError(
            f"{path}: a grid is a YAML mapping of experiments, params and wandb; got {type(grid).__name__}"
        )
    unknown = sorted(set(grid) - {"experiments", "params", "models", "wandb"})
    if unknown or not grid.get("experiments"):
        raise ConfigError(
            f"{path}: a grid has experiments, params, models and wandb (and needs experiments); got {sorted(grid)}"
        )
    not_swept = sorted(set(grid.get("models", {})) - set(values(grid["params"].get("model", []))))
    if not_swept:
        raise ConfigError(f"{path}: models has settings for {not_swept}, which params.model does not list; add them")
    return grid


def values(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def hydra_overrides(grid: dict[str, Any], replace: list[str] = ()) -> list[str]:
    """The grid's params as Hydra multirun overrides (``key=a,b,c``); ``replace`` (``key=a,b``) swaps one's values."""
    malformed = [r for r in replace if "=" not in r]
    if malformed:
        raise ConfigError(f"{malformed[0]!r}: write key=a,b (a param of the grid and its values)")
    swapped = dict(r.split("=", 1) for r in replace)
    unknown = sorted(set(swapped) - set(grid["params"]))
    if unknown:
        raise ConfigError(f"{unknown} not in the grid's params ({sorted(grid['params'])}); pass other keys to Hydra")
    return [
        f"{key}={swapped.get(key, ','.join(str(v) for v in values(value)))}" for key, value in grid["params"].items()
    ]


def multiruns(grid: dict[str, Any], replace: list[str] = ()) -> list[list[str]]:
    """The grid as Hydra multiruns: one for the models without settings of their own, then one per model with
    its own (the grid's ``models``), its settings after the params."""
    overrides = hydra_overrides(grid, replace)
    own = grid.get("models", {})
    models = next((o.split("=", 1)[1].split(",") for o in overrides if o.startswith("model=")), None)
    if models is None:
        return [overrides]
    groups = [([m for m in models if m not in own], {})] + [([m], own[m]) for m in models if m in own]
    return [
        [f"model={','.join(group)}" if o.startswith("model=") else o for o in overrides]
        + [f"{key}={value}" for key, value in settings.items()]
        for group, settings in groups
        if group
    ]


def experiment_sweep(experiment: str) -> dict[str, Any]:
    """An experiment's Hydra sweep (``hydra.sweeper.params``, ``key: a,b,c``) as grid params. A W&B agent
    starts single runs, which Hydra's sweeper never sees, so the experiment's W&B file sweeps them itself.
    Read from the composed config, as Hydra reads it: an experiment that extends another (beyond_window,
    the demo) sweeps what that one does unless it sets its own."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ctxdistill.cli import CONFIG_DIR
    from ctxdistill.config import register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        config = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = config.hydra.sweeper.params or {}
    swept = {key: [yaml.safe_load(choice) for choice in str(value).split(",")] for key, value in params.items()}
    return {key: choices if len(choices) > 1 else choices[0] for key, choices in swept.items()}


def objectives(experiment: str, methods: list[str]) -> set[str]:
    """The metric each of ``methods`` (none: the experiment's own) is judged by in ``experiment`` (``method.objective``,
    as its runs record it; every one is better higher)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ctxdistill.cli import CONFIG_DIR
    from ctxdistill.methods import build_method

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        chosen = [[f"method={m}"] for m in methods] or [[]]
        return {build_method(compose("config", [f"experiment={experiment}", *m]).method).objective for m in chosen}


def wandb_sweeps(grid_path: Path, out: Path) -> dict[Path, str]:
    """The W&B sweep file of each experiment of the grid: path -> text (``<grid>_<experiment>.yaml``, or
    ``<grid>.yaml`` for a grid of the experiment of its name: the demo), and one more per model with settings of
    its own (``<grid>_<experiment>_<model>.yaml``)."""
    grid = load_grid(grid_path)
    paper = grid_path.stem
    own = grid.get("models", {})
    models = values(grid["params"].get("model", []))
    shared = [m for m in models if m not in own]
    groups = [("", {"model": shared if len(shared) > 1 else shared[0]} if shared else {})] if shared or not own else []
    groups += [(f"_{model}", {"model": model, **own[model]}) for model in models if model in own]
    files = {}
    for experiment in grid["experiments"]:
        name = experiment.rsplit("/", 1)[-1]
        for suffix, group in groups:
            path = out / (f"{paper}{suffix}.yaml" if name == paper else f"{paper}_{name}{suffix}.yaml")
            wandb = grid.get("wandb", {}).get(experiment, {})
            params = {"experiment": experiment, **experiment_sweep(experiment), **grid["params"], **group, **wandb}
            metrics = objectives(experiment, values(params.get("method", [])))
            files[path] = wandb_sweep(params, grid_path, out, path, name + suffix.replace("_", " "), metrics)
    return files


def wandb_sweep(params: dict[str, Any], grid_path: Path, out: Path, path: Path, part: str, metrics: set[str]) -> str:
    """The W&B sweep file of ``params``; its metric is the runs' objective (``metrics``: each swept method's), none
    where the methods are judged by different ones (a grid needs none: W&B would rank one method's runs by
    another's metric)."""
    runs = 1
    for value in params.values():
        runs *= len(values(value))
    # a sharded model needs a process per GPU, which an agent starts only through torchrun
    sharded = params.get("trainer/distributed", "ddp") != "ddp"
    launcher = ["torchrun", "--standalone", "--nproc_per_node", "gpu"] if sharded else ["${interpreter}"]
    body = {
        "program": "src/ctxdistill/__main__.py",
        # W&B's sweep variables: the agent hands the parameters over as Hydra key=value
        "command": ["${env}", *launcher, "-m", "ctxdistill", "${args_no_hyphens}", AGENT_RUN_DIR],
        "project": "ctxdistill",
        "method": "grid",
        **({"metric": {"name": next(iter(metrics)), "goal": "maximize"}} if len(metrics) == 1 else {}),
        "parameters": {
            key: {"values": value} if isinstance(value, list) else {"value": value} for key, value in params.items()
        },
    }
    header = WANDB_HEADER.format(
        grid=grid_path.as_posix(),
        out=out.as_posix(),
        name=part,
        script=f"sweeps/{grid_path.stem}.sh",
        launch=" ".join(launcher) if sharded else "python",
        runs=runs,
        path=path.as_posix(),
        variables="".join(f"{name}=PATH " for name in sorted(set(ENVIRONMENT_VARIABLE.findall(str(params))))),
    )
    return header + yaml.safe_dump(body, sort_keys=False, width=120, default_flow_style=None)


def refuse_grid_keys(grid: dict[str, Any], grid_path: Path, arguments: list[str]) -> None:
    """A paper script's own arguments come after the grid's params in each multirun, where Hydra keeps the last
    value: one naming a grid key (model=opt-125m) would replace that key's values in every multirun, a sharded
    model's included, and give the table the same cells twice."""
    keys = {*grid["params"], *(k for settings in grid.get("models", {}).values() for k in settings)}
    for argument in arguments:
        key = argument.split("=", 1)[0].lstrip("+~")
        if key in keys:
            raise ConfigError(
                f"{argument}: {key} is a key of the grid ({grid_path}), which the script sweeps itself. Change its "
                f"values with the script's variables (its --help) or in the grid, not as an argument"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctxdistill.grids", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["experiments", "overrides", "wandb", "arguments"])
    parser.add_argument("grid", type=Path)
    parser.add_argument(
        "replace",
        nargs="*",
        help="overrides: key=a,b replaces a param's values; arguments: a script's arguments, refused if a grid key",
    )
    parser.add_argument("--out", type=Path, default=Path("sweeps/wandb"), help="wandb: where the files go")
    args = parser.parse_args(argv)
    try:
        grid = load_grid(args.grid)
        if args.what == "experiments":
            print("\n".join(grid["experiments"]))
        elif args.what == "overrides":
            print("\n".join(" ".join(multirun) for multirun in multiruns(grid, args.replace)))
        elif args.what == "arguments":
            refuse_grid_keys(grid, args.grid, args.replace)
        else:
            for path, text in wandb_sweeps(args.grid, args.out).items():
                path.write_text(text)
                print(path)
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
