// Fetch helpers (token header, JSON errors) and table rendering shared by the page's tabs.

const TOKEN_KEY = "scdrugmap-token";

export class ApiError extends Error {
  constructor(status, detail) {
    super(`${status}: ${detail}`);
    this.status = status;
    this.detail = detail;
  }
}

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

export function authHeaders() {
  const t = getToken();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

async function errorOf(response) {
  let detail = response.statusText;
  try {
    detail = (await response.json()).detail ?? detail;
  } catch {
    /* not JSON */
  }
  return new ApiError(response.status, detail);
}

/** fetch() with the token; throws ApiError with the server's detail on a non-2xx status. */
export async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJSON(path, params = {}) {
  const qs = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v === undefined || v === null || v === "") continue;
    for (const item of Array.isArray(v) ? v : [v]) qs.append(k, item);
  }
  const url = qs.toString() ? `${path}?${qs}` : path;
  return (await api(url)).json();
}

/** POST a FormData with upload progress (XMLHttpRequest: fetch has no upload progress). */
export function postForm(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onload = () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        body = { detail: xhr.statusText };
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve({ status: xhr.status, body });
      else reject(new ApiError(xhr.status, body.detail ?? xhr.statusText));
    };
    xhr.onerror = () => reject(new ApiError(0, "network error"));
    xhr.send(form);
  });
}

export function fmt(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(3);
  return String(v);
}

/** Fill a <table> with columns [{key, label, render?}] and rows (objects). */
export function renderTable(table, columns, rows, { onRowClick = null } = {}) {
  const head = document.createElement("tr");
  for (const c of columns) {
    const th = document.createElement("th");
    th.textContent = c.label ?? c.key;
    head.appendChild(th);
  }
  table.tHead.replaceChildren(head);
  const body = table.tBodies[0];
  body.replaceChildren();
  for (const row of rows) {
    const tr = document.createElement("tr");
    for (const c of columns) {
      const td = document.createElement("td");
      const v = c.render ? c.render(row) : fmt(row[c.key]);
      if (v instanceof Node) td.appendChild(v);
      else td.textContent = v;
      tr.appendChild(td);
    }
    if (onRowClick) {
      tr.classList.add("clickable");
      tr.tabIndex = 0;
      tr.addEventListener("click", () => onRowClick(row, tr));
      tr.addEventListener("keydown", (e) => e.key === "Enter" && onRowClick(row, tr));
    }
    body.appendChild(tr);
  }
}

export function fillSelect(select, options, { keep = true } = {}) {
  const previous = select.value;
  select.replaceChildren();
  for (const o of options) {
    const opt = document.createElement("option");
    opt.value = typeof o === "object" ? o.value : o;
    opt.textContent = typeof o === "object" ? o.label : o;
    select.appendChild(opt);
  }
  if (keep && [...select.options].some((o) => o.value === previous)) select.value = previous;
}
