#!/bin/bash
# One device session for the GPU engine (issue 6) from prebuilt binaries: GPU tests, the
# perplexity and greedy checks against the CPU engine's figures, bench-latency at 1B/3B/7B.
# Prepare here (no GPU needed):
#   cmake --build build -j2 && dev/pack_prebuilt.sh --data build-data/models build-data/eval
# where build-data/models/mixlm-19m is a copy of ../shared/models/mixlm-19m (without
# hidden_states.safetensors), build-data/models/mixlm-w4.spear comes from `spear quantize`,
# build-data/eval holds wiki.test.tokens; carry build-pack. On the device:
#   tar xzf build-pack/bin.tgz && bash dev/run_gpu_engine.sh
# Logs and tables go to $OUT.
set -o pipefail
OUT=${OUT:-/tmp/spear-out}
mkdir -p "$OUT"
B=build-bin
D=$B/data
export LD_LIBRARY_PATH=$PWD/$B/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib:$LD_LIBRARY_PATH
export SPEAR_SHARED_DIR=$PWD/$D   # the GPU tests find mixlm-19m under $D/models
ldd $B/spear $B/spear_cuda_tests | grep "not found"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,memory.used --format=csv | tee "$OUT/gpu.txt"

timeout 180 $B/spear_cuda_tests --gtest_filter='LlamaOps*:GpuModel*' >"$OUT/gpu_tests.log" 2>&1
echo "GPU tests rc=$?"; grep -E "^\[  (PASSED|FAILED|SKIPPED)|Failure|error" "$OUT/gpu_tests.log" | head -30

# Perplexity on the GPU; the CPU engine's figures for the same runs are in docs/BENCHMARKS.md.
ppl() { echo "== ppl $*"; timeout 120 $B/spear ppl --device cuda --json "$@" 2>>"$OUT/ppl.err" | tee -a "$OUT/ppl.jsonl"; }
ppl --model models/stories260K-hf --data data/tinystories/tinystories_sample.txt --ctx 256
[ -d $D/models/mixlm-19m ] && ppl --model $D/models/mixlm-19m --data $D/eval/wiki.test.tokens --ctx 512
[ -f $D/models/mixlm-w4.spear ] && ppl --model $D/models/mixlm-w4.spear --data $D/eval/wiki.test.tokens --ctx 512
tail -3 "$OUT/ppl.err"

timeout 400 $B/spear bench-latency --config llama-3.2-1b,llama-3.2-3b,llama-2-7b --autotune \
  --json "$OUT/bench-latency.json" --md "$OUT/bench-latency.md" >"$OUT/bench-latency.log" 2>&1
echo "bench-latency rc=$?"; tail -60 "$OUT/bench-latency.log"
