source /tmp/abl/common.sh
S=/tmp/abl/spear5
set -x
cal() {  # cal NAME BUDGET extra-args...
  local n=$1 b=$2; shift 2
  /usr/bin/time -f "%e s" nice -n 15 $S calibrate --model $M --quantized w4.spear --calib $VAL --budget $b --out $n.spear --report-json $n.report.json --stat-windows 8 --probe-windows 1 --report-windows 2 "$@" > $n.log 2>&1
}
for b in 0.05 0.01 0.02; do
  while [ ! -s placement-$b.json ]; do sleep 10; done
  for mode in qera rrr; do
    cal static-$mode-g-$b $b --calib-windows 12 --guard-windows 4 --objective static --static-mode $mode --placement placement-$b.json
    evalx static-$mode-g-$b static-$mode-g-$b.spear
  done
done
date
