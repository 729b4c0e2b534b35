#!/usr/bin/env python3
"""The benchmarks of DESIGN.md section 16, written to docs/benchmarks.md (`make bench`).

Benchmarks, not tests: each prints its figure and nothing asserts a time. Standard library
only (run with .venv/bin/python: the local backend needs the runner's packages there).

    run.py all            # everything; writes docs/benchmarks.md (and target/bench/results.json)
    run.py local          # B3 (local) and B11 (local)
    run.py cluster        # B1, B3 (cluster), B4, B5, B7, B8, B11 (api, controller) on a dev cluster
    run.py report         # docs/benchmarks.md again from target/bench/results.json

Options (also env): --runs / BENCH_RUNS (finished runs at the top level, default 10000; the
middle level is a tenth), --starts / BENCH_STARTS (/start samples per level, default 40),
--local-runs / BENCH_LOCAL_RUNS (20), --queue / BENCH_QUEUE (queued runs for B4, 30),
--wrk-seconds / BENCH_WRK_SECONDS (8), --profile / BENCH_PROFILE (release|debug),
--no-build, BENCH_KUBECONFIG (use a running dev cluster instead of starting one).
A quick run: `BENCH_RUNS=1000 BENCH_STARTS=10 BENCH_LOCAL_RUNS=5 BENCH_WRK_SECONDS=3 make bench`.
"""
import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kube as k8s  # noqa: E402
import report  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_PYTHON = os.path.join(REPO, ".venv", "bin", "python")
OUT_DIR = os.path.join(REPO, "target", "bench")
RESULTS = os.path.join(OUT_DIR, "results.json")
NS = os.environ.get("BENCH_NAMESPACE", "bench")
FACADE_LOCK = "bench"
QUEUE_LOCK = "bench-queue"
NOTEBOOK_CM = "bench-notebook"
HISTORY_LOCKS = 200
TEST_IMAGE = "quay.io/jupyter/minimal-notebook:test"


def trivial_notebook(cells=("x = 1", "y = x + 1", "print(x + y)")):
    return {
        "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [],
                   "source": src} for i, src in enumerate(cells)],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def realistic_notebook():
    """About 5 KB of ipynb: what an inline run of a small report carries."""
    cells = ["import math, json, statistics\nparams = {'alpha': 0.1, 'days': 30}\n"]
    for i in range(18):
        cells.append(
            f"# step {i}: load, clean and summarise a slice of the data\n"
            f"values_{i} = [math.sin(x / {i + 1}) * {i + 2} for x in range(200)]\n"
            f"summary_{i} = {{'mean': statistics.mean(values_{i}), 'max': max(values_{i}),\n"
            f"              'min': min(values_{i})}}\nprint(json.dumps(summary_{i}))\n")
    return json.dumps(trivial_notebook(cells))


# --- small helpers ------------------------------------------------------------------------


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(values, p):
    """Nearest-rank percentile."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))]


def summary(values):
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": pct(values, 50), "p99": pct(values, 99), "max": max(values),
            "min": min(values), "mean": statistics.fmean(values)}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])  # KiB
    return out


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)


def wait_idle(pid, window=2.0, max_ticks=4, timeout=300):
    """Waits until the process used at most `max_ticks` clock ticks (10 ms each) of CPU over
    `window` seconds; returns the monotonic time that quiet window began."""
    samples = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = time.monotonic()
        samples.append((now, cpu_ticks(pid)))
        old = [s for s in samples if s[0] <= now - window]
        if old:
            t0, ticks0 = old[-1]
            if samples[-1][1] - ticks0 <= max_ticks:
                return t0
        time.sleep(0.1)
    raise TimeoutError(f"process {pid} never went idle in {timeout}s")


def http(method, url, body=None, timeout=60):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, method=method, data=data if data is not None else (b"" if method == "POST"
                                                                                         else None))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(url, started, timeout=120):
    """Polls `url` every 5 ms until it answers 200; returns seconds since `started`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.005)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def load():
    return os.getloadavg()


class Procs:
    """The processes this script started; each stopped by its own pid (SIGTERM, then SIGKILL)."""

    def __init__(self):
        self.procs = []

    def start(self, argv, log_path, env=None):
        logf = open(log_path, "ab")
        p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, **(env or {})}, start_new_session=True, cwd=REPO)
        p.started = time.monotonic()
        p.log_path = log_path
        self.procs.append(p)
        return p

    def stop(self, p, grace=20):
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self):
        for p in reversed(list(self.procs)):
            self.stop(p)


# --- build --------------------------------------------------------------------------------


def build(args):
    profile = ["--release"] if args.profile == "release" else []
    if not args.no_build:
        log(f"cargo build --locked {' '.join(profile)} --bin notebook-operator")
        subprocess.run(["cargo", "build", "--locked", *profile, "--bin", "notebook-operator"], cwd=REPO, check=True)
    binary = os.path.join(REPO, "target", args.profile, "notebook-operator")
    if not os.path.exists(binary):
        sys.exit(f"{binary} missing: build it or drop --no-build")
    return binary


def git_commit():
    out = subprocess.run(["git", "log", "-1", "--format=%h %s"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip()[:120]


def git_dirty():
    """Source files that differ from the commit (the build is of the working tree)."""
    out = subprocess.run(["git", "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"], cwd=REPO,
                         capture_output=True, text=True)
    return [line[3:] for line in out.stdout.splitlines()]


def machine():
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kib / 1048576, 1),
            "kernel": platform.release(), "python": platform.python_version()}


# --- B3 and B11 on the local backend ---------------------------------------------------------


def local_series(binary, runs, warm, pause, tmp, tag):
    nb = os.path.join(tmp, "trivial.ipynb")
    with open(nb, "w") as f:
        json.dump(trivial_notebook(), f)
    port = free_port()
    data = os.path.join(tmp, f"data-{tag}")
    procs = Procs()
    argv = [binary, "local", "--notebook", nb, "--python", VENV_PYTHON, "--data-dir", data,
            "--listen", f"127.0.0.1:{port}", f"--warm-kernel={'true' if warm else 'false'}"]
    p = procs.start(argv, os.path.join(OUT_DIR, f"local-{tag}.log"), env={"RUST_LOG": "warn"})
    base = f"http://127.0.0.1:{port}"
    out = {}
    try:
        out["ready_s"] = wait_ready(base + "/readyz", p.started)
        # Idle: the Rust process only (a warm spare's Python is a child with its own RSS).
        time.sleep(pause or 1.0)
        wait_idle(p.pid, timeout=60)
        out["idle_rss_kib"] = proc_status(p.pid)["VmRSS"]
        times = []
        for _ in range(runs):
            if pause:
                time.sleep(pause)
            t0 = time.monotonic()
            status, body = http("POST", base + "/start")
            if status != 200:
                raise RuntimeError(f"/start answered {status}: {body[:200]!r}")
            run = json.loads(body)
            while run["status"] not in ("SUCCESS", "FAILURE", "REVOKED"):
                time.sleep(0.005)
                run = json.loads(http("GET", f"{base}/progress?task_id={run['id']}")[1])
            times.append(time.monotonic() - t0)
            if run["status"] != "SUCCESS":
                raise RuntimeError(f"run {run['id']} ended {run['status']}")
        out["start_to_success"] = summary(times)
        out["after_rss_kib"] = proc_status(p.pid)["VmRSS"]
    finally:
        procs.stop_all()
    return out


def bench_local(args, binary, results):
    log("local backend: B3 (start -> SUCCESS) and B11 (cold start, idle RSS)")
    res = results.setdefault("local", {})
    res["load_before"] = load()
    with tempfile.TemporaryDirectory() as tmp:
        res["warm_paused"] = local_series(binary, args.local_runs, True, args.local_pause, tmp, "warm-paused")
        log(f"  warm kernel, {args.local_pause}s between runs: {fmt_s(res['warm_paused']['start_to_success'])}")
        res["warm_back_to_back"] = local_series(binary, args.local_runs, True, 0, tmp, "warm-b2b")
        log(f"  warm kernel, back to back: {fmt_s(res['warm_back_to_back']['start_to_success'])}")
        res["cold"] = local_series(binary, args.local_runs, False, args.local_pause, tmp, "cold")
        log(f"  --warm-kernel=false: {fmt_s(res['cold']['start_to_success'])}")
    res["pause_s"] = args.local_pause
    res["load_after"] = load()


def secs(v):
    return "never 200" if v is None else f"{v:.3f}s"


def fmt_s(s):
    if not s or not s.get("n"):
        return "no samples"
    return f"p50 {s['p50'] * 1000:.0f} ms, p99 {s['p99'] * 1000:.0f} ms (n={s['n']})"


# --- the dev cluster ---------------------------------------------------------------------------


class Cluster:
    def __init__(self, args, binary, procs):
        self.args, self.binary, self.procs = args, binary, procs
        self.assets = os.environ.get("KUBEBUILDER_ASSETS") or subprocess.run(
            ["tests/control-plane/build.sh"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip().splitlines()[-1]
        self.kubeconfig = os.environ.get("BENCH_KUBECONFIG")
        if not self.kubeconfig:
            example = os.path.join(REPO, "target", "debug", "examples", "dev_cluster")
            if not args.no_build:
                log("cargo build --locked --example dev_cluster")
                built = subprocess.run(["cargo", "build", "--locked", "--example", "dev_cluster"], cwd=REPO)
                if built.returncode != 0:
                    if not os.path.exists(example):
                        sys.exit("cargo build --example dev_cluster failed")
                    log("  the build failed: using the dev_cluster built before (test infrastructure only)")
            self.kubeconfig = os.path.join(OUT_DIR, "kubeconfig")
            if os.path.exists(self.kubeconfig):
                os.remove(self.kubeconfig)
            log("starting the dev cluster (etcd, kube-apiserver, kube-controller-manager, test kubelet)")
            self.dev = procs.start([example],
                                   os.path.join(OUT_DIR, "dev-cluster.log"),
                                   env={"KUBEBUILDER_ASSETS": self.assets, "KUBECONFIG_OUT": self.kubeconfig})
            deadline = time.monotonic() + 180
            while not os.path.exists(self.kubeconfig):
                if self.dev.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"the dev cluster did not start: see {self.dev.log_path}")
                time.sleep(0.2)
            time.sleep(0.5)
        self.kube = k8s.Kube(self.kubeconfig)
        self.controller = None
        self.facade = None
        self.controller_port = None

    def kubectl(self, *argv, stdin=None):
        out = subprocess.run([os.path.join(self.assets, "kubectl"), "--kubeconfig", self.kubeconfig, *argv],
                             input=stdin, capture_output=True)
        if out.returncode != 0:
            sys.exit(f"kubectl {' '.join(argv)}: {out.stderr.decode(errors='replace')}")

    def prepare(self):
        # The CRDs of the binary under test (`notebook-operator crd`), not a file that may lag.
        crd = subprocess.run([self.binary, "crd"], capture_output=True, check=True).stdout
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=crd)
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/notebookruns.notebooks.dev")
        # NotebookSchedule, where the binary has it (the controller watches it).
        schedule = subprocess.run([self.binary, "crd", "schedule"], capture_output=True)
        if schedule.returncode == 0 and schedule.stdout.strip():
            self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=schedule.stdout)
        if self.kube.get_opt(f"/api/v1/namespaces/{NS}") is not None:
            sys.exit(f"namespace {NS} exists already: use a fresh dev cluster")
        self.kube.create("/api/v1/namespaces", {"metadata": {"name": NS}})
        deadline = time.monotonic() + 60
        while self.kube.get_opt(f"/api/v1/namespaces/{NS}/serviceaccounts/default") is None:
            if time.monotonic() > deadline:
                sys.exit("no default service account: is kube-controller-manager running?")
            time.sleep(0.2)
        self.kube.create(k8s.PATHS["configmaps"](NS), {
            "metadata": {"name": NOTEBOOK_CM}, "data": {"notebook.ipynb": json.dumps(trivial_notebook())}})

    def controller_help(self):
        return subprocess.run([self.binary, "controller", "--help"], capture_output=True, text=True).stdout

    def start_controller(self, tag):
        self.controller_port = free_port()
        argv = [self.binary, "controller", "--namespace", NS, "--listen", f"127.0.0.1:{self.controller_port}",
                "--default-image", TEST_IMAGE]
        self.controller = self.procs.start(argv, os.path.join(OUT_DIR, f"controller-{tag}.log"),
                                           env={"KUBECONFIG": self.kubeconfig, "RUST_LOG": "warn"})
        base = f"http://127.0.0.1:{self.controller_port}"
        serving = wait_ready(base + "/healthz", self.controller.started)
        ready = {}

        def poll():
            try:
                ready["s"] = wait_ready(base + "/readyz", self.controller.started, timeout=self.args.ready_timeout)
            except TimeoutError:
                # Seen on this code: /readyz of a controller without --leader-elect stays 503 (see
                # notes.md); convergence is then judged by the idle time alone.
                log(f"  the controller's /readyz was not 200 after {self.args.ready_timeout}s")
                ready["s"] = None

        t = threading.Thread(target=poll, daemon=True)
        t.start()
        return serving, ready, t

    def stop_controller(self):
        if self.controller is not None:
            self.procs.stop(self.controller)
            self.controller = None

    def start_facade(self):
        port = free_port()
        argv = [self.binary, "api", "--namespace", NS, "--notebook-configmap", NOTEBOOK_CM, "--lock", FACADE_LOCK,
                "--listen", f"127.0.0.1:{port}", "--admit-timeout", "30s"]
        self.facade = self.procs.start(argv, os.path.join(OUT_DIR, "api.log"),
                                       env={"KUBECONFIG": self.kubeconfig, "RUST_LOG": "warn"})
        self.base = f"http://127.0.0.1:{port}"
        return wait_ready(self.base + "/readyz", self.facade.started)

    def metrics_counts(self):
        return k8s.request_counts(self.kube.metrics())


class Observer:
    """Watches the namespace's runs and Jobs: when each run was first seen terminal, when each
    Job appeared (by the run label), as this machine's monotonic clock saw them."""

    def __init__(self, kube):
        self.lock = threading.Condition()
        self.terminal = {}
        self.phase = {}
        self.job_added = {}
        self.running = {}
        self.watches = [kube.watch(k8s.runs_path(NS), self.on_run), kube.watch(k8s.PATHS["jobs"](NS), self.on_job)]
        for w in self.watches:
            w.ready.wait(30)

    def on_run(self, t, typ, obj):
        name = obj["metadata"]["name"]
        phase = (obj.get("status") or {}).get("phase")
        with self.lock:
            self.phase[name] = phase
            if phase in ("Succeeded", "Failed", "Cancelled", "Rejected") and name not in self.terminal:
                self.terminal[name] = t
            if phase == "Running" and name not in self.running:
                self.running[name] = t
            self.lock.notify_all()

    def on_job(self, t, typ, obj):
        run = (obj["metadata"].get("labels") or {}).get("notebooks.dev/run")
        if typ == "ADDED" and run:
            with self.lock:
                self.job_added.setdefault(run, t)
                self.lock.notify_all()

    def wait(self, table, name, timeout=120):
        deadline = time.monotonic() + timeout
        with self.lock:
            while name not in table:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{name}: not seen in {timeout}s (phase {self.phase.get(name)})")
                self.lock.wait(left)
            return table[name]

    def stop(self):
        for w in self.watches:
            w.stop()


def bench_starts(cluster, obs, n):
    """B1 (/start -> Job exists), B3 on the cluster (/start -> SUCCESS, seen by the watch that
    also feeds /progress) and B4 with Forbid (the run's end -> the next /start admitted: a
    client retrying a refused /start at once)."""
    b1, b3, b4 = [], [], []
    prev = None
    refused = 0
    for _ in range(n + 1):
        t_end = obs.wait(obs.terminal, prev) if prev is not None else None
        while True:
            t0 = time.monotonic()
            status, body = http("POST", cluster.base + "/start")
            if status == 200:
                break
            if status == 400 and b"already running" in body:
                refused += 1
                time.sleep(0.005)
                continue
            raise RuntimeError(f"/start answered {status}: {body[:300]!r}")
        t_admitted = time.monotonic()
        run = json.loads(body)["id"]
        if t_end is not None:
            b4.append(t_admitted - t_end)
        t_job = obs.wait(obs.job_added, run)
        t_done = obs.wait(obs.terminal, run)
        if obs.phase.get(run) != "Succeeded":
            raise RuntimeError(f"run {run} ended {obs.phase.get(run)}")
        # The first start of a series warms connections and caches: kept out of the figures.
        if prev is not None:
            b1.append(t_job - t0)
            b3.append(t_done - t0)
        prev = run
    return {"b1": summary(b1), "b3": summary(b3), "b4_forbid": summary(b4), "refused_retries": refused}


def bench_queue(cluster, obs, n, tag):
    """B4 with Queue: n runs queued on one lock at once; each run's end -> the next one's Job."""
    names = [f"queue-{tag}-{i:03d}" for i in range(n)]
    spec = {"notebook": {"inline": json.dumps(trivial_notebook())}, "lock": QUEUE_LOCK,
            "concurrencyPolicy": "Queue"}
    for name in names:
        cluster.kube.create(k8s.runs_path(NS), {"apiVersion": "notebooks.dev/v1alpha1", "kind": "NotebookRun",
                                                "metadata": {"name": name}, "spec": spec})
    gaps, to_running = [], []
    for a, b in zip(names, names[1:]):
        t_end = obs.wait(obs.terminal, a, timeout=180)
        gaps.append(obs.wait(obs.job_added, b, timeout=180) - t_end)
        to_running.append(obs.wait(obs.running, b, timeout=180) - t_end)
    obs.wait(obs.terminal, names[-1], timeout=180)
    bad = [x for x in names if obs.phase.get(x) != "Succeeded"]
    if bad:
        raise RuntimeError(f"queued runs not Succeeded: {bad[:5]}")
    return {"end_to_job": summary(gaps), "end_to_running": summary(to_running)}


WRK_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def wrk(url, connections, seconds):
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", url],
                         capture_output=True, text=True, check=True).stdout

    def latency(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        return float(m.group(1)) * WRK_UNITS[m.group(2)] if m else None

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    return {"rps": float(rps.group(1)) if rps else None, "p50": latency(50), "p99": latency(99),
            "non2xx": int(non2xx.group(1)) if non2xx else 0, "socket_errors": errors.group(0) if errors else None}


def bench_progress(cluster, seconds, task_id):
    out = {}
    for path in ("/progress", f"/progress?task_id={task_id}"):
        key = "latest" if path == "/progress" else "by_id"
        for c in (10, 50):
            out[f"{key}_c{c}"] = wrk(cluster.base + path, c, seconds)
            r = out[f"{key}_c{c}"]
            log(f"  B5 GET {path.split('?')[0]}{' ?task_id' if key == 'by_id' else ''} c={c}: "
                f"{r['rps']} req/s, p50 {r['p50']}, p99 {r['p99']}, non-2xx {r['non2xx']}")
    return out


def ensure_wrk():
    if subprocess.run(["sh", "-c", "command -v wrk"], capture_output=True).returncode == 0:
        return
    log("installing wrk (apt-get install -y wrk)")
    if subprocess.run(["apt-get", "install", "-y", "wrk"], capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, capture_output=True)


# --- history: finished runs created on the control plane --------------------------------------


def finished_status(template, name, now):
    status = json.loads(json.dumps(template).replace(template["_run"], name))
    status.pop("_run", None)
    for key in ("startTime", "completionTime"):
        status[key] = now
    for c in status.get("conditions", []):
        c["lastTransitionTime"] = now
    return status


def status_template(cluster):
    """A real Succeeded run's status (from the level-0 series), to copy into history."""
    runs = cluster.kube.get(k8s.runs_path(NS) + f"?labelSelector=app.kubernetes.io/created-by%3Dnotebook-operator-api")
    for run in runs["items"]:
        st = run.get("status") or {}
        if st.get("phase") == "Succeeded":
            return {**st, "_run": run["metadata"]["name"]}
    raise RuntimeError("no Succeeded run to copy a status from")


def fill_history(cluster, template, start, end, inline_share=0.3, threads=16):
    """Creates runs history-<start>..<end-1>, each patched to Succeeded; spread over
    HISTORY_LOCKS locks. Returns seconds taken."""
    inline = realistic_notebook()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rng = random.Random(start)
    kube = cluster.kube

    def one(i):
        name = f"history-{i:05d}"
        if rng.random() < inline_share:
            notebook = {"inline": inline}
        else:
            notebook = {"configMap": {"name": NOTEBOOK_CM, "key": "notebook.ipynb"}}
        body = {"apiVersion": "notebooks.dev/v1alpha1", "kind": "NotebookRun",
                "metadata": {"name": name, "labels": {"bench.notebooks.dev/history": "true"}},
                "spec": {"notebook": notebook, "lock": f"hist-{i % HISTORY_LOCKS:03d}",
                         "parameters": {"day": i % 31, "region": "eu"}}}
        kube.create(k8s.runs_path(NS), body)
        kube.merge_patch(f"{k8s.runs_path(NS)}/{name}/status", {"status": finished_status(template, name, now)})

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for f in concurrent.futures.as_completed([pool.submit(one, i) for i in range(start, end)]):
            f.result()
    return time.monotonic() - t0


def cache_content(cluster):
    """What a cache of whole NotebookRuns holds: bytes of JSON as listed, and the share of
    managed fields and inline notebooks."""
    total = managed = inline = count = 0
    cont = None
    while True:
        page = cluster.kube.get(k8s.runs_path(NS) + "?limit=2000" + (f"&continue={cont}" if cont else ""))
        for run in page["items"]:
            count += 1
            total += len(json.dumps(run, separators=(",", ":")))
            managed += len(json.dumps(run["metadata"].get("managedFields", []), separators=(",", ":")))
            inline += len((run["spec"].get("notebook") or {}).get("inline") or "")
        cont = page["metadata"].get("continue")
        if not cont:
            break
    return {"runs": count, "json_bytes": total, "managed_fields_bytes": managed, "inline_bytes": inline}


def run_count(cluster):
    return len(cluster.kube.get(k8s.runs_path(NS))["items"])


def controller_settled(cluster, tag):
    """Starts the controller, waits until ready and idle; its readiness time and RSS."""
    serving, ready, poller = cluster.start_controller(tag)
    pid = cluster.controller.pid
    idle_at = wait_idle(pid)
    st = proc_status(pid)
    poller.join()
    return {"serving_s": serving, "ready_s": ready.get("s"), "idle_s": idle_at - cluster.controller.started,
            "rss_kib": st["VmRSS"], "hwm_kib": st["VmHWM"], "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def restart_with_count(cluster, tag):
    """B8: a controller started over the namespace's history: time to ready and to idle, and
    what it wrote (watched changes in the namespace; the API server's request counters)."""
    changes = {}
    lock = threading.Lock()
    per_kind = {}

    def counter(kind):
        def on(t, typ, obj):
            with lock:
                changes.setdefault(kind, {}).setdefault(typ, 0)
                changes[kind][typ] += 1
                if kind == "notebookruns" and typ == "MODIFIED":
                    per_kind.setdefault("runs", set()).add(obj["metadata"]["name"])
        return on

    watches = [cluster.kube.watch(path(NS), counter(kind)) for kind, path in k8s.PATHS.items()]
    for w in watches:
        w.ready.wait(30)
    before = cluster.metrics_counts()
    out = controller_settled(cluster, tag)
    time.sleep(2)  # late writes would show here
    after = cluster.metrics_counts()
    for w in watches:
        w.stop()
    requests = {}
    for key, value in after.items():
        diff = value - before.get(key, 0)
        resource, sub, verb = key
        if diff and resource in ("notebookruns", "leases", "jobs", "configmaps", "events", "pods"):
            requests[f"{verb} {resource}{'/' + sub if sub else ''}"] = int(diff)
    out["watched_changes"] = changes
    out["runs_modified"] = len(per_kind.get("runs", ()))
    out["api_requests"] = requests
    return out


def bench_cluster(args, binary, results):
    ensure_wrk()
    procs = Procs()
    res = results.setdefault("cluster", {})
    try:
        cluster = Cluster(args, binary, procs)
        cluster.prepare()
        help_text = cluster.controller_help()
        res["history_limit_flag"] = "--history-limit" in help_text
        res["history_locks"] = HISTORY_LOCKS
        top = args.runs
        levels = [0, top // 10, top]
        res["levels"] = levels
        res["load"] = {"start": load()}

        # Level 0: cold starts (B11), RSS with no history (B7), the series.
        log("level 0: controller and facade cold start (B11), RSS (B7)")
        res["controller"] = {"0": controller_settled(cluster, "0")}
        res["api"] = {"ready_s": cluster.start_facade()}
        time.sleep(1)
        wait_idle(cluster.facade.pid, timeout=60)
        res["api"]["idle_rss_kib"] = proc_status(cluster.facade.pid)["VmRSS"]
        log(f"  controller /readyz {secs(res['controller']['0']['ready_s'])}, RSS {res['controller']['0']['rss_kib']} KiB;"
            f" api ready {res['api']['ready_s']:.3f}s, RSS {res['api']['idle_rss_kib']} KiB")
        obs = Observer(cluster.kube)
        res["series"] = {}
        res["series"]["0"] = series(args, cluster, obs, "0")
        template = status_template(cluster)

        created = 0
        for level in levels[1:]:
            log(f"history: stopping the controller, creating finished runs up to {level}")
            cluster.stop_controller()
            took = fill_history(cluster, template, created, level)
            log(f"  {level - created} runs created and patched Succeeded in {took:.1f}s")
            res.setdefault("fill_s", {})[str(level)] = took
            created = level
            if level == top:
                log(f"level {level}: restart convergence (B8) and RSS (B7)")
                res["restart"] = restart_with_count(cluster, str(level))
                res["controller"][str(level)] = {k: res["restart"][k] for k in
                                                 ("serving_s", "ready_s", "idle_s", "rss_kib", "hwm_kib", "fds")}
                log(f"  /readyz {secs(res['restart']['ready_s'])}, idle {res['restart']['idle_s']:.2f}s, "
                    f"RSS {res['restart']['rss_kib']} KiB, runs modified {res['restart']['runs_modified']}, "
                    f"requests {res['restart']['api_requests']}")
            else:
                log(f"level {level}: RSS (B7)")
                res["controller"][str(level)] = controller_settled(cluster, str(level))
                log(f"  RSS {res['controller'][str(level)]['rss_kib']} KiB")
        res["runs_present"] = run_count(cluster)
        res["cache_content"] = cache_content(cluster)
        time.sleep(1)
        res["api"]["rss_kib_at_top"] = proc_status(cluster.facade.pid)["VmRSS"]
        res["series"][str(top)] = series(args, cluster, obs, str(top))
        res["controller"][f"{top}_after_series"] = {"rss_kib": proc_status(cluster.controller.pid)["VmRSS"]}
        res["load"]["end"] = load()
        obs.stop()
    finally:
        procs.stop_all()


def series(args, cluster, obs, tag):
    out = {"load_before": load()}
    log(f"level {tag}: B1/B3/B4 Forbid over {args.starts} /start calls")
    out.update(bench_starts(cluster, obs, args.starts))
    log(f"  B1 {fmt_s(out['b1'])}; B3 cluster {fmt_s(out['b3'])}; B4 Forbid {fmt_s(out['b4_forbid'])}")
    log(f"level {tag}: B4 Queue over {args.queue} queued runs")
    out["b4_queue"] = bench_queue(cluster, obs, args.queue, tag)
    log(f"  B4 Queue end -> Job {fmt_s(out['b4_queue']['end_to_job'])}")
    last = json.loads(http("GET", cluster.base + "/progress")[1])["id"]
    out["b5"] = bench_progress(cluster, args.wrk_seconds, last)
    out["load_after"] = load()
    return out


# --- main ---------------------------------------------------------------------------------------


def main():
    env = os.environ.get
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="all", choices=["all", "local", "cluster", "report"])
    ap.add_argument("--runs", type=int, default=int(env("BENCH_RUNS", "10000")))
    ap.add_argument("--starts", type=int, default=int(env("BENCH_STARTS", "40")))
    ap.add_argument("--local-runs", type=int, default=int(env("BENCH_LOCAL_RUNS", "20")))
    ap.add_argument("--local-pause", type=float, default=float(env("BENCH_LOCAL_PAUSE", "1.5")))
    ap.add_argument("--queue", type=int, default=int(env("BENCH_QUEUE", "30")))
    ap.add_argument("--ready-timeout", type=float, default=float(env("BENCH_READY_TIMEOUT", "20")))
    ap.add_argument("--wrk-seconds", type=int, default=int(env("BENCH_WRK_SECONDS", "8")))
    ap.add_argument("--profile", choices=["release", "debug"], default=env("BENCH_PROFILE", "release"))
    ap.add_argument("--no-build", action="store_true", default=env("BENCH_NO_BUILD") == "1")
    ap.add_argument("--output", default=os.path.join(REPO, "docs", "benchmarks.md"))
    args = ap.parse_args()
    os.makedirs(OUT_DIR, exist_ok=True)
    if args.what == "report":
        with open(RESULTS) as f:
            results = json.load(f)
        report.write(results, args.output)
        log(f"wrote {args.output}")
        return
    results = {}
    if args.what != "all" and os.path.exists(RESULTS):
        with open(RESULTS) as f:
            results = json.load(f)
    binary = build(args)
    results["meta"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(), "dirty": git_dirty(), "machine": machine(),
        "binary_built": datetime.datetime.fromtimestamp(os.path.getmtime(binary), datetime.timezone.utc)
        .strftime("%Y-%m-%d %H:%M UTC"), "profile": args.profile,
        "command": " ".join(["make bench" if env("MAKELEVEL") else "scripts/bench/run.py", *sys.argv[1:]]),
        "options": {"runs": args.runs, "starts": args.starts, "local_runs": args.local_runs,
                    "local_pause": args.local_pause, "queue": args.queue, "wrk_seconds": args.wrk_seconds},
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }
    if args.what in ("all", "local"):
        bench_local(args, binary, results)
    if args.what in ("all", "cluster"):
        bench_cluster(args, binary, results)
    results["meta"]["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=1)
    report.write(results, args.output)
    log(f"wrote {args.output} and {RESULTS}")


if __name__ == "__main__":
    main()
