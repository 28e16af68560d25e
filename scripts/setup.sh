#!/usr/bin/env bash
# Installs everything ArrowQuant needs on a fresh Debian/Ubuntu machine and builds it:
# system packages (a C++ compiler, Python headers, GoogleTest, nlohmann-json, Eigen), a virtual environment in .venv (or $ARROWQUANT_VENV),
# the package itself (C++ core + Python API), and the build tools the C++ tests use.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${ARROWQUANT_VENV:-.venv}"
APT_PACKAGES=(g++ python3-dev python3-venv libgtest-dev nlohmann-json3-dev libeigen3-dev)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "==> installing system packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"

echo "==> installing build tools"
"$PY" -m pip install -q --disable-pip-version-check "scikit-build-core>=0.10" "nanobind>=2.4" "pyarrow==26.*" cmake ninja 2>&1 | grep -v "^WARNING: Location" || true

echo "==> building and installing arrow_quant_v2"
# No build isolation: the build uses this environment's pyarrow, the very one the package runs
# with, and keeps its build folder (build/) so a rebuild only compiles what changed.
# (A failed build must stop here: an earlier install would still import.)
set +e
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation ".[test]" 2>&1 | grep -v "^WARNING: Location"
status=${PIPESTATUS[0]}
set -e
[ "$status" -eq 0 ] || { echo "arrow_quant_v2 failed to build (pip exit status $status)" >&2; exit 1; }
"$PY" -c "import arrow_quant_v2" || { echo "arrow_quant_v2 failed to import" >&2; exit 1; }
echo "==> ready: $VENV/bin/arrowquant"
