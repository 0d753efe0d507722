// Results tab: per-model bars with fold points, radar over a category's values, ROC/PR of a run.
import { fillSelect, fmt, getJSON, renderTable } from "./api.js";
import { barPoints, lines, radar } from "./charts.js";

const runLabel = (r) => `${r.model} · ${r.head}${r.strategy && r.strategy !== "frozen" ? ` (${r.strategy})` : ""}`;
const METRIC_NAMES = { f1: "F1", auroc: "AUROC", auprc: "AUPRC", accuracy: "Accuracy",
  balanced_accuracy: "Balanced accuracy", mcc: "MCC", precision: "Precision", recall: "Recall" };

export function initResults({ onError }) {
  const $ = (id) => document.getElementById(id);
  const sel = { protocol: $("res-protocol"), category: $("res-category"), value: $("res-value"),
    metric: $("res-metric"), run: $("res-run") };
  let runs = [];

  const uniq = (xs) => [...new Set(xs)].sort();
  function refreshSelectors() {
    fillSelect(sel.protocol, uniq(runs.map((r) => r.protocol)));
    const inProtocol = runs.filter((r) => r.protocol === sel.protocol.value);
    fillSelect(sel.category, uniq(inProtocol.map((r) => r.category)));
    const inCategory = inProtocol.filter((r) => r.category === sel.category.value);
    fillSelect(sel.value, uniq(inCategory.map((r) => r.value)));
    const chosen = inCategory.filter((r) => r.value === sel.value.value);
    fillSelect(sel.run, chosen.map((r) => ({ value: r.run_id, label: `${runLabel(r)} — ${r.run_id}` })));
  }

  async function drawBars() {
    const metric = sel.metric.value;
    const common = { protocol: sel.protocol.value, category: sel.category.value, metric };
    const folds = await getJSON("/metrics", { ...common, value: sel.value.value });
    const groups = new Map();
    for (const row of folds.items) {
      if (!groups.has(row.run_id)) groups.set(row.run_id, { label: runLabel(row), points: [], names: [] });
      groups.get(row.run_id).points.push(row.score);
      // cross-data folds are held-out studies: name them; pooled folds are numbered
      groups.get(row.run_id).names.push(row.protocol === "cross" && row.fold_name ? `held-out study ${row.fold_name}` : `fold ${row.fold}`);
    }
    const data = [...groups.values()].map((g) => {
      const def = g.points.filter((p) => p !== null);
      return { ...g, mean: def.length ? def.reduce((a, b) => a + b, 0) / def.length : null };
    });
    $("bar-caption").textContent = `${METRIC_NAMES[metric]} per model — ${sel.category.value} = ${sel.value.value} (${sel.protocol.value}); points are ${sel.protocol.value === "cross" ? "held-out studies" : "folds"}`;
    const lo = metric === "mcc" ? -1 : 0;
    barPoints($("bar-chart"), data, { yLabel: METRIC_NAMES[metric], yDomain: [lo, 1] });

    const summary = await getJSON("/metrics", { ...common, summary: true });
    const axes = [...new Set(summary.items.map((r) => r.value))].sort();
    const series = new Map();
    for (const r of summary.items) {
      const key = runLabel(r);
      if (!series.has(key)) series.set(key, { label: key, values: axes.map(() => null) });
      series.get(key).values[axes.indexOf(r.value)] = r.mean === null ? null : Math.max(0, r.mean);
    }
    $("radar-caption").textContent = `${METRIC_NAMES[metric]} over every ${sel.category.value} value (${sel.protocol.value})`;
    radar($("radar-chart"), axes, [...series.values()], { label: metric });

    const table = await getJSON("/metrics", { protocol: sel.protocol.value, category: sel.category.value,
      value: sel.value.value, summary: true });
    // mean ± sd | constant-classifier baseline at the folds' prevalence [folds counted when not all]
    const wide = new Map();
    for (const r of table.items) {
      if (!wide.has(r.run_id)) {
        wide.set(r.run_id, { run: runLabel(r), run_id: r.run_id, positive: r.positive_class ?? "",
          flag: r.degenerate ? "degenerate" : "" });
      }
      const base = r.baseline === null || r.baseline === undefined ? "" : ` | ${fmt(r.baseline)}`;
      const folds = r.n_folds_total && r.n_folds < r.n_folds_total ? ` [${r.n_folds}/${r.n_folds_total}]` : "";
      wide.get(r.run_id)[r.metric] = r.mean === null
        ? `NULL (${r.undefined_reason ?? "undefined"})` : `${fmt(r.mean)} ± ${fmt(r.sd ?? 0)}${base}${folds}`;
    }
    renderTable($("res-table"), [{ key: "run", label: "Model · head" }, { key: "run_id", label: "Run" },
      { key: "positive", label: "Positive" },
      ...Object.keys(METRIC_NAMES).map((k) => ({ key: k, label: METRIC_NAMES[k] })),
      { key: "flag", label: "Flag" }], [...wide.values()]);
    await drawLeakage();
  }

  // the same cells under cell / sample / patient / study grouping (scdrugmap leakage), below the table
  async function drawLeakage() {
    let box = document.getElementById("res-leakage");
    if (!box) {
      box = document.createElement("div");
      box.id = "res-leakage";
      $("res-table").after(box);
    }
    const rep = await getJSON("/leakage", { category: sel.category.value, value: sel.value.value });
    if (!rep.items.length) {
      box.textContent = "Leakage: no report for this value (scdrugmap leakage --model M --value V).";
      return;
    }
    const rows = new Map();
    for (const r of rep.items) {
      const key = `${r.report_id}/${r.grouping}`;
      if (!rows.has(key)) rows.set(key, { model: `${r.model} · ${r.head}`, grouping: r.grouping, reference: r.reference });
      const d = r.inflation === null ? "" : ` (${r.inflation >= 0 ? "+" : ""}${fmt(r.inflation)})`;
      rows.get(key)[r.metric] = r.mean === null ? "—" : `${fmt(r.mean)}${d}`;
    }
    const caption = document.createElement("p");
    caption.textContent = "Leakage: means over folds under each grouping (inflation over the strictest grouping).";
    const table = document.createElement("table");
    table.createTHead();
    table.createTBody();
    renderTable(table, [{ key: "model", label: "Model · head" }, { key: "grouping", label: "Grouping" },
      ...["auroc", "auprc", "f1", "balanced_accuracy", "mcc"].map((k) => ({ key: k, label: METRIC_NAMES[k] })),
      { key: "reference", label: "Strictest" }], [...rows.values()]);
    box.replaceChildren(caption, table);
  }

  async function drawCurves() {
    const runId = sel.run.value;
    if (!runId) return;
    try {
      const c = await getJSON(`/runs/${encodeURIComponent(runId)}/curves`);
      const label = runs.find((r) => r.run_id === runId);
      const name = label ? runLabel(label) : runId;
      lines($("roc-chart"), [{ label: `${name} (AUROC ${c.auroc.toFixed(3)})`, x: c.roc.fpr, y: c.roc.tpr }],
        { xLabel: "False positive rate", yLabel: "True positive rate", diagonal: true });
      lines($("pr-chart"), [{ label: `${name} (AP ${c.average_precision.toFixed(3)})`, x: c.pr.recall, y: c.pr.precision }],
        { xLabel: "Recall", yLabel: "Precision" });
      $("curve-info").textContent = `${c.n_positive} ${c.positive_class} vs ${c.n_negative} other labelled cells`;
    } catch (e) {
      $("roc-chart").textContent = e.detail ?? String(e);
      $("pr-chart").textContent = "";
    }
  }

  const redraw = () => drawBars().then(drawCurves).catch(onError);
  for (const key of ["protocol", "category", "value"]) {
    sel[key].addEventListener("change", () => { refreshSelectors(); redraw(); });
  }
  sel.metric.addEventListener("change", () => drawBars().catch(onError));
  sel.run.addEventListener("change", () => drawCurves().catch(onError));

  return async function activate() {
    const page = await getJSON("/runs", { limit: 10000 });
    runs = page.items.filter((r) => r.strategy !== "predict" && r.status === "complete");
    if (!runs.length) {
      $("bar-chart").textContent = "No evaluation runs in the store yet (scdrugmap evaluate).";
      return;
    }
    refreshSelectors();
    await redraw();
  };
}
