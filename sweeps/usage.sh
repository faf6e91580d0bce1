# Sourced first by each sweep script: -h or --help prints the script's opening comment (what it runs, its variables)
# and exits, instead of passing --help on as a Hydra override.
for arg; do
  [[ $arg = -h || $arg = --help ]] && { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" && exit 0; }
done
