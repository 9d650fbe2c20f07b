// skyfabric dashboard: server-sent events in, DOM and SVG out. No framework, no network but our own.
"use strict";

const HISTORY = 300;
const series = {};          // provider -> [[t, seconds, attempts, failed, ttft p50, ttft p99, tokens], ...]
let lastState = null;
let lastTick = 0;
const feedSeen = new Set();

const $ = (id) => document.getElementById(id);
function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}
function clock(t) { return new Date(t * 1000).toLocaleTimeString([], { hour12: false }); }
function fmt(v, unit) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (unit === "%") return (v * 100).toFixed(v < 0.1 ? 1 : 0) + " %";
  if (unit === "ms") return v < 1 ? (v * 1000).toFixed(0) + " ms" : v.toFixed(2) + " s";
  if (v >= 1000) return (v / 1000).toFixed(1) + "k";
  return v >= 10 ? v.toFixed(0) : v.toFixed(1);
}

// -- fleet tree -----------------------------------------------------------------------------------------

function renderTree(topology) {
  const root = $("tree");
  const frag = document.createDocumentFragment();
  for (const provider of topology) {
    const word = lastState.summary[provider.name];
    const box = el("div", "provider");
    box.dataset.provider = provider.name;
    box.dataset.health = word;
    const name = el("div", "name");
    name.append(el("span", null, provider.name), el("span", "word " + word, word));
    if (provider.cost_per_hour) name.append(el("span", "cost", "$" + provider.cost_per_hour.toFixed(2) + "/h"));
    box.append(name);
    for (const region of provider.regions) {
      const r = el("div", "region", region.name);
      for (const pool of region.pools) {
        const p = el("div", "pool");
        p.append(el("span", null, pool.name + " "),
                 el("span", "meta", pool.accelerator + " · " + pool.engine + " · " + pool.model));
        for (const e of pool.endpoints) {
          const row = el("div", "endpoint health-" + e.health);
          row.dataset.endpoint = e.id;
          row.dataset.health = e.health;
          row.title = e.url;
          row.append(el("span", "state"), el("span", "id", e.id.split("/").pop() + "  " + e.url),
                     el("span", "load", e.outstanding + " in flight · " + e.successes + " ok · " + e.failures + " failed"));
          if (e.health !== "up") {
            let why = e.health === "cooling" ? "throttled (Retry-After)" : e.health === "probing" ? "waiting for a probe" : "ejected";
            if (e.cause) why += ": " + e.cause;
            if (e.since) why += " · since " + clock(e.since);
            if (e.back_in) why += " · retry in " + e.back_in + " s";
            row.append(el("span", "cause", why));
          }
          p.append(row);
        }
        r.append(p);
      }
      box.append(r);
    }
    frag.append(box);
  }
  root.replaceChildren(frag);

  const summary = $("summary");
  summary.replaceChildren(...Object.entries(lastState.summary).map(([name, word]) => {
    const pill = el("span", "pill " + word, name + " " + word);
    pill.dataset.provider = name;
    pill.dataset.health = word;
    return pill;
  }));
}

// -- charts ---------------------------------------------------------------------------------------------

const METRICS = [
  { label: "requests/s", values: [(p) => p[2] / p[1]], unit: "" },
  { label: "error rate", values: [(p) => (p[2] ? p[3] / p[2] : null)], unit: "%" },
  { label: "TTFT p50 / p99", values: [(p) => p[4], (p) => p[5]], unit: "ms" },
  { label: "tokens/s", values: [(p) => p[6] / p[1]], unit: "" },
];
const COLORS = ["--c1", "--c2", "--c3", "--c4", "--c5", "--c6"];

function span(now) {
  // The time axis grows with the data, up to HISTORY seconds.
  let first = now;
  for (const points of Object.values(series)) if (points.length && points[0][0] < first) first = points[0][0];
  return Math.min(HISTORY, Math.max(20, now - first));
}

function chart(points, metric, color, now, window) {
  const box = el("div", "chart");
  const latest = points.length ? points[points.length - 1] : null;
  const label = el("div", "label");
  const shown = latest ? metric.values.map((f) => fmt(f(latest), metric.unit)).join(" / ") : "–";
  label.append(el("span", null, metric.label), el("span", "value", shown));
  box.append(label);
  const W = 300, H = 54;
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", "aria-label": metric.label });
  let max = metric.unit === "%" ? 0.05 : 1e-9;
  for (const p of points) for (const f of metric.values) { const v = f(p); if (v !== null && v > max) max = v; }
  if (metric.unit === "%" && max > 0.05) max = Math.min(1, max);
  max *= 1.1;
  const x = (t) => W - ((now - t) / window) * W;
  s.append(svg("line", { x1: 0, x2: W, y1: H - 1.5, y2: H - 1.5, class: "base" }));
  const y = (v) => H - 2 - (v / max) * (H - 4);
  metric.values.forEach((f, n) => {
    const coords = points.filter((p) => f(p) !== null).map((p) => `${x(p[0]).toFixed(1)},${y(f(p)).toFixed(1)}`);
    if (!coords.length) return;
    const line = svg("polyline", { points: coords.join(" "), class: n ? "p99" : "" });
    line.style.stroke = `var(${color})`;
    if (n === 0 && metric.values.length === 1) {
      const first = coords[0].split(",")[0], last = coords[coords.length - 1].split(",")[0];
      const area = svg("polygon", { points: `${first},${H} ${coords.join(" ")} ${last},${H}`, class: "area" });
      area.style.fill = `var(${color})`;
      s.append(area);
    }
    s.append(line);
  });
  box.append(s);
  return box;
}

function renderCharts() {
  const root = $("charts");
  const now = lastState ? lastState.time : Date.now() / 1000;
  const frag = document.createDocumentFragment();
  const window = span(now);
  $("span").textContent = window >= 60 ? "last " + Math.round(window / 60) + " min" : "last " + Math.round(window) + " s";
  Object.keys(series).sort().forEach((provider, n) => {
    const points = series[provider];
    const row = el("div", "prow");
    row.dataset.provider = provider;
    const title = el("div", "title");
    title.append(el("b", null, provider));
    const word = lastState && lastState.summary[provider];
    if (word) title.append(el("span", "word " + word, word));
    const cost = lastState && (lastState.topology.find((p) => p.name === provider) || {}).cost_per_hour;
    if (cost) {
      const recent = points.slice(-60);
      const seconds = recent.reduce((a, p) => a + p[1], 0);
      const tps = recent.reduce((a, p) => a + p[6], 0) / Math.max(1, seconds);
      let text = "$" + cost.toFixed(2) + "/h";
      if (tps > 0) text += " · $" + (cost / (tps * 3600) * 1e6).toFixed(2) + " per 1M tokens (last minute)";
      title.append(el("span", "cost", text));
    }
    row.append(title);
    const grid = el("div", "grid4");
    for (const metric of METRICS) grid.append(chart(points, metric, COLORS[n % COLORS.length], now, window));
    row.append(grid);
    frag.append(row);
  });
  root.replaceChildren(frag);
}

// -- feed -----------------------------------------------------------------------------------------------

function addFeed(items) {
  const list = $("feed");
  const empty = list.querySelector(".empty");
  for (const item of items) {
    if (feedSeen.has(item.seq)) continue;
    feedSeen.add(item.seq);
    if (empty) empty.remove();
    const li = el("li");
    li.dataset.kind = item.kind;
    li.append(el("span", "t", clock(item.t)), el("span", "k " + item.kind, item.kind), el("span", null, item.text));
    list.prepend(li);
  }
  while (list.children.length > 200) list.lastChild.remove();
  if (!list.children.length) list.append(el("li", "empty", "Nothing yet: no failover, continuation or ejection."));
}

// -- the event stream -----------------------------------------------------------------------------------

function apply(state) {
  lastState = state;
  lastTick = Date.now();
  renderTree(state.topology);
  renderCharts();
  addFeed(state.feed || []);
  $("updated").textContent = "updated " + clock(state.time);
  $("link").className = "dot";
}

function connect() {
  const source = new EventSource("/dashboard/events");
  source.addEventListener("hello", (ev) => {
    const state = JSON.parse(ev.data);
    for (const [p, points] of Object.entries(state.series)) series[p] = points.slice(-HISTORY);
    apply(state);
  });
  source.addEventListener("tick", (ev) => {
    const state = JSON.parse(ev.data);
    for (const [p, point] of Object.entries(state.points)) {
      (series[p] = series[p] || []).push(point);
      if (series[p].length > HISTORY) series[p].shift();
    }
    apply(state);
  });
  source.onerror = () => { $("link").className = "dot off"; $("updated").textContent = "reconnecting…"; };
}

setInterval(() => {
  if (lastTick && Date.now() - lastTick > 5000) { $("link").className = "dot off"; }
}, 1000);
connect();
