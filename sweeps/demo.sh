#!/usr/bin/env bash
# The offline demo: install, then sweep zero_shot, icl, ft and cd with the bundled SmolLM2-135M
# on the synthetic task and print the comparison table. Extra arguments are Hydra overrides.
set -euo pipefail
source "$(dirname "$0")/usage.sh"
[[ ${SWEEP_DIR:-/} = /* ]] || SWEEP_DIR=$PWD/$SWEEP_DIR  # where the user is, not the repository root
cd "$(dirname "$0")/.."
source src/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# SWEEP_DIR=<an earlier sweep dir> finishes that sweep instead of starting a new one
ctxdistill -m experiment=demo hydra.sweep.dir="${SWEEP_DIR:-outputs/demo/$(date +%Y-%m-%d_%H-%M-%S)}" "$@"
