// Datasets tab: searchable, filterable, paged table and a per-dataset detail panel.
import { fmt, getJSON, renderTable } from "./api.js";

const FACETS = [
  ["tissue", "Tissue"], ["cancer_type", "Cancer type"], ["drug", "Drug"], ["drug_class", "Drug class"],
  ["regimen", "Regimen"], ["source", "Source"], ["label_confidence", "Label confidence"],
];
const PAGE = 25;
const stars = (n) => (n ? "★".repeat(n) + "☆".repeat(3 - n) : "");
const COLUMNS = [
  { key: "dataset_id", label: "Dataset" }, { key: "study", label: "Study" }, { key: "tissue", label: "Tissue" },
  { key: "cancer_type", label: "Cancer type" }, { key: "drug", label: "Drug" },
  { key: "drug_class", label: "Drug class" }, { key: "regimen", label: "Regimen" },
  { key: "source", label: "Source" }, { key: "label_confidence", label: "Labels", render: (r) => stars(r.label_confidence) },
  { key: "n_cells", label: "Cells" },
];

export function initDatasets({ onError }) {
  const filters = document.getElementById("dataset-filters");
  const search = document.getElementById("ds-search");
  const table = document.getElementById("ds-table");
  const count = document.getElementById("ds-count");
  const selects = {};
  let offset = 0;
  let total = 0;

  async function load() {
    const params = { q: search.value.trim(), limit: PAGE, offset };
    for (const [key, sel] of Object.entries(selects)) if (sel.value) params[key] = sel.value;
    try {
      const page = await getJSON("/datasets", params);
      total = page.total;
      renderTable(table, COLUMNS, page.items, { onRowClick: (row, tr) => {
        table.querySelectorAll("tr.selected").forEach((t) => t.classList.remove("selected"));
        tr.classList.add("selected");
        showDetail(row.dataset_id).catch(onError);
      } });
      count.textContent = total ? `${offset + 1}–${offset + page.items.length} of ${total}` : "no datasets match";
    } catch (e) {
      onError(e);
    }
  }

  async function setup() {
    const facets = await getJSON("/datasets/facets");
    for (const [key, label] of FACETS) {
      const sel = document.createElement("select");
      sel.id = `ds-filter-${key}`;
      sel.setAttribute("aria-label", label);
      const all = new Option(`${label}: all`, "");
      sel.appendChild(all);
      for (const { value, n } of facets[key] || []) sel.appendChild(new Option(`${value} (${n})`, value));
      sel.addEventListener("change", () => { offset = 0; load(); });
      selects[key] = sel;
      filters.appendChild(sel);
    }
    let timer = null;
    search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => { offset = 0; load(); }, 250); });
    document.getElementById("ds-prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); load(); });
    document.getElementById("ds-next").addEventListener("click", () => { if (offset + PAGE < total) { offset += PAGE; load(); } });
    await load();
  }

  setup().catch(onError);
}

async function showDetail(id) {
  const d = await getJSON(`/datasets/${encodeURIComponent(id)}`);
  const box = document.getElementById("ds-detail");
  box.classList.remove("muted");
  box.replaceChildren();
  const h = document.createElement("h2");
  h.textContent = id;
  const c = d.counts;
  const labelled = c.n_sensitive + c.n_resistant;
  const bar = document.createElement("div");
  bar.className = "stack";
  for (const [n, cls, label] of [[c.n_sensitive, "sens", "sensitive"], [c.n_resistant, "res", "resistant"],
    [c.n_unlabelled, "unl", "unlabelled"]]) {
    if (!n) continue;
    const seg = document.createElement("span");
    seg.className = cls;
    seg.style.flex = String(n);
    seg.title = `${n} ${label}`;
    seg.textContent = `${n} ${label}`;
    bar.appendChild(seg);
  }
  const dl = document.createElement("dl");
  const meta = { ...d.dataset, cells: c.n_cells, samples: c.n_samples, labelled };
  for (const key of ["cells", "samples", "labelled", "study", "accession", "tissue", "cancer_type", "drug",
    "drug_class", "regimen", "source", "technology", "organism", "label_confidence", "n_genes", "n_genes_mapped",
    "x_kind"]) {
    if (meta[key] === null || meta[key] === undefined) continue;
    const dt = document.createElement("dt");
    dt.textContent = key.replaceAll("_", " ");
    const dd = document.createElement("dd");
    dd.textContent = fmt(meta[key]);
    dl.append(dt, dd);
  }
  const cov = document.createElement("table");
  cov.className = "data";
  cov.createTHead();
  cov.createTBody();
  const embedded = Object.fromEntries(d.embeddings.map((e) => [e.revision, e.n_cells_embedded]));
  const pct = (v) => {
    const wrap = document.createElement("span");
    wrap.className = "meter";
    const track = document.createElement("b");
    const fill = document.createElement("i");
    fill.style.width = `${Math.round((v ?? 0) * 100)}%`;
    track.appendChild(fill);
    wrap.append(track, `${v === null ? "–" : Math.round(v * 100)} %`);
    return wrap;
  };
  renderTable(cov, [
    { key: "model", label: "Model" }, { key: "revision", label: "Revision", render: (r) => r.revision.slice(0, 10) },
    { key: "frac_genes", label: "Genes covered", render: (r) => pct(r.frac_genes) },
    { key: "frac_counts", label: "Counts covered", render: (r) => pct(r.frac_counts) },
    ...["exact", "alias", "crossmap", "none"].map((route) => ({
      key: `genes_${route}`,
      label: { exact: "Exact", alias: "Alias", crossmap: "Cross-map", none: "Unmatched" }[route],
      render: (r) => (r[`genes_${route}`] === null ? "–"
        : `${fmt(r[`genes_${route}`])} (${Math.round(100 * r[`counts_${route}`])} %)`),
    })),
    { key: "embedded", label: "Cells embedded", render: (r) => fmt(embedded[r.revision] ?? 0) },
  ], d.coverage);
  const covTitle = document.createElement("h3");
  covTitle.textContent = "Gene coverage per model";
  const covNote = document.createElement("p");
  covNote.className = "muted";
  covNote.textContent = "How this file's genes met each model's vocabulary, as genes (share of the dataset's "
    + "counts). Exact: the file's own spelling, read as the original model reads it. Alias: recovered through a "
    + "current, previous or alias HGNC symbol (e.g. H2AFZ = H2AZ1). Cross-map: recovered through the Ensembl id "
    + "↔ symbol map. Unmatched: not in the vocabulary, so the model never sees it. "
    + "Embedding with --option gene_matching=original keeps only the exact matches.";
  box.append(h, bar, dl, covTitle, ...(d.coverage.length ? [covNote, cov] : [Object.assign(document.createElement("p"),
    { textContent: "No model has embedded this dataset yet." })]));
}
