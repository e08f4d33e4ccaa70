source /tmp/abl/common.sh
set -x
while pgrep -f "bash phase1.sh" > /dev/null; do sleep 10; done
date
cal() {  # cal NAME BUDGET extra-args...
  local n=$1 b=$2; shift 2
  /usr/bin/time -f "%e s" nice -n 15 $S calibrate --model $M --quantized w4.spear --calib $VAL --budget $b --out $n.spear --report-json $n.report.json --stat-windows 8 --probe-windows 1 --report-windows 2 "$@" > $n.log 2>&1
}
cal static-rrr-0.05 0.05 --calib-windows 8 --objective static --static-mode rrr --placement placement-0.05.json
date
/usr/bin/time -f "%e s" nice -n 15 $S ppl --model w4.spear --ref-model $M --data $TEST --ctx 512 --max-windows $EW --json --save-logits fp$EW.bin > eval-w4.json 2> eval-w4.err
date
evalx static-qera-0.05 static-qera-0.05.spear; date
evalx static-rrr-0.05 static-rrr-0.05.spear; date
cal static-rrrlayer-0.05 0.05 --calib-windows 8 --objective static --static-mode rrr --static-refit layer --placement placement-0.05.json
evalx static-rrrlayer-0.05 static-rrrlayer-0.05.spear; date
