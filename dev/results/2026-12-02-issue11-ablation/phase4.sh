source /tmp/abl/common.sh
S=/tmp/abl/spear3
set -x
cal() {  # cal NAME BUDGET extra-args...
  local n=$1 b=$2; shift 2
  /usr/bin/time -f "%e s" nice -n 15 $S calibrate --model $M --quantized w4.spear --calib $VAL --budget $b --out $n.spear --report-json $n.report.json --stat-windows 8 --probe-windows 1 --report-windows 2 "$@" > $n.log 2>&1
}
/usr/bin/time -f "%e s" nice -n 15 $S ppl --model $M --data $TEST --ctx 512 --max-windows $EW --json > eval-fp.json 2> eval-fp.err
for b in 0.01 0.02; do
  cal static-qera-$b $b --calib-windows 8 --objective static --static-mode qera --gains static-qera-0.05.report.json
  python3 -c "import json;json.dump(json.load(open('static-qera-$b.report.json'))['placement'],open('placement-$b.json','w'))"
  cal static-rrr-$b $b --calib-windows 8 --objective static --static-mode rrr --placement placement-$b.json
done
while [ ! -s eval-w4.json ]; do sleep 10; done
for b in 0.01 0.02; do evalx static-qera-$b static-qera-$b.spear; evalx static-rrr-$b static-rrr-$b.spear; done
date
