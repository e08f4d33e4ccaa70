#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan+UBSan) and runs each for N seconds.
#   fuzz/run.sh [seconds=180] [target...]     targets: safetensors config tokenizer request chat_template spear safetensors_index http_framer
# New corpus entries go to $BUILD/corpus/<target> (fuzz/corpus stays the small seed
# set); crashes, timeouts and OOMs go to $BUILD/artifacts/<target>/.
#   RUNS=N      stop each target after N executions (-runs) instead of at the time limit
#   TIMEOUT=S   seconds one input may take before it is a hang (default 10; raise it on a
#               machine shared with builds, where a stalled process trips it)
set -uo pipefail
secs=${1:-180}
shift $(( $# > 0 ? 1 : 0 ))
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(safetensors config tokenizer request chat_template spear safetensors_index http_framer)
root=$(cd "$(dirname "$0")/.." && pwd)
build=${SPEAR_FUZZ_BUILD:-$root/build-fuzz}

CC=clang CXX=clang++ cmake -S "$root" -B "$build" -DSPEAR_FUZZ=ON -DSPEAR_CUDA=OFF \
  -DSPEAR_BUILD_TESTS=OFF -DSPEAR_BUILD_BENCH=OFF >/dev/null || exit 1
cmake --build "$build" -j"${JOBS:-2}" --target $(printf 'fuzz_%s ' "${targets[@]}") || exit 1

summary=()
status=0
for t in "${targets[@]}"; do
  work=$build/corpus/$t
  art=$build/artifacts/$t
  mkdir -p "$work" "$art"
  log=$build/fuzz_$t.log
  echo "== fuzz_$t for ${secs}s (log: $log)"
  # -timeout: one input taking 10 s is a hang; -rss_limit_mb: a blow-up is a finding.
  "$build/fuzz/fuzz_$t" "$work" "$root/fuzz/corpus/$t" -max_total_time="$secs" ${RUNS:+-runs=$RUNS} \
    -timeout="${TIMEOUT:-10}" -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix="$art/" \
    >"$log" 2>&1
  rc=$?
  execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | awk '{print $2}')
  took=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | tail -1 | awk '{print $5}')
  findings=$(find "$art" -type f | wc -l)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | awk '{print $2}')
  if [ "$rc" -ne 0 ] || [ "$findings" -ne 0 ]; then
    status=1
    grep -E 'ERROR|SUMMARY|uncaught|Test unit written' "$log" | head -5
  fi
  summary+=("$(printf '%-12s %6ss %12s execs %6s cov  %s findings (exit %s)' \
    "$t" "${took:-?}" "${execs:-?}" "${cov:-?}" "$findings" "$rc")")
done
printf '%s\n' "${summary[@]}"
exit $status
