source /tmp/abl/common.sh
S=/tmp/abl/spear3
set -x
e2e() {  # e2e NAME BUDGET GATE
  /usr/bin/time -f "%e s" nice -n 15 $S calibrate --model $M --quantized w4.spear --calib $VAL --budget $2 --out $1.spear --report-json $1.report.json --init-from static-qera-$2.spear --gate $3 --calib-windows 16 --epochs 2 --batch 2 --report-windows 2 > $1.log 2>&1
  while [ ! -s eval-w4.json ]; do sleep 10; done
  evalx $1 $1.spear
}
e2e e2e-none-0.05 0.05 none &
e2e e2e-diag-0.05 0.05 diag &
e2e e2e-full-0.05 0.05 full &
wait
date
