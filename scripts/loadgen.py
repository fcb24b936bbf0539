#!/usr/bin/env python3
"""A small closed-loop load generator for `afa serve` (standard library only).

Each of --concurrency workers sends POST /generate requests back to back until --requests
have been sent in total or --max-seconds passed. Reports throughput, latency percentiles of
successful requests, and status counts (429 = queue full). Only loopback targets are allowed.

  python3 scripts/loadgen.py --url http://127.0.0.1:8080 --concurrency 4 --requests 40 --steps 1
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse
from collections import Counter


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--prompt", default="a lighthouse at dusk")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()
    target = urllib.parse.urlparse(args.url)
    if target.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("loadgen only targets loopback addresses")
    if args.requests > 10000 or args.concurrency > 256:
        raise SystemExit("bounded: at most 10000 requests and 256 workers")

    lock = threading.Lock()
    sent = [0]
    latencies, statuses, server_ms = [], Counter(), []
    deadline = time.monotonic() + args.max_seconds

    def worker(idx):
        conn = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=args.max_seconds + 60)
        while True:
            with lock:
                if sent[0] >= args.requests or time.monotonic() > deadline:
                    break
                seed = sent[0]
                sent[0] += 1
            body = json.dumps({"prompt": args.prompt, "steps": args.steps, "n": args.n, "seed": seed})
            start = time.monotonic()
            try:
                conn.request("POST", "/generate", body, {"content-type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                status = "conn-error"
                conn.close()
                conn = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=args.max_seconds + 60)
            elapsed = time.monotonic() - start
            with lock:
                statuses[status] += 1
                if status == 200:
                    latencies.append(elapsed)
                    t = json.loads(data)["timings"]
                    server_ms.append(sum(t.values()))
            if status == 429:
                time.sleep(0.05)
        conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    ok = statuses.get(200, 0)
    report = {
        "concurrency": args.concurrency,
        "requests": sum(statuses.values()),
        "ok": ok,
        "statuses": {str(k): v for k, v in statuses.items()},
        "wall_s": round(wall, 3),
        "images_per_s": round(ok * args.n / wall, 3) if wall > 0 else 0,
        "p50_ms": round(percentile(latencies, 0.5) * 1e3, 1),
        "p90_ms": round(percentile(latencies, 0.9) * 1e3, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1e3, 1),
        "mean_server_ms": round(statistics.mean(server_ms), 1) if server_ms else None,
    }
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:>16}: {v}")


if __name__ == "__main__":
    main()
