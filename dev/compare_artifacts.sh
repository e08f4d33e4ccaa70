#!/bin/bash
# Behaviour check for refactors: runs one spear binary through quantize (RTN, GPTQ),
# calibrate and ppl on the shipped stories260K model and prints, per artifact, the
# tensors_sha256 the file records (the hash of every tensor's bytes, so timing fields in
# the metadata do not matter) and the perplexities. Run it with the binary before and
# after a change and diff the outputs.
#   dev/compare_artifacts.sh BINARY OUTDIR [MIXLM_DIR]
set -euo pipefail
BIN=$1; OUT=$2; MIX=${3:-}
mkdir -p "$OUT"
M=models/stories260K-hf; D=data/tinystories/tinystories_val.txt
calib="--calib $D --calib-offset 200000 --calib-windows 8"
sha() { python3 -c "import json,struct,sys; f=open(sys.argv[1],'rb'); n=struct.unpack('<Q',f.read(8))[0]; print(sys.argv[1].split('/')[-1], json.loads(f.read(n))['__metadata__']['tensors_sha256'])" "$1"; }
$BIN quantize --model $M --out $OUT/rtn.spear -q 2>/dev/null || $BIN quantize --model $M --out $OUT/rtn.spear
sha $OUT/rtn.spear
$BIN quantize --model $M --out $OUT/gptq.spear --method gptq $calib -q 2>/dev/null || $BIN quantize --model $M --out $OUT/gptq.spear --method gptq $calib
sha $OUT/gptq.spear
$BIN calibrate --model $M --quantized $OUT/rtn.spear $calib --budget 0.02 -q --out $OUT/rtn-ec.spear
sha $OUT/rtn-ec.spear
for m in $M $OUT/rtn.spear $OUT/gptq.spear $OUT/rtn-ec.spear; do
  echo "ppl $m $($BIN ppl --model $m --data $D --ctx 256 --max-windows 20 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["ppl"])')"
done
if [ -n "$MIX" ]; then
  $BIN quantize --model $MIX --out $OUT/mix-rtn.spear -q 2>/dev/null || $BIN quantize --model $MIX --out $OUT/mix-rtn.spear
  sha $OUT/mix-rtn.spear
  for m in $MIX $OUT/mix-rtn.spear; do
    echo "ppl $m $($BIN ppl --model $m --data data/tinystories/tinystories_val.txt --ctx 512 --max-windows 10 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["ppl"])')"
  done
fi
