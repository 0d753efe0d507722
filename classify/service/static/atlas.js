// Atlas tab: which model to pick (GET /recommend) and the integrated releases to download (GET /releases).
import { api, authHeaders, fmt, getJSON, getToken, renderTable } from "./api.js";

const ci = (m, lo, hi) => (m === null ? "—" : `${fmt(m)} [${lo === null ? "—" : fmt(lo)}, ${hi === null ? "—" : fmt(hi)}]`);
const signed = (v) => (v === null ? "—" : `${v >= 0 ? "+" : ""}${v.toFixed(3)}`);

/** A link that downloads the release (with the token as a header when the service needs one). */
function downloadLink(item, onError) {
  const a = document.createElement("a");
  a.href = item.download;
  a.textContent = "Download h5ad";
  a.className = "release-download";
  a.setAttribute("download", `${item.release_id}.h5ad`);
  a.addEventListener("click", async (ev) => {
    if (!getToken()) return; // a plain link streams the file
    ev.preventDefault();
    try {
      const blob = await (await api(item.download, { headers: authHeaders() })).blob();
      const url = URL.createObjectURL(blob);
      const tmp = Object.assign(document.createElement("a"), { href: url, download: `${item.release_id}.h5ad` });
      tmp.click();
      setTimeout(() => URL.revokeObjectURL(url), 1000);
    } catch (e) {
      onError(e);
    }
  });
  return a;
}

export function initAtlas({ onError }) {
  const $ = (id) => document.getElementById(id);

  async function drawRecommendation() {
    const res = await getJSON("/recommend", { category: $("rec-category").value, scenario: $("rec-scenario").value,
      metric: $("rec-metric").value });
    const name = res.metric.toUpperCase();
    renderTable($("rec-table"), [
      { key: "category" }, { key: "value" }, { key: "scenario" },
      { key: "recommendation", render: (r) => {
        const span = document.createElement("span");
        const b = document.createElement("b");
        b.textContent = r.recommendation;
        b.className = r.reason ? "muted" : "";
        span.appendChild(b);
        if (r.reason) { // why not, under the verdict
          const why = document.createElement("div");
          why.className = "muted rec-reason";
          why.textContent = r.reason;
          span.appendChild(why);
        }
        return span;
      } },
      { key: "best", label: `best: ${name} [95% CI]`, render: (r) => `${r.best} ${ci(r.mean, r.ci_low, r.ci_high)}` },
      { key: "n_seeds", label: "seeds" }, { key: "n_runs", label: "runs" },
      { key: "over_baseline", label: "vs baseline", render: (r) => signed(r.over_baseline) },
      { key: "next", render: (r) => (r.next ? `${r.next} ${ci(r.next_mean, r.next_ci_low, r.next_ci_high)}` : "—") },
      { key: "over_next", label: "vs next", render: (r) => signed(r.over_next) },
    ], res.items);
    $("rec-info").textContent = res.items.length ? `${res.items.length} category value × scenario groups; `
      + `recommended only with ≥ ${res.min_seeds} seeds, an interval above the baseline and apart from the next model's`
      : "no complete evaluation runs: run `scdrugmap evaluate --seeds 0,1,2` first";
  }

  async function drawReleases() {
    const res = await getJSON("/releases");
    renderTable($("rel-table"), [
      { key: "release_id", label: "release" }, { key: "scope_category", label: "category" },
      { key: "scope_value", label: "value" }, { key: "model" }, { key: "n_cells", label: "cells" },
      { key: "n_datasets", label: "datasets" }, { key: "created_date", label: "first built" },
      { key: "content_hash", label: "sha256", render: (r) => `${r.content_hash.slice(0, 12)}…` },
      { key: "download", label: "", render: (r) => downloadLink(r, onError) },
    ], res.items);
    $("rel-info").textContent = res.n ? "" : "no releases yet: `scdrugmap release build --category drug --value NAME --model pca`";
  }

  for (const id of ["rec-category", "rec-scenario", "rec-metric"]) {
    $(id).addEventListener("change", () => drawRecommendation().catch(onError));
  }
  return async () => {
    await Promise.all([drawRecommendation(), drawReleases()]);
  };
}
