#!/bin/bash
# Issue 11's ablation at the calibration defaults, on the GPU (calibrate --device cuda), from
# binaries carried in build-pack/bin.tar.xz (dev/pack_device.sh; unpack it first).
#   bash dev/run_ablation_gpu.sh [BUDGETS] [DEADLINE_S]     (defaults: "0.02 0.01 0.05", 540)
# mixlm-19m, W4 per-channel RTN, calibrated on wiki.valid.tokens (defaults: 256 windows of 512
# tokens, 32 statistics windows, 3 epochs), scored on the whole wiki.test.raw with the GPU engine
# (spear ppl --device cuda: the GPU engine has no --ref-model; the calibration KLs are in the reports).
# Per budget: the defaults (searches the placement; its report's placement is then fixed for
# every other row of that budget) and their static control (--static-out: the guarded RRR
# closed form refitted layer by layer, training's start), e2e ungated, e2e diagonal gate, e2e
# from the QERA/site start, static QERA (site refit, guarded; --objective static's default),
# the same without the guard, static RRR with the site refit. Rows stop being started after DEADLINE_S seconds.
# ROWS=defaults runs only the first row of each budget; CALIB_TIMEOUT (300 s) bounds each
# calibration; STATIC_DEVICE=cpu keeps the static control on the host.
# One JSON line per row in $OUT/ablation.jsonl; calibration reports and logs beside it.
set -o pipefail
OUT=${OUT:-/tmp/spear-out}; mkdir -p "$OUT"
B=$PWD/build-bin; D=$B/data
export LD_LIBRARY_PATH=$B/lib:/usr/local/cuda/lib64:$LD_LIBRARY_PATH
if ldd $B/spear | grep -q "libcusolver.*not found"; then
  so=$(find / -name 'libcusolver.so.12*' -not -path '*/proc/*' 2>/dev/null | head -1)
  [ -n "$so" ] && export LD_LIBRARY_PATH=$(dirname "$so"):$LD_LIBRARY_PATH
fi
export OMP_WAIT_POLICY=passive
BUDGETS=${1:-"0.02 0.01 0.05"}; DEADLINE=${2:-540}
MIX=$D/models/mixlm-19m; V=$D/wiki.valid.tokens; T=$D/wiki.test.raw; W=/tmp/abl
mkdir -p $W
score() {  # LABEL MODEL
  local j; j=$($B/spear ppl --device cuda --model "$2" --data $T --ctx 512 --json 2>>"$OUT/ppl.err")
  echo "{\"row\":\"$1\",\"eval\":$j}" | tee -a "$OUT/ablation.jsonl"
}
[ -f $W/w4.spear ] || $B/spear quantize --model $MIX --out $W/w4.spear >/dev/null 2>&1
score fp $MIX
score w4 $W/w4.spear
calib() {  # LABEL BUDGET ARGS...
  local label=$1 b=$2; shift 2
  if (( SECONDS > DEADLINE )); then echo "skip $label (deadline)"; return 1; fi
  local t0=$SECONDS
  /usr/bin/time -f "%e s, peak host %M KB" -o "$OUT/$label.time" timeout ${CALIB_TIMEOUT:-300} \
    $B/spear calibrate --device cuda --static-device ${STATIC_DEVICE:-cuda} --model $MIX --quantized $W/w4.spear --calib $V --budget $b \
    --report-json "$OUT/$label.report.json" --out $W/$label.spear "$@" >"$OUT/$label.log" 2>&1
  local rc=$?
  echo "calibrate $label rc=$rc in $((SECONDS - t0)) s ($(cat "$OUT/$label.time" 2>/dev/null | tail -1)): $(tail -1 "$OUT/$label.log")"
  [ $rc = 0 ] && score "$label" $W/$label.spear
}
for b in $BUDGETS; do
  calib default-$b $b --static-out $W/static-rrr-layer-$b.spear || continue
  score static-rrr-layer-$b $W/static-rrr-layer-$b.spear
  [ "${ROWS:-all}" = defaults ] && continue
  python3 -c "import json,sys; json.dump(json.load(open(sys.argv[1]))['placement'], open(sys.argv[2],'w'))" \
    "$OUT/default-$b.report.json" $W/placement-$b.json
  P="--placement $W/placement-$b.json"
  calib e2e-none-$b $b $P --gate none
  calib e2e-diag-$b $b $P --gate diag
  calib e2e-from-qera-site-$b $b $P --static-mode qera --static-refit site
  calib static-qera-$b $b $P --objective static
  calib static-qera-noguard-$b $b $P --objective static --guard-windows 0
  calib static-rrr-site-$b $b $P --objective static --static-mode rrr
done
echo "ablation done in $SECONDS s"
