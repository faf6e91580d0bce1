#!/usr/bin/env bash
# Scratchpad distillation with a teacher that can add
# (docs/papers/context-distillation.md#a-teacher-that-can-add-fine-tuned-first):
# stage 1 fine-tunes the bundled SmolLM2 on 500 worked additions (experiment=addition_teacher); stage 2 uses the
# result as teacher and student: zero_shot (the student before distillation), icl (the teacher, writing its
# scratchpad) and scratchpad (the student after, trained on the teacher's greedy answers), then the table.
#
#   bash sweeps/snell2022_addition.sh              # both stages into outputs/snell2022_addition
#   SEEDS=0,1,2 bash sweeps/snell2022_addition.sh  # stage 2 over several seeds (one teacher)
#
# Extra arguments are Hydra overrides for every run. Running it again skips complete runs.
set -uo pipefail
source "$(dirname "$0")/usage.sh"
[[ ${SWEEP_DIR:-/} = /* ]] || SWEEP_DIR=$PWD/$SWEEP_DIR  # where the user is, not the repository root
cd "$(dirname "$0")/.."
root=${SWEEP_DIR:-outputs/snell2022_addition}
seeds=${SEEDS:-0}
status=0
ctxdistill experiment=addition_teacher "hydra.run.dir=$root/teacher" "$@" || exit  # its status: stage 2 needs it
stage2=(experiment=addition_distill "model.name_or_path=$root/teacher/model" model.name=smollm2-135m-addition-ft
  "seed=$seeds" "hydra.sweep.dir=$root/distill")
ctxdistill -m "${stage2[@]}" method=zero_shot,icl "$@" || failed
ctxdistill -m "${stage2[@]}" method=scratchpad method.num_samples=1 method.temperature=0 "$@" || failed
ctxdistill-compare "$root/distill" --out "$root/distill" || failed
exit $status
