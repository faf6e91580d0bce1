#!/usr/bin/env bash
# Upadhayaya et al. 2024 (Table 3, Fig. 1): the grid of sweeps/grids/upadhayaya2024.yaml (zero_shot, icl,
# ft, cd x OPT-125m/350m/1.3b/2.7b x MNLI, RTE, QQP x seeds 0-3 = 192 runs); one Hydra multirun per dataset into
# $SWEEP_DIR/<dataset> (default outputs/sweeps/upadhayaya2024), then one README.md + results/ for all, with the
# scorecard against the paper's Table 3. METHODS, MODELS and SEEDS replace the grid's values (e.g. METHODS=cd
# MODELS=smollm2-135m SEEDS=0,1 on a CPU); COMPARE_ARGS go to ctxdistill-compare ("--model-as smollm2-135m=opt-125m").
#
#   bash sweeps/upadhayaya2024.sh                                          # one run after another
#   bash sweeps/upadhayaya2024.sh hydra/launcher=joblib hydra.launcher.n_jobs=4
#   bash sweeps/upadhayaya2024.sh hydra/launcher=submitit_slurm hydra.launcher.partition=gpu  # SLURM arrays
#
# Extra arguments are Hydra overrides for every dataset (not of a grid key: METHODS, MODELS, SEEDS change those); MNLI_ARGS, RTE_ARGS and QQP_ARGS add
# overrides for one dataset (local data, e.g. QQP_ARGS="dataset.ood.paws_qqp.source.data_dir=PATH/paws_qqp").
# Running it again finishes an interrupted sweep: complete cells are skipped (force=true redoes them).
# Exits non-zero if any cell failed (each sweep lists its failed cells).
set -uo pipefail
source "$(dirname "$0")/usage.sh"
[[ ${SWEEP_DIR:-/} = /* ]] || SWEEP_DIR=$PWD/$SWEEP_DIR  # where the user is, not the repository root
cd "$(dirname "$0")/.."
root=${SWEEP_DIR:-outputs/sweeps/upadhayaya2024}
grid=sweeps/grids/upadhayaya2024.yaml
multiruns=$(python -m ctxdistill.grids overrides "$grid" ${METHODS:+"method=$METHODS"} ${MODELS:+"model=$MODELS"} \
  ${SEEDS:+"seed=$SEEDS"}) || exit 2
mapfile -t multiruns <<< "$multiruns"
# shellcheck disable=SC2086  # COMPARE_ARGS are meant to split on spaces; checked before the sweeps, not after them
ctxdistill-compare --check-args --scorecard --paper upadhayaya2024 ${COMPARE_ARGS:-} || exit 2
source sweeps/each_dataset.sh "$@"
# shellcheck disable=SC2086  # COMPARE_ARGS are meant to split on spaces
ctxdistill-compare "$root" --out "$root" --scorecard ${COMPARE_ARGS:-} || failed
exit $status
