#!/usr/bin/env python3
"""Runs a command, then prints one JSON line: wall seconds and the peak resident memory of
the child (ru_maxrss of RUSAGE_CHILDREN: file-backed mapped pages count, as they do for a
checkpoint read through mmap). Used by dev/run_load_bench.sh.
  measure.py LABEL -- CMD ARGS..."""
import json, resource, subprocess, sys, time

label = sys.argv[1]
cmd = sys.argv[sys.argv.index("--") + 1:]
t0 = time.monotonic()
p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
wall = time.monotonic() - t0
rss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"label": label, "rc": p.returncode, "wall_s": round(wall, 2),
                  "peak_rss_gb": round(rss_kib * 1024 / 1e9, 3),
                  "stdout": p.stdout.strip()[-400:], "stderr": p.stderr.strip()[-600:]}), flush=True)
