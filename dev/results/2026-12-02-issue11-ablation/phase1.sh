source /tmp/abl/common.sh
set -x
date
cal() {  # cal NAME BUDGET extra-args...
  local n=$1 b=$2; shift 2
  /usr/bin/time -f "%e s" nice -n 15 $S calibrate --model $M --quantized w4.spear --calib $VAL --budget $b --out $n.spear --report-json $n.report.json --stat-windows 8 --probe-windows 1 --report-windows 2 "$@" > $n.log 2>&1
}
cal static-qera-0.05 0.05 --calib-windows 8 --objective static --static-mode qera
python3 -c "import json;json.dump(json.load(open('static-qera-0.05.report.json'))['placement'],open('placement-0.05.json','w'))"
date
