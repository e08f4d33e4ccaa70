#!/bin/bash
# One device call for issues 11 and 12 (binaries from dev/pack_device.sh; unpack first):
#   bash dev/run_session_gpu.sh
# 1. the GPU calibration tests; 2. the default calibration of mixlm-19m at 2% on the GPU with
# the GPU static control, scored on the whole wiki.test.raw (compare: the CPU run of the same
# command, docs/RESULTS.md); 3. the llama-3.2-1b-shaped calibration at issue 12's setting;
# 4. GPTQ of the 1B shape on the host's cores, for what time is left.
# Bounds (seconds): TESTS 150, the mixlm calibration 150, CALIB_1B_TIMEOUT 240, GPTQ_TIMEOUT 100 (0: skip).
OUT=${OUT:-/tmp/spear-out}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
TESTS_TIMEOUT=150 bash dev/run_calib_gpu.sh tests
ROWS=defaults CALIB_TIMEOUT=150 bash dev/run_ablation_gpu.sh 0.02 60
CALIB_TIMEOUT=${CALIB_1B_TIMEOUT:-240} bash dev/run_calib_gpu.sh 1b
B=$PWD/build-bin
[ "${GPTQ_TIMEOUT:-100}" = 0 ] && exit 0  # GPTQ_TIMEOUT=0: no GPTQ run
LD_LIBRARY_PATH=$B/lib:$LD_LIBRARY_PATH /usr/bin/time -f "gptq 1b %e s, peak %M KB" timeout ${GPTQ_TIMEOUT:-100} \
  $B/spear quantize --method gptq --model /tmp/ck1b --calib $B/data/wiki.test.tokens --out /tmp/1b-gptq.spear \
  >"$OUT/gptq1b.log" 2>&1
tail -3 "$OUT/gptq1b.log"
