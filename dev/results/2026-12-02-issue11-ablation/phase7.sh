source /tmp/abl/common.sh
S=/tmp/abl/spear5
set -x
e2e() {  # e2e NAME BUDGET GATE
  /usr/bin/time -f "%e s" nice -n 15 $S calibrate --model $M --quantized w4.spear --calib $VAL --budget $2 --out $1.spear --report-json $1.report.json --init-from static-qera-$2.spear --gate $3 --calib-windows 32 --epochs 3 --batch 2 --report-windows 2 > $1.log 2>&1
  evalx $1 $1.spear
}
e2e e2eL-none-0.02 0.02 none &
e2e e2eL-diag-0.02 0.02 diag &
e2e e2eL-full-0.02 0.02 full &
wait
date
