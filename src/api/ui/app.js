// The dashboard: plain DOM and fetch over the REST API (/runs), no framework, no CDN.
"use strict";
const TOKEN_KEY = "notebook-operator-token";
const $ = (id) => document.getElementById(id);
let timer = null;
let follow = null; // AbortController of the log being followed

function token() { return sessionStorage.getItem(TOKEN_KEY); }

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token()) headers["Authorization"] = "Bearer " + token();
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  if (resp.status === 401) throw new Unauthorized("token needed");
  return resp;
}

async function detail(resp) {
  try { return (await resp.json()).detail || resp.statusText; } catch (_) { return resp.statusText; }
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function duration(run) {
  if (!run.startedAt) return "";
  const end = run.finishedAt ? Date.parse(run.finishedAt) : Date.now();
  const s = Math.max(0, Math.round((end - Date.parse(run.startedAt)) / 1000));
  return s < 60 ? s + " s" : Math.floor(s / 60) + " min " + (s % 60) + " s";
}

function percent(run) {
  if (run.progress) return run.progress.percent;
  return run.phase === "Succeeded" ? 100 : 0;
}

const ACTIVE = ["Pending", "Queued", "Running"];

function show(view) {
  for (const id of ["token-view", "list-view", "run-view"]) $(id).hidden = id !== view;
  $("forget-token").hidden = !token();
}

function needToken() {
  stop();
  show("token-view");
  $("token-input").focus();
}

function stop() {
  if (timer) clearTimeout(timer);
  timer = null;
  if (follow) follow.abort();
  follow = null;
}

// === the runs list ===

async function renderList() {
  const resp = await api("/runs?limit=100");
  const page = await resp.json();
  const body = $("runs").querySelector("tbody");
  body.replaceChildren(...page.items.map((run) => {
    const bar = el("progress", { max: "100", value: String(percent(run)), "aria-label": "Progress of " + run.id });
    const kill = ACTIVE.includes(run.phase)
      ? el("button", { type: "button", class: "danger", "aria-label": "Kill run " + run.id, text: "Kill" })
      : "";
    if (kill) kill.addEventListener("click", () => cancel(run.id));
    return el("tr", { "data-run": run.id },
      el("td", { "data-label": "Run" }, el("a", { href: "#/runs/" + run.id, text: run.id.slice(0, 8) })),
      el("td", { "data-label": "Phase" }, el("span", { class: "badge " + run.phase, text: run.phase })),
      el("td", { "data-label": "Progress" }, bar, " " + (run.progress ? run.progress.display : "")),
      el("td", { "data-label": "Reason", text: run.reason || "" }),
      el("td", { "data-label": "Duration", text: duration(run) }),
      el("td", { "data-label": "Parameters", class: "params", text: run.parameters ? JSON.stringify(run.parameters) : "" }),
      el("td", {}, kill));
  }));
  $("no-runs").hidden = page.items.length > 0;
}

async function start(event) {
  event.preventDefault();
  $("start-error").textContent = "";
  const text = $("parameters").value.trim();
  let parameters = null;
  if (text) {
    try { parameters = JSON.parse(text); } catch (e) { $("start-error").textContent = "Parameters: " + e.message; return; }
  }
  try {
    const resp = await api("/runs", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ parameters }),
    });
    if (!resp.ok) { $("start-error").textContent = await detail(resp); return; }
    const run = await resp.json();
    location.hash = "#/runs/" + run.id;
  } catch (e) { failed(e, "start-error"); }
}

async function cancel(id) {
  try {
    const resp = await api("/runs/" + encodeURIComponent(id) + "/cancel", { method: "POST" });
    if (!resp.ok) alert(await detail(resp));
  } catch (e) { failed(e); }
  refresh();
}

// === the schedules (kubernetes backend only: the local backend answers 501) ===

let schedulesServed = true;

function when(iso) {
  const d = new Date(iso);
  return isNaN(d) ? "" : d.toLocaleString();
}

async function renderSchedules() {
  if (!schedulesServed) return;
  const resp = await api("/schedules");
  if (resp.status === 501 || resp.status === 404) { schedulesServed = false; $("schedules-section").hidden = true; return; }
  $("schedules-section").hidden = false;
  if (!resp.ok) { $("schedule-error").textContent = await detail(resp); return; }
  const items = await resp.json();
  $("schedules").querySelector("tbody").replaceChildren(...items.map((s) => {
    const state = !s.ready ? "Invalid" : s.suspend ? "Suspended" : "Active";
    const runNow = el("button", { type: "button", "aria-label": "Run " + s.name + " now", text: "Run now" });
    runNow.addEventListener("click", () => scheduleAction(s.name, "run"));
    const toggle = el("button", {
      type: "button", "aria-label": (s.suspend ? "Resume " : "Suspend ") + s.name, text: s.suspend ? "Resume" : "Suspend",
    });
    toggle.addEventListener("click", () => scheduleAction(s.name, s.suspend ? "resume" : "suspend"));
    const last = s.lastRun
      ? el("a", { href: "#/runs/" + s.lastRun.name, text: [s.lastRun.phase, s.lastRun.reason].filter(Boolean).join(" · ") || s.lastRun.name })
      : "";
    return el("tr", { "data-schedule": s.name },
      el("td", { "data-label": "Schedule", text: s.name }),
      el("td", { "data-label": "Cron", class: "params", text: s.schedule + (s.timeZone ? " (" + s.timeZone + ")" : "") }),
      el("td", { "data-label": "State" }, el("span", { class: "badge " + state, text: state, title: s.message || "" })),
      el("td", { "data-label": "Last run" }, last),
      el("td", { "data-label": "Next", text: s.nextScheduleTime && !s.suspend && s.ready ? when(s.nextScheduleTime) : "" }),
      el("td", {}, runNow, " ", toggle));
  }));
  $("no-schedules").hidden = items.length > 0;
}

async function scheduleAction(name, action) {
  $("schedule-error").textContent = "";
  try {
    const resp = await api("/schedules/" + encodeURIComponent(name) + "/" + action, { method: "POST" });
    if (!resp.ok) { $("schedule-error").textContent = await detail(resp); return; }
    if (action === "run") { location.hash = "#/runs/" + (await resp.json()).id; return; }
  } catch (e) { failed(e, "schedule-error"); }
  refresh();
}

// === one run ===

function renderNotebook(nb) {
  const cells = (nb.cells || []).map((cell, i) => {
    const src = Array.isArray(cell.source) ? cell.source.join("") : cell.source || "";
    const box = el("div", { class: "cell", "aria-label": "Cell " + i });
    if (cell.cell_type !== "code") { box.append(el("pre", { class: "src", text: src })); return box; }
    box.append(el("pre", { class: "src", text: "[" + (cell.execution_count ?? " ") + "] " + src }));
    for (const out of cell.outputs || []) {
      if (out.output_type === "stream") {
        box.append(el("pre", { class: "out", text: [].concat(out.text).join("") }));
      } else if (out.output_type === "error") {
        box.append(el("pre", { class: "err", text: stripAnsi((out.traceback || []).join("\n")) }));
      } else if (out.data) {
        if (out.data["image/png"]) box.append(el("img", { alt: "Output of cell " + i, src: "data:image/png;base64," + [].concat(out.data["image/png"]).join("") }));
        else if (out.data["text/plain"]) box.append(el("pre", { class: "out", text: [].concat(out.data["text/plain"]).join("") }));
      }
    }
    return box;
  });
  $("run-notebook").replaceChildren(...cells);
}

function stripAnsi(text) { return text.replace(/\x1b\[[0-9;]*[A-Za-z]/g, ""); }

async function followLog(id) {
  follow = new AbortController();
  const signal = follow.signal;
  $("run-log").textContent = "";
  try {
    const resp = await api("/runs/" + encodeURIComponent(id) + "/logs?follow=true", { signal });
    if (!resp.ok) { $("run-log").textContent = await detail(resp); return; }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      $("run-log").textContent += decoder.decode(value, { stream: true });
    }
  } catch (e) { if (!signal.aborted) failed(e); }
}

async function renderRun(id, first) {
  const resp = await api("/runs/" + encodeURIComponent(id));
  if (!resp.ok) { $("run-title").textContent = await detail(resp); return false; }
  const run = await resp.json();
  $("run-title").textContent = "Run " + run.id;
  $("run-phase").textContent = run.phase;
  $("run-phase").className = "badge " + run.phase;
  $("run-progress").value = percent(run);
  $("run-percent").textContent = percent(run) + " %" + (run.progress ? " (" + run.progress.display + " cells)" : "");
  $("run-cell").textContent = run.phase === "Running" && run.progress && run.progress.currentCell != null
    ? "running cell " + run.progress.currentCell : "";
  $("run-kill").hidden = !ACTIVE.includes(run.phase);
  $("run-message").textContent = [run.reason, run.message].filter(Boolean).join(": ");
  $("run-meta").textContent = "Duration " + duration(run) + (run.parameters ? " · parameters " + JSON.stringify(run.parameters) : "");
  const tb = run.error && run.error.traceback;
  $("run-error").hidden = !tb;
  if (tb) {
    $("error-title").textContent = "Traceback" + (run.error.cell != null ? " (cell " + run.error.cell + ")" : "");
    $("run-traceback").textContent = stripAnsi(tb);
  }
  if (first) followLog(id);
  const finished = !ACTIVE.includes(run.phase);
  if (finished || first) {
    const nb = await api("/runs/" + encodeURIComponent(id) + "/notebook");
    if (nb.ok) {
      const blob = await nb.blob();
      $("run-download").href = URL.createObjectURL(blob);
      $("run-download").download = id + ".ipynb";
      renderNotebook(JSON.parse(await blob.text()));
    }
  }
  if (finished && $("run-report").hidden) {
    // The HTML report (results store s3): fetched with the token, opened from memory.
    const report = await api("/runs/" + encodeURIComponent(id) + "/report");
    if (report.ok) {
      $("run-report").href = URL.createObjectURL(new Blob([await report.blob()], { type: "text/html" }));
      $("run-report").hidden = false;
    }
  }
  return !finished;
}

// === routing and refresh ===

function route() {
  const m = location.hash.match(/^#\/runs\/([A-Za-z0-9-]+)$/);
  return m ? { run: m[1] } : { list: true };
}

async function refresh(first = false) {
  if (timer) clearTimeout(timer);
  const where = route();
  try {
    if (where.run) {
      show("run-view");
      const active = await renderRun(where.run, first);
      if (active || first) timer = setTimeout(() => refresh(), 700);
    } else {
      show("list-view");
      await Promise.all([renderList(), renderSchedules()]);
      timer = setTimeout(() => refresh(), 1000);
    }
  } catch (e) { failed(e); }
}

function failed(e, where) {
  if (e instanceof Unauthorized) { needToken(); return; }
  if (where) $(where).textContent = String(e.message || e);
  timer = setTimeout(() => refresh(), 2000);
}

$("token-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
  $("token-input").value = "";
  const probe = await api("/runs?limit=1").catch((e) => e);
  if (probe instanceof Unauthorized) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("token-error").textContent = "That token was refused.";
    return;
  }
  $("token-error").textContent = "";
  stop();
  refresh(true);
});
$("forget-token").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); needToken(); });
$("start-form").addEventListener("submit", start);
$("run-kill").addEventListener("click", () => { const r = route(); if (r.run) cancel(r.run); });
window.addEventListener("hashchange", () => { stop(); $("run-report").hidden = true; refresh(true); });
refresh(true);
