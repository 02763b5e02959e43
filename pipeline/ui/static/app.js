// agentstream live page. Everything the lake says is put in the page as text (textContent,
// never innerHTML), so event text cannot become markup. State lives in the URL.
"use strict";

const DIMS = ["agent", "version", "prompt", "model", "tenant"];
const STATE_KEYS = ["view", "range", "from", "to", ...DIMS, "by", "q", "condition", "live"];
// Which views a message on each derived topic changes.
const FEEDS = {
  metrics: ["overview", "cost", "quality", "budgets", "attention"],
  anomalies: ["overview", "attention"],
  verdicts: ["releases"],
  dead_letters: ["dead_letters"],
};
const TILES = [
  ["events", "events"],
  ["cost_usd", "cost"],
  ["cost_per_completed_task", "cost per completed task"],
  ["task_success_rate", "task success"],
  ["escalation_rate", "escalation rate"],
  ["retrieval_miss_rate", "retrieval-miss rate"],
  ["tool_error_rate", "tool error rate"],
  ["latency_p95_ms", "latency p95"],
];
// A rise is bad for these tiles, good for task success and neutral for volume.
const WORSE_UP = new Set(["cost_usd", "cost_per_completed_task", "escalation_rate",
  "retrieval_miss_rate", "tool_error_rate", "latency_p95_ms"]);
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

// ---------------------------------------------------------------------------------- DOM

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function section(title, ...children) {
  return h("section", {}, h("h2", { text: title }), ...children);
}

// ---------------------------------------------------------------------------- numbers

function fmt(column, value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "boolean") return value ? "yes" : "no";
  const name = String(column).toLowerCase();
  if (typeof value === "string") {
    if (/^\d{4}-\d\d-\d\dT\d\d:\d\d/.test(value)) return when(value);
    return value;
  }
  if (Array.isArray(value)) return value.join(", ");
  if (typeof value !== "number") return String(value);
  if (name.endsWith("_rate") || name.endsWith("_share")) return (value * 100).toFixed(1) + "%";
  if (name.startsWith("cost") || name.endsWith("_usd") || name.endsWith("usd_per_h")) {
    const s = Math.abs(value) >= 0.1 ? value.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 })
      : value.toPrecision(3);
    return "$" + s;
  }
  if (name.endsWith("_ms")) return Math.round(value).toLocaleString("en-US") + " ms";
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  if (Math.abs(value) >= 1000) return Math.round(value).toLocaleString("en-US");
  return String(Number(value.toPrecision(3)));
}

function when(iso) {
  const d = new Date(iso);
  if (isNaN(d)) return iso;
  return d.toISOString().replace("T", " ").slice(0, 19);
}

// ------------------------------------------------------------------------------ state

function state() {
  const p = new URLSearchParams(location.search);
  const s = {};
  for (const k of STATE_KEYS) if (p.get(k)) s[k] = p.get(k);
  s.view = s.view || "overview";
  return s;
}

function href(changes, base) {
  const s = Object.assign({}, base || state(), changes);
  const p = new URLSearchParams();
  for (const k of STATE_KEYS) if (s[k] !== undefined && s[k] !== null && s[k] !== "") p.set(k, s[k]);
  return "?" + p.toString();
}

function go(changes, replace) {
  const url = href(changes);
  if (replace) history.replaceState(null, "", url); else history.pushState(null, "", url);
  render();
}

function query(extra) {
  const s = state();
  const p = new URLSearchParams();
  for (const k of ["range", "from", "to", ...DIMS]) if (s[k]) p.set(k, s[k]);
  for (const [k, v] of Object.entries(extra || {})) if (v) p.set(k, v);
  return p.toString();
}

function link(text, changes) {
  const a = h("a", { href: href(changes) }, text);
  a.addEventListener("click", (e) => {
    if (e.ctrlKey || e.metaKey || e.shiftKey) return;
    e.preventDefault();
    go(changes);
  });
  return a;
}

// ------------------------------------------------------------------------------ fetch

let generation = 0;

async function api(path) {
  const res = await fetch(path, { headers: { Accept: "application/json" } });
  const body = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok || body.error) throw new Error(body.error || `HTTP ${res.status}`);
  return body;
}

function status(text) { document.getElementById("status").textContent = text; }
function showError(text) { document.getElementById("error").textContent = text || ""; }

// ------------------------------------------------------------------------------ tables

function table(t, opts) {
  opts = opts || {};
  const cols = t.columns.filter((c) => !(opts.hide || []).includes(c));
  const idx = Object.fromEntries(t.columns.map((c, i) => [c, i]));
  const head = h("tr", {}, cols.map((c) => h("th", { text: c })));
  const rows = t.rows.map((r) => {
    const row = Object.fromEntries(t.columns.map((c, i) => [c, r[i]]));
    return h("tr", {}, cols.map((c) => {
      const v = r[idx[c]];
      const render = (opts.cells || {})[c];
      if (render) return h("td", {}, render(v, row));
      const text = fmt((opts.units || {})[c] ? row[opts.units[c]] || c : c, v);
      const cls = typeof v === "number" ? "num" : text.length > 40 ? "wrap" : null;
      return h("td", { class: cls }, text);
    }));
  });
  if (!rows.length) rows.push(h("tr", {}, h("td", { class: "empty", colspan: cols.length, text: opts.empty || "no rows" })));
  return h("table", { class: "grid", id: opts.id }, h("thead", {}, head), h("tbody", {}, rows));
}

function badge(kind, value) {
  return h("span", { class: `${kind} ${value || ""}`, text: value || "–" });
}

// ------------------------------------------------------------------------------ charts

const charts = [];

function chart(title, x, lines, measure, opts) {
  opts = opts || {};
  const box = h("div", { class: "chart" });
  const names = Object.keys(lines);
  if (!x.length || !names.length) {
    box.append(h("p", { class: "muted", text: `no ${title} in this range` }));
    return box;
  }
  const series = [{}].concat(names.map((n, i) => ({
    label: n, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false,
    value: (u, v) => fmt(measure, v),
  })));
  const data = [x].concat(names.map((n) => lines[n]));
  requestAnimationFrame(() => {
    if (typeof uPlot === "undefined") return;
    const width = Math.max(300, box.clientWidth || 900);
    const plot = new uPlot({
      title, width, height: opts.height || 240,
      series,
      scales: { x: { time: true } },
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"),
      axes: [{}, { values: (u, ticks) => ticks.map((v) => fmt(measure, v)), size: 90 }],
    }, data, box);
    charts.push(plot);
  });
  return box;
}

// ------------------------------------------------------------------------------ views

const VIEWS = {};

VIEWS.overview = async (s) => {
  const body = await api(`/api/view/overview?${query()}`);
  const d = body.data;
  const tiles = h("div", { class: "tiles", id: "tiles" }, TILES.map(([key, label]) => {
    const v = d.tiles[key];
    const before = d.previous[key];
    let change = d.span.previous_start ? "no data in the previous period" : "no previous period (all)";
    let cls = "change";
    if (typeof v === "number" && typeof before === "number" && before !== 0) {
      const rel = (v - before) / Math.abs(before);
      change = `${rel >= 0 ? "▲" : "▼"} ${(Math.abs(rel) * 100).toFixed(1)}% vs previous period`;
      if (WORSE_UP.has(key) && Math.abs(rel) >= 0.05) cls += rel > 0 ? " bad" : " good";
      if (key === "task_success_rate" && Math.abs(rel) >= 0.05) cls += rel > 0 ? " good" : " bad";
    }
    return h("div", { class: "tile", "data-key": key, "data-value": v === null || v === undefined ? "" : String(v),
      "data-previous": before === null || before === undefined ? "" : String(before) },
      h("div", { class: "label", text: label }),
      h("div", { class: "value", text: fmt(key, v) }),
      h("div", { class: cls, text: change }));
  }));
  const c = d.chart;
  const open = d.attention.rows.filter((r) => r[0] === "open").length;
  return [
    h("section", {}, tiles),
    section("Events and cost over time",
      chart("events", c.x, c.series.events || {}, "events", { height: 180 }),
      chart("cost", c.x, c.series.cost_usd || {}, "cost_usd", { height: 180 })),
    section(`Needs attention (${open} open shown)`, attentionTable(d.attention, true),
      h("p", {}, link("all conditions →", { view: "attention", condition: null }))),
  ];
};

function attentionTable(t, short) {
  return table(t, {
    id: "conditions",
    hide: short ? ["condition_id", "detectors", "message", "alerts", "direction"] : ["condition_id"],
    units: { baseline: "measure", peak: "measure" },
    empty: "nothing needs attention in this range",
    cells: {
      severity: (v) => badge("sev", v),
      subject: (v, row) => link(v || "(all)", { view: "attention", condition: row.condition_id }),
    },
  });
}

VIEWS.attention = async (s) => {
  if (s.condition) return conditionView(s.condition);
  const body = await api(`/api/view/attention?${query()}`);
  return [section("Needs attention: anomaly conditions, budget and release alerts",
    h("p", { class: "note", text: "Open conditions first, then by severity, newest first. Click a key for its metrics around the alert, its example events and their sessions." }),
    attentionTable(body.data.conditions, false))];
};

async function conditionView(id) {
  const body = await api(`/api/condition?id=${encodeURIComponent(id)}`);
  const d = body.data;
  const c = d.condition;
  const measure = c.measure;
  const ctx = d.context;
  const xi = ctx.columns.indexOf("window_start");
  const vi = ctx.columns.indexOf("value");
  const x = ctx.rows.map((r) => new Date(r[xi]).getTime() / 1000);
  const lines = { observed: ctx.rows.map((r) => r[vi]), baseline: ctx.rows.map(() => c.baseline) };
  const sessions = d.sessions.map((sid) => h("li", {}, link(sid, { view: "sessions", q: sid, condition: null })));
  return [
    section(`${c.subject || "(all)"}: ${measure}`,
      h("p", { id: "condition-message", text: c.message || "" }),
      h("p", { class: "note" }, `severity `, badge("sev", c.severity), ` · opened ${fmt("t", c.opened_at)} · `,
        c.recovered_at ? `recovered ${fmt("t", c.recovered_at)}` : "open",
        ` · baseline ${fmt(measure, c.baseline)} · peak ${fmt(measure, c.peak)}`),
      h("p", {}, link("← all conditions", { condition: null }))),
    section("Baseline vs observed around the first alert",
      chart(measure, x, lines, measure, { height: 220 }),
      h("h3", { text: "The window's metrics, 10 windows either side (offset 0 = the alert's)" }),
      table(ctx, { id: "context", cells: { value: (v) => h("span", { class: "num", text: fmt(measure, v) }) } })),
    section("Alerts of this condition", table(d.alerts, { id: "alerts", hide: ["anomaly_id", "example_event_ids"],
      units: { baseline: "measure", observed: "measure" }, cells: { severity: (v) => badge("sev", v) } })),
    section(`Example events (${d.examples.rows.length})`, table(d.examples, { id: "examples", empty: "no example events recorded for this alert" })),
    section(`Events of the window ${fmt("t", d.window.start)} – ${fmt("t", d.window.end)}: ${d.window_event_count.toLocaleString("en-US")} (first ${d.window_events.rows.length} shown)`,
      table(d.window_events, { id: "window-events" })),
    section("Their sessions", sessions.length ? h("ul", { id: "sessions" }, sessions) : h("p", { class: "muted", text: "no sessions" })),
  ];
}

VIEWS.cost = async (s) => {
  const by = s.by || "agent";
  const body = await api(`/api/view/cost?${query({ by })}`);
  const d = body.data;
  const picker = h("select", { id: "by", onchange: (e) => go({ by: e.target.value }) },
    ["agent", "version", "model", "tenant"].map((b) => h("option", { value: b, selected: b === by ? "selected" : null, text: b })));
  const idLink = (v) => v ? link(v, { view: "sessions", q: v }) : "–";
  return [
    section("Cost over time", h("div", { class: "row" }, h("label", {}, "by ", picker)),
      chart("cost", d.chart.x, d.chart.series.cost_usd || {}, "cost_usd")),
    section(`Cost by ${by}`, table(d.table, { id: "cost-table" })),
    section("Most expensive tasks", table(d.tasks, { id: "top-tasks", cells: { task_id: idLink } })),
    section("Most expensive sessions", table(d.sessions, { id: "top-sessions", cells: { session_id: idLink } })),
  ];
};

VIEWS.releases = async () => {
  const d = (await api(`/api/view/releases?${query()}`)).data;
  return [
    section("Releases: candidate against baseline, per measure",
      h("p", { class: "note", text: "The latest look of each release and measure; a decided verdict is final. Effect with its always-valid interval." }),
      table(d.summary, { id: "release-summary", cells: { verdict: (v) => badge("verdict", v) } })),
    section("Looks over the rollout's windows", table(d.looks, { id: "release-looks", cells: { verdict: (v) => badge("verdict", v) } })),
    section("Announced rollouts", table(d.announced, { id: "release-events" })),
  ];
};

VIEWS.budgets = async () => {
  const d = (await api(`/api/view/budgets?${query()}`)).data;
  return [section("Budgets: spend against budget per period",
    table(d.budgets, {
      id: "budgets",
      cells: {
        used_share: (v) => {
          const bar = h("span", { class: v >= 1 ? "over" : "" });
          bar.style.width = `${Math.min(100, (v || 0) * 100)}%`;
          return h("div", { class: "row nowrap" }, h("div", { class: "bar" }, bar), fmt("used_share", v));
        },
      },
      empty: "no budgets configured (AGENTSTREAM_BUDGETS)",
    }))];
};

VIEWS.quality = async () => {
  const d = (await api(`/api/view/quality?${query()}`)).data;
  const c = d.chart;
  const rates = {};
  for (const [m, lines] of Object.entries(c.series)) rates[m] = lines.all;
  return [
    section("Rates over time", chart("rates", c.x, rates, "x_rate")),
    section("Task funnel by agent and version", table(d.funnel, { id: "funnel" })),
    section("Tool errors by tool", table(d.tools, { id: "tool-errors" })),
    section("Latency by step and model (p50 / p95 / p99)", table(d.latency, { id: "latency" })),
  ];
};

VIEWS.sessions = async (s) => {
  const q = s.q || "";
  const d = (await api(`/api/view/sessions?${query({ q })}`)).data;
  const input = h("input", { id: "q", name: "q", value: q, size: 40, placeholder: "session, task or trace id" });
  const form = h("form", { class: "row", id: "search", onsubmit: (e) => { e.preventDefault(); go({ q: input.value.trim() }); } },
    input, h("button", { type: "submit", text: "search" }),
    q ? link("clear", { q: null }) : null,
    h("a", { id: "csv", href: `/api/events.csv?${query({ q })}`, download: "agentstream-events.csv", text: "CSV export" }));
  if (!q) {
    return [section("Sessions and events", form,
      h("p", { class: "note", text: "The latest sessions of the range; search an id for its events as a timeline." }),
      table(d.sessions, { id: "session-list", cells: { session_id: (v) => link(v, { q: v }) } }))];
  }
  return [section(`Events of ${q}`, form,
    h("p", { class: "note", text: "An id search ignores the time range." }), timeline(d.events))];
};

function timeline(t) {
  const i = Object.fromEntries(t.columns.map((c, k) => [c, k]));
  if (!t.rows.length) return h("p", { class: "muted", id: "timeline", text: "no events with this id" });
  const t0 = new Date(t.rows[0][i.ts]).getTime();
  const ends = t.rows.map((r) => new Date(r[i.ts]).getTime() + (r[i.latency_ms] || 0));
  const span = Math.max(1, Math.max(...ends) - t0);
  const rows = t.rows.map((r) => {
    const start = new Date(r[i.ts]).getTime() - t0;
    const bar = h("span", { class: `${r[i.type]} ${r[i.status] === "error" ? "error" : ""}` });
    bar.style.left = `${(start / span) * 100}%`;
    bar.style.width = `${((r[i.latency_ms] || 0) / span) * 100}%`;
    const what = r[i.tool_name] || r[i.model] || r[i.outcome] || r[i.reason] || r[i.query] || r[i.action] || "";
    return h("tr", {},
      h("td", { text: `+${(start / 1000).toFixed(2)} s` }),
      h("td", { text: r[i.type] }),
      h("td", { class: "wrap", text: what }),
      h("td", { class: "num", text: fmt("tokens", (r[i.input_tokens] || 0) + (r[i.output_tokens] || 0) || null) }),
      h("td", { class: "num", text: fmt("cost_usd", r[i.cost_usd]) }),
      h("td", { class: "num", text: fmt("latency_ms", r[i.latency_ms]) }),
      h("td", { class: "lane" }, h("div", { class: "tbar" }, bar)));
  });
  return h("div", {},
    h("table", { class: "grid timeline", id: "timeline" },
      h("thead", {}, h("tr", {}, ["at", "type", "what", "tokens", "cost", "latency", "timeline"].map((c) => h("th", { text: c })))),
      h("tbody", {}, rows)),
    h("h3", { text: "All fields" }), table(t, { id: "events" }));
}

VIEWS.dead_letters = async () => {
  const d = (await api(`/api/view/dead_letters?${query()}`)).data;
  return [
    section(`Dead letters: ${d.total.toLocaleString("en-US")} rejected messages`,
      h("p", { class: "note", text: "Not filtered by key or time range: a rejected message may have neither." }),
      h("h3", { text: "By field" }), table(d.by_field, { id: "dead-by-field" }),
      h("h3", { text: "Most recent" }), table(d.recent, { id: "dead-recent" })),
  ];
};

// ------------------------------------------------------------------------------ render

async function render() {
  const s = state();
  const mine = ++generation;
  document.querySelectorAll("#tabs a").forEach((a) => a.classList.toggle("active", a.dataset.view === s.view));
  syncFilters(s);
  const fn = VIEWS[s.view] || VIEWS.overview;
  const started = performance.now();
  try {
    const parts = await fn(s);
    if (mine !== generation) return;
    while (charts.length) charts.pop().destroy();
    document.getElementById("view").replaceChildren(...parts);
    document.body.dataset.rendered = String(mine);
    document.body.dataset.view = s.view;
    showError("");
    status(`${s.view} rendered in ${Math.round(performance.now() - started)} ms · ${new Date().toISOString().slice(11, 19)} UTC`);
  } catch (err) {
    if (mine !== generation) return;
    showError(err.message);
  }
}

// ------------------------------------------------------------------------------ filters

let options = null;

function syncFilters(s) {
  const form = document.getElementById("filters");
  document.getElementById("range").value = s.range || "24h";
  form.classList.toggle("custom", s.range === "custom");
  document.getElementById("from").value = s.from || "";
  document.getElementById("to").value = s.to || "";
  for (const d of DIMS) {
    const sel = document.getElementById(`f-${d}`);
    const values = (options && options[d]) || [];
    const want = s[d] || "";
    const have = Array.from(sel.options).map((o) => o.value);
    const next = ["", ...values, ...(want && !values.includes(want) ? [want] : [])];
    if (have.join("\n") !== next.join("\n")) {
      sel.replaceChildren(...next.map((v) => h("option", { value: v, text: v || "any" })));
    }
    sel.value = want;
  }
  document.getElementById("live").checked = s.live !== "0";
}

async function loadOptions() {
  try {
    options = (await api("/api/options")).data;
    syncFilters(state());
  } catch (err) {
    showError(err.message);
  }
}

function wireFilters() {
  const form = document.getElementById("filters");
  form.addEventListener("submit", (e) => e.preventDefault());
  document.getElementById("range").addEventListener("change", (e) => {
    const v = e.target.value;
    if (v === "custom") { form.classList.add("custom"); return; }
    go({ range: v, from: null, to: null });
  });
  for (const id of ["from", "to"]) {
    document.getElementById(id).addEventListener("change", () => {
      const from = document.getElementById("from").value.trim();
      const to = document.getElementById("to").value.trim();
      if (from && to) go({ range: "custom", from, to });
    });
  }
  for (const d of DIMS) {
    document.getElementById(`f-${d}`).addEventListener("change", (e) => go({ [d]: e.target.value || null, condition: null }));
  }
  document.getElementById("reset").addEventListener("click", () => go(Object.fromEntries(DIMS.map((d) => [d, null]))));
  document.getElementById("live").addEventListener("change", (e) => go({ live: e.target.checked ? null : "0" }, true));
  document.querySelectorAll("#tabs a").forEach((a) => a.addEventListener("click", (e) => {
    e.preventDefault();
    go({ view: a.dataset.view, condition: null, q: null });
  }));
}

// ------------------------------------------------------------------------------ live

let pendingRefresh = null;

function follow() {
  const dot = document.getElementById("live-status");
  const source = new EventSource("/api/live");
  const mark = (on) => {
    dot.className = `dot ${on ? "on" : "off"}`;
    dot.title = on ? "following the derived topics" : "not following the topics (no broker)";
    document.body.dataset.live = on ? "1" : "0";
  };
  source.addEventListener("status", (e) => mark(JSON.parse(e.data).live));
  source.addEventListener("update", (e) => {
    const msg = JSON.parse(e.data);
    mark(true);
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
    if (state().live === "0") return;
    const view = state().view;
    if (!(FEEDS[msg.topic] || []).includes(view)) return;
    if (msg.topic === "metrics" && view === "attention" && state().condition) return;
    clearTimeout(pendingRefresh);
    pendingRefresh = setTimeout(render, 300);
  });
}

// Not following the topics (no broker): re-read every 15 s while live is on, as the server
// refreshes its copy of the derived tables as often.
setInterval(() => {
  if (state().live !== "0" && document.body.dataset.live !== "1") render();
}, 15000);

window.addEventListener("popstate", render);
document.addEventListener("DOMContentLoaded", () => {
  wireFilters();
  render();
  loadOptions();
  follow();
});
