"""Helpers for the runner tests: run src/runner/run.py as a subprocess on a real kernel."""

import base64
import gzip
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "src" / "runner" / "run.py"
NOTEBOOKS = ROOT / "notebooks"
PROGRESS = "##notebook-operator:progress "
TRAILER = "##notebook-operator:notebook "


def code(source, tags=None, cell_id=None):
    return {"cell_type": "code", "source": source, "tags": tags, "id": cell_id}


def markdown(source):
    return {"cell_type": "markdown", "source": source}


def make_notebook(path, *cells, kernel="python3", language="python"):
    """Write an nbformat 4.5 notebook; cells are strings (code) or code()/markdown() dicts."""
    nb_cells = []
    for i, c in enumerate(cells):
        if isinstance(c, str):
            c = code(c)
        cell = {"cell_type": c["cell_type"], "id": c.get("id") or "cell-%d" % i, "metadata": {}, "source": c["source"]}
        if c.get("tags"):
            cell["metadata"]["tags"] = c["tags"]
        if c["cell_type"] == "code":
            cell["execution_count"] = None
            cell["outputs"] = []
        nb_cells.append(cell)
    nb = {
        "cells": nb_cells,
        "metadata": {"kernelspec": {"name": kernel, "display_name": kernel, "language": language}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    Path(path).write_text(json.dumps(nb, indent=1))
    return Path(path)


class Result:
    def __init__(self, rc, stdout, stderr, term_path, out_path, elapsed):
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        self.elapsed = elapsed
        self.lines = stdout.splitlines()
        self.events = [json.loads(l[len(PROGRESS):]) for l in self.lines if l.startswith(PROGRESS)]
        trailers = [l[len(TRAILER):] for l in self.lines if l.startswith(TRAILER)]
        assert len(trailers) <= 1, "more than one trailer line"
        self.trailer = decode_trailer(trailers[0]) if trailers else None
        self.term_raw = Path(term_path).read_bytes() if Path(term_path).exists() else None
        self.term = json.loads(self.term_raw) if self.term_raw is not None else None
        self.out = json.loads(Path(out_path).read_text()) if Path(out_path).exists() else None
        # the same, as nbformat reads it (multi-line strings joined)
        self.nb = nbformat.reads(Path(out_path).read_text(), as_version=4) if self.out is not None else None
        self.out_path = Path(out_path)

    def stream_lines(self):
        """stdout lines that are neither progress events nor the trailer."""
        return [l for l in self.lines if not l.startswith(PROGRESS) and not l.startswith(TRAILER)]

    def __repr__(self):
        return "Result(rc=%r)\n--- stdout\n%s\n--- stderr\n%s" % (self.rc, self.stdout[-3000:], self.stderr[-3000:])


def decode_trailer(payload):
    return json.loads(gzip.decompress(base64.b64decode(payload, validate=True)).decode("utf-8"))


def runner_cmd(notebook, out, term, *extra):
    return [sys.executable, str(RUNNER), "--notebook", str(notebook), "--output", str(out), "--termination-log", str(term), *map(str, extra)]


@pytest.fixture
def run(tmp_path):
    """run(notebook, *extra_args, timeout=..., env=...) -> Result (waits for the exit)."""

    def _run(notebook, *extra, timeout=60, env=None):
        out, term = tmp_path / "out.ipynb", tmp_path / "term.json"
        for p in (out, term):
            if p.exists():
                p.unlink()
        t0 = time.monotonic()
        p = subprocess.run(
            runner_cmd(notebook, out, term, *extra),
            capture_output=True,
            timeout=timeout,
            env=env,
            cwd=tmp_path,
        )
        return Result(
            p.returncode,
            p.stdout.decode("utf-8", "replace"),
            p.stderr.decode("utf-8", "replace"),
            term,
            out,
            time.monotonic() - t0,
        )

    return _run


class Live:
    """A running runner whose stdout lines are collected with their arrival time."""

    def __init__(self, notebook, tmp_path, *extra):
        self.out, self.term = tmp_path / "out.ipynb", tmp_path / "term.json"
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            runner_cmd(notebook, self.out, self.term, *extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=tmp_path,
        )
        self.lines = []  # (seconds since start, line)
        self._q = queue.Queue()
        self._stderr = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self._stderr.append(self.proc.stderr.read()), daemon=True).start()

    def _read(self):
        for raw in self.proc.stdout:
            item = (time.monotonic() - self.t0, raw.decode("utf-8", "replace").rstrip("\n"))
            self._q.put(item)
        self._q.put(None)

    def wait_line(self, predicate, timeout):
        """Wait until a stdout line satisfies predicate; returns (t, line)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no matching line within %ss; got %r" % (timeout, self.lines))
            try:
                item = self._q.get(timeout=left)
            except queue.Empty:
                continue
            if item is None:
                raise AssertionError("runner exited before a matching line; got %r" % (self.lines,))
            self.lines.append(item)
            if predicate(item[1]):
                return item

    def finish(self, timeout):
        """Wait for the exit; returns a Result and the exit time (seconds since start)."""
        rc = self.proc.wait(timeout=timeout)
        t_exit = time.monotonic() - self.t0
        while True:
            try:
                item = self._q.get(timeout=5)
            except queue.Empty:
                break
            if item is None:
                break
            self.lines.append(item)
        time.sleep(0.05)
        stdout = "".join(l + "\n" for _, l in self.lines)
        stderr = b"".join(self._stderr).decode("utf-8", "replace")
        return Result(rc, stdout, stderr, self.term, self.out, t_exit), t_exit

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


@pytest.fixture
def live(tmp_path):
    started = []

    def _start(notebook, *extra):
        lv = Live(notebook, tmp_path, *extra)
        started.append(lv)
        return lv

    yield _start
    for lv in started:
        lv.kill()


def kernel_processes(runner_pid):
    """Processes started by the runner as its kernel (they carry JPY_PARENT_PID=<runner pid>)."""
    found = []
    marker = ("JPY_PARENT_PID=%d" % runner_pid).encode()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/environ" % d, "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if marker in env:
            try:
                with open("/proc/%s/stat" % d) as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                found.append(int(d))
    return found
