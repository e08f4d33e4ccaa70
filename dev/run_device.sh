#!/bin/bash
# One device-machine session of the kernel lab: configure, build, CPU + GPU tests,
# compute-sanitizer on a small case, and the benchmark. Logs go to $OUT.
#   bash dev/run_device.sh [quick|full|tests]
# Needs the carried dependencies in .carry/deps (PCRE2, GoogleTest, nlohmann_json, CLI11;
# see dev/README.md). Tries the top-level CMake first, then dev/CMakeLists.txt.
set -o pipefail
MODE=${1:-quick}
OUT=${OUT:-/tmp/spear-out}
mkdir -p "$OUT"
DEPS=$PWD/.carry/deps/usr
export PKG_CONFIG_PATH=$DEPS/lib/x86_64-linux-gnu/pkgconfig:$DEPS/share/pkgconfig
export LD_LIBRARY_PATH=$DEPS/lib/x86_64-linux-gnu:$LD_LIBRARY_PATH
export CMAKE_PREFIX_PATH=$DEPS
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,clocks.max.sm,power.draw,memory.used --format=csv | tee "$OUT/gpu.txt"
nvcc --version | tail -1; cmake --version | head -1
B=build-gpu
if cmake -S . -B $B -DSPEAR_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a -DCMAKE_BUILD_TYPE=Release >"$OUT/cmake.log" 2>&1; then
  echo "top-level CMake configure: OK"
  TARGETS="spear_cuda_tests bench_w4a16 spear_tests"
else
  echo "top-level CMake configure FAILED (see cmake.log):"; grep -E "Error|not found|No package" -A2 "$OUT/cmake.log" | head -12
  B=build-dev
  cmake -S dev -B $B -DCMAKE_BUILD_TYPE=Release >>"$OUT/cmake.log" 2>&1 || { echo "dev configure failed"; tail -30 "$OUT/cmake.log"; exit 1; }
  echo "dev/ standalone configure: OK"
  TARGETS="spear_cuda_tests bench_w4a16 spear_quant_tests"
fi
for t in $TARGETS; do
  cmake --build $B -j16 --target $t >>"$OUT/build.log" 2>&1 && echo "built $t" || { echo "BUILD FAILED: $t"; grep -E "error" "$OUT/build.log" | head -20; }
done
find_bin() { find $B -type f -name "$1" -perm -u+x | head -1; }
QT=$(find_bin spear_quant_tests); [ -z "$QT" ] && QT=$(find_bin spear_tests)
[ -n "$QT" ] && $QT --gtest_filter='Quant*:CudaRepack*' 2>&1 | tail -4 | tee "$OUT/cpu_tests.log"
CT=$(find_bin spear_cuda_tests)
if [ -n "$CT" ]; then
  timeout 300 $CT >"$OUT/cuda_tests.log" 2>&1; TRC=$?
  echo "spear_cuda_tests rc=$TRC"; grep -E "^\[  (PASSED|FAILED|SKIPPED)|Failure|error:" "$OUT/cuda_tests.log" | head -30
  [ $TRC -ne 0 ] && [ "$MODE" != "force" ] && { echo "GPU tests failed: benchmark not run"; exit 1; }
  if true; then
    timeout 120 compute-sanitizer --tool memcheck $CT --gtest_filter='*OddShapes*:*IdentityGate*' >"$OUT/sanitizer.log" 2>&1
    echo "compute-sanitizer rc=$? :"; grep -E "ERROR SUMMARY|PASSED|FAILED" "$OUT/sanitizer.log" | tail -3
  fi
fi
BW=$(find_bin bench_w4a16)
if [ -n "$BW" ] && [ "$MODE" != "tests" ]; then
  ARGS="--md $OUT/bench.md --cache $OUT/w4a16-cache.txt"; [ "$MODE" = "quick" ] && ARGS="--quick $ARGS"
  timeout 480 $BW $ARGS >"$OUT/bench.log" 2>&1; echo "bench rc=$?"
  grep -E "^- |ceiling" "$OUT/bench.log" | tail -60
fi
