#!/usr/bin/env bash
# Li et al. 2024 on a CPU: the auxiliary weight alpha (method.aux_weight; 0 = the student without the auxiliary
# task) swept over {0, 0.1, 0.5, 1} x seeds 0-2 for both students on the WN18RR subsample: MiniLM-L6 KG-BERT
# with reconstruction, and the bundled SmolLM2 decoder with contextualization. Sized for two shared CPU cores:
# 32 training triples (2 epochs, batches of 16), 20 test triples ranked head and tail against 20 sampled
# entities each. The contexts of those triples first (stage 1, once; 128 covers NUM_TRAIN up to 128):
#   ctxdistill experiment=li2024/wn18rr_subsample method=contextualization model=smollm2-135m \
#     dataset.source.data_dir=PATH/wn18rr/kgbert_format method.max_new_tokens=64 dataset.num_train=128
#   DATA=PATH/wn18rr/kgbert_format bash sweeps/li2024_alpha.sh [overrides]
# ALPHAS, SEEDS and NUM_TRAIN (training triples) change the grid; STUDENTS="minilm" or "smollm2" runs one student:
#   STUDENTS=minilm ALPHAS=0.01,0.03 DATA=... bash sweeps/li2024_alpha.sh                  # MiniLM, smaller weights
#   STUDENTS=smollm2 NUM_TRAIN=128 SWEEP_DIR=outputs/sweeps/li2024_alpha_128 DATA=... \
#     bash sweeps/li2024_alpha.sh                                                       # the decoder, 4x the triples
# Then the table of means and 95% intervals over the seeds:
#   ctxdistill-compare outputs/sweeps/li2024_alpha --by method.aux_weight
set -euo pipefail
source "$(dirname "$0")/usage.sh"
[[ ${SWEEP_DIR:-/} = /* ]] || SWEEP_DIR=$PWD/$SWEEP_DIR  # where the user is, not the repository root
data=${DATA:?set DATA to the WN18RR kgbert_format directory}
[[ $data = /* ]] || data=$PWD/$data
[ -d "$data" ] || { echo "DATA=$data: no such directory; set DATA to the WN18RR kgbert_format directory" >&2 && exit 2; }
cd "$(dirname "$0")/.."
root=${SWEEP_DIR:-outputs/sweeps/li2024_alpha}
students=${STUDENTS:-minilm smollm2}
for student in $students; do  # before any runs: a misspelt one would stop the grid after the students before it
  [[ " minilm smollm2 " == *" $student "* ]] || { echo "STUDENTS: unknown student $student; they are minilm smollm2" >&2 && exit 2; }
done
common=(
  "dataset.source.data_dir=$data"
  "dataset.num_train=${NUM_TRAIN:-32}" dataset.num_eval=20 dataset.eval_candidates=20 trainer.epochs=2
  trainer.batch_size=16 "method.aux_weight=${ALPHAS:-0,0.1,0.5,1}" "seed=${SEEDS:-0,1,2}"
)
for student in $students; do
  case $student in
    minilm) ctxdistill -m experiment=li2024/wn18rr_subsample method=kgbert_cd "${common[@]}" \
      "hydra.sweep.dir=$root/minilm" "$@" ;;
    smollm2) ctxdistill -m experiment=li2024/wn18rr_subsample_decoder method=kg_decoder_cd "${common[@]}" \
      "hydra.sweep.dir=$root/smollm2" "$@" ;;
  esac
done
