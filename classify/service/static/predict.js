// Predict tab: upload with progress, head picker, job polling, result table, CSV download, UMAP.
import { api, fillSelect, getJSON, postForm, renderTable } from "./api.js";
import { scatter } from "./charts.js";

const PAGE = 100;

export function initPredict({ onError }) {
  const $ = (id) => document.getElementById(id);
  let cells = null;
  let offset = 0;
  let job = null;
  let byRun = new Map();

  async function loadHeads() {
    const models = await getJSON("/models");
    const auroc = (h) => h.metrics.auroc ?? -1;
    const heads = models.heads.filter((h) => h.predictable).sort((a, b) => auroc(b) - auroc(a));
    byRun = new Map(heads.map((h) => [h.run_id, h]));
    fillSelect($("pred-head"), heads.map((h) => {
      const score = auroc(h) < 0 ? "" : ` · AUROC ${auroc(h).toFixed(3)}`;
      const lora = h.strategy === "lora" ? " · LoRA" : "";
      return { value: h.run_id, label: `${h.model}${lora} · ${h.head} · ${h.protocol} ${h.category}=${h.value}${score}` };
    }));
    if (!heads.length) $("pred-submit").disabled = true;
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
      rows.push({ obs_name: cells.obs_name[i], probability: cells.probability[i],
        probability_raw: cells.probability_raw[i], label: cells.label[i] });
    }
    renderTable($("pred-table"), [{ key: "obs_name", label: "Cell" }, { key: "probability", label: "Probability" },
      { key: "probability_raw", label: "Raw" }, { key: "label", label: "Label",
        render: (r) => Object.assign(document.createElement("span"), { className: `lab ${r.label}`, textContent: r.label }) }], rows);
    $("pred-count").textContent = `${offset + 1}–${offset + rows.length} of ${cells.obs_name.length}`;
  }

  async function showResult(jobId) {
    const res = await getJSON(`/jobs/${jobId}/result`);
    cells = res.cells;
    offset = 0;
    const s = res.summary;
    $("pred-summary").textContent = `${s.n_scored}/${s.n_cells} cells scored with ${s.run_id}: ${s.n_sensitive} sensitive, `
      + `${s.n_resistant} resistant, ${s.n_abstained} abstained (calibration ${s.calibration}).`;
    $("pred-result").hidden = false;
    showPage();
    $("umap-chart").textContent = "computing UMAP…";
    try {
      const u = await getJSON(`/jobs/${jobId}/umap`);
      scatter($("umap-chart"), { x: u.x, y: u.y, c: u.probability, labels: u.obs_name }, { colorLabel: "predicted probability" });
      $("umap-caption").textContent = `${u.basis} (${u.n_shown} of ${u.n_cells} cells), coloured by predicted probability`;
    } catch (e) {
      $("umap-chart").textContent = e.detail ?? String(e);
    }
  }

  async function poll(jobId) {
    for (;;) {
      const st = await getJSON(`/jobs/${jobId}`);
      $("pred-status").textContent = `${st.status}: ${st.stage} (${st.elapsed_s.toFixed(1)} s)`;
      if (st.status === "done") return;
      if (st.status === "failed") throw Object.assign(new Error(st.error.detail), { detail: `${st.error.status}: ${st.error.detail}` });
      await new Promise((r) => setTimeout(r, 400));
    }
  }

  $("pred-head").addEventListener("change", showFolds);
  $("predict-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
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
