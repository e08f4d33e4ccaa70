# sourced by the ablation steps
S=/tmp/abl/spear
M=/work/shared/models/mixlm-19m
VAL=/work/shared/data/wikitext-2/wiki.valid.tokens
TEST=/work/shared/data/wikitext-2-raw/wiki.test.raw
EW=${EW:-20}
cd /tmp/abl
evalx() {  # evalx NAME ARTIFACT
  /usr/bin/time -f "%e s" nice -n 15 $S ppl --model $2 --ref-logits fp$EW.bin --data $TEST --ctx 512 --max-windows $EW --json > eval-$1.json 2> eval-$1.err
}
