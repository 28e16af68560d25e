#!/usr/bin/env bash
# Runs every test: the C++ unit tests (GoogleTest, built with AddressSanitizer and
# UndefinedBehaviorSanitizer), a short run of every fuzz target (scripts/fuzz.sh --smoke) and the
# Python tests (pytest). Sets everything up first.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

VENV="$(realpath "${ARROWQUANT_VENV:-.venv}")"
PY="$VENV/bin/python"
BUILD=build/tests

echo "==> C++ tests (sanitizers on)"
"$VENV/bin/cmake" -S . -B "$BUILD" -G Ninja -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DARROWQUANT_SANITIZE=ON -DBUILD_TESTING=ON \
  -DARROWQUANT_PYTHON=OFF -DPython_EXECUTABLE="$PY" >/dev/null
"$VENV/bin/cmake" --build "$BUILD" -j "$(nproc)"
"$VENV/bin/ctest" --test-dir "$BUILD" --output-on-failure -j "$(nproc)"

echo "==> Python tests"
# PyTorch (CPU) for the calibration tests: an optional extra for users, required here so those
# tests run rather than skip. 2.13.0 is the CPU build this machine kind keeps on disk.
# gguf (gguf-py) and ggml-python: the independent decoders (and llama.cpp's encoder) that the
# ggml-scheme tests hold our bytes against. ggml-python builds ggml from source the first time
# (about a minute; pip caches the wheel). diffusers and compressed-tensors (pure Python): the
# consumers whose own loader and decompressor the export tests read our files with; diffusers'
# GGUF loader needs accelerate (low_cpu_mem_usage).
# Ray: the cluster tests start a two-node cluster on this machine (tests/python/test_cluster.py).
# matplotlib draws the quality report's plots; Debian's chromium renders the page in the report
# tests (tests/python/test_report.py).
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0" "gguf>=0.10" "ggml-python>=0.0.40" \
  "diffusers==0.42.1" "accelerate==1.15.0" "compressed-tensors==0.20.0" "ray==2.60.0" "matplotlib>=3.7" \
  2>&1 | grep -v "^WARNING: Location" || true
if ! command -v chromium >/dev/null 2>&1; then
  echo "==> installing chromium (headless rendering of the report in the tests)"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

# libFuzzer targets (fuzz/): clang build with ASan + UBSan, then each target a short run
# (scripts/fuzz.sh --smoke; ARROWQUANT_SKIP_FUZZ=1 skips it). After the installs above: the
# calibration seeds are written by arrow_quant_v2.calibration, which needs PyTorch.
if [ "${ARROWQUANT_SKIP_FUZZ:-0}" != "1" ]; then
  echo "==> fuzz smoke"
  ./scripts/fuzz.sh --smoke
fi

"$PY" -m pytest -q tests/python "$@"
