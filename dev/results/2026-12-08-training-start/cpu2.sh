#!/bin/bash
S=/work/main/build/spear; M=/work/shared/models/mixlm-19m; D=/work/shared/data
cd /tmp/abl
while [ ! -f done ]; do sleep 5; done
for v in "rrr-site-0.02 --static-mode rrr" "rrr-layer-0.02 --static-mode rrr --static-refit layer"; do
  set -- $v; l=$1; shift
  /usr/bin/time -f "calibrate $l %e s peak %M KB" $S calibrate --model $M --quantized w4.spear --calib $D/wikitext-2/wiki.valid.tokens --budget 0.02 "$@" --report-json cpu-$l.json --out cpu-$l.spear > cpu-$l.log 2>&1
  echo "$l $(tail -1 cpu-$l.log)" >> status.txt
  echo "cpu-$l $($S ppl --model cpu-$l.spear --data $D/wikitext-2-raw/wiki.test.raw --ctx 512 --json 2>/dev/null)" >> ppl.txt
done
touch done2
