// The scdrugmap page: tabs, token handling, errors; each tab lives in its own module.
import { getJSON, getToken, renderTable, setToken, api } from "./api.js";
import { initAtlas } from "./atlas.js";
import { initBiology } from "./biology.js";
import { initContext } from "./context.js";
import { initDatasets } from "./datasets.js";
import { initPredict } from "./predict.js";
import { initResults } from "./results.js";

const errorBox = document.getElementById("error");

function onError(e) {
  const detail = e && (e.detail ?? e.message) ? (e.detail ?? e.message) : String(e);
  errorBox.textContent = e && e.status ? `Error ${e.status}: ${detail}` : `Error: ${detail}`;
  errorBox.hidden = false;
  if (e && e.status === 401) document.getElementById("token-form").hidden = false;
}

function clearError() {
  errorBox.hidden = true;
}

async function sqlTab() {
  document.getElementById("sql-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearError();
    try {
      const res = await (await api("/sql", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ query: document.getElementById("sql-query").value }) })).json();
      const rows = res.rows.map((r) => Object.fromEntries(res.columns.map((c, i) => [c, r[i]])));
      renderTable(document.getElementById("sql-table"), res.columns.map((c) => ({ key: c })), rows);
      document.getElementById("sql-info").textContent = `${res.n_rows} rows${res.truncated ? ` (truncated at ${res.limit})` : ""}, ${res.elapsed_s} s`;
    } catch (e) {
      onError(e);
    }
  });
}

async function main() {
  const health = await getJSON("/health");
  const tokenForm = document.getElementById("token-form");
  if (health.auth_required) {
    tokenForm.hidden = false;
    document.getElementById("token").value = getToken();
  }
  tokenForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    setToken(document.getElementById("token").value.trim());
    location.reload();
  });
  if (health.store) {
    document.getElementById("store-info").textContent = `${health.store.datasets} datasets · ${health.store.cells} cells · `
      + `${health.store.embeddings} embeddings · ${health.store.runs} runs`;
  }
  if (health.auth_required && !getToken()) {
    onError({ status: 401, detail: "this service needs a token: enter it above" });
    return;
  }
  initDatasets({ onError });
  const activators = { results: initResults({ onError }), biology: initBiology({ onError }),
    context: initContext({ onError }),
    atlas: initAtlas({ onError }),
    predict: initPredict({ onError, clearError }) };
  // a new action replaces the previous one's error: no stale banner above a later result
  document.addEventListener("submit", clearError, true);
  const activated = new Set();
  sqlTab();
  for (const btn of document.querySelectorAll("nav .tab")) {
    btn.addEventListener("click", () => {
      clearError();
      document.querySelectorAll("nav .tab").forEach((b) => b.classList.toggle("active", b === btn));
      document.querySelectorAll("main .panel").forEach((p) => { p.hidden = p.id !== `tab-${btn.dataset.tab}`; });
      const act = activators[btn.dataset.tab];
      if (act && !activated.has(btn.dataset.tab)) {
        activated.add(btn.dataset.tab);
        act().catch(onError);
      }
    });
  }
}

main().catch(onError);
