"""ctxdistill-eval: evaluate a finished run's model again, on other eval sets or sizes, without training it again.

    ctxdistill-eval RUN_DIR 'ood=[hans_all]'            # another out-of-domain set (conf/ood/)
    ctxdistill-eval RUN_DIR dataset.num_eval=null --name full-validation
    ctxdistill-eval SWEEP_DIR dataset.hans_file=PATH     # every cell of a sweep

The run's config (its recorded Hydra overrides, or its config.yaml) plus the overrides given here
is the evaluation's config; the model is the run's base model with the weights the run saved
(adapter/ or model/). Metrics and predictions go to ``RUN_DIR/evaluations/NAME/``: the run's own
files are never touched.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

EVALUATIONS = "evaluations"


def evaluation_config(run_dir: Path, overrides: list[str], out: Path) -> DictConfig:
    """The run's config with ``overrides``: recomposed from its recorded Hydra overrides when it has them
    (group choices such as dataset=... then work), else its config.yaml with dotted overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    from ctxdistill.cli import CONFIG_DIR
    from ctxdistill.config import ConfigError

    # overrides.yaml: the run's own record (any output_dir); .hydra/: Hydra's, in a sweep cell or an older run
    recorded = next(
        (p for p in (run_dir / "overrides.yaml", run_dir / ".hydra" / "overrides.yaml") if p.is_file()), None
    )
    GlobalHydra.instance().clear()
    if recorded:
        # the evaluation's own directory (quoted: a sweep cell's name holds = and ,), no tracking
        fixed = [f"output_dir='{out}'", "logger=none"]
        recorded_overrides = [o for o in OmegaConf.load(recorded) if not o.startswith(("hydra.", "output_dir="))]
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("config", overrides=[*recorded_overrides, *overrides, *fixed])
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
            schema_defaults = compose("config", overrides=[f"method={cfg.method.name}"]).method
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


def evaluate_run(run_dir: Path, overrides: list[str], name: str) -> dict[str, Any]:
    """Evaluate the run in ``run_dir`` under ``overrides``; returns what metrics.json holds."""
    import torch

    from ctxdistill import provenance
    from ctxdistill.config import ConfigError, validate
    from ctxdistill.methods import build_method
    from ctxdistill.models import ModelHandle, honour_name_or_path, load_tokenizer, model_identity
    from ctxdistill.run import build_models, rounded, run_identity, save_results, separate_teacher_tokenizer
    from ctxdistill.serving import serving_metrics

    out = run_dir / EVALUATIONS / name
    cfg = evaluation_config(run_dir, overrides, out)
    provenance.begin_run()
    validate(cfg)
    honour_name_or_path(cfg.model)
    method = build_method(cfg.method)
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
        identity=model_identity(method.teacher_model or cfg.model, cfg.seed),
    )
    evaluator = method.evaluator(handle, tokenizer, task, cfg.trainer.eval_batch_size)
    metric_set = method.metric_set(evaluator)
    evaluator.prepare()
    metrics, predictions = evaluator.evaluate()
    metrics.update(serving_metrics(evaluator.serving_costs()))
    metrics = rounded(metrics)
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
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    save_results(out, result, predictions)
    log.info("%s: %s", out, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return result


def run_dirs(path: Path) -> list[Path]:
    """The finished runs under ``path``: itself, or every cell of a sweep (never an earlier evaluation)."""
    if (path / "metrics.json").is_file():
        return [path]
    return sorted(p.parent for p in path.rglob("metrics.json") if EVALUATIONS not in p.relative_to(path).parts)


def main(argv: Optional[list[str]] = None) -> int:
    from ctxdistill.cli import cell_dir, exit_with_message, quiet_console, user_errors
    from ctxdistill.progress import BarSafeHandler

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[1:]),
    )
    parser.add_argument("path", type=Path, help="a finished run's directory, or a sweep's")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the evaluation (key=value)")
    parser.add_argument(
        "--name", help="the evaluation's directory under RUN_DIR/evaluations/ (default: made from the overrides)"
    )
    args = parser.parse_args(argv)
    quiet_console()
    # force: the handler writes to this call's stderr, not to one an earlier call in the process saw
    logging.basicConfig(
        level=logging.INFO,
        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
        handlers=[BarSafeHandler()],
        force=True,
    )
    runs = run_dirs(args.path)
    if not runs:
        parser.error(f"no finished run (metrics.json) under {args.path}")
    name = args.name or cell_dir(",".join(args.overrides)) or "again"
    for run_dir in runs:
        try:
            evaluate_run(run_dir, args.overrides, name)
        except user_errors() as e:
            exit_with_message(e)
    print(json.dumps({"evaluations": [str(r / EVALUATIONS / name) for r in runs]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
