// Cohort page: one page of the slide table at a time (the server filters, sorts and pages).
"use strict";
const state = { sort: "slide_id", order: "asc", page: 0, per_page: 50, status: "", dataset: "", center: "", q: "" };
const $ = (id) => document.getElementById(id);
const fmt = (v, d = 3) => (v === null || v === undefined) ? "–" : (typeof v === "number" ? v.toFixed(d) : String(v));
function esc(s) { return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }

async function getJSON(url) {
  const r = await fetch(url);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function fill(select, values) {
  for (const v of values) { const o = document.createElement("option"); o.value = o.textContent = v; select.appendChild(o); }
}

async function init() {
  const run = await getJSON("/api/run");
  $("run").textContent = `${run.n_slides} slides · model ${run.model} · prompt key ${run.prompt_key} · ${run.root}`;
  fill($("f-status"), run.statuses); fill($("f-dataset"), run.datasets); fill($("f-center"), run.centers);
  for (const k of ["status", "dataset", "center"]) $("f-" + k).onchange = (e) => { state[k] = e.target.value; state.page = 0; load(); };
  let timer = null;
  $("f-search").oninput = (e) => { clearTimeout(timer); timer = setTimeout(() => { state.q = e.target.value; state.page = 0; load(); }, 200); };
  $("b-worst").onclick = () => { state.sort = "dice"; state.order = "asc"; state.page = 0; load(); };
  $("b-failed").onclick = () => { state.status = state.status === "failed" ? "" : "failed"; $("f-status").value = state.status; state.page = 0; load(); };
  $("b-prev").onclick = () => { if (state.page > 0) { state.page--; load(); } };
  $("b-next").onclick = () => { state.page++; load(); };
  for (const th of document.querySelectorAll("th.sort")) {
    th.onclick = () => {
      const col = th.dataset.col;
      state.order = (state.sort === col && state.order === "asc") ? "desc" : "asc";
      state.sort = col; state.page = 0; load();
    };
  }
  load();
}

async function load() {
  const q = new URLSearchParams({ sort: state.sort, order: state.order, page: state.page, per_page: state.per_page });
  for (const k of ["status", "dataset", "center", "q"]) if (state[k]) q.set(k, state[k]);
  const data = await getJSON("/api/slides?" + q);
  const pages = Math.max(1, Math.ceil(data.total / data.per_page));
  if (state.page >= pages && data.total) { state.page = pages - 1; return load(); }
  for (const th of document.querySelectorAll("th.sort")) {
    th.classList.toggle("asc", th.dataset.col === state.sort && state.order === "asc");
    th.classList.toggle("desc", th.dataset.col === state.sort && state.order === "desc");
  }
  $("count").textContent = `${data.total} slides`;
  $("pageinfo").textContent = ` page ${state.page + 1} of ${pages} `;
  $("b-prev").disabled = state.page === 0; $("b-next").disabled = state.page + 1 >= pages;
  const rows = data.rows.map((r) => {
    const link = `/slide?id=${encodeURIComponent(r.slide_id)}`;
    const img = r.status === "ok" ? `<img class="thumb" loading="lazy" alt="" src="/api/slides/${encodeURIComponent(r.slide_id)}/thumbnail.jpg">` : "";
    return `<tr data-slide="${esc(r.slide_id)}"><td>${img}</td><td><a href="${link}">${esc(r.slide_id)}</a></td>` +
      `<td class="status-${esc(r.status)}">${esc(r.status)}</td><td class="num">${fmt(r.dice)}</td>` +
      `<td class="num">${fmt(r.precision)}</td><td class="num">${fmt(r.recall)}</td>` +
      `<td class="num">${fmt(r.tumour_area_mm2, 2)}</td><td>${esc(r.dataset ?? "")}</td><td>${esc(r.center ?? "")}</td>` +
      `<td class="err">${esc(r.error ?? "")}</td></tr>`;
  });
  document.querySelector("#slides tbody").innerHTML = rows.join("");
}

init().catch((e) => { $("count").textContent = "error: " + e.message; });
