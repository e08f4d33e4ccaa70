#!/bin/bash
S=/tmp/spear-abl; M=/work/shared/models/mixlm-19m; D=/work/shared/data
cd /tmp/abl
for v in "qera-site-0.05 --budget 0.05" "rrr-layer-0.01 --budget 0.01 --static-mode rrr --static-refit layer"; do
  set -- $v; l=$1; shift
  /usr/bin/time -f "calibrate $l %e s peak %M KB" $S calibrate --model $M --quantized w4.spear --calib $D/wikitext-2/wiki.valid.tokens "$@" --report-json cpu-$l.json --out cpu-$l.spear > cpu-$l.log 2>&1
  echo "$l $(tail -1 cpu-$l.log)" >> status.txt
  echo "cpu-$l $($S ppl --model cpu-$l.spear --data $D/wikitext-2-raw/wiki.test.raw --ctx 512 --json 2>/dev/null)" >> ppl.txt
done
touch done4
