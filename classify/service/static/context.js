// Cell context tab: resistant / sensitive share of each cell type per dataset (scDrugAtlas Fig. 3g;
// `scdrugmap analyze celltypes`) and cell–cell communication runs (`scdrugmap analyze ccc`): a heat map
// of specific interactions per sender → receiver and the strongest ligand → receptor pairs.
import { fillSelect, fmt, getJSON, renderTable } from "./api.js";
import { el as svgEl, text as svgText } from "./charts.js";

const COLOURS = { resistant: "#e76f51", sensitive: "#2a9d8f" };
const pct = (v) => (v === null || v === undefined ? "" : `${(100 * v).toFixed(1)} %`);

/** Horizontal stacked bars: one per cell type, resistant share then sensitive share of its labelled cells. */
function proportionBars(container, rows, { width = 560, bar = 26 } = {}) {
  const m = { l: 130, r: 60, t: 8, b: 30 };
  const height = m.t + m.b + bar * Math.max(1, rows.length);
  container.replaceChildren();
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", class: "chart celltypes",
    "aria-label": `resistant and sensitive share of ${rows.length} cell types` });
  container.appendChild(svg);
  const sx = (v) => m.l + v * (width - m.l - m.r);
  rows.forEach((r, i) => {
    const y = m.t + i * bar + 3;
    const labelled = r.n_resistant + r.n_sensitive;
    const res = labelled ? r.n_resistant / labelled : 0;
    const sen = labelled ? r.n_sensitive / labelled : 0;
    svgText(svg, m.l - 6, y + bar / 2, r.cell_type, { "text-anchor": "end", class: "tick" });
    for (const [lab, x0, w] of [["resistant", 0, res], ["sensitive", res, sen]]) {
      const rect = svgEl("rect", { x: sx(x0), y, width: Math.max(0, sx(x0 + w) - sx(x0)), height: bar - 6,
        fill: COLOURS[lab], class: `ct-bar ${lab}`, "data-type": r.cell_type }, svg);
      svgEl("title", {}, rect).textContent = `${r.cell_type}: ${lab} ${pct(w)} (${r[`n_${lab}`]} of ${labelled} labelled cells)`;
    }
    svgText(svg, sx(1) + 4, y + bar / 2, `n=${r.n_cells}`, { class: "tick" });
  });
  for (const t of [0, 0.25, 0.5, 0.75, 1]) {
    svgText(svg, sx(t), height - 10, `${t * 100}%`, { "text-anchor": "middle", class: "tick" });
  }
  const legend = document.createElement("div");
  legend.className = "legend";
  for (const lab of ["resistant", "sensitive"]) {
    const span = document.createElement("span");
    const sw = document.createElement("i");
    sw.style.background = COLOURS[lab];
    span.append(sw, lab);
    legend.appendChild(span);
  }
  container.appendChild(legend);
}

/** Heat map of counts per sender (rows) → receiver (columns). */
function heatMap(container, groups, counts, { cell = 34 } = {}) {
  const m = { l: 150, r: 90, t: 10, b: 130 };
  const n = groups.length;
  const width = m.l + m.r + cell * n;
  const height = m.t + m.b + cell * n;
  container.replaceChildren();
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", class: "chart ccc-heat",
    "aria-label": `specific interactions among ${n} groups` });
  container.appendChild(svg);
  const value = new Map(counts.map((c) => [`${c.source}\u0000${c.target}`, c.n]));
  const max = Math.max(1, ...counts.map((c) => c.n));
  groups.forEach((s, i) => {
    svgText(svg, m.l - 6, m.t + i * cell + cell / 2 + 4, s, { "text-anchor": "end", class: "tick" });
    groups.forEach((t, j) => {
      const v = value.get(`${s}\u0000${t}`) ?? 0;
      const x = m.l + j * cell;
      const y = m.t + i * cell;
      const rect = svgEl("rect", { x, y, width: cell - 1, height: cell - 1, fill: "#d62728",
        "fill-opacity": (0.08 + 0.92 * (v / max)).toFixed(3), class: "ccc-cell" }, svg);
      svgEl("title", {}, rect).textContent = `${s} → ${t}: ${v} specific interactions`;
      svgText(svg, x + cell / 2, y + cell / 2 + 4, String(v), { "text-anchor": "middle", class: "tick" });
    });
  });
  groups.forEach((t, j) => {
    const x = m.l + j * cell + cell / 2;
    const y = m.t + n * cell + 8;
    svgText(svg, x, y, t, { transform: `rotate(60 ${x} ${y})`, class: "tick" });
  });
}

export function initContext({ onError }) {
  const $ = (id) => document.getElementById(id);
  let items = [];
  let runs = [];

  function drawTypes() {
    const rows = items.filter((r) => r.dataset_id === $("ct-dataset").value);
    if (!rows.length) return;
    proportionBars($("ct-chart"), rows);
    const total = rows.reduce((a, r) => a + r.n_cells, 0);
    $("ct-caption").textContent = `${$("ct-dataset").value}: resistant and sensitive share of each type's labelled cells (${total} cells)`;
    renderTable($("ct-table"), [{ key: "cell_type", label: "Cell type" }, { key: "n_cells", label: "Cells" },
      { key: "n_resistant", label: "Resistant" }, { key: "n_sensitive", label: "Sensitive" },
      { key: "n_unlabelled", label: "Unlabelled" }, { key: "frac_resistant", label: "Resistant share", render: (r) => pct(r.frac_resistant) },
      { key: "share_of_resistant", label: "% of resistant cells", render: (r) => pct(r.share_of_resistant) },
      { key: "share_of_sensitive", label: "% of sensitive cells", render: (r) => pct(r.share_of_sensitive) }], rows);
  }

  async function loadTypes() {
    const res = await getJSON("/analysis/celltypes", { method: $("ct-method").value || "markers" });
    if (!$("ct-method").options.length) fillSelect($("ct-method"), res.methods);
    items = res.items;
    const datasets = [...new Set(items.map((r) => r.dataset_id))];
    fillSelect($("ct-dataset"), datasets);
    if (!items.length) {
      $("ct-chart").textContent = "No cell types yet (scdrugmap analyze celltypes annotate --dataset ID).";
      return;
    }
    $("ct-info").textContent = `${datasets.length} annotated datasets`;
    drawTypes();
  }

  async function drawRun() {
    const run = runs.find((r) => r.ccc_id === $("ccc-run").value);
    if (!run) return;
    const res = await getJSON(`/analysis/ccc/${encodeURIComponent(run.ccc_id)}`, { limit: 20 });
    const groups = Object.keys(run.groups).filter((g) => res.counts.some((c) => c.source === g || c.target === g)
      || res.top.some((t) => t.source === g || t.target === g));
    heatMap($("ccc-heat"), groups.length ? groups : Object.keys(run.groups), res.counts);
    $("ccc-info").textContent = `${run.dataset_ids.join("+")} by ${run.groupby} (${run.method}, ${run.resource}): `
      + `${res.n_specific} of ${res.n_interactions} interactions specific; groups ${Object.entries(run.groups).map(([g, n]) => `${g} (${n})`).join(", ")}`;
    $("ccc-note").textContent = run.note ? `Note: ${run.note}` : "";
    renderTable($("ccc-table"), [{ key: "source", label: "Sender" }, { key: "target", label: "Receiver" },
      { key: "ligand", label: "Ligand" }, { key: "receptor", label: "Receptor" },
      { key: "magnitude", label: "Magnitude" }, { key: "specificity", label: "Specificity", render: (r) => fmt(r.specificity) }],
    res.top.slice(0, 40));
  }

  async function loadRuns() {
    runs = (await getJSON("/analysis/ccc")).items;
    fillSelect($("ccc-run"), runs.map((r) => ({ value: r.ccc_id, label: `${r.dataset_ids.join("+")} · ${r.groupby} · ${r.method} — ${r.ccc_id}` })));
    if (!runs.length) {
      $("ccc-heat").textContent = "No cell–cell communication runs yet (scdrugmap analyze ccc --dataset ID).";
      return;
    }
    await drawRun();
  }

  $("ct-method").addEventListener("change", () => loadTypes().catch(onError));
  $("ct-dataset").addEventListener("change", () => drawTypes());
  $("ccc-run").addEventListener("change", () => drawRun().catch(onError));

  return async function activate() {
    const failed = (await Promise.allSettled([loadTypes(), loadRuns()])).find((p) => p.status === "rejected");
    if (failed) throw failed.reason;
  };
}
