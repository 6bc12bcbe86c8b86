"""The page's stylesheet and script, shipped inside the package (no CDN, no remote font).

Python strings rather than files beside the module, so that every way of
installing fedsite carries them (a wheel takes only the package data that
pyproject lists) and the static report can inline them. The script only
polls: it fetches the server-rendered fragment and swaps it in; it builds no
HTML of its own and sends nothing but GET requests.
"""

from __future__ import annotations

CSS = """
:root { color-scheme: light; --ink: #111827; --muted: #6b7280; --line: #e5e7eb; --card: #fff; --bg: #f3f4f6; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
.wrap { max-width: 1320px; margin: 0 auto; padding: 18px 22px 28px; }
.head { display: grid; grid-template-columns: 1fr auto; gap: 8px 24px; align-items: center;
  background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 14px 18px; }
.id { display: flex; align-items: center; gap: 8px; flex-wrap: wrap; }
h1 { font-size: 22px; margin: 0 6px 0 0; letter-spacing: -0.01em; }
h2 { font-size: 16px; margin: 0 0 10px; }
.tag { font-size: 12px; padding: 2px 8px; border-radius: 999px; background: #eef2ff; color: #3730a3; }
.state { display: flex; align-items: center; gap: 10px; font-size: 18px; font-weight: 600;
  padding: 6px 14px; border-radius: 8px; grid-row: span 2; justify-self: end; }
.dot { width: 12px; height: 12px; border-radius: 50%; background: currentColor; flex: none; }
.state-running { background: #dbeafe; color: #1d4ed8; }
.state-waiting_for_clients { background: #fef3c7; color: #92400e; }
.state-preparing, .state-distilling { background: #e0e7ff; color: #3730a3; }
.state-done { background: #dcfce7; color: #166534; }
.state-failed { background: #fee2e2; color: #991b1b; }
.state-stopped { background: #f3f4f6; color: #374151; }
.state-running .dot, .state-waiting_for_clients .dot, .state-preparing .dot, .state-distilling .dot {
  animation: pulse 1.6s ease-in-out infinite; }
@keyframes pulse { 50% { opacity: 0.35; } }
.bar { display: flex; align-items: center; gap: 10px; color: var(--muted); font-size: 13px; }
progress { width: min(420px, 60vw); height: 10px; appearance: none; border: 0; border-radius: 6px;
  background: var(--line); overflow: hidden; }
progress::-webkit-progress-bar { background: var(--line); border-radius: 6px; }
progress::-webkit-progress-value { background: #2563eb; border-radius: 6px; }
progress::-moz-progress-bar { background: #2563eb; }
.alert { margin-top: 12px; padding: 10px 14px; border-radius: 8px; border: 1px solid; }
.alert-warn { background: #fffbeb; border-color: #fcd34d; color: #78350f; }
.alert-bad { background: #fef2f2; border-color: #fca5a5; color: #7f1d1d; }
.kpis { display: grid; grid-template-columns: repeat(auto-fit, minmax(190px, 1fr)); gap: 12px; margin-top: 14px; }
.kpi { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 10px 14px; }
.kpi .k { color: var(--muted); font-size: 12.5px; font-weight: 600; }
.kpi .v { font-size: 26px; font-weight: 650; font-variant-numeric: tabular-nums; }
.kpi .v small { font-size: 15px; color: var(--muted); font-weight: 500; }
.kpi .d { color: var(--muted); font-size: 12.5px; }
.good { color: #15803d !important; } .bad { color: #b91c1c !important; } .warn { color: #b45309; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(360px, 1fr)); gap: 12px; margin-top: 14px; }
.panel { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 10px 12px 8px; }
figcaption { display: flex; justify-content: space-between; gap: 10px; flex-wrap: wrap;
  font-weight: 600; margin-bottom: 4px; }
.legend { display: flex; gap: 12px; font-weight: 400; color: var(--muted); font-size: 12px; }
.key { display: inline-flex; align-items: center; gap: 5px; }
svg.chart { width: 100%; height: auto; display: block; }
.note { color: var(--muted); font-size: 12px; margin: 4px 2px 0; }
.off { color: var(--muted); padding: 28px 8px; text-align: center; }
.clients { margin-top: 14px; background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 12px 14px; }
.table { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); white-space: nowrap; }
td:last-child { white-space: normal; min-width: 220px; }
th { color: var(--muted); font-weight: 600; font-size: 12px; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:hover { background: #f9fafb; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; }
.pill { font-size: 12px; padding: 1px 8px; border-radius: 999px; }
.pill.on { background: #dcfce7; color: #166534; } .pill.off { background: #f3f4f6; color: #6b7280; }
.muted { color: var(--muted); }
footer { color: var(--muted); font-size: 12px; margin-top: 14px; text-align: center; }
.connection { position: sticky; top: 0; z-index: 1; background: #fef3c7; color: #78350f; text-align: center;
  padding: 6px; font-size: 13px; border-bottom: 1px solid #fcd34d; }
@media (max-width: 720px) { .head { grid-template-columns: 1fr; } .state { justify-self: start; grid-row: auto; }
  .charts { grid-template-columns: 1fr; } }
"""

JS = """
(function () {
  "use strict";
  var main = document.getElementById("dashboard");
  var banner = document.getElementById("connection");
  if (!main || !window.fetch) { return; }
  var every = Number(main.getAttribute("data-poll-ms")) || 2000;
  var failures = 0;

  function finished() { return main.querySelector("[data-final]") !== null; }

  function later(ms) { window.setTimeout(poll, ms); }

  function lost(why) {
    failures += 1;
    banner.textContent = "No answer from the dashboard since " + new Date().toLocaleTimeString() +
      " (" + why + "); the coordinator may have stopped. Retrying.";
    banner.hidden = false;
    later(Math.min(every * Math.pow(2, failures), 30000));
  }

  function poll() {
    fetch("fragment", { cache: "no-store", credentials: "same-origin" }).then(function (reply) {
      if (reply.status === 401) { window.location.reload(); return null; }
      if (!reply.ok) { throw new Error("HTTP " + reply.status); }
      return reply.text();
    }).then(function (html) {
      if (html === null) { return; }
      main.innerHTML = html;
      failures = 0;
      banner.hidden = true;
      if (!finished()) { later(every); }
    }, function (error) { lost(error.message || "network error"); });
  }

  if (!finished()) { later(every); }
})();
"""
