#!/usr/bin/env bash
# Serving benchmark matrix for docs/BENCHMARKS.md ("Serving (issue 5)"). For each
# artifact, one `spear serve` per scheduler runs at the same time (idle servers cost
# nothing), and `spear bench-serve` visits them interleaved, rate by rate and
# repetition by repetition, so that drifting machine load hits every scheduler alike.
# One JSON per run, then a markdown table of medians over the repetitions.
#
#   bench/bench_serve.sh SPEAR_BIN OUT_DIR "name=path ..." ["ec-aware ec-blind no-chunk"] ["1 2 3"]
#
# Environment: REQUESTS (40), INPUT_LEN (128), OUTPUT_LEN (64), SLO_TTFT_MS (1000),
# SLO_TPOT_MS (50), MAX_BATCH (32), PORT (18200), SEED (0), REPS (1), THREADS (1:
# OMP/BLAS threads per server; one thread keeps step times steady on a shared machine).
set -euo pipefail
BIN=$1; OUT=$2; MODELS=$3
SCHEDS=${4:-"ec-aware ec-blind no-chunk"}
RATES=${5:-"1 2 3"}
REQUESTS=${REQUESTS:-40}; INPUT_LEN=${INPUT_LEN:-128}; OUTPUT_LEN=${OUTPUT_LEN:-64}
SLO_TTFT_MS=${SLO_TTFT_MS:-1000}; SLO_TPOT_MS=${SLO_TPOT_MS:-50}; MAX_BATCH=${MAX_BATCH:-32}
PORT=${PORT:-18200}; SEED=${SEED:-0}; REPS=${REPS:-1}; THREADS=${THREADS:-1}
mkdir -p "$OUT"
for m in $MODELS; do
  name=${m%%=*}; path=${m#*=}
  pids=(); port=$PORT
  declare -A ports=()
  for s in $SCHEDS; do
    OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS "$BIN" serve --model "$path" --port "$port" \
      --scheduler "$s" --max-batch "$MAX_BATCH" --slo-tpot-ms "$SLO_TPOT_MS" --slo-ttft-ms "$SLO_TTFT_MS" \
      --max-queue 1024 >"$OUT/serve-$name-$s.log" 2>&1 &
    pids+=($!); ports[$s]=$port; port=$((port + 1))
    # Start one at a time: the start-up profile must not share the CPU with another.
    for _ in $(seq 1 240); do curl -sf "http://127.0.0.1:${ports[$s]}/health" >/dev/null && break; sleep 0.5; done
  done
  for rep in $(seq 1 "$REPS"); do
    for r in $RATES; do
      for s in $SCHEDS; do
        f="$OUT/$name-$s-r$r-rep$rep"
        "$BIN" bench-serve --url "http://127.0.0.1:${ports[$s]}" --rate "$r" --requests "$REQUESTS" \
          --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --seed "$((SEED + rep))" \
          --slo-ttft-ms "$SLO_TTFT_MS" --slo-tpot-ms "$SLO_TPOT_MS" --json "$f.json" >"$f.txt"
        echo "$name $s rate $r rep $rep: $(grep -E 'Goodput|P99 TPOT|P99 TTFT' "$f.txt" | tr -s ' ' | tr '\n' ';') load $(cut -d' ' -f1 /proc/loadavg)"
      done
    done
  done
  for s in $SCHEDS; do curl -s "http://127.0.0.1:${ports[$s]}/metrics" >"$OUT/metrics-$name-$s.txt" || true; done
  kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
  unset ports
done
python3 - "$OUT" <<'PY'
import json, glob, os, re, sys, statistics as st
runs = {}
for f in glob.glob(os.path.join(sys.argv[1], "*-r*-rep*.json")):
    m = re.match(r"(.+?)-(ec-aware|ec-blind|fixed|no-chunk)-r([0-9.]+)-rep(\d+)\.json$", os.path.basename(f))
    runs.setdefault((m.group(1), m.group(2), float(m.group(3))), []).append(json.load(open(f)))
med = lambda xs: st.median(xs)
print("| artifact | rate (req/s) | scheduler | TTFT median / p99 (ms) | TPOT median / p99 (ms) | ITL p99 (ms) | goodput (req/s) | SLO met | failed | reps |")
print("|---|---|---|---|---|---|---|---|---|---|")
order = {"ec-aware": 0, "ec-blind": 1, "fixed": 2, "no-chunk": 3}
for (name, sched, rate), js in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][2], order[kv[0][1]])):
    g = lambda k, q: med([j[k][q] for j in js])
    print(f"| {name} | {rate:g} | {sched} | {g('ttft_ms','median'):.0f} / {g('ttft_ms','p99'):.0f} | "
          f"{g('tpot_ms','median'):.1f} / {g('tpot_ms','p99'):.1f} | {g('itl_ms','p99'):.0f} | "
          f"{med([j['goodput'] for j in js]):.2f} | {100*med([j['slo_attainment'] for j in js]):.0f}% | "
          f"{sum(j['failed'] for j in js)} | {len(js)} |")
PY
