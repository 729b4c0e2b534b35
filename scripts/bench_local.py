#!/usr/bin/env python3
"""Benchmark: /start -> SUCCESS on the local backend for a trivial 3-cell notebook.

DESIGN.md section 6 targets a median under 0.8 s and a max under 1.5 s (section 8: under 0.2 s
with the warm kernel, the default). This is a benchmark, not a test: the numbers depend on the
machine and its load. `make bench` runs the full set (scripts/bench/run.py, docs/benchmarks.md).

    scripts/bench_local.py [--runs 20] [--binary target/release/notebook-operator]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = {
    "cells": [
        {"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [], "source": src}
        for i, src in enumerate(["x = 1", "y = x + 1", "print(x + y)"])
    ],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}


def call(url, method="GET"):
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.load(resp)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--binary", default=os.path.join(REPO, "target", "debug", "notebook-operator"))
    ap.add_argument("--python", default=os.path.join(REPO, ".venv", "bin", "python"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        nb = os.path.join(tmp, "trivial.ipynb")
        with open(nb, "w") as f:
            json.dump(NOTEBOOK, f)
        server = subprocess.Popen(
            [args.binary, "local", "--notebook", nb, "--python", args.python, "--data-dir", os.path.join(tmp, "data"),
             "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        try:
            first = server.stdout.readline()
            base = next(w for w in first.split() if w.startswith("http://"))
            times = []
            for _ in range(args.runs):
                t0 = time.monotonic()
                run = call(base + "/start", "POST")
                while run["status"] not in ("SUCCESS", "FAILURE", "REVOKED"):
                    time.sleep(0.01)
                    run = call(f"{base}/progress?task_id={run['id']}")
                times.append(time.monotonic() - t0)
                if run["status"] != "SUCCESS":
                    sys.exit(f"run {run['id']} ended {run['status']}: {run.get('message')}")
        finally:
            server.terminate()
            server.wait(timeout=10)
    print(f"/start -> SUCCESS over {len(times)} runs: median {statistics.median(times):.3f}s, "
          f"max {max(times):.3f}s, min {min(times):.3f}s (target: median < 0.8s, max < 1.5s); "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
