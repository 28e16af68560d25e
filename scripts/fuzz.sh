#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, clang with ASan + UBSan) in build/fuzz and runs them.
#
#   ./scripts/fuzz.sh --smoke            each target a short fixed run (what scripts/test.sh and CI run)
#   ./scripts/fuzz.sh --bench [N]        N executions in total (default 10000000), one target at a
#                                        time: the slow targets FUZZ_BENCH_SECONDS (60) each, the two
#                                        fast ones the rest; prints executions and exec/s per target
#   ./scripts/fuzz.sh --build            build only
#   ./scripts/fuzz.sh --run TARGET [libFuzzer args...]   one target on its corpus, as long as you like
#
# Installs clang and its libFuzzer runtime with apt when they are missing (as scripts/setup.sh does
# for its packages). Seed corpora are generated, never committed: fuzz/make_seeds.cpp (the C++
# writers) and fuzz/make_calibration_seeds.py (the Python package's calibration writer). A crash
# leaves its input in build/fuzz/artifacts/ and fails the script; fuzz/README.md says how to turn
# it into a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE="${1:---smoke}"
shift || true
VENV="$(realpath "${ARROWQUANT_VENV:-.venv}")"
PY="$VENV/bin/python"
BUILD=build/fuzz
TARGETS=(tensor_decode weights_parquet safetensors export_requantize calibration_parquet manifest_json)
SMOKE_SECONDS="${FUZZ_SMOKE_SECONDS:-10}"  # per target
JOBS="$(nproc)"

# --- clang + libFuzzer ---------------------------------------------------------------------
CXX_FUZZ="${FUZZ_CXX:-clang++}"
have_libfuzzer() {
  command -v "$CXX_FUZZ" >/dev/null 2>&1 || return 1
  local rt
  rt="$("$CXX_FUZZ" -print-resource-dir 2>/dev/null)/lib/linux/libclang_rt.fuzzer-x86_64.a"
  [ -f "$rt" ]
}
if ! have_libfuzzer; then
  echo "==> installing clang and libFuzzer (clang, libclang-rt-14-dev)"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq clang libclang-rt-14-dev >/dev/null
  have_libfuzzer || { echo "clang++ with libFuzzer is still missing" >&2; exit 1; }
fi

# --- build -----------------------------------------------------------------------------------
echo "==> building the fuzz targets ($BUILD)"
start=$(date +%s)
"$VENV/bin/cmake" -S . -B "$BUILD" -G Ninja -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" \
  -DCMAKE_CXX_COMPILER="$CXX_FUZZ" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DARROWQUANT_FUZZ=ON \
  -DBUILD_TESTING=OFF -DARROWQUANT_PYTHON=OFF -DPython_EXECUTABLE="$PY" >/dev/null
"$VENV/bin/cmake" --build "$BUILD" -j "$JOBS"
echo "    built in $(( $(date +%s) - start )) s"
[ "$MODE" = "--build" ] && exit 0

export ARROW_DEFAULT_MEMORY_POOL=system
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

# --- seed corpora ----------------------------------------------------------------------------
SEEDS="$BUILD/seeds"
if [ ! -f "$SEEDS/.done" ] || [ "$BUILD/fuzz/fuzz_make_seeds" -nt "$SEEDS/.done" ] ||
   [ fuzz/make_calibration_seeds.py -nt "$SEEDS/.done" ]; then
  echo "==> writing seed corpora ($SEEDS)"
  rm -rf "$SEEDS"
  "$BUILD/fuzz/fuzz_make_seeds" "$SEEDS" >/dev/null
  "$PY" fuzz/make_calibration_seeds.py "$SEEDS/calibration_parquet"
  touch "$SEEDS/.done"
fi
mkdir -p "$BUILD/artifacts"

# Runs one target: its working corpus (new inputs land there), then its seeds.
run_target() {
  local t="$1"
  shift
  mkdir -p "$BUILD/corpus/$t"
  "$BUILD/fuzz/fuzz_$t" -artifact_prefix="$BUILD/artifacts/$t-" -rss_limit_mb=3072 -timeout=20 \
    -print_final_stats=1 "$@" "$BUILD/corpus/$t" "$SEEDS/$t"
}

case "$MODE" in
  --smoke)
    echo "==> fuzz smoke: ${#TARGETS[@]} targets, ${SMOKE_SECONDS} s each"
    for t in "${TARGETS[@]}"; do
      log="$BUILD/smoke-$t.log"
      if ! run_target "$t" -seed=1 -max_total_time="$SMOKE_SECONDS" >"$log" 2>&1; then
        tail -60 "$log" >&2
        echo "fuzz target $t failed (log $log, input in $BUILD/artifacts/)" >&2
        exit 1
      fi
      printf '    %-20s %10s runs  %8s exec/s\n' "$t" \
        "$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")" "$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")"
    done
    ;;
  --bench)
    # The slow targets (a Parquet file opened, a model directory discovered, or an encoder's search
    # per execution) run FUZZ_BENCH_SECONDS each (default 60); the fast structured ones share the
    # rest of the budget by executions.
    TOTAL="${1:-10000000}"
    SLOW_SECONDS="${FUZZ_BENCH_SECONDS:-60}"
    SLOW=(weights_parquet export_requantize calibration_parquet manifest_json)
    FAST=(tensor_decode safetensors)
    echo "==> fuzz benchmark: $TOTAL executions in total, one target at a time ($(date -u +%FT%TZ), $(nproc) cores)"
    sum=0
    bench_one() {  # target, libFuzzer limit
      local t="$1" limit="$2" log="$BUILD/bench-$1.log" t0 status=0 runs rate
      t0=$(date +%s)
      run_target "$t" -seed=1 "$limit" >"$log" 2>&1 || status=$?
      runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
      rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")"
      printf '    %-20s %10s runs  %8s exec/s  %6s s  exit %s  corpus %s\n' "$t" "${runs:-?}" "${rate:-?}" \
        "$(( $(date +%s) - t0 ))" "$status" "$(ls "$BUILD/corpus/$t" | wc -l)"
      sum=$(( sum + ${runs:-0} ))
      if [ "$status" -ne 0 ]; then
        tail -60 "$log" >&2
        echo "fuzz target $t failed (log $log, input in $BUILD/artifacts/)" >&2
        exit 1
      fi
    }
    for t in "${SLOW[@]}"; do bench_one "$t" -max_total_time="$SLOW_SECONDS"; done
    left=$(( TOTAL - sum ))
    [ "$left" -lt 0 ] && left=0
    for i in "${!FAST[@]}"; do
      n=$(( left / (${#FAST[@]} - i) ))
      bench_one "${FAST[$i]}" -runs="$n"
      left=$(( TOTAL - sum ))
      [ "$left" -lt 0 ] && left=0
    done
    echo "    total: $sum executions ($(date -u +%FT%TZ))"
    ;;
  --run)
    t="${1:?--run needs a target: ${TARGETS[*]}}"
    shift
    run_target "$t" "$@"
    ;;
  *)
    echo "usage: $0 --smoke | --bench [executions] | --build | --run TARGET [libFuzzer args]" >&2
    exit 2
    ;;
esac
