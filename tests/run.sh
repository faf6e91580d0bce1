#!/usr/bin/env bash
# Install ctxdistill (into ./.venv unless a virtualenv is active), lint it and run the test suite:
# offline, on CPU, W&B disabled except where a test writes an offline run on purpose.
set -euo pipefail
cd "$(dirname "$0")/.."
source src/setup_env.sh
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check . && ruff format --check --quiet .   # lint and format (pyproject.toml [tool.ruff]), in a second
# One worker per core, a test file per worker (its module fixtures built once); CTXDISTILL_TEST_WORKERS=0
# runs in this process (a debugger, pytest -x).
python -m pytest -n "${CTXDISTILL_TEST_WORKERS:-auto}" --dist loadfile "$@"
