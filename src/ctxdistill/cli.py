"""The ``ctxdistill`` command: a Hydra app over conf/ (``ctxdistill --help`` lists the groups)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ctxdistill.config import register_schemas

register_schemas()

# conf/ sits at the repository root, beside src/ (the package is installed editable).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    from ctxdistill.run import run  # heavy imports after Hydra has parsed the command line

    result = run(cfg)
    # The return value is what Hydra sweepers (e.g. Optuna) optimise.
    return result["metrics"]["eval/accuracy"]


if __name__ == "__main__":
    main()
