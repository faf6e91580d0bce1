# Sourced by the paper scripts once they have set `root` (the sweep directory), `grid` (the grid file) and
# `multiruns` (the grid's multiruns, a line of overrides each: more than one where a model has settings of its
# own): checks every dataset's data paths, then runs each multirun per experiment of the grid into $root/DATASET
# with that dataset's DATASET_ARGS (e.g. QQP_ARGS) and the script's arguments.
# Leaves `status` 1 if a cell failed; exits 2 if a sweep was refused with a message, 130 or 143 if stopped (`failed`).
experiments=$(python -m ctxdistill.grids experiments "$grid") || exit 2
python -m ctxdistill.grids arguments "$grid" -- "$@" || exit 2  # a grid key given as an argument would replace it
dataset_args=()
for experiment in $experiments; do
  dataset=${experiment##*/}
  args_var="${dataset^^}_ARGS"
  # shellcheck disable=SC2206  # the per-dataset overrides are meant to split on spaces
  dataset_args+=(${!args_var:-})
done
# every dataset's data paths before any cell: a wrong one in QQP_ARGS would otherwise stop the sweep after MNLI's
python -m ctxdistill.launch_checks "${dataset_args[@]}" "$@" || exit 2
status=0
for experiment in $experiments; do
  dataset=${experiment##*/}
  args_var="${dataset^^}_ARGS"
  for multirun in "${multiruns[@]}"; do
    read -ra params <<< "$multirun"
    # shellcheck disable=SC2086  # the per-dataset overrides are meant to split on spaces
    ctxdistill -m "experiment=$experiment" "${params[@]}" ${!args_var:-} "hydra.sweep.dir=$root/$dataset" "$@" ||
      failed
  done
done
