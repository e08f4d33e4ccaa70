#!/bin/bash
# A device session without a build: GPU tests, compute-sanitizer on the small cases and the
# benchmark, from binaries built on the development machine (nvcc needs no GPU) and carried
# in build-bin/ (git-ignored): spear_cuda_tests, bench_w4a16. Logs to $OUT.
#   bash dev/run_prebuilt.sh [decode|quick|full]
set -o pipefail
MODE=${1:-decode}
OUT=${OUT:-/tmp/spear-out}
mkdir -p "$OUT"
B=build-bin
# the host libraries the binaries were linked against (OpenBLAS, PCRE2, libstdc++, ...);
# cuBLAS comes from the machine's CUDA
export LD_LIBRARY_PATH=$PWD/$B/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib:$LD_LIBRARY_PATH
ldd $B/bench_w4a16 | grep "not found"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,clocks.max.sm,power.draw,memory.used --format=csv | tee "$OUT/gpu.txt"
timeout ${TEST_TIMEOUT:-60} $B/spear_cuda_tests >"$OUT/cuda_tests.log" 2>&1; echo "spear_cuda_tests rc=$?"
grep -E "^\[  (PASSED|FAILED|SKIPPED)|Failure|error:" "$OUT/cuda_tests.log" | head -30
ARGS="--md $OUT/bench.md --cache $OUT/w4a16-cache.txt"
[ "$MODE" = "quick" ] && ARGS="--quick $ARGS"
[ "$MODE" = "decode" ] && ARGS="--decode $ARGS"
timeout ${BENCH_TIMEOUT:-300} $B/bench_w4a16 $ARGS >"$OUT/bench.log" 2>&1; echo "bench rc=$?"
grep -E "^- |ceiling|checks failed|CHECK FAILED" "$OUT/bench.log" | tail -40
timeout ${SAN_TIMEOUT:-60} compute-sanitizer --tool memcheck $B/spear_cuda_tests --gtest_filter='*OddShapes*:*IdentityGate*' >"$OUT/sanitizer.log" 2>&1
echo "compute-sanitizer rc=$? :"; grep -E "ERROR SUMMARY|PASSED|FAILED" "$OUT/sanitizer.log" | tail -3
