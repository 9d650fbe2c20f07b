// skyfabric dashboard: server-sent events in, DOM and SVG out. No framework, no network but our own.
"use strict";

const HISTORY = 300;
const series = {};          // provider -> [[t, seconds, attempts, failed, ttft p50, ttft p99, tokens], ...]
let lastState = null;
let lastTick = 0;
const feedSeen = new Set();
const feedItems = [];        // every feed item received (the drill timeline marks ejections and recoveries)

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
    feedItems.push(item);
    if (feedItems.length > 1000) feedItems.shift();
    if (empty) empty.remove();
    const li = el("li");
    li.dataset.kind = item.kind;
    li.append(el("span", "t", clock(item.t)), el("span", "k " + item.kind, item.kind), el("span", null, item.text));
    list.prepend(li);
  }
  while (list.children.length > 200) list.lastChild.remove();
  if (!list.children.length) list.append(el("li", "empty", "Nothing yet: no failover, continuation or ejection."));
}

// -- the drill timeline ---------------------------------------------------------------------------------
// A drill runner announces its phases (POST /dashboard/drill): each fault is a lane with a bar while it is
// on; under the lanes, what the gateway saw on the same time axis (all providers together: requests/s,
// failed attempts/s, the worst provider's TTFT p50), with its ejections (red) and recoveries (green).

function fleetPoints() {
  const byTime = new Map();
  for (const points of Object.values(series)) for (const p of points) {
    const t = Math.round(p[0] * 10) / 10;
    const row = byTime.get(t) || { t: p[0], seconds: p[1], attempts: 0, failed: 0, ttft: null };
    row.attempts += p[2];
    row.failed += p[3];
    if (p[4] !== null && (row.ttft === null || p[4] > row.ttft)) row.ttft = p[4];
    byTime.set(t, row);
  }
  return [...byTime.values()].sort((a, b) => a.t - b.t);
}

function renderDrill(drill, now) {
  const box = $("drill");
  if (!drill) { box.hidden = true; return; }
  box.hidden = false;
  box.dataset.drill = drill.id;
  box.dataset.state = drill.ended ? "ended" : "running";
  const end = drill.ended || now;
  const elapsed = Math.max(0, end - drill.started);
  const planned = drill.duration ? " / " + Math.round(drill.duration) + " s planned" : "";
  $("drill-title").textContent = (drill.scenario || drill.id) + " · " + (drill.ended ? "ended after " : "running ") +
    Math.round(elapsed) + " s" + planned + " · started " + clock(drill.started);
  const from = drill.started - 10;
  const to = Math.max(end, drill.ended ? end : drill.started + (drill.duration || 0)) + 5;
  const W = 900, LEFT = 150, LANE = 18, CH = 34;
  const lanes = drill.faults.length;
  const H = 16 + lanes * (LANE + 4) + 3 * (CH + 6) + 4;
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "drill timeline" });
  const x = (t) => LEFT + ((t - from) / Math.max(1, to - from)) * (W - LEFT - 4);
  // time axis: a tick every 10 s from the start
  for (let t = drill.started; t <= to; t += 10) {
    s.append(svg("line", { x1: x(t), x2: x(t), y1: 12, y2: H, class: "axis" }));
    const label = svg("text", { x: x(t) + 2, y: 10, class: "muted" });
    label.textContent = "+" + Math.round(t - drill.started) + "s";
    s.append(label);
  }
  drill.faults.forEach((fault, n) => {
    const y = 16 + n * (LANE + 4);
    const g = svg("g", { class: "fault" });
    const open = fault.windows.length && fault.windows[fault.windows.length - 1][1] === null;
    g.dataset.fault = fault.fault;
    g.dataset.target = fault.target || "";
    g.dataset.state = open ? "on" : "off";
    g.dataset.windows = fault.windows.length;
    g.append(svg("rect", { x: LEFT, y, width: W - LEFT - 4, height: LANE, class: "lane" }));
    const name = svg("text", { x: 0, y: y + 13 });
    name.textContent = (fault.target || fault.fault) + (fault.mode ? ": " + fault.mode : "");
    g.append(name);
    for (const [on, off] of fault.windows) {
      const bar = svg("rect", { x: x(on), y: y + 2, width: Math.max(1.5, x(off === null ? now : off) - x(on)),
                                height: LANE - 4, class: off === null ? "bar" : "bar closed" });
      const tip = svg("title");
      tip.textContent = fault.fault + ": on at +" + (on - drill.started).toFixed(1) + " s" +
        (off === null ? ", still on" : ", off at +" + (off - drill.started).toFixed(1) + " s");
      bar.append(tip);
      g.append(bar);
    }
    s.append(g);
  });
  const points = fleetPoints().filter((p) => p.t >= from && p.t <= to);
  const rows = [
    { label: "requests/s", cls: "rps", f: (p) => p.attempts / p.seconds },
    { label: "failed/s", cls: "errors", f: (p) => p.failed / p.seconds },
    { label: "TTFT p50", cls: "ttft", f: (p) => p.ttft, unit: "ms" },
  ];
  const top = 16 + lanes * (LANE + 4) + 2;
  rows.forEach((row, n) => {
    const y0 = top + n * (CH + 6);
    s.append(svg("rect", { x: LEFT, y: y0, width: W - LEFT - 4, height: CH, class: "lane" }));
    const values = points.map(row.f).filter((v) => v !== null);
    const max = Math.max(1e-9, ...values) * 1.1;
    const coords = points.filter((p) => row.f(p) !== null)
      .map((p) => `${x(p.t).toFixed(1)},${(y0 + CH - 2 - (row.f(p) / max) * (CH - 4)).toFixed(1)}`);
    if (coords.length) s.append(svg("polyline", { points: coords.join(" "), class: row.cls, "data-series": row.cls }));
    const label = svg("text", { x: 0, y: y0 + 14 });
    const latest = points.length ? row.f(points[points.length - 1]) : null;
    label.textContent = row.label + "  " + fmt(latest, row.unit);
    s.append(label);
  });
  for (const item of feedItems) {
    if ((item.kind !== "ejection" && item.kind !== "recovery") || item.t < from || item.t > to) continue;
    const line = svg("line", { x1: x(item.t), x2: x(item.t), y1: top - 2, y2: H, class: "marker " + item.kind });
    line.dataset.kind = item.kind;
    const tip = svg("title");
    tip.textContent = clock(item.t) + " " + item.text;
    line.append(tip);
    s.append(line);
  }
  if (!drill.ended) s.append(svg("line", { x1: x(now), x2: x(now), y1: 12, y2: H, class: "now" }));
  $("drill-timeline").replaceChildren(s);
}

// -- the event stream -----------------------------------------------------------------------------------

function apply(state) {
  lastState = state;
  lastTick = Date.now();
  renderTree(state.topology);
  renderCharts();
  addFeed(state.feed || []);
  renderDrill(state.drill, state.time);
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
