#!/bin/bash
# Device run for "one model description" (issue 9), from binaries built here and carried in
# build-pack/bin.tar.xz (dev/pack_device.sh; unpack it first): the GPU tests; perplexity on CPU and GPU for the shipped
# and shared models; the cost of loading a Llama-2-7B-shaped bf16 checkpoint (random weights
# written by transformers) for --device cuda, with the binary from before the change
# (build-bin/spear-before) and after: peak host memory and wall time of `spear ppl --device
# cuda` over 2 windows. Logs and a JSON line per measurement go to $OUT.
#   bash dev/run_load_bench.sh tests ckpt7b load7b w4 fuse   (load7b and w4 need ckpt7b first)
# floor (decode-floor issue): bench-latency --breakdown at 7B and 1B, and prefill with and
# without the dequantize + cuBLAS path (--dequant-mb 0), same build, same run; kernels: bench_w4a16 --quick;
# batch: bench-latency at batch 1..64 with and without the batch kernel (SPEAR_W4A16_BATCH=0).
set -o pipefail
OUT=${OUT:-/tmp/spear-out}; mkdir -p "$OUT"
B=$PWD/build-bin; D=$B/data
export LD_LIBRARY_PATH=$B/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib:$LD_LIBRARY_PATH
export SPEAR_SHARED_DIR=$D OMP_WAIT_POLICY=passive SPEAR_CLI=$B/spear
# the test binaries find models/ and data/ under the source path they were built in
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
ldd $B/spear | grep "not found"
M=$PWD/models/stories260K-hf; TXT=$PWD/data/tinystories/tinystories_val.txt
CK=/tmp/llama-2-7b-bf16
MIX=$D/models/mixlm-19m
[ -f $D/mixlm-w4.spear ] || $B/spear quantize --model $MIX --out $D/mixlm-w4.spear >/dev/null
# A calibrated mixlm artifact (2% budget, 16 windows, 1 epoch: speed, not quality), also kept in $OUT.
calib_ec() {
  /usr/bin/time -f "calibrate %e s, peak %M KB" $B/spear calibrate --model $MIX --quantized $D/mixlm-w4.spear \
    --calib $D/wiki.test.tokens --calib-offset 200000 --calib-windows 16 --epochs 1 --budget 0.02 -q \
    --out $D/mixlm-ec.spear >"$OUT/calibrate.log" 2>&1 && cp $D/mixlm-ec.spear "$OUT/"
}
for mode in "$@"; do case $mode in
calib-bg)  # the calibration above in the background on 8 threads, for later modes
  OMP_NUM_THREADS=8 calib_ec & ;;
tests)
  nvidia-smi --query-gpu=name,memory.used --format=csv | tee "$OUT/gpu.txt"
  timeout 300 $B/spear_cuda_tests >"$OUT/gpu_tests.log" 2>&1; echo "GPU tests rc=$?"
  grep -E "^\[  (PASSED|FAILED|SKIPPED)|Failure" "$OUT/gpu_tests.log" | head -20
  for dev in cpu cuda; do
    for mm in $M $MIX $D/mixlm-w4.spear; do
      data=$TXT; [ "$mm" = "$M" ] || data=$D/wiki.test.tokens
      echo "ppl $dev $(basename $mm) $($B/spear ppl --device $dev --model $mm --data $data --ctx 512 --max-windows 40 --json 2>>"$OUT/ppl.err")" | tee -a "$OUT/ppl.txt"
    done
  done ;;
ckpt7b)
  t0=$(date +%s); python3 dev/make_random_llama.py llama-2-7b $CK $M/tokenizer.json >"$OUT/make7b.log" 2>&1
  echo "checkpoint rc=$? in $(( $(date +%s) - t0 )) s: $(du -sb $CK | cut -f1) bytes" ;;
load7b)
  for bin in spear-before spear spear-before spear; do
    python3 dev/measure.py "$bin ppl cuda 7b-bf16" -- $B/$bin ppl --device cuda --model $CK --data $TXT --ctx 512 --max-windows 2 --json | tee -a "$OUT/load.jsonl"
  done ;;
w4)
  python3 dev/measure.py "spear quantize 7b" -- $B/spear quantize --model $CK --out /tmp/w4-7b.spear | tee -a "$OUT/load.jsonl"
  for bin in spear-before spear; do
    python3 dev/measure.py "$bin ppl cuda 7b-w4" -- $B/$bin ppl --device cuda --model /tmp/w4-7b.spear --data $TXT --ctx 512 --max-windows 2 --json | tee -a "$OUT/load.jsonl"
  done ;;
fuse)  # stacked Q|K|V and Gate|Up against one GEMM per module, same build, same run
  for f in "" --no-fuse; do
    timeout 280 $B/spear bench-latency --config llama-2-7b,llama-3.2-1b --variants fp16,w4,w4ec --batches 1,8 \
      --contexts 512 --prefill 512,2048 --autotune $f --md "$OUT/bench-latency${f}.md" >"$OUT/bench-latency${f}.log" 2>&1
    echo "bench-latency $f rc=$?"; cat "$OUT/bench-latency${f}.md"
  done ;;
floor)
  timeout 330 $B/spear bench-latency --config llama-2-7b,llama-3.2-1b --variants fp16,w4,w4ec --batches 1,8,32 \
    --contexts 512 --prefill 512,2048 --autotune --breakdown --md "$OUT/floor.md" --json "$OUT/floor.json" >"$OUT/floor.log" 2>&1
  echo "bench-latency floor rc=$?"; sed -n 1,45p "$OUT/floor.md"
  timeout 120 $B/spear bench-latency --config llama-2-7b,llama-3.2-1b --variants w4,w4ec --batches 1 --contexts 512 \
    --prefill 512,2048 --autotune --dequant-mb 0 --md "$OUT/floor-nodq.md" >"$OUT/floor-nodq.log" 2>&1
  echo "bench-latency --dequant-mb 0 rc=$?"; cat "$OUT/floor-nodq.md" ;;
floor-w4)  # the W4 decode step only (no FP16 models), with the breakdown
  timeout 300 $B/spear bench-latency --config llama-2-7b,llama-3.2-1b --variants w4,w4ec --batches 1,8,32 \
    --contexts 512 --prefill 512 --autotune --breakdown --md "$OUT/floor-w4.md" >"$OUT/floor-w4.log" 2>&1
  echo "bench-latency floor-w4 rc=$?"; sed -n 1,14p "$OUT/floor-w4.md" ;;
floor-1b)  # Llama-3.2-1B at its published shape (head_dim 64), all variants, with the breakdown at batch 1
  timeout 240 $B/spear bench-latency --config llama-3.2-1b --variants fp16,w4,w4ec --batches 1,8,32 \
    --contexts 512 --prefill 512,2048 --autotune --md "$OUT/floor-1b.md" >"$OUT/floor-1b.log" 2>&1
  echo "bench-latency floor-1b rc=$?"; sed -n 1,32p "$OUT/floor-1b.md" ;;
serve-profile)  # the serving loop's profile (bench-serve --profile) on the GPU: mixlm W4 and a 1B-shaped bf16 checkpoint
  serve_bench() {  # MODEL LABEL ARGS...
    local m=$1 label=$2; shift 2
    $B/spear serve --model "$m" --device cuda --port 8090 --max-batch 64 >"$OUT/serve-$label.log" 2>&1 &
    local pid=$!
    for i in $(seq 1 120); do curl -sf http://127.0.0.1:8090/health >/dev/null 2>&1 && break; sleep 1; done
    timeout 200 $B/spear bench-serve --url http://127.0.0.1:8090 --profile --json "$OUT/bench-serve-$label.json" "$@" \
      >"$OUT/bench-serve-$label.txt" 2>&1
    echo "bench-serve $label rc=$?"; sed -n '/Successful/,/Output token/p;/Median TPOT/p;/Median TTFT/p;/Engine loop/,/engine steps/p' "$OUT/bench-serve-$label.txt"
    kill -TERM $pid; wait $pid 2>/dev/null
  }
  serve_bench $D/mixlm-w4.spear mixlm-w4 --requests 200 --input-len 128 --output-len 64 --rate inf
  CK1=/tmp/llama-3.2-1b-bf16
  [ -d $CK1 ] || python3 dev/make_random_llama.py llama-3.2-1b $CK1 $M/tokenizer.json >"$OUT/make1b.log" 2>&1
  serve_bench $CK1 1b-bf16 --requests 200 --input-len 512 --output-len 128 --rate inf
  if [ -n "$SERVE_W4" ]; then  # the same checkpoint quantized (RTN, W4 per channel)
    [ -f /tmp/1b-w4.spear ] || $B/spear quantize --model $CK1 --out /tmp/1b-w4.spear >"$OUT/quantize1b.log" 2>&1
    serve_bench /tmp/1b-w4.spear 1b-w4 --requests 200 --input-len 512 --output-len 128 --rate inf
  fi ;;
gate)  # issue 11: the calibrated r x r gate in the W4 kernel (w4ec-full) against the per-coordinate gate (w4ec)
  # and separate launches (w4ec-naive), 7B and 1B, autotuned; then a calibrated mixlm artifact (calibrated
  # here on the host's cores, few windows: speed, not quality) on CPU and GPU
  timeout 300 $B/spear bench-latency --config llama-2-7b,llama-3.2-1b --variants w4,w4ec,w4ec-full,w4ec-naive \
    --batches 1,8,32 --contexts 512 --prefill 512 --autotune --md "$OUT/gate.md" >"$OUT/gate.log" 2>&1
  echo "bench-latency gate rc=$?"; sed -n 1,32p "$OUT/gate.md"
  [ -f $D/mixlm-ec.spear ] || calib_ec
  wait
  for dev in cpu cuda; do
    echo "ppl $dev mixlm-ec $($B/spear ppl --device $dev --model $D/mixlm-ec.spear --data $D/wiki.test.tokens --ctx 512 --max-windows 40 --json 2>>"$OUT/ppl.err")" | tee -a "$OUT/ppl.txt"
  done ;;
serve-sample)  # GPU sampling: a 1B-shaped checkpoint served greedy and sampled (temperature 1, top-p 0.9); mixlm W4 vs W4+EC
  serve_one() {  # MODEL LABEL ARGS... ($SERVE_ARGS: more flags for spear serve)
    local m=$1 label=$2; shift 2
    $B/spear serve --model "$m" --device cuda --port 8090 --max-batch 64 $SERVE_ARGS >"$OUT/serve-$label.log" 2>&1 &
    local pid=$!
    for i in $(seq 1 120); do curl -sf http://127.0.0.1:8090/health >/dev/null 2>&1 && break; sleep 1; done
    timeout 150 $B/spear bench-serve --url http://127.0.0.1:8090 --profile --json "$OUT/bench-serve-$label.json" "$@" \
      >"$OUT/bench-serve-$label.txt" 2>&1
    echo "bench-serve $label rc=$?"; sed -n '/Successful/,/Output token/p;/Median TPOT/p;/Median TTFT/p;/Engine loop/,/engine steps/p' "$OUT/bench-serve-$label.txt"
    kill -TERM $pid; wait $pid 2>/dev/null
  }
  CK1=/tmp/llama-3.2-1b-bf16
  [ -d $CK1 ] || $B/spear make-checkpoint --config llama-3.2-1b --out $CK1 >"$OUT/make1b.log" 2>&1
  serve_one $CK1 1b-greedy --requests 200 --input-len 512 --output-len 128 --rate inf
  serve_one $CK1 1b-sampled --requests 200 --input-len 512 --output-len 128 --rate inf --temperature 1 --top-p 0.9
  SERVE_ARGS=--host-sampling serve_one $CK1 1b-sampled-host --requests 200 --input-len 512 --output-len 128 --rate inf \
    --temperature 1 --top-p 0.9
  serve_one $D/mixlm-w4.spear mixlm-w4 --requests 200 --input-len 128 --output-len 64 --rate inf --temperature 1
  wait  # calib-bg
  [ -f $D/mixlm-ec.spear ] && serve_one $D/mixlm-ec.spear mixlm-ec --requests 200 --input-len 128 --output-len 64 --rate inf --temperature 1
  ;;
heuristic)  # the dispatcher without a table (what ppl/generate/serve get untuned), and --autotune's saved table
  timeout 200 $B/spear bench-latency --config llama-2-7b,llama-3.2-1b --variants w4,w4ec --batches 1,8 --contexts 512 \
    --prefill 512 --md "$OUT/heuristic.md" >"$OUT/heuristic.log" 2>&1
  echo "bench-latency (heuristic) rc=$?"; sed -n 1,14p "$OUT/heuristic.md"
  export SPEAR_W4A16_CACHE=$OUT/w4a16-table.txt; rm -f "$SPEAR_W4A16_CACHE"
  for i in 1 2; do
    /usr/bin/time -f "%e s" $B/spear ppl --device cuda --autotune --model $D/mixlm-w4.spear --data $D/wiki.test.tokens \
      --ctx 512 --max-windows 4 --json 2>&1 | grep -E "ppl|s$"
    echo "tuning table: $(grep -c '|' "$SPEAR_W4A16_CACHE") entries"
  done
  unset SPEAR_W4A16_CACHE ;;
batch)  # the batch kernel (M = 9..128): bench-latency with it and without it (SPEAR_W4A16_BATCH=0), same build, same run
  for nb in 1 0; do
    v=w4,w4ec-full; [ $nb = 1 ] && v=fp16,w4,w4ec-full
    SPEAR_W4A16_BATCH=$nb SPEAR_W4A16_CACHE=/tmp/w4a16-batch$nb.txt timeout 200 $B/spear bench-latency \
      --config llama-2-7b,llama-3.2-1b --variants $v --batches 1,8,16,32,64 --contexts 512 --prefill 512 --autotune \
      --md "$OUT/batch$nb.md" --json "$OUT/batch$nb.json" >"$OUT/batch$nb.log" 2>&1
    echo "bench-latency SPEAR_W4A16_BATCH=$nb rc=$?"; sed -n 1,40p "$OUT/batch$nb.md"
  done ;;
batch-quick)  # the same at 7B and 1B, W4 and W4+EC (full gate), batch 1/16/32/64 and a 128-token prefill (M = 128)
  for nb in 1 0; do
    SPEAR_W4A16_BATCH=$nb SPEAR_W4A16_CACHE=/tmp/w4a16-bq$nb.txt timeout 110 $B/spear bench-latency \
      --config llama-2-7b,llama-3.2-1b --variants w4,w4ec-full --batches 1,16,32,64 --contexts 512 --prefill 128 \
      --autotune --md "$OUT/bq$nb.md" --json "$OUT/bq$nb.json" >"$OUT/bq$nb.log" 2>&1
    echo "bench-latency SPEAR_W4A16_BATCH=$nb rc=$?"; sed -n 1,30p "$OUT/bq$nb.md"
  done ;;
sanitize)  # compute-sanitizer memcheck on the small W4A16 cases (every kernel incl. the batch kernel, with ECs)
  timeout ${SAN_TIMEOUT:-120} compute-sanitizer --tool memcheck $B/spear_cuda_tests \
    --gtest_filter='*OddShapes*:*IdentityGate*' >"$OUT/sanitizer.log" 2>&1
  echo "compute-sanitizer rc=$?"; grep -E "ERROR SUMMARY|PASSED|FAILED|Invalid" "$OUT/sanitizer.log" | head -8 ;;
profile)  # ncu on single configs (bench_w4a16 --only/--run): the batch kernel at 7B gate+up M = 64 (the
  # autotuned config, and split-K 2) and the decode kernel at M = 1, for where the time goes
  prof() {  # LABEL ONLY CONFIG
    timeout 120 ncu --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
      --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section SchedulerStats \
      -k regex:'w4_(batch|decode)_kernel' --launch-skip 2 -c 1 $B/bench_w4a16 --only "$2" --run "$3" >"$OUT/ncu-$1.txt" 2>&1
    echo "ncu $1 rc=$?"; grep -E "^  [a-zA-Z]|Duration|Throughput|Registers|Achieved Occupancy|Issue Slots|Stall|Executed Ipc" "$OUT/ncu-$1.txt" | head -30
  }
  prof batch64 7B:gate+up:64 "batch nt=2 tg=8 warps=8 splits=1"
  prof batch64s2 7B:gate+up:64 "batch nt=2 tg=8 warps=8 splits=2"
  prof decode1 7B:gate+up:1 "decode nt=2 tg=1 warps=4 splits=1" ;;
calib-gpu)  # issue 12: calibrate on the GPU against the host's 16 cores (mixlm, same settings, same run), the
  # results' perplexity; then a Llama-3.2-1B-shaped checkpoint (random weights) calibrated on the GPU
  for dev in ${CALIB_DEVS:-cuda cpu}; do
    /usr/bin/time -f "calibrate $dev %e s, peak %M KB" timeout ${CALIB_TIMEOUT:-200} $B/spear calibrate --model $MIX \
      --quantized $D/mixlm-w4.spear --calib $D/wiki.test.tokens --calib-offset 200000 --calib-windows 32 --epochs 1 \
      --budget 0.02 --device $dev --report-json "$OUT/calib-$dev.json" --out /tmp/mixlm-ec-$dev.spear >"$OUT/calib-$dev.log" 2>&1
    echo "calibrate $dev rc=$?"; tail -2 "$OUT/calib-$dev.log"
    [ -f /tmp/mixlm-ec-$dev.spear ] && echo "ppl cuda mixlm-ec-$dev $($B/spear ppl --device cuda --model /tmp/mixlm-ec-$dev.spear \
      --data $D/wiki.test.tokens --ctx 512 --max-windows 40 --json 2>>"$OUT/ppl.err")" | tee -a "$OUT/ppl.txt"
  done
  [ -n "$CALIB_NO_1B" ] && continue  # (CALIB_DEVS, CALIB_NO_1B: a shorter run)
  CK1=/tmp/llama-3.2-1b-bf16
  [ -d $CK1 ] || $B/spear make-checkpoint --config llama-3.2-1b --out $CK1 >"$OUT/make1b.log" 2>&1
  [ -f /tmp/1b-w4.spear ] || $B/spear quantize --model $CK1 --out /tmp/1b-w4.spear >"$OUT/quantize1b.log" 2>&1
  /usr/bin/time -f "calibrate 1b cuda %e s, peak %M KB" timeout ${CALIB1B_TIMEOUT:-240} $B/spear calibrate --model $CK1 \
    --quantized /tmp/1b-w4.spear --calib $D/wiki.test.tokens --calib-windows 8 --epochs 1 --budget 0.01 --device cuda \
    --report-json "$OUT/calib-1b.json" --out /tmp/1b-ec.spear >"$OUT/calib-1b.log" 2>&1
  echo "calibrate 1b rc=$?"; tail -3 "$OUT/calib-1b.log" ;;
kernels)
  [ -x $B/bench_w4a16 ] && timeout ${KERNELS_TIMEOUT:-300} $B/bench_w4a16 --quick --md "$OUT/bench_w4a16.md" --cache "$OUT/w4a16-cache.txt" >"$OUT/bench_w4a16.log" 2>&1
  echo "bench_w4a16 rc=$?"; tail -40 "$OUT/bench_w4a16.md" ;;
esac; done
