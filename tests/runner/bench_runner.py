#!/usr/bin/env python3
"""Benchmark (not a test): end-to-end wall time of the runner on a trivial notebook.

    .venv/bin/python tests/runner/bench_runner.py [-n 10] [--notebook PATH]

Default notebook: three trivial code cells (no sleeps). Reports median and max of
python start -> process exit, plus the time to the first progress event.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "..", "..", "src", "runner", "run.py")

TRIVIAL = {
    "cells": [
        {"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [], "source": src}
        for i, src in enumerate(["x = 1", "y = x + 1", "print('y =', y)"])
    ],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=10)
    ap.add_argument("--notebook")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        nb = a.notebook
        if not nb:
            nb = os.path.join(tmp, "trivial.ipynb")
            with open(nb, "w") as f:
                json.dump(TRIVIAL, f)
        totals, firsts = [], []
        for i in range(a.n):
            out = os.path.join(tmp, "out.ipynb")
            t0 = time.monotonic()
            p = subprocess.Popen(
                [sys.executable, RUNNER, "--notebook", nb, "--output", out],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            first = None
            for line in p.stdout:
                if first is None and line.startswith(b"##notebook-operator:progress"):
                    first = time.monotonic() - t0
            rc = p.wait(timeout=120)
            total = time.monotonic() - t0
            if rc != 0:
                print(f"run {i}: exit code {rc}", file=sys.stderr)
            totals.append(total)
            firsts.append(first or 0.0)
            print(f"run {i + 1:2d}: {total:.3f} s (start event at {first or 0:.3f} s)")
        print(
            f"end-to-end over {a.n} runs: median {statistics.median(totals):.3f} s, "
            f"max {max(totals):.3f} s, min {min(totals):.3f} s; "
            f"start event median {statistics.median(firsts):.3f} s"
        )


if __name__ == "__main__":
    main()
