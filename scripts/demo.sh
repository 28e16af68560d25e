#!/usr/bin/env bash
# The main job on the built-in default model: sets everything up, generates a small
# diffusers-layout pipeline (bf16, convolutions, attention, norms, biases), quantizes it with
# each deployment profile, validates each result from the files, and prints a summary table.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >&2
VENV="${ARROWQUANT_VENV:-.venv}"
exec "$VENV/bin/arrowquant" demo "$@"
