source /tmp/abl/common.sh
S=/tmp/abl/spear5
set -x
e2e() {  # e2e NAME BUDGET GATE
  /usr/bin/time -f "%e s" nice -n 15 $S calibrate --model $M --quantized w4.spear --calib $VAL --budget $2 --out $1.spear --report-json $1.report.json --init-from static-qera-$2.spear --gate $3 --calib-windows 16 --epochs 2 --batch 2 --report-windows 2 > $1.log 2>&1
  evalx $1 $1.spear
}
for b in 0.01 0.02; do
  while [ ! -s static-qera-$b.report.json ]; do sleep 10; done
  e2e e2e-none-$b $b none &
  e2e e2e-diag-$b $b diag &
  e2e e2e-full-$b $b full &
  wait
  date
done
