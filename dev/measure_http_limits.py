#!/usr/bin/env python3
"""Measures two targets of issue 14 against a real `spear serve` process:

  rss     Peak RSS under any single request <= 2x the documented body limit + the model.
          For each hostile body (near the limit with Content-Length, chunked, gzip; a gzip
          bomb; bodies that parse into many small JSON values) a fresh server is started,
          warmed up with one normal request, VmHWM is reset (/proc/PID/clear_refs = 5,
          the peak is then the current RSS) and read back after the hostile request is
          answered. peak - rss_before must stay within 2 x --max-body-mb. With --repeat N
          the same request is sent N times to that server, each measured the same way
          (a process's later large requests meet a heap the earlier ones shaped), and
          "retained_mb" is what the process holds after the last answer over the RSS
          before the first.
  slow    128 slow clients do not delay a normal request by more than 100 ms. The latency
          of a normal completion (max_tokens 2) is measured alone, then while 128
          connections trickle header lines (one every 50 ms each), --reps times each
          (median, p99, max). The slow clients run in a second process: in a thread they
          hold the measured client's GIL (5 ms switch interval) for ~10 ms a request.

  python3 dev/measure_http_limits.py [--spear build/spear] [--model models/stories260K-hf]
                                     [--max-body-mb 8] [--repeat 1] [--case NAME] [--reps 200]
                                     [rss] [slow]
Prints one line per case and a JSON summary; exits 1 if a target is missed.
"""
import argparse
import gzip
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(key)


class Server:
    def __init__(self, args, extra=()):
        cmd = [args.spear, "serve", "--model", args.model, "--port", "0", "--no-profile",
               "--max-body-mb", str(args.max_body_mb), *extra]
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.port = None
        self.log = []
        t0 = time.time()
        while self.port is None:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError("spear serve exited:\n" + "".join(self.log))
            self.log.append(line)
            m = re.search(r"(?:127\.0\.0\.1|localhost|0\.0\.0\.0):(\d+)", line)
            if m:
                self.port = int(m.group(1))
            if time.time() - t0 > 120:
                raise RuntimeError("no port in the log:\n" + "".join(self.log))
        threading.Thread(target=self._drain, daemon=True).start()
        while True:
            st, _ = request(self.port, raw_get("/health"))
            if st == 200:
                break
            time.sleep(0.05)

    def _drain(self):
        for line in self.p.stdout:
            self.log.append(line)

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def raw_get(path):
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def post(path, body, extra=b"", chunked=False, chunk=1 << 16):
    head = (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra)
    if not chunked:
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    parts = [head + b"Transfer-Encoding: chunked\r\n\r\n"]
    for i in range(0, len(body), chunk):
        c = body[i:i + chunk]
        parts.append(b"%x\r\n" % len(c) + c + b"\r\n")
    parts.append(b"0\r\n\r\n")
    return b"".join(parts)


def request(port, data, timeout=300):
    """Sends data (stopping early if the server answers), returns (status, body)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.setblocking(True)
        sent = 0
        try:
            while sent < len(data):
                sent += s.send(data[sent:sent + (1 << 20)])
        except (BrokenPipeError, ConnectionResetError):
            pass
        buf = b""
        while b"\r\n\r\n" not in buf:
            b = s.recv(65536)
            if not b:
                return 0, b""
            buf += b
        head, _, rest = buf.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        m = re.search(rb"(?i)content-length:\s*(\d+)", head)
        n = int(m.group(1)) if m else None
        while n is None or len(rest) < n:
            b = s.recv(65536)
            if not b:
                break
            rest += b
        return status, rest
    finally:
        s.close()


NORMAL = json.dumps({"prompt": "Once upon a time", "max_tokens": 2, "temperature": 0}).encode()


def rss_cases(limit):
    """(name, bytes on the wire, decoded body size, request bytes)"""
    n = limit - 64
    text = b'{"prompt": "' + b"a" * (n - 14) + b'"}'
    ids = b'{"prompt": [' + b",".join([b"0"] * ((n - 14) // 2)) + b"]}"
    strs = b'{"prompt": [' + b",".join([b'"a"'] * ((n - 14) // 4)) + b"]}"
    empties = b'{"prompt": [' + b",".join([b"[]"] * ((n - 14) // 3)) + b"]}"
    objs = b'{"prompt": "x", "stop": [' + b",".join([b"{}"] * ((n - 30) // 3)) + b"]}"
    msg = b'{"role":"user","content":"a"}'
    msgs = b'{"messages": [' + b",".join([msg] * ((n - 16) // (len(msg) + 1))) + b"]}"
    keys = b"{" + b",".join(b'"k%d":0' % i for i in range(n // 12)) + b"}"
    bomb = gzip.compress(b'{"prompt": "' + b"a" * (100 << 20) + b'"}', 9, mtime=0)
    cases = [
        ("text prompt, Content-Length", post("/v1/completions", text), len(text)),
        ("text prompt, chunked", post("/v1/completions", text, chunked=True), len(text)),
        ("text prompt, gzip", post("/v1/completions", gzip.compress(text, 6, mtime=0),
                                   b"Content-Encoding: gzip\r\n"), len(text)),
        ("text prompt, chunked + deflate", post("/v1/completions", zlib.compress(text, 6),
                                                b"Content-Encoding: deflate\r\n", chunked=True), len(text)),
        ("gzip bomb, 100 MB inflated", post("/v1/completions", bomb, b"Content-Encoding: gzip\r\n"), 100 << 20),
        ("2x the limit, chunked", post("/v1/completions", text + b" " * limit, chunked=True), 2 * len(text)),
        ("token ids [0,0,...]", post("/v1/completions", ids), len(ids)),
        ("strings [\"a\",...]", post("/v1/completions", strs), len(strs)),
        ("empty lists [[],...]", post("/v1/completions", empties), len(empties)),
        ("empty objects in stop", post("/v1/completions", objs), len(objs)),
        ("messages, 1 char each", post("/v1/chat/completions", msgs), len(msgs)),
        ("unknown keys {k0..kN}", post("/v1/completions", keys), len(keys)),
        ("tokenize, text prompt", post("/tokenize", text), len(text)),
    ]
    return [(name, len(req), dec, req) for name, req, dec in cases]


def run_rss(args):
    limit = args.max_body_mb << 20
    results = []
    ok = True
    for name, wire, decoded, req in rss_cases(limit):
        if args.case and not any(c in name for c in args.case):
            continue
        srv = Server(args)
        try:
            request(srv.port, post("/v1/completions", NORMAL))  # warm up
            pid = srv.p.pid
            model_rss = kb(pid, "VmRSS")
            first_before = None
            for rep in range(args.repeat):
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                before = kb(pid, "VmHWM")
                if first_before is None:
                    first_before = before
                t0 = time.time()
                status, body = request(srv.port, req)
                took = time.time() - t0
                time.sleep(0.2)
                peak = kb(pid, "VmHWM")
                code = ""
                try:
                    code = json.loads(body)["error"].get("code", "")
                except Exception:
                    pass
                grow = (peak - before) / 1024
                within = grow <= 2 * args.max_body_mb
                ok &= within
                r = {"case": name, "wire_bytes": wire, "decoded_bytes": decoded, "status": status, "code": code,
                     "seconds": round(took, 3), "rss_before_mb": round(before / 1024, 1),
                     "peak_mb": round(peak / 1024, 1), "growth_mb": round(grow, 1),
                     "bound_mb": 2 * args.max_body_mb, "within": within, "model_rss_mb": round(model_rss / 1024, 1)}
                if args.repeat > 1:
                    r["repeat"] = rep + 1
                    r["retained_mb"] = round((kb(pid, "VmRSS") - first_before) / 1024, 1)
                results.append(r)
                more = f"  #{rep + 1}, retained +{r['retained_mb']:.1f} MB" if args.repeat > 1 else ""
                print(f"{name:34s} wire {wire / 2**20:7.2f} MB  -> {status} {code:26s} {took:6.2f} s  "
                      f"RSS {before / 1024:6.1f} -> {peak / 1024:6.1f} MB (+{grow:5.1f}, bound +{2 * args.max_body_mb})"
                      f"{'' if within else '  OVER'}{more}", flush=True)
        finally:
            srv.stop()
    return ok, results


def pct(v, q):
    """numpy's default percentile (linear between order statistics)."""
    v = sorted(v)
    k = (len(v) - 1) * q
    i = int(k)
    return v[i] + (v[min(i + 1, len(v) - 1)] - v[i]) * (k - i)


def trickle(port, n_slow, ready, stop):
    """n_slow connections each sending a header line every 50 ms; one the server answers
    (431 after 128 lines, 408 after the head deadline) is replaced by a new one."""
    def fresh():
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        s.setblocking(False)
        return s
    slow = [fresh() for _ in range(n_slow)]
    ready.set()
    while not stop.is_set():
        for i, s in enumerate(slow):
            try:
                s.send(b"X-Slow: 1\r\n")
                if s.recv(4096, socket.MSG_PEEK):
                    raise OSError("answered")
            except BlockingIOError:
                pass
            except OSError:
                s.close()
                slow[i] = fresh()
        time.sleep(0.05)
    for s in slow:
        s.close()


def run_slow(args, n_slow=128):
    reps = args.reps
    srv = Server(args, ["--http-threads", "4"])
    try:
        def normal():
            t0 = time.perf_counter()
            st, _ = request(srv.port, post("/v1/completions", NORMAL))
            assert st == 200, st
            return (time.perf_counter() - t0) * 1e3

        for _ in range(3):
            normal()
        alone = [normal() for _ in range(reps)]
        if args.trickle_in_thread:  # the 2026-12-02 method: the GIL is shared with the client
            ready, stop = threading.Event(), threading.Event()
            th = threading.Thread(target=trickle, args=(srv.port, n_slow, ready, stop))
        else:
            import multiprocessing
            ready, stop = multiprocessing.Event(), multiprocessing.Event()
            th = multiprocessing.Process(target=trickle, args=(srv.port, n_slow, ready, stop))
        th.start()
        ready.wait(60)
        time.sleep(0.3)
        beside = [normal() for _ in range(reps)]
        stop.set()
        th.join()
    finally:
        srv.stop()
    med_a, med_b = statistics.median(alone), statistics.median(beside)
    worst_delay = max(beside) - med_a
    r = {"slow_clients": n_slow, "requests": reps, "trickle": "thread" if args.trickle_in_thread else "process",
         "loadavg": os.getloadavg()[0],
         "alone_median_ms": round(med_a, 2), "alone_p99_ms": round(pct(alone, 0.99), 2),
         "alone_max_ms": round(max(alone), 2), "beside_median_ms": round(med_b, 2),
         "beside_p99_ms": round(pct(beside, 0.99), 2),
         "beside_max_ms": round(max(beside), 2), "median_delay_ms": round(med_b - med_a, 2),
         "p99_delay_ms": round(pct(beside, 0.99) - med_a, 2),
         "worst_delay_ms": round(worst_delay, 2)}
    print(f"normal request alone: median {med_a:.2f} ms, p99 {pct(alone, 0.99):.2f} ms, max {max(alone):.2f} ms; "
          f"beside {n_slow} slow clients: median {med_b:.2f} ms, p99 {pct(beside, 0.99):.2f} ms, "
          f"max {max(beside):.2f} ms; delay median {med_b - med_a:+.2f} ms, worst {worst_delay:+.2f} ms "
          f"(target 100; load average {os.getloadavg()[0]:.2f})", flush=True)
    return worst_delay <= 100, r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spear", default=os.path.join(ROOT, "build", "spear"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "stories260K-hf"))
    ap.add_argument("--max-body-mb", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1, help="rss: send each hostile request this many times")
    ap.add_argument("--case", action="append", help="rss: only the cases whose name contains this (repeatable)")
    ap.add_argument("--reps", type=int, default=200, help="slow: normal requests alone and beside")
    ap.add_argument("--trickle-in-thread", action="store_true",
                    help="slow: trickle from a thread of this process (shares the GIL with the measured client)")
    ap.add_argument("what", nargs="*", default=["rss", "slow"])
    args = ap.parse_args()
    summary, ok = {"max_body_mb": args.max_body_mb}, True
    if "rss" in args.what:
        o, summary["rss"] = run_rss(args)
        ok &= o
    if "slow" in args.what:
        o, summary["slow"] = run_slow(args)
        ok &= o
    print(json.dumps(summary))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
