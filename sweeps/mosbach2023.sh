#!/usr/bin/env bash
# Mosbach et al. 2023 (llmft), few-shot fine-tuning vs in-context learning: the grid of
# sweeps/grids/mosbach2023.yaml, icl and pbft (llmft's full-parameter pattern-based fine-tuning) on 16
# examples x OPT-125m ... 6.7b (MODELS replaces them) x MNLI (HANS) and QQP (PAWS-QQP) x llmft's patterns
# (PATTERNS replaces minimal,gpt3,eval_harness) x data seeds 0-9 (seed 0 fixed, as llmft's data_seed) = 600 runs;
# one Hydra multirun per dataset into $SWEEP_DIR/<dataset> (default outputs/sweeps/mosbach2023),
# then one README.md + results/ (accuracy vs model size, in-domain and out-of-domain) for all. Every cell trains
# in bf16 mixed precision over float32 weights; OPT-6.7b's cells shard with FSDP in a multirun of their own, which
# needs a GPU per process: run MODELS=opt-6.7b with a launcher giving it several (docs/papers/mosbach2023.md).
#
#   bash sweeps/mosbach2023.sh hydra/launcher=submitit_slurm hydra.launcher.gpus_per_node=1
#   MODELS=opt-125m,opt-350m bash sweeps/mosbach2023.sh hydra/launcher=joblib hydra.launcher.n_jobs=2
#
# Extra arguments are Hydra overrides for every dataset (not of a grid key: MODELS, PATTERNS change those); MNLI_ARGS and QQP_ARGS add overrides for
# one dataset (local data, e.g. QQP_ARGS="dataset.ood.paws_qqp.source.data_dir=PATH/paws_qqp").
# Running it again finishes an interrupted sweep: complete cells are skipped (force=true redoes them).
set -uo pipefail
source "$(dirname "$0")/usage.sh"
[[ ${SWEEP_DIR:-/} = /* ]] || SWEEP_DIR=$PWD/$SWEEP_DIR  # where the user is, not the repository root
cd "$(dirname "$0")/.."
root=${SWEEP_DIR:-outputs/sweeps/mosbach2023}
grid=sweeps/grids/mosbach2023.yaml
multiruns=$(python -m ctxdistill.grids overrides "$grid" ${MODELS:+"model=$MODELS"} ${PATTERNS:+"dataset.pattern=$PATTERNS"}) || exit 2
mapfile -t multiruns <<< "$multiruns"
source sweeps/each_dataset.sh "$@"
ctxdistill-compare "$root" --out "$root" --by dataset.pattern || failed  # a row per pattern, data seeds averaged
exit $status
