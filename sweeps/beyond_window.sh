#!/usr/bin/env bash
# Beyond the context window (docs/papers/beyond-the-window.md): accuracy against the number of demonstrations
# (12, 24, 48: 1, 2, 4 contexts of 12) with the window capped at 400 tokens (one context) for icl (1 context),
# cd (every context at once), sequential_cd (one after another), ft on the same demonstrations, cd into a
# 40-token prefix (as many trainable parameters as LoRA r=8 on q/v) and cheat_sheet, and below the window
# (one context of 4 or 8 demonstrations) for icl, cd and ft, over seeds 0-2; each trained arm then evaluated
# on another generated task (forgetting); then the table and plot in $SWEEP_DIR/results.
#
#   bash sweeps/beyond_window.sh                       # every arm, one after another
#   ARMS="cd ft" bash sweeps/beyond_window.sh          # some arms (several such commands can run at once)
#   SEEDS=0 bash sweeps/beyond_window.sh               # one seed
#
# Extra arguments are Hydra overrides for every run. Running it again finishes an interrupted sweep: complete
# cells are skipped. Exits non-zero if any cell failed.
set -uo pipefail
source "$(dirname "$0")/usage.sh"
[[ ${SWEEP_DIR:-/} = /* ]] || SWEEP_DIR=$PWD/$SWEEP_DIR  # where the user is, not the repository root
cd "$(dirname "$0")/.."
root=${SWEEP_DIR:-outputs/sweeps/beyond_window}
seeds=${SEEDS:-0,1,2}
status=0
# Forgetting: the living task (animal or object?) with its instruction in the prompt, which the untrained
# model answers above chance; before = the untrained model, after = each trained run (ctxdistill-eval).
other_task=(dataset=synthetic_living "ood=[]" dataset.num_eval=64 dataset.context.num_contexts=1
  'dataset.student_instruction="Is the thing an animal? Answer \" yes\" if it is an animal and \" no\" if it is an object."')
sweep() {
  local arm=$1 trains=$2
  shift 2
  ctxdistill -m experiment=beyond_window "seed=$seeds" logger.group=beyond_window "hydra.sweep.dir=$root/runs/$arm" \
    "$@" "${overrides[@]}" || failed
  if [ "$trains" = trains ]; then
    ctxdistill-eval "$root/runs/$arm" "${other_task[@]}" --name forgetting >/dev/null || failed
  fi
}
overrides=("$@")
all_arms="icl cd sequential_cd ft cd_prefix cheat_sheet below_window"
arms=${ARMS:-$all_arms}
for arm in $arms; do  # before any arm runs: a misspelt one would stop the sweep after the arms before it
  [[ " $all_arms " == *" $arm "* ]] || { echo "ARMS: unknown arm $arm; the arms are $all_arms" >&2 && exit 2; }
done
for arm in $arms; do
  case $arm in
    # and below the window's 12: the curve's left side, where only the demonstrations' number changes
    icl) sweep icl - method=icl dataset.context.num_contexts=1 dataset.context.num_demos=4,8,12 ;;
    cd) sweep cd trains method=cd dataset.context.num_contexts=1,2,4 ;;
    sequential_cd) sweep sequential_cd trains method=sequential_cd dataset.context.num_contexts=2,4 ;;
    ft) sweep ft trains method=ft dataset.context.num_contexts=1,2,4 ;;
    cd_prefix) sweep cd_prefix trains method=cd model.adapter=prefix dataset.context.num_contexts=1,2,4 ;;
    # 4 demonstrations per request: all 12 (let alone 48) and the request overflow the 400-token window
    cheat_sheet) sweep cheat_sheet - method=cheat_sheet method.chunk_demos=4 dataset.context.num_contexts=1,2,4 ;;
    # cd and ft on one context of 4 or 8 demonstrations: the trained arms' side of the curve below the window
    below_window) sweep below_window trains method=cd,ft dataset.context.num_contexts=1 dataset.context.num_demos=4,8 ;;
  esac
done
# the untrained model on the other task, under the sweep's overrides as each forgetting evaluation (its model, say);
# run again, it is skipped when complete, and refused if made with other settings
ctxdistill experiment=beyond_window method=zero_shot "${overrides[@]}" "${other_task[@]}" logger=none \
  "output_dir=$root/before" || failed
python -m ctxdistill.learning_curve "$root/runs" --out "$root/results" --window-demos 12 --before "$root/before" || failed
exit $status
