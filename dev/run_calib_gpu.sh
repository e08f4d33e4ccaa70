#!/bin/bash
# Device run for the calibration on the GPU (issue 12), from binaries built here and carried
# in build-pack/bin.tar.xz (dev/pack_device.sh; unpack it first). Logs go to $OUT.
#   bash dev/run_calib_gpu.sh tests mixlm 1b
# tests: the GPU calibration tests (CalibGpu*, CalibGpuBackward*);
# mixlm: spear calibrate --objective static on mixlm-19m with --device cpu and cuda (same
#        options: 32 statistics windows, the guard on 4), both reports and the perplexity of each
#        artifact (GPU engine);
# 1b:    spear calibrate --device cuda on a random Llama-3.2-1B-shaped checkpoint (real shapes)
#        at issue 12's target setting (256 windows of 512 tokens, 3 epochs, 2% budget): the
#        stage timings of the report (STATIC_DEVICE=cpu: the static control on the host).
set -o pipefail
OUT=${OUT:-/tmp/spear-out}; mkdir -p "$OUT"
B=$PWD/build-bin; D=$B/data
export LD_LIBRARY_PATH=$B/lib:/usr/local/cuda/lib64:$LD_LIBRARY_PATH
# cuSOLVER may come only with PyTorch's CUDA wheels on the device image.
if ldd $B/spear | grep -q "libcusolver.*not found"; then
  so=$(find / -name 'libcusolver.so.12*' -not -path '*/proc/*' 2>/dev/null | head -1)
  [ -n "$so" ] && export LD_LIBRARY_PATH=$(dirname "$so"):$LD_LIBRARY_PATH
fi
ldd $B/spear | grep "not found"
export SPEAR_SHARED_DIR=$D OMP_WAIT_POLICY=passive SPEAR_CLI=$B/spear
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
MIX=$D/models/mixlm-19m
for mode in "$@"; do case $mode in
tests)
  nvidia-smi --query-gpu=name,memory.used --format=csv | tee "$OUT/gpu.txt"
  timeout ${TESTS_TIMEOUT:-240} $B/spear_cuda_tests --gtest_filter='CalibGpu*' >"$OUT/calib_gpu_tests.log" 2>&1
  echo "CalibGpu tests rc=$?"
  grep -E "^\[  (PASSED|FAILED|SKIPPED)|Failure|\[  FAILED" "$OUT/calib_gpu_tests.log" | head -30 ;;
mixlm)
  $B/spear quantize --model $MIX --out /tmp/mix-w4.spear >/dev/null 2>&1
  for dev in cpu cuda; do
    /usr/bin/time -f "calibrate $dev %e s, peak %M KB" $B/spear calibrate --device $dev $([ $dev = cuda ] && echo --static-device cuda) --model $MIX \
      --quantized /tmp/mix-w4.spear --calib $D/wiki.test.tokens --calib-offset 200000 --calib-windows 40 \
      --objective static --budget 0.02 --report-json "$OUT/calib-mixlm-$dev.json" --out /tmp/mix-ec-$dev.spear \
      >"$OUT/calib-mixlm-$dev.log" 2>&1
    echo "calibrate mixlm $dev rc=$?: $(tail -1 "$OUT/calib-mixlm-$dev.log")"
    echo "ppl $dev-calibrated $($B/spear ppl --device cuda --model /tmp/mix-ec-$dev.spear --data $D/wiki.test.tokens \
      --ctx 512 --max-windows 40 --json 2>>"$OUT/ppl.err")" | tee -a "$OUT/ppl.txt"
  done ;;
1b)
  $B/spear make-checkpoint --config llama-3.2-1b --out /tmp/ck1b >"$OUT/make1b.log" 2>&1
  /usr/bin/time -f "quantize 1b %e s, peak %M KB" $B/spear quantize --model /tmp/ck1b --out /tmp/1b-w4.spear >"$OUT/quantize1b.log" 2>&1
  echo "1b checkpoint and W4: rc=$?; $(tail -1 "$OUT/quantize1b.log")"
  /usr/bin/time -f "calibrate 1b cuda %e s, peak %M KB" timeout ${CALIB_TIMEOUT:-330} $B/spear calibrate --device cuda --static-device ${STATIC_DEVICE:-cuda} \
    --model /tmp/ck1b --quantized /tmp/1b-w4.spear --calib $D/wiki.test.tokens --calib-windows 256 \
    --epochs 3 --budget 0.02 --report-json "$OUT/calib-1b.json" --out /tmp/1b-ec.spear \
    >"$OUT/calib-1b.log" 2>&1
  echo "calibrate 1b cuda rc=$?"; tail -4 "$OUT/calib-1b.log"
  grep -o '"seconds[a-z_]*":[0-9.e+-]*' "$OUT/calib-1b.json" ;;
*) echo "unknown mode $mode"; exit 2 ;;
esac; done
