#!/usr/bin/env bash
# Runs every test: the C++ unit tests (GoogleTest, built with AddressSanitizer and
# UndefinedBehaviorSanitizer) and the Python tests (pytest). Sets everything up first.
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
"$PY" -m pytest -q tests/python "$@"
