#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install what is missing, build, and run
# spear on the model shipped in the repository (stories260K, TinyStories text).
set -euo pipefail
cd "$(dirname "$0")"
scripts/install-deps.sh
scripts/build.sh
model=models/stories260K-hf
data=data/tinystories/tinystories_val.txt
echo "== spear info"
build/spear info $model
echo "== spear generate (greedy)"
build/spear generate --model $model --prompt "Once upon a time" --max-tokens 48
echo "== spear ppl (fp32, 512-token windows; reference: 5.04816)"
build/spear ppl --model $model --data $data --ctx 512

# SPEAR on the same model: 4-bit RTN, the sensitivity diagnostic, gated Error
# Compensators under a memory budget, and the report. Calibration text is the tail of the
# TinyStories file (from token 200000 on); evaluation is its first 100 windows: disjoint.
out=out/spear
mkdir -p $out
calib="--calib $data --calib-offset 200000 --calib-windows 32"
echo "== spear quantize (RTN, 4 bits, per output channel)"
build/spear quantize --model $model --out $out/w4.spear
build/spear info $out/w4.spear
echo "== spear diagnose (pictures: $out/spear-heatmap.svg, $out/spear-token-error.svg)"
build/spear diagnose --model $model --quantized $out/w4.spear $calib --out-dir $out --top 10 -q
echo "== spear calibrate (2% memory budget)"
build/spear calibrate --model $model --quantized $out/w4.spear $calib --budget 0.02 -q \
  --out $out/w4-ec.spear
build/spear ppl --model $out/w4-ec.spear --data $data --ctx 512 --max-windows 100
echo "== spear eval: fp, W4, static control and SPEAR at 1%, 2% and 5% memory"
build/spear eval --model $model --data $data $calib --ctx 512 --max-windows 100 \
  --budgets 0.01,0.02,0.05 -q --json $out/report.json --markdown $out/report.md
