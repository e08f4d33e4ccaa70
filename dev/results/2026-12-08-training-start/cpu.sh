#!/bin/bash
S=/work/main/build/spear; M=/work/shared/models/mixlm-19m; D=/work/shared/data
cd /tmp/abl
[ -f w4.spear ] || $S quantize --model $M --out w4.spear >/dev/null 2>&1
for b in 0.02; do
  /usr/bin/time -f "calibrate $b %e s peak %M KB" $S calibrate --model $M --quantized w4.spear --calib $D/wikitext-2/wiki.valid.tokens --budget $b --report-json cpu-$b.json --out cpu-$b.spear > cpu-$b.log 2>&1
  echo "$b $(tail -1 cpu-$b.log)" >> status.txt
  echo "cpu-$b $($S ppl --model cpu-$b.spear --data $D/wikitext-2-raw/wiki.test.raw --ctx 512 --json 2>/dev/null)" >> ppl.txt
done
echo "w4 $($S ppl --model w4.spear --data $D/wikitext-2-raw/wiki.test.raw --ctx 512 --json 2>/dev/null)" >> ppl.txt
touch done
