#!/bin/bash
# Packs binaries built here (nvcc needs no GPU) for a device session without a build:
# build-pack/bin.tgz holds build-bin/ with the stripped spear and spear_cuda_tests, and the
# host libraries they link that the device image may lack (cpp-httplib, brotli, OpenBLAS
# with gfortran/quadmath, PCRE2); cuBLAS/cudart come from the device's CUDA. With
# --data, also the inputs of the end-to-end GPU checks (mixlm-19m, its evaluation texts,
# artifacts made here) under build-bin/data. The device command:
#   tar xzf build-pack/bin.tgz && bash dev/run_gpu_engine.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf build-bin build-pack
mkdir -p build-bin/lib build-pack
cp build/spear build/tests/spear_cuda_tests build-bin/
[ -f build/bench/bench_w4a16 ] && cp build/bench/bench_w4a16 build-bin/
strip build-bin/spear build-bin/spear_cuda_tests build-bin/bench_w4a16 2>/dev/null || true
for l in $(ldd build/spear build/tests/spear_cuda_tests | awk '/=>/{print $3}' | sort -u |
           grep -E "httplib|brotli|openblas|gfortran|quadmath|pcre2"); do
  cp -L "$l" build-bin/lib/
done
if [ "${1:-}" = "--data" ]; then
  shift
  mkdir -p build-bin/data
  for f in "$@"; do cp -rL "$f" build-bin/data/; done
fi
tar czf build-pack/bin.tgz build-bin
du -sh build-pack/bin.tgz
