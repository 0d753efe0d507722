// Small SVG charts for the scdrugmap page: bars with per-fold points, radar, curves, scatter.
// No dependencies; every chart replaces the content of a container element.

const NS = "http://www.w3.org/2000/svg";
export const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
  "#7f7f7f", "#bcbd22", "#17becf"];
const VIRIDIS = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"];

/** An SVG element with attributes, appended to parent when given. */
export function el(name, attrs = {}, parent = null) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

/** An SVG text element at (x, y). */
export function text(parent, x, y, content, attrs = {}) {
  const t = el("text", { x, y, ...attrs }, parent);
  t.textContent = content;
  return t;
}

function svgRoot(container, width, height, label) {
  container.replaceChildren();
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": label,
    class: "chart" });
  container.appendChild(svg);
  return svg;
}

function hexToRgb(h) {
  return [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16));
}

/** Viridis colour of t in [0, 1]; grey for missing values. */
export function viridis(t) {
  if (t === null || t === undefined || Number.isNaN(t)) return "#bbbbbb";
  const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const a = hexToRgb(VIRIDIS[i]);
  const b = hexToRgb(VIRIDIS[i + 1]);
  const f = x - i;
  return `rgb(${a.map((v, k) => Math.round(v + (b[k] - v) * f)).join(",")})`;
}

function axisY(svg, m, h, scale, ticks, label, width) {
  for (const t of ticks) {
    const y = scale(t);
    el("line", { x1: m.l, x2: width - m.r, y1: y, y2: y, class: "grid" }, svg);
    text(svg, m.l - 6, y + 4, t.toFixed(1), { "text-anchor": "end", class: "tick" });
  }
  text(svg, 14, m.t + (h - m.t - m.b) / 2, label, {
    transform: `rotate(-90 14 ${m.t + (h - m.t - m.b) / 2})`, "text-anchor": "middle", class: "axis-label" });
}

function legend(container, items) {
  const div = document.createElement("div");
  div.className = "legend";
  for (const { label, color } of items) {
    const span = document.createElement("span");
    const sw = document.createElement("i");
    sw.style.background = color;
    span.append(sw, label);
    div.appendChild(span);
  }
  container.appendChild(div);
}

/**
 * Bars of the mean with the per-fold values as points.
 * groups: [{label, mean, points: [number|null], names?: [string]}] (names: e.g. the held-out study of
 * each cross-data fold); values in yDomain (default [0, 1]).
 */
export function barPoints(container, groups, { yLabel = "", yDomain = [0, 1], width = 640, height = 320 } = {}) {
  const svg = svgRoot(container, width, height, `bar chart of ${yLabel}`);
  const m = { l: 48, r: 12, t: 12, b: 84 };
  const [lo, hi] = yDomain;
  const sy = (v) => height - m.b - ((v - lo) / (hi - lo)) * (height - m.t - m.b);
  axisY(svg, m, height, sy, [0, 0.2, 0.4, 0.6, 0.8, 1.0].map((t) => lo + t * (hi - lo)), yLabel, width);
  const bw = (width - m.l - m.r) / Math.max(1, groups.length);
  groups.forEach((g, i) => {
    const x0 = m.l + i * bw;
    const color = PALETTE[i % PALETTE.length];
    if (g.mean !== null && g.mean !== undefined) {
      const bar = el("rect", { x: x0 + bw * 0.2, width: bw * 0.6, y: sy(Math.max(lo, g.mean)),
        height: Math.max(0, sy(lo) - sy(Math.max(lo, g.mean))), fill: color, opacity: 0.55, class: "bar" }, svg);
      el("title", {}, bar).textContent = `${g.label}: mean ${g.mean.toFixed(3)}`;
    }
    g.points.forEach((p, j) => {
      if (p === null || p === undefined) return;
      const jitter = ((j * 37) % 11) / 11 - 0.5;
      const dot = el("circle", { cx: x0 + bw / 2 + jitter * bw * 0.4, cy: sy(p), r: 3.2, fill: color,
        stroke: "#222", "stroke-width": 0.6, class: "fold-point" }, svg);
      el("title", {}, dot).textContent = `${g.label} ${g.names?.[j] ?? `fold ${j}`}: ${p.toFixed(3)}`;
    });
    const lx = x0 + bw / 2;
    const ly = height - m.b + 12;
    text(svg, lx, ly, g.label.length > 28 ? `${g.label.slice(0, 27)}…` : g.label, {
      transform: `rotate(35 ${lx} ${ly})`, class: "tick" });
  });
  el("line", { x1: m.l, x2: width - m.r, y1: sy(lo), y2: sy(lo), class: "axis" }, svg);
}

/** Radar chart: axes = category values; series: [{label, values: [number|null]}] in [0, max]. */
export function radar(container, axes, series, { max = 1, size = 340, label = "" } = {}) {
  const pad = 120;
  const width = size + 2 * pad;
  const svg = svgRoot(container, width, size + 40, `radar chart ${label}`);
  const cx = width / 2;
  const cy = size / 2 + 20;
  const r = size / 2 - 10;
  const n = Math.max(axes.length, 1);
  const pt = (i, v) => {
    const a = -Math.PI / 2 + (2 * Math.PI * i) / n;
    return [cx + Math.cos(a) * r * (v / max), cy + Math.sin(a) * r * (v / max)];
  };
  for (const ring of [0.25, 0.5, 0.75, 1]) {
    el("polygon", { points: axes.map((_, i) => pt(i, ring * max).join(",")).join(" "), class: "grid",
      fill: "none" }, svg);
    text(svg, cx + 3, cy - r * ring - 2, (ring * max).toFixed(2), { class: "tick" });
  }
  axes.forEach((a, i) => {
    const [x, y] = pt(i, max);
    el("line", { x1: cx, y1: cy, x2: x, y2: y, class: "grid" }, svg);
    const [lx, ly] = pt(i, max * 1.12);
    const short = a.length > 24 ? `${a.slice(0, 23)}…` : a;
    text(svg, lx, ly, short, { "text-anchor": lx < cx - 5 ? "end" : lx > cx + 5 ? "start" : "middle",
      class: "tick" });
  });
  series.forEach((s, k) => {
    const color = PALETTE[k % PALETTE.length];
    const pts = s.values.map((v, i) => pt(i, v ?? 0));
    const poly = el("polygon", { points: pts.map((p) => p.join(",")).join(" "), fill: color,
      "fill-opacity": 0.12, stroke: color, "stroke-width": 2, class: "radar-series" }, svg);
    el("title", {}, poly).textContent = s.label;
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) return;
      const dot = el("circle", { cx: pts[i][0], cy: pts[i][1], r: 3, fill: color }, svg);
      el("title", {}, dot).textContent = `${s.label} · ${axes[i]}: ${v.toFixed(3)}`;
    });
  });
  legend(container, series.map((s, k) => ({ label: s.label, color: PALETTE[k % PALETTE.length] })));
}

/** Line chart on [0,1]²: series [{label, x: [], y: []}]; diagonal draws the chance line. */
export function lines(container, series, { xLabel = "", yLabel = "", diagonal = false, size = 320 } = {}) {
  const m = { l: 48, r: 12, t: 12, b: 40 };
  const width = size + m.l + m.r;
  const height = size + m.t + m.b;
  const svg = svgRoot(container, width, height, `${yLabel} against ${xLabel}`);
  const sx = (v) => m.l + v * size;
  const sy = (v) => m.t + (1 - v) * size;
  axisY(svg, m, height, sy, [0, 0.2, 0.4, 0.6, 0.8, 1.0], yLabel, width);
  for (const t of [0, 0.2, 0.4, 0.6, 0.8, 1.0]) text(svg, sx(t), height - m.b + 14, t.toFixed(1),
    { "text-anchor": "middle", class: "tick" });
  text(svg, m.l + size / 2, height - 6, xLabel, { "text-anchor": "middle", class: "axis-label" });
  el("rect", { x: m.l, y: m.t, width: size, height: size, class: "frame", fill: "none" }, svg);
  if (diagonal) el("line", { x1: sx(0), y1: sy(0), x2: sx(1), y2: sy(1), class: "chance" }, svg);
  series.forEach((s, k) => {
    const d = s.x.map((x, i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(s.y[i]).toFixed(1)}`).join("");
    const path = el("path", { d, fill: "none", stroke: PALETTE[k % PALETTE.length], "stroke-width": 2,
      class: "curve" }, svg);
    el("title", {}, path).textContent = s.label;
  });
  legend(container, series.map((s, k) => ({ label: s.label, color: PALETTE[k % PALETTE.length] })));
}

/** Scatter of points coloured by a value (viridis over the observed range), with a colour bar. */
export function scatter(container, { x, y, c, labels = [] }, { colorLabel = "", size = 420 } = {}) {
  const finite = c.filter((v) => v !== null && !Number.isNaN(v));
  const ext = (v) => v.reduce(([lo, hi], t) => [Math.min(lo, t), Math.max(hi, t)], [Infinity, -Infinity]);
  const [cmin, cmax] = finite.length ? ext(finite) : [0, 1];
  const norm = (v) => (v === null || Number.isNaN(v) ? null : (v - cmin) / (cmax - cmin || 1));
  const m = { l: 12, r: 100, t: 12, b: 12 };
  const inset = 8;
  const svg = svgRoot(container, size + m.l + m.r, size + m.t + m.b, `scatter coloured by ${colorLabel}`);
  const [x0, x1] = ext(x);
  const [y0, y1] = ext(y);
  const sx = (v) => m.l + inset + ((v - x0) / (x1 - x0 || 1)) * (size - 2 * inset);
  const sy = (v) => m.t + inset + (1 - (v - y0) / (y1 - y0 || 1)) * (size - 2 * inset);
  el("rect", { x: m.l, y: m.t, width: size, height: size, class: "frame", fill: "none" }, svg);
  const radius = x.length > 5000 ? 1.2 : x.length > 1000 ? 2 : 3;
  x.forEach((xv, i) => {
    const dot = el("circle", { cx: sx(xv).toFixed(1), cy: sy(y[i]).toFixed(1), r: radius, fill: viridis(norm(c[i])),
      class: "cell" }, svg);
    if (x.length <= 3000) {
      el("title", {}, dot).textContent = `${labels[i] ?? i}: ${c[i] === null ? "not scored" : c[i].toFixed(3)}`;
    }
  });
  const bx = size + m.l + 18;
  for (let i = 0; i < 50; i++) {
    el("rect", { x: bx, y: m.t + (size * i) / 50, width: 14, height: size / 50 + 0.5, fill: viridis(1 - i / 50) },
      svg);
  }
  text(svg, bx + 18, m.t + 8, cmax.toFixed(3), { class: "tick" });
  text(svg, bx + 18, m.t + size, cmin.toFixed(3), { class: "tick" });
  text(svg, bx + 60, m.t + size / 2, colorLabel, { transform: `rotate(90 ${bx + 60} ${m.t + size / 2})`,
    "text-anchor": "middle", class: "axis-label" });
}
