// Predict tab: upload with progress, head picker, job polling, result table, CSV download, UMAP.
import { api, fillSelect, getJSON, postForm, renderTable } from "./api.js";
import { scatter } from "./charts.js";

const PAGE = 100;

export function initPredict({ onError, clearError = () => {} }) {
  const $ = (id) => document.getElementById(id);
  let cells = null;
  let offset = 0;
  let job = null;
  let byRun = new Map();

  async function loadHeads() {
    const models = await getJSON("/models");
    const auroc = (h) => h.metrics.auroc ?? -1;
    // only heads that can score a new file are offered, the default (best predictable) first
    const heads = models.heads.filter((h) => h.predictable)
      .sort((a, b) => (b.default === true) - (a.default === true) || auroc(b) - auroc(a));
    byRun = new Map(heads.map((h) => [h.run_id, h]));
    const label = (h) => {
      const score = auroc(h) < 0 ? "" : ` · AUROC ${auroc(h).toFixed(3)}`;
      const lora = h.strategy === "lora" ? " · LoRA" : "";
      return `${h.model}${lora} · ${h.head} · ${h.protocol} ${h.category}=${h.value}${score}`;
    };
    fillSelect($("pred-head"), heads.map((h) => ({ value: h.run_id, label: `${label(h)}${h.default ? " (default)" : ""}` })));
    if (models.default_head && byRun.has(models.default_head)) $("pred-head").value = models.default_head;
    if (!heads.length) $("pred-submit").disabled = true;
    const unavailable = models.heads.filter((h) => !h.predictable);
    $("pred-unavailable").hidden = !unavailable.length;
    $("pred-unavailable-summary").textContent = `${unavailable.length} trained head(s) cannot score new files`;
    $("pred-unavailable-list").replaceChildren(...unavailable.map((h) => Object.assign(document.createElement("li"),
      { className: "unpredictable", textContent: `${label(h)} (${h.run_id}): ${h.not_predictable_reason}` })));
    showFolds();
  }

  // LoRA heads: pick the fold whose adapter + head to apply (frozen heads send no fold)
  function showFolds() {
    const h = byRun.get($("pred-head").value);
    const lora = h?.strategy === "lora";
    $("pred-fold-label").hidden = !lora;
    $("pred-fold").disabled = !lora;
    fillSelect($("pred-fold"), lora ? (h.folds || []).map((f) => ({ value: String(f), label: String(f) })) : []);
  }

  function showPage() {
    const rows = [];
    for (let i = offset; i < Math.min(cells.obs_name.length, offset + PAGE); i++) {
      rows.push({ obs_name: cells.obs_name[i], p_sensitive: cells.p_sensitive[i],
        p_sensitive_raw: cells.p_sensitive_raw[i], call: cells.call[i], status: cells.status[i], reason: cells.reason[i] });
    }
    renderTable($("pred-table"), [{ key: "obs_name", label: "Cell" }, { key: "p_sensitive", label: "p(sensitive)" },
      { key: "p_sensitive_raw", label: "Raw p(sensitive)" }, { key: "call", label: "Call",
        render: (r) => Object.assign(document.createElement("span"), { className: `lab ${r.call}`, textContent: r.call }) },
      { key: "status", label: "Status" }, { key: "reason", label: "Reason" }], rows);
    $("pred-count").textContent = `${offset + 1}–${offset + rows.length} of ${cells.obs_name.length}`;
  }

  async function showResult(jobId) {
    const res = await getJSON(`/jobs/${jobId}/result`);
    cells = res.cells;
    offset = 0;
    const s = res.summary;
    $("pred-summary").textContent = `${s.n_scored} new cells scored, ${s.n_out_of_fold} cells that trained the head shown `
      + `with their out-of-fold prediction, ${s.n_not_scored} not scored (of ${s.n_cells}) with ${s.run_id}: `
      + `${s.n_sensitive} sensitive, ${s.n_resistant} resistant, ${s.n_abstained} abstained.`;
    const q = s.qc;
    $("pred-qc").textContent = q.applied
      ? `QC (> ${q.min_genes} genes, < ${q.max_pct_mito} % mitochondrial): ${q.n_failed} cells failed`
        + (Object.keys(q.reasons).length ? ` — ${Object.entries(q.reasons).map(([k, n]) => `${n} ${k}`).join(", ")}` : "")
      : `QC skipped: the file holds ${q.x_kind} values, not raw counts.`;
    const c = s.calibration_detail;
    const oos = Object.entries(c.out_of_study || {}).filter(([, f]) => f.brier_calibrated != null)
      .map(([m, f]) => `${m}: Brier ${f.brier_raw.toFixed(3)} raw → ${f.brier_calibrated.toFixed(3)}, ECE ${f.ece_raw.toFixed(3)} → ${f.ece_calibrated.toFixed(3)}`);
    $("pred-calibration").textContent = `Calibration ${c.method} (${c.reason}).`
      + (oos.length ? ` Out-of-study check over ${c.n_studies} studies — ${oos.join("; ")}.` : "");
    $("pred-result").hidden = false;
    showPage();
    $("umap-chart").textContent = "computing UMAP…";
    try {
      const u = await getJSON(`/jobs/${jobId}/umap`);
      scatter($("umap-chart"), { x: u.x, y: u.y, c: u.p_sensitive, labels: u.obs_name }, { colorLabel: "p(sensitive)" });
      $("umap-caption").textContent = `${u.basis} (${u.subsampled ? `a random subsample of ${u.n_shown} of ${u.n_cells} cells, for speed` : `${u.n_cells} cells`}), coloured by p(sensitive)`;
    } catch (e) {
      $("umap-chart").textContent = e.detail ?? String(e);
    }
  }

  async function poll(jobId) {
    for (;;) {
      const st = await getJSON(`/jobs/${jobId}`);
      $("pred-bar").value = st.progress;  // 0–1: the job's own progress once the upload is in
      $("pred-status").textContent = `${st.status}: ${st.progress_detail || st.stage} — ${Math.round(st.progress * 100)} % (${st.elapsed_s.toFixed(1)} s)`;
      if (st.status === "done") return;
      if (st.status === "failed") throw Object.assign(new Error(st.error.detail), { detail: `${st.error.status}: ${st.error.detail}` });
      await new Promise((r) => setTimeout(r, 400));
    }
  }

  $("pred-head").addEventListener("change", showFolds);
  $("predict-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearError();
    const form = new FormData(ev.target);
    form.set("wait", "0");
    $("pred-result").hidden = true;
    $("pred-progress").hidden = false;
    $("pred-submit").disabled = true;
    $("pred-status").textContent = "uploading…";
    try {
      const { body } = await postForm("/predict", form, (f) => {
        $("pred-bar").value = f;
        $("pred-status").textContent = `uploading… ${Math.round(f * 100)} %`;
      });
      job = body.job_id;
      await poll(job);
      $("pred-status").textContent = "done";
      await showResult(job);
    } catch (e) {
      $("pred-status").textContent = `failed — ${e.detail ?? e.message}`;
      onError(e);
    } finally {
      $("pred-submit").disabled = false;
    }
  });
  $("pred-prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); showPage(); });
  $("pred-next").addEventListener("click", () => { if (offset + PAGE < cells.obs_name.length) { offset += PAGE; showPage(); } });
  $("pred-download").addEventListener("click", async () => {
    try {
      const blob = await (await api(`/jobs/${job}/result?format=csv`)).blob();
      const a = Object.assign(document.createElement("a"), { href: URL.createObjectURL(blob),
        download: `${($("pred-file").files[0]?.name || "cells").replace(/\.h5ad$/i, "")}.scdrugmap.csv` });
      document.body.appendChild(a);
      a.click();
      a.remove();
    } catch (e) {
      onError(e);
    }
  });

  return () => loadHeads();
}
