#!/usr/bin/env bash
# Why Meta-ICT does not help on the unseen task offline (docs/papers/huang2022.md#meta-ict-what-the-students-answer):
# the ICT student (trained on sentiment, size and living, evaluated every 16 steps on temperature) and the untrained
# student, each evaluated on the temperature task with its own answer words (" up"/" down") and with the answer
# words of two source tasks (" zip"/" pop" from size, " foo"/" bar" from sentiment), instruction included. Per-class
# accuracies say which word each student gives.
#
#   bash sweeps/huang2022_meta_words.sh [Hydra overrides for every run]
#
# Running it again skips what is done.
set -euo pipefail
source "$(dirname "$0")/usage.sh"
[[ ${SWEEP_DIR:-/} = /* ]] || SWEEP_DIR=$PWD/$SWEEP_DIR  # where the user is, not the repository root
cd "$(dirname "$0")/.."
root=${SWEEP_DIR:-outputs/sweeps/huang2022_meta_words}
words() {  # the temperature task answered with " $1" (hot) and " $2" (cold)
  printf '%s\n' "dataset.eval_tasks.temperature.verbalizers=[' $1',' $2']" \
    "dataset.eval_tasks.temperature.context.instruction='Is the thing hot or cold? Answer \" $1\" if it is hot and \" $2\" if it is cold.'"
}
extra=("$@")
[ -f "$root/ict/metrics.json" ] ||
  ctxdistill experiment=huang2022/meta_ict method=ict trainer.eval_every=16 logger=none "output_dir=$root/ict" "${extra[@]}"
for pair in "zip pop" "foo bar" "up down"; do
  read -r hot cold <<<"$pair"
  mapfile -t with_words < <(words "$hot" "$cold")
  [ -f "$root/untrained_${hot}_$cold/metrics.json" ] || ctxdistill experiment=huang2022/meta_ict method=icl logger=none \
    "${with_words[@]}" "output_dir=$root/untrained_${hot}_$cold" "${extra[@]}"
  # the ICT run's own evaluation is the one with its own words
  [ "$hot" = up ] || [ -f "$root/ict/evaluations/words_${hot}_$cold/metrics.json" ] ||
    ctxdistill-eval "$root/ict" "${with_words[@]}" --name "words_${hot}_$cold" >/dev/null
done
python - "$root" <<'PY'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
print("student    words      accuracy  hot (label 0)  cold (label 1)  majority")
for words in ("up_down", "zip_pop", "foo_bar"):
    ict = root / "ict" if words == "up_down" else root / "ict" / "evaluations" / f"words_{words}"
    for student, path in (("untrained", root / f"untrained_{words}"), ("ict", ict)):
        m = json.loads((path / "metrics.json").read_text())["metrics"]
        t = lambda k: m[f"temperature/{k}"]
        print(f"{student:10} {words:10} {t('accuracy'):8.3f}  {t('accuracy_label0'):13.3f}  {t('accuracy_label1'):14.3f}  {t('majority_rate'):8.3f}")
PY
