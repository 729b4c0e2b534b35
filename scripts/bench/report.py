"""docs/benchmarks.md from the results of scripts/bench/run.py.

The figures come from the run; the explanation of a missed target comes from
scripts/bench/notes.md (one `## <target id>` section each), shown only while that target is missed.
"""
import os
import re

NOTES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notes.md")
MIB = 1024.0


def ms(v):
    return "–" if v is None else f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def mib(kib):
    return "–" if kib is None else f"{kib / MIB:.1f} MiB"


def dist(s):
    if not s or not s.get("n"):
        return "–", "–", "0"
    return ms(s["p50"]), ms(s["p99"]), str(s["n"])


def flat(a, b, slack=1.25, floor=0.005):
    """b is 'flat' against a: at most 25 % (and at least 5 ms) slower."""
    if a is None or b is None:
        return None
    return b <= max(a * slack, a + floor)


def notes():
    if not os.path.exists(NOTES):
        return {}
    text = open(NOTES).read()
    parts = re.split(r"^## (\S+).*$", text, flags=re.M)
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}


def verdict(ok):
    return "–" if ok is None else ("met" if ok else "**missed**")


def write(results, path):
    meta = results.get("meta", {})
    m = meta.get("machine", {})
    local = results.get("local", {})
    cl = results.get("cluster", {})
    levels = cl.get("levels", [0, 1000, 10000])
    top = str(levels[-1])
    series = cl.get("series", {})
    s0, st = series.get("0", {}), series.get(top, {})
    ctrl = cl.get("controller", {})
    restart = cl.get("restart", {})
    out = []
    w = out.append
    w("# Benchmarks")
    w("")
    w("Written by `make bench` (`scripts/bench/run.py`, DESIGN.md section 16): do not edit by hand; the")
    w("explanations of missed targets live in `scripts/bench/notes.md`. Benchmarks, not tests: nothing")
    w("here is asserted by `make test`, and `make bench` is not part of `make test` or CI.")
    w("")
    w("**The figures are noisy.** They were taken on a shared 2-core machine while other work (compiles,")
    w("test suites) ran beside them; the load averages below say how busy it was. Compare figures of one")
    w("run with each other (0 against 10,000 finished runs), not with another machine.")
    w("")
    w("| | |")
    w("| --- | --- |")
    w(f"| date | {meta.get('date', '–')} |")
    dirty = meta.get("dirty") or []
    w(f"| commit | `{meta.get('commit', '–')}`"
      + (f" plus uncommitted changes in the working tree to {len(dirty)} files ({', '.join(f'`{d}`' for d in dirty)}):"
         " other helpers' work in progress, built as it stood" if dirty else "") + " |")
    w(f"| machine | {m.get('cpu', '–')}, {m.get('cores', '–')} cores, {m.get('memory_gib', '–')} GiB, "
      f"Linux {m.get('kernel', '–')}, Python {m.get('python', '–')} |")
    w(f"| build | `cargo build --{meta.get('profile', 'release')}` "
      f"(`target/{meta.get('profile', 'release')}/notebook-operator`, built {meta.get('binary_built', '–')}) |")
    w(f"| command | `{meta.get('command', 'make bench')}` |")
    opts = meta.get("options", {})
    w(f"| options | {opts.get('runs')} finished runs at the top level, {opts.get('starts')} `/start` samples per "
      f"level, {opts.get('local_runs')} local runs per series, {opts.get('queue')} queued runs, "
      f"wrk {opts.get('wrk_seconds')} s per point |")
    w(f"| load (`uptime`) at start | `{meta.get('uptime', '–')}` |")
    w(f"| load (`uptime`) at end | `{meta.get('uptime_end', '–')}` |")
    hl = cl.get("history_limit_flag")
    w(f"| history | {top} finished runs created on the control plane (status patched to Succeeded, copied "
      f"from a real run), over {cl.get('history_locks', '–')} locks (≤ {int(levels[-1]) // max(1, cl.get('history_locks', 1))} "
      f"per lock), about 30 % with an inline notebook of ~5 KB; the controller runs with its defaults"
      f"{' (`--history-limit` 100 per lock: nothing is pruned)' if hl else ' (this build has no `--history-limit`)'}; "
      f"{cl.get('runs_present', '–')} runs present at the end |")
    w("")

    # Targets.
    w("## Targets")
    w("")
    w("| # | target | measured | |")
    w("| --- | --- | --- | --- |")
    rows = []
    b1_0, b1_t = s0.get("b1", {}).get("p50"), st.get("b1", {}).get("p50")
    rows.append(("B1", f"`/start` → Job p50 flat between 0 and {top} finished runs",
                 f"{ms(b1_0)} → {ms(b1_t)}", flat(b1_0, b1_t)))
    for c in (10, 50):
        a = s0.get("b5", {}).get(f"latest_c{c}", {})
        b = st.get("b5", {}).get(f"latest_c{c}", {})
        ok = None
        if a.get("rps") and b.get("rps"):
            ok = b["rps"] >= 0.8 * a["rps"] and flat(a.get("p50"), b.get("p50"), floor=0.001)
        rows.append((f"B5-c{c}", f"`/progress` flat between 0 and {top} runs ({c} connections)",
                     f"{a.get('rps', 0):.0f} → {b.get('rps', 0):.0f} req/s, p50 {ms(a.get('p50'))} → {ms(b.get('p50'))}",
                     ok))
    rss = ctrl.get(top, {}).get("rss_kib")
    rows.append(("B7", f"controller RSS < 40 MiB at {top} finished runs", mib(rss),
                 None if rss is None else rss < 40 * MIB))
    if restart:
        writes = sum(v for k, v in restart.get("api_requests", {}).items()
                     if k.split()[0] in ("POST", "PUT", "PATCH", "DELETE", "APPLY") and "notebookruns" in k)
        conv = max(restart.get("ready_s") or 0, restart.get("idle_s") or 0)
        rows.append(("B8-time", f"restart with {top} finished runs converges in < 30 s",
                     f"`/readyz` {ms(restart.get('ready_s')) if restart.get('ready_s') is not None else 'never 200'}, "
                     f"idle {ms(restart.get('idle_s'))}", conv < 30))
        rows.append(("B8-writes", "… and writes nothing for finished runs",
                     f"{restart.get('runs_modified', '–')} runs changed, {writes} write requests on NotebookRuns",
                     restart.get("runs_modified", 1) == 0 and writes == 0))
    warm = local.get("warm_paused", {}).get("start_to_success", {})
    rows.append(("B3-local", "local trivial notebook `/start` → SUCCESS median < 0.2 s (warm kernel)",
                 ms(warm.get("p50")), None if not warm.get("n") else warm["p50"] < 0.2))
    cold = local.get("cold", {}).get("start_to_success", {})
    rows.append(("B3-cold", "local, `--warm-kernel=false`: median < 0.8 s, max < 1.5 s (section 6)",
                 f"median {ms(cold.get('p50'))}, max {ms(cold.get('max'))}",
                 None if not cold.get("n") else cold["p50"] < 0.8 and cold["max"] < 1.5))
    missed = []
    for rid, target, measured, ok in rows:
        w(f"| {rid} | {target} | {measured} | {verdict(ok)} |")
        if ok is False:
            missed.append(rid)
    w("")
    w("Flat means: the p50 at the top level at most 25 % (and at least 5 ms, 1 ms for B5) above the p50")
    w("with no history, and for B5 at least 80 % of the requests per second.")
    w("")
    explain = notes()
    if missed:
        w("### Why the missed targets are missed")
        w("")
        shown = {}
        for rid in missed:
            key = rid if rid in explain else rid.split("-")[0]
            shown.setdefault(key, []).append(rid)
        for key, ids in shown.items():
            text = " ".join(explain.get(key, "").split()) or "not explained yet (add a section to scripts/bench/notes.md)."
            w(f"- **{', '.join(ids)}**: {text}")
        w("")

    # Details.
    w("## B1, B3 and B4 on the dev cluster")
    w("")
    w("The dev cluster (`make dev-cluster`): etcd, kube-apiserver, kube-controller-manager and the test")
    w("kubelet, which runs the runner as a host process with `.venv`'s Python; `notebook-operator")
    w("controller` and `notebook-operator api` as separate processes. Times are taken by one watch on")
    w("NotebookRuns and Jobs in the benchmark (the same events the facade's cache gets). The first")
    w("`/start` of a series is not counted.")
    w("")
    w("| | finished runs | p50 | p99 | n | load before |")
    w("| --- | --- | --- | --- | --- | --- |")
    for name, key, sub in (("B1 `/start` → Job exists", "b1", None),
                           ("B3 `/start` → SUCCESS (3 cells)", "b3", None),
                           ("B4 Forbid: end → next `/start` admitted", "b4_forbid", None),
                           ("B4 Queue: end → next run's Job", "b4_queue", "end_to_job"),
                           ("B4 Queue: end → next run Running", "b4_queue", "end_to_running")):
        for lvl in ("0", top):
            s = series.get(lvl, {}).get(key, {})
            if sub:
                s = s.get(sub, {})
            p50, p99, n = dist(s)
            la = series.get(lvl, {}).get("load_before")
            w(f"| {name} | {lvl} | {p50} | {p99} | {n} | {'–' if not la else f'{la[0]:.2f}'} |")
    w("")
    w("B4 Forbid counts from the moment the first run was seen finished to the answer of the `/start` that")
    w("was admitted; a `/start` refused meanwhile (400, the lock not yet released) is retried at once"
      f" ({s0.get('refused_retries', '–')} and {st.get('refused_retries', '–')} refusals at 0 and {top}).")
    w("")

    w("## B5 `/progress` under load")
    w("")
    w("`wrk -t2 -cN` against the kubernetes facade (`notebook-operator api`); `latest` is `GET /progress`")
    w("(the lock's current or last run), `by id` is `GET /progress?task_id=<id>`.")
    w("")
    w("| request | connections | finished runs | req/s | p50 | p99 | non-2xx |")
    w("| --- | --- | --- | --- | --- | --- | --- |")
    for key, label in (("latest", "`/progress`"), ("by_id", "`/progress?task_id=`")):
        for c in (10, 50):
            for lvl in ("0", top):
                r = series.get(lvl, {}).get("b5", {}).get(f"{key}_c{c}", {})
                rps = r.get("rps")
                w(f"| {label} | {c} | {lvl} | {'–' if rps is None else f'{rps:.0f}'} | {ms(r.get('p50'))} | "
                  f"{ms(r.get('p99'))} | {r.get('non2xx', '–')} |")
    w("")

    w("## B7 controller memory, B8 restart")
    w("")
    w("Each level: a controller started fresh over the namespace, RSS (`VmRSS` in `/proc/<pid>/status`) read")
    w("once it served `/healthz` and its CPU went quiet (≤ 40 ms of CPU in 2 s); open fds from")
    w("`/proc/<pid>/fd` (mostly its connections to the API server).")
    w("")
    w("| finished runs | `/healthz` after | `/readyz` after | idle after | RSS | peak RSS (VmHWM) | open fds |")
    w("| --- | --- | --- | --- | --- | --- | --- |")
    for lvl in levels:
        c = ctrl.get(str(lvl), {})
        ready = ms(c.get("ready_s")) if c.get("ready_s") is not None else "never 200"
        w(f"| {lvl} | {ms(c.get('serving_s'))} | {ready} | {ms(c.get('idle_s'))} | {mib(c.get('rss_kib'))} | "
          f"{mib(c.get('hwm_kib'))} | {c.get('fds', '–')} |")
    after = ctrl.get(f"{top}_after_series", {})
    if after:
        w(f"| {top}, after the /start series | | | | {mib(after.get('rss_kib'))} | | |")
    w("")
    cc = cl.get("cache_content", {})
    if cc:
        w(f"What a cache of whole objects holds at the top level: {cc['runs']} NotebookRuns, "
          f"{cc['json_bytes'] / 1048576:.1f} MiB of JSON as listed, of which managed fields "
          f"{cc['managed_fields_bytes'] / 1048576:.1f} MiB and inline notebooks {cc['inline_bytes'] / 1048576:.1f} MiB "
          "(deserialized structs take several times their JSON).")
        w("")
    if restart:
        w(f"B8, the restart over {top} finished runs: what changed in the namespace while it converged (a watch per")
        w("kind from before the start), and the API server's `apiserver_request_total` for those kinds (all")
        w("namespaces; the node's own Lease renewals show under `leases`).")
        w("")
        w("| | |")
        w("| --- | --- |")
        ch = restart.get("watched_changes", {})
        w(f"| changes seen | {', '.join(f'{k}: ' + ', '.join(f'{t} {n}' for t, n in v.items()) for k, v in ch.items()) or 'none'} |")
        w(f"| runs modified | {restart.get('runs_modified', '–')} |")
        req = restart.get("api_requests", {})
        w(f"| requests | {', '.join(f'{k}: {v}' for k, v in sorted(req.items())) or 'none'} |")
        w("")

    w("## B11 idle memory and cold start")
    w("")
    w("Cold start: from `exec` to the first 200 from `/readyz` (polled every 5 ms). Idle RSS: the Rust")
    w("process only, after start-up, once its CPU went quiet (the local backend's warm spare is a")
    w("Python child with memory of its own, not counted).")
    w("")
    w("| command | cold start → `/readyz` | idle RSS |")
    w("| --- | --- | --- |")
    wp = local.get("warm_paused", {})
    cd = local.get("cold", {})
    w(f"| `local` (warm kernel) | {ms(wp.get('ready_s'))} | {mib(wp.get('idle_rss_kib'))} |")
    w(f"| `local --warm-kernel=false` | {ms(cd.get('ready_s'))} | {mib(cd.get('idle_rss_kib'))} |")
    api = cl.get("api", {})
    w(f"| `api` (0 runs; {top} runs) | {ms(api.get('ready_s'))} | {mib(api.get('idle_rss_kib'))}; "
      f"{mib(api.get('rss_kib_at_top'))} |")
    c0 = ctrl.get("0", {})
    ready = ms(c0.get("ready_s")) if c0.get("ready_s") is not None else "never 200 (see notes)"
    w(f"| `controller` (0 runs) | {ready}; `/healthz` {ms(c0.get('serving_s'))} | {mib(c0.get('rss_kib'))} |")
    w("")

    w("## B3 on the local backend")
    w("")
    w("`notebook-operator local` on a trivial 3-cell notebook, `.venv`'s Python; `/start`, then")
    w("`/progress?task_id=` every 5 ms until SUCCESS.")
    w("")
    w("| series | p50 | p99 | max | n |")
    w("| --- | --- | --- | --- | --- |")
    for key, label in (("warm_paused", f"warm kernel, {local.get('pause_s', '–')} s between runs"),
                       ("warm_back_to_back", "warm kernel, back to back (the spare may still be starting)"),
                       ("cold", "`--warm-kernel=false`")):
        s = local.get(key, {}).get("start_to_success", {})
        p50, p99, n = dist(s)
        w(f"| {label} | {p50} | {p99} | {ms(s.get('max'))} | {n} |")
    w("")
    w("For comparison (issue 11): the original FastAPI + Celery service took a median 1.26 s on the same")
    w("notebook, this project before the warm kernel 0.74 s.")
    w("")
    never_ready = any(isinstance(c, dict) and "serving_s" in c and c.get("ready_s") is None for c in ctrl.values())
    if "general" in explain or never_ready:
        w("## Notes")
        w("")
        w(explain.get("general", ""))
        if never_ready and "readyz" in explain:
            w("- " + " ".join(explain["readyz"].split()))
        w("")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(out))
