// Biology tab: DE tables (volcano + top genes + enrichment), embedding separation per model,
// biomarkers, diffusion pseudotime by label, gene lookup, Harmony corrections (uncorrected vs
// corrected per held-out study), dataset label confidence and the figure gallery of `scdrugmap analyze`.
import { api, fillSelect, fmt, getJSON, getToken, renderTable } from "./api.js";
import { barPoints, el as svgEl, text as svgText } from "./charts.js";

const COLOURS = { up: "#e76f51", down: "#2a9d8f", ns: "#c4c8cf" };
const NAMES = { up: "up in resistant", down: "down in resistant", ns: "not significant" };
const LABEL_COLOURS = { resistant: "#e76f51", sensitive: "#2a9d8f", unlabelled: "#9ca3af" };
const LABEL_ORDER = ["resistant", "sensitive", "unlabelled"];
const stars = (n) => (n ? "★".repeat(n) + "☆".repeat(3 - n) : "—");
const sci = (v) => (v === null || v === undefined ? "" : v === 0 ? "0" : Math.abs(v) < 1e-3 ? v.toExponential(2) : fmt(v));
const deLabel = (r) => `${r.dataset_ids.join("+")} · ${r.method} · ${r.labels}${r.cells && r.cells !== "labelled" ? ` (${r.cells})` : ""}`;

/** About n round tick values covering [lo, hi]. */
function ticks(lo, hi, n = 6) {
  const raw = (hi - lo) / Math.max(1, n);
  const mag = 10 ** Math.floor(Math.log10(raw || 1));
  const step = [1, 2, 5, 10].map((f) => f * mag).find((s) => raw <= s) ?? 10 * mag;
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9; t += step) out.push(Math.abs(t) < 1e-12 ? 0 : t);
  return out;
}

/** Volcano plot: x = effect, y = -log10 adjusted p; points coloured up / down / not significant. */
export function volcano(container, v, { xLabel = "log2 fold change", alpha = 0.05, minEffect = 0, nLabels = 10 } = {}) {
  const width = 560;
  const height = 420;
  const m = { l: 52, r: 16, t: 12, b: 44 };
  container.replaceChildren();
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", class: "chart volcano",
    "aria-label": `volcano plot of ${v.n_points} genes` });
  container.appendChild(svg);
  const xmax = v.log2fc.reduce((a, x) => Math.max(a, Math.abs(x)), Math.max(1e-6, minEffect * 1.5)) * 1.05;
  const ymax = v.neg_log10_padj.reduce((a, y) => Math.max(a, y), -Math.log10(alpha) * 1.2) * 1.05;
  const sx = (x) => m.l + ((x + xmax) / (2 * xmax)) * (width - m.l - m.r);
  const sy = (y) => height - m.b - (y / ymax) * (height - m.t - m.b);
  for (const t of ticks(-xmax, xmax)) {
    svgEl("line", { x1: sx(t), x2: sx(t), y1: m.t, y2: height - m.b, class: "grid" }, svg);
    svgText(svg, sx(t), height - m.b + 14, String(+t.toFixed(2)), { "text-anchor": "middle", class: "tick" });
  }
  for (const t of ticks(0, ymax, 5)) {
    svgEl("line", { x1: m.l, x2: width - m.r, y1: sy(t), y2: sy(t), class: "grid" }, svg);
    svgText(svg, m.l - 6, sy(t) + 4, String(+t.toFixed(1)), { "text-anchor": "end", class: "tick" });
  }
  svgEl("rect", { x: m.l, y: m.t, width: width - m.l - m.r, height: height - m.t - m.b, class: "frame", fill: "none" }, svg);
  svgEl("line", { x1: m.l, x2: width - m.r, y1: sy(-Math.log10(alpha)), y2: sy(-Math.log10(alpha)), class: "chance" }, svg);
  if (minEffect > 0) {
    for (const s of [-1, 1]) svgEl("line", { x1: sx(s * minEffect), x2: sx(s * minEffect), y1: m.t, y2: height - m.b, class: "chance" }, svg);
  }
  svgText(svg, m.l + (width - m.l - m.r) / 2, height - 8, xLabel, { "text-anchor": "middle", class: "axis-label" });
  const cy = m.t + (height - m.t - m.b) / 2;
  svgText(svg, 14, cy, "-log10 adjusted p", { transform: `rotate(-90 14 ${cy})`, "text-anchor": "middle", class: "axis-label" });
  // not-significant points first, so the significant ones are drawn on top
  const order = [...v.gene.keys()].sort((a, b) => (v.direction[b] === "ns") - (v.direction[a] === "ns"));
  const titled = v.n_points <= 5000;
  for (const i of order) {
    const dot = svgEl("circle", { cx: sx(v.log2fc[i]).toFixed(1), cy: sy(v.neg_log10_padj[i]).toFixed(1),
      r: v.direction[i] === "ns" ? 2 : 2.8, fill: COLOURS[v.direction[i]], "fill-opacity": 0.8,
      class: `volcano-point ${v.direction[i]}`, "data-gene": v.gene[i] }, svg);
    if (titled) {
      svgEl("title", {}, dot).textContent = `${v.gene[i]}: effect ${v.log2fc[i].toFixed(3)}, -log10 padj ${v.neg_log10_padj[i].toFixed(2)}`;
    }
  }
  const top = order.filter((i) => v.direction[i] !== "ns")
    .sort((a, b) => v.neg_log10_padj[b] - v.neg_log10_padj[a]).slice(0, nLabels);
  for (const i of top) {
    svgText(svg, sx(v.log2fc[i]) + 4, sy(v.neg_log10_padj[i]) - 4, v.gene[i], { class: "tick gene-label" });
  }
  const legend = document.createElement("div");
  legend.className = "legend";
  for (const d of ["up", "down", "ns"]) {
    const span = document.createElement("span");
    const sw = document.createElement("i");
    sw.style.background = COLOURS[d];
    span.append(sw, `${NAMES[d]} (${v.direction.filter((x) => x === d).length})`);
    legend.appendChild(span);
  }
  container.appendChild(legend);
}

/** Pseudotime strip chart: x = pseudotime, one jittered band per label, coloured by label; median ticks. */
export function pseudotimeStrip(container, res, { width = 560, band = 56 } = {}) {
  const p = res.points;
  const rank = (lab) => (LABEL_ORDER.includes(lab) ? LABEL_ORDER.indexOf(lab) : LABEL_ORDER.length);
  const rows = [...res.labels].sort((a, b) => rank(a.label) - rank(b.label));
  const m = { l: 86, r: 16, t: 10, b: 40 };
  const height = m.t + m.b + band * Math.max(1, rows.length);
  container.replaceChildren();
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", class: "chart pseudotime",
    "aria-label": `pseudotime of ${res.n_points} cells by label` });
  container.appendChild(svg);
  const lo = Math.min(0, ...p.pseudotime);
  const hi = Math.max(1e-9, ...p.pseudotime);
  const sx = (x) => m.l + ((x - lo) / (hi - lo || 1)) * (width - m.l - m.r);
  const row = new Map(rows.map((r, i) => [r.label, i]));
  const cy = (lab) => m.t + band * (row.get(lab) ?? 0) + band / 2;
  for (const t of ticks(lo, hi, 6)) {
    svgEl("line", { x1: sx(t), x2: sx(t), y1: m.t, y2: height - m.b, class: "grid" }, svg);
    svgText(svg, sx(t), height - m.b + 14, String(+t.toFixed(2)), { "text-anchor": "middle", class: "tick" });
  }
  svgEl("rect", { x: m.l, y: m.t, width: width - m.l - m.r, height: height - m.t - m.b, class: "frame", fill: "none" }, svg);
  for (const r of rows) {
    svgText(svg, m.l - 8, cy(r.label) + 4, r.label, { "text-anchor": "end", class: "tick" });
  }
  svgText(svg, m.l + (width - m.l - m.r) / 2, height - 8, "diffusion pseudotime", { "text-anchor": "middle", class: "axis-label" });
  const titled = p.pseudotime.length <= 3000;
  p.pseudotime.forEach((x, i) => {
    const lab = p.label[i];
    const jitter = (((i * 2654435761) >>> 0) % 1000) / 1000 - 0.5;
    const dot = svgEl("circle", { cx: sx(x).toFixed(1), cy: (cy(lab) + jitter * band * 0.7).toFixed(1), r: 2.4,
      fill: LABEL_COLOURS[lab] ?? "#6b7280", "fill-opacity": 0.7,
      class: `pt-point ${LABEL_COLOURS[lab] ? lab : "other"}` }, svg);
    if (titled) {
      const prob = p.probability ? `, P(resistant) ${p.probability[i] === null ? "n/a" : p.probability[i].toFixed(3)}` : "";
      svgEl("title", {}, dot).textContent = `${lab}: pseudotime ${x.toFixed(3)}${prob}`;
    }
  });
  for (const r of rows) {
    if (r.median === null) continue;
    const med = svgEl("line", { x1: sx(r.median), x2: sx(r.median), y1: cy(r.label) - band * 0.42,
      y2: cy(r.label) + band * 0.42, class: "pt-median" }, svg);
    svgEl("title", {}, med).textContent = `${r.label}: median pseudotime ${r.median.toFixed(3)} (${r.n_finite} cells)`;
  }
  const legend = document.createElement("div");
  legend.className = "legend";
  for (const r of rows) {
    const span = document.createElement("span");
    const sw = document.createElement("i");
    sw.style.background = LABEL_COLOURS[r.label] ?? "#6b7280";
    span.append(sw, `${r.label} (${r.n_cells} cells, median ${fmt(r.median)})`);
    legend.appendChild(span);
  }
  container.appendChild(legend);
}

/** An <img> for a figure URL: direct without a token, else fetched with the token as a blob. */
async function figureImage(url, alt) {
  const img = document.createElement("img");
  img.alt = alt;
  img.loading = "lazy";
  if (!getToken()) {
    img.src = url;
  } else {
    img.src = URL.createObjectURL(await (await api(url)).blob());
  }
  return img;
}

export function initBiology({ onError }) {
  const $ = (id) => document.getElementById(id);
  let deRuns = [];
  let ptRuns = [];

  async function drawDE() {
    const run = deRuns.find((r) => r.de_id === $("bio-de").value);
    if (!run) return;
    const res = await getJSON(`/analysis/de/${encodeURIComponent(run.de_id)}`,
      { limit: 50, significant_only: $("bio-sig-only").checked });
    volcano($("volcano-chart"), res.volcano, { xLabel: run.effect_unit || "log2 fold change", alpha: run.alpha,
      minEffect: run.min_log2fc });
    $("volcano-caption").textContent = `Volcano: ${deLabel(run)} — ${run.n_significant} of ${run.n_genes} genes significant`;
    const overlap = run.truth_de_id
      ? ` · vs truth-label DE: Jaccard ${fmt(run.jaccard)}, Spearman log2FC ${fmt(run.spearman_log2fc)}, ${run.n_shared} shared`
      : "";
    $("bio-de-info").textContent = `${run.test ?? run.method}; ${run.n_resistant} resistant vs ${run.n_sensitive} sensitive cells${overlap}`;
    renderTable($("bio-genes"), [
      { key: "gene", label: "Gene" }, { key: "log2fc", label: "Effect" }, { key: "p", label: "p", render: (r) => sci(r.p) },
      { key: "padj", label: "Adj. p", render: (r) => sci(r.padj) }, { key: "mean_resistant", label: "Mean res." },
      { key: "mean_sensitive", label: "Mean sens." }, { key: "frac_resistant", label: "Frac. res." },
      { key: "frac_sensitive", label: "Frac. sens." },
      { key: "significant", label: "Sig.", render: (r) => (r.significant ? (r.log2fc > 0 ? "up" : "down") : "") },
    ], res.rows);
    $("bio-genes-caption").textContent = `Top ${res.rows.length} of ${res.n_rows} genes by adjusted p`;
    const enrich = await getJSON("/analysis/enrich", { de_id: run.de_id });
    if (!enrich.items.length) {
      $("bio-enrich-caption").textContent = "No enrichment of this table yet (scdrugmap analyze enrich --de ID).";
      renderTable($("bio-enrich"), [], []);
      return;
    }
    const terms = await getJSON(`/analysis/enrich/${encodeURIComponent(enrich.items[0].enrich_id)}`, { limit: 10 });
    $("bio-enrich-caption").textContent = `Enriched gene sets (${terms.run.genesets ?? ""}, ${terms.run.n_sets} sets)`;
    renderTable($("bio-enrich"), [{ key: "direction", label: "Dir." }, { key: "rank", label: "#" },
      { key: "term", label: "Term" }, { key: "description", label: "Description" }, { key: "n_hits", label: "Hits" },
      { key: "fold_enrichment", label: "Fold" }, { key: "padj", label: "Adj. p", render: (r) => sci(r.padj) }], terms.rows);
  }

  async function drawSeparation() {
    const sep = await getJSON("/analysis/separation");
    if (!sep.items.length) {
      $("sep-chart").textContent = "No separation scores yet (scdrugmap analyze separation --model M).";
      return;
    }
    const groups = sep.models.map((mdl) => ({ label: `${mdl.model} (${mdl.revision.slice(0, 8)})`, mean: mdl.knn_purity,
      points: sep.items.filter((i) => i.revision === mdl.revision && i.scope === "dataset").map((i) => i.knn_purity) }));
    barPoints($("sep-chart"), groups, { yLabel: "kNN label purity", height: 260 });
    const heads = [...new Set(sep.items.flatMap((i) => Object.keys(i.head_metrics)))].sort();
    renderTable($("sep-table"), [{ key: "model", label: "Model" }, { key: "scope", label: "Scope" },
      { key: "value", label: "Value" }, { key: "n_cells", label: "Cells" }, { key: "silhouette", label: "Silhouette" },
      { key: "silhouette_shuffled", label: "Shuffled" }, { key: "knn_purity", label: "kNN purity" },
      { key: "knn_purity_expected", label: "Expected" },
      ...heads.map((h) => ({ key: h, label: `${h} ${sep.metric.toUpperCase()}`, render: (r) => fmt(r.head_metrics[h]) }))],
    sep.items);
  }

  async function drawBiomarkers() {
    const bm = await getJSON("/analysis/biomarkers", { limit: 20 });
    if (!bm.items.length) {
      $("bio-bm-caption").textContent = "No biomarker runs yet (scdrugmap analyze biomarkers).";
      return;
    }
    const run = bm.items[0];
    $("bio-bm-caption").textContent = `Biomarkers of ${run.dataset_ids.join("+")} (${run.labels} labels; CV AUROC ${fmt(run.cv_auroc)})`;
    renderTable($("bio-bm"), [{ key: "rank", label: "#" }, { key: "gene", label: "Gene" },
      { key: "mean_abs_shap", label: "Mean |SHAP|" }, { key: "gain_fraction", label: "Gain frac." },
      { key: "direction", label: "Dir." }], run.genes);
  }

  async function drawConfidence() {
    const conf = await getJSON("/analysis/confidence");
    $("conf-caption").textContent = `Label confidence: ${conf.counts["3"]} ★★★, ${conf.counts["2"]} ★★☆, `
      + `${conf.counts["1"]} ★☆☆, ${conf.counts.none} without stars`;
    renderTable($("conf-table"), [{ key: "dataset_id", label: "Dataset" }, { key: "drug", label: "Drug" },
      { key: "stars", label: "Stars", render: (r) => {
        const s = document.createElement("span");
        s.className = "stars";
        s.textContent = stars(r.stars);
        s.title = [r.source, r.set_at && `set at ${r.set_at}`, r.reason].filter(Boolean).join(" · ");
        return s;
      } }, { key: "source", label: "Source" }, { key: "reason", label: "Evidence" }], conf.items);
  }

  async function drawGallery() {
    const figs = await getJSON("/analysis/figures");
    const box = $("bio-gallery");
    box.replaceChildren();
    if (!figs.items.length) {
      box.textContent = "No figures yet: the scdrugmap analyze commands write them to <store>/analysis/figures.";
      return;
    }
    for (const f of figs.items) {
      const fig = document.createElement("figure");
      fig.className = "gallery-item";
      const url = f.png ?? f.svg;
      if (url) fig.appendChild(await figureImage(url, f.stem));
      const cap = document.createElement("figcaption");
      cap.textContent = f.caption;
      fig.appendChild(cap);
      box.appendChild(fig);
    }
  }

  async function drawPseudotime() {
    const run = ptRuns.find((r) => r.pt_id === $("bio-pt").value);
    if (!run) return;
    const res = await getJSON(`/analysis/pseudotime/${encodeURIComponent(run.pt_id)}`, { max_points: 5000 });
    pseudotimeStrip($("pt-chart"), res);
    const prob = run.run_id ? `, with ${run.run_id}'s P(resistant) ${fmt(run.spearman_probability)}` : "";
    $("pt-caption").textContent = `Pseudotime of ${run.dataset_id} by label (${res.n_points} of ${res.n_cells} cells shown)`;
    $("bio-pt-info").textContent = `root: ${run.root_rule}; Spearman with label (resistant = 1) `
      + `${fmt(run.spearman_label)}, AUROC ${fmt(run.auroc_label)}${prob}`
      + (res.n_unreachable ? `; ${res.n_unreachable} cells unreachable` : "");
  }

  async function drawGene(symbol) {
    const res = await getJSON("/analysis/genes", { gene: symbol });
    const list = $("gene-list");
    list.replaceChildren(...res.genes.map((g) => Object.assign(document.createElement("option"), { value: g.gene })));
    if (!res.gene) {
      $("gene-caption").textContent = res.genes.length
        ? `Gene lookup (${res.genes.length} genes viewed)` : "No gene views yet (scdrugmap analyze gene SYMBOL).";
      return;
    }
    $("gene-caption").textContent = res.items.length
      ? `${res.gene} by label in ${res.n} datasets (${res.items[0].value_kind})` : res.hint;
    renderTable($("gene-table"), [{ key: "dataset_id", label: "Dataset" }, { key: "n_resistant", label: "Res." },
      { key: "n_sensitive", label: "Sens." }, { key: "mean_resistant", label: "Mean res." },
      { key: "mean_sensitive", label: "Mean sens." }, { key: "frac_resistant", label: "Frac. res." },
      { key: "frac_sensitive", label: "Frac. sens." }, { key: "log2fc", label: "Effect" },
      { key: "p", label: "p (cells)", render: (r) => sci(r.p) }], res.items);
  }

  async function drawCorrection() {
    const revision = $("bio-corr").value;
    if (!revision) return;
    const res = await getJSON(`/analysis/corrections/${encodeURIComponent(revision)}/metrics`, { metric: $("corr-metric").value });
    const c = res.correction;
    $("corr-caption").textContent = `${c.model}: Harmony on ${c.source_model} (${c.source_revision.slice(0, 8)}) by `
      + `${c.batch_key}, ${c.n_batches} batches, ${c.n_cells} cells — ${res.metric.toUpperCase()} per held-out study`;
    const diff = (r) => {
      const s = document.createElement("span");
      s.textContent = r.difference === null ? "" : `${r.difference > 0 ? "+" : ""}${r.difference.toFixed(3)}`;
      s.className = r.difference > 0 ? "diff-pos" : r.difference < 0 ? "diff-neg" : "";
      return s;
    };
    renderTable($("corr-table"), [{ key: "value", label: "Value" }, { key: "protocol", label: "Protocol" },
      { key: "head", label: "Head" }, { key: "fold", label: "Held-out study / fold" },
      { key: "uncorrected", label: "Uncorrected" }, { key: "corrected", label: "Corrected" },
      { key: "difference", label: "Difference", render: diff }], res.items);
    [...$("corr-table").tBodies[0].rows].forEach((tr, i) => tr.classList.toggle("mean-row", res.items[i].fold === "mean"));
    if (!res.items.length) $("corr-caption").textContent += " (no compared runs: scdrugmap evaluate --corrected)";
  }

  async function initLower() {
    ptRuns = (await getJSON("/analysis/pseudotime")).items;
    fillSelect($("bio-pt"), ptRuns.map((r) => ({ value: r.pt_id,
      label: `${r.dataset_id}${r.run_id ? ` · ${r.run_id}` : ""} — ${r.pt_id}` })));
    if (!ptRuns.length) $("pt-chart").textContent = "No pseudotime yet (scdrugmap analyze pseudotime --dataset ID).";
    const corr = (await getJSON("/analysis/corrections")).items;
    fillSelect($("bio-corr"), corr.map((c) => ({ value: c.revision,
      label: `${c.model} (${c.revision.slice(0, 8)}) ← ${c.source_model} by ${c.batch_key}` })));
    if (!corr.length) $("corr-caption").textContent = "No batch corrections yet (scdrugmap embed --model M --correct harmony).";
    const genes = (await getJSON("/analysis/genes")).genes;
    if (genes.length && !$("gene-input").value) $("gene-input").value = genes[0].gene;
    await Promise.all([drawPseudotime(), drawCorrection(), drawGene($("gene-input").value.trim())]);
  }

  $("bio-de").addEventListener("change", () => drawDE().catch(onError));
  $("bio-sig-only").addEventListener("change", () => drawDE().catch(onError));
  $("bio-pt").addEventListener("change", () => drawPseudotime().catch(onError));
  $("bio-corr").addEventListener("change", () => drawCorrection().catch(onError));
  $("corr-metric").addEventListener("change", () => drawCorrection().catch(onError));
  $("gene-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    drawGene($("gene-input").value.trim()).catch(onError);
  });

  return async function activate() {
    deRuns = (await getJSON("/analysis/de")).items;
    fillSelect($("bio-de"), deRuns.map((r) => ({ value: r.de_id, label: `${deLabel(r)} — ${r.de_id}` })));
    if (!deRuns.length) $("volcano-chart").textContent = "No DE tables yet (scdrugmap analyze de --dataset ID).";
    const parts = [drawSeparation(), drawBiomarkers(), initLower(), drawConfidence(), drawGallery()];
    if (deRuns.length) parts.unshift(drawDE());
    const failed = (await Promise.allSettled(parts)).find((p) => p.status === "rejected");
    if (failed) throw failed.reason;
  };
}
