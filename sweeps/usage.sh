# Sourced first by each sweep script: -h or --help prints the script's opening comment (what it runs, its variables)
# and exits, instead of passing --help on as a Hydra override; and `command || failed`, below.
for arg; do
  [[ $arg = -h || $arg = --help ]] && { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" && exit 0; }
done

# After a command that failed: a refusal (2, said once: every later multirun would repeat it) or a stop (130 Ctrl-C,
# 143 SIGTERM: the commands catch them to save their work and exit) ends the script with that status; any other
# failure (a cell that failed) sets status=1, and the script goes on to the next multirun.
failed() {
  local code=$?
  case $code in 2 | 130 | 143) exit "$code" ;; esac
  status=1
}
