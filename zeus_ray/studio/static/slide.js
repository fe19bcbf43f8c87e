// Slide page: OpenSeadragon over the slide's deep-zoom tiles, overlays laid over it as single
// pictures (level-0 px from the top-left corner), and the prompt panel.
"use strict";
const $ = (id) => document.getElementById(id);
const sid = new URLSearchParams(location.search).get("id");
const api = `/api/slides/${encodeURIComponent(sid)}`;
const ORDER = (n) => n.startsWith("heat-") ? 0 : n === "mask" ? 1 : n === "tissue" ? 2 : 3;   // bottom to top
const studio = { viewer: null, items: {}, layers: {}, draft: null, info: null, applied: null };
window.studio = studio;

function esc(s) { return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }
const fmt = (v, d = 3) => (v === null || v === undefined) ? "–" : v.toFixed(d);

async function call(url, body) {
  const opts = body === undefined ? {} : { method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", "X-Zeus-Studio": "1" } };
  const r = await fetch(url, opts);
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

function message(text, isError) { $("msg").textContent = text; $("msg").className = isError ? "err" : "note"; }

// --- overlays ----------------------------------------------------------------------------------
function layerUrl(name, ext) {
  const draft = (studio.draft && (name === "mask" || name.startsWith("heat-"))) ? `?draft=${encodeURIComponent(studio.draft)}` : "";
  return `${api}/overlays/${name}.${ext}${draft}`;
}

function opacityOf(name) {
  const l = studio.layers[name];
  return l.on ? l.opacity : 0;
}

async function addLayer(name) {
  const meta = await call(layerUrl(name, "json"));
  const old = studio.items[name];
  const slideW = studio.info.width;
  return new Promise((resolve) => {
    studio.viewer.addTiledImage({
      tileSource: { type: "image", url: layerUrl(name, "png"), buildPyramid: false },
      x: 0, y: 0, width: meta.width * meta.px0 / slideW, opacity: opacityOf(name),
      ...(old ? { index: studio.viewer.world.getIndexOfItem(old) } : {}),   // a redrawn layer keeps its place
      success: (e) => {
        if (old) studio.viewer.world.removeItem(old);
        studio.items[name] = e.item; studio.layers[name].legend = meta.legend; legend(name); resolve(e.item);
      },
      error: () => resolve(null),
    });
  });
}

function legend(name) {
  const g = studio.layers[name].legend, el = document.querySelector(`#ovl-${name} .lg`);
  if (!g || !el) return;
  if (g.kind === "ramp") {
    el.innerHTML = `<span class="ramp" style="background:linear-gradient(to right,${g.colors.join(",")})"></span> ` +
      `<span class="legend-range">${g.min.toFixed(3)} … ${g.max.toFixed(3)}</span>`;
  } else if (g.kind === "line") {
    el.innerHTML = `<span class="swatch line" style="border-color:${g.color}" title="${esc(g.label)}"></span>`;
  } else {
    el.innerHTML = `<span class="swatch" style="background:${g.color}" title="${esc(g.label)}"></span>`;
  }
}

function overlayControls(names, classes) {
  const label = (n) => n.startsWith("heat-") ? `similarity: ${classes[+n.slice(5)]}` : n === "truth" ? "ground truth" : n === "mask" ? "mask (predicted tumour)" : n;
  $("overlays").innerHTML = names.map((n) => `<div class="ovl" id="ovl-${n}">` +
    `<input type="checkbox" id="on-${n}" ${studio.layers[n].on ? "checked" : ""}>` +
    `<label for="on-${n}">${esc(label(n))}<br><span class="lg"></span></label>` +
    `<input type="range" id="op-${n}" min="0" max="100" value="${Math.round(studio.layers[n].opacity * 100)}" title="opacity"></div>`).join("");
  for (const n of names) {
    const apply = () => { const it = studio.items[n]; if (it) it.setOpacity(opacityOf(n)); };
    $("on-" + n).onchange = (e) => { studio.layers[n].on = e.target.checked; apply(); };
    $("op-" + n).oninput = (e) => { studio.layers[n].opacity = e.target.value / 100; apply(); };
  }
}

studio.fullyLoaded = () => {
  const w = studio.viewer && studio.viewer.world;
  if (!w || w.getItemCount() < 1 + Object.keys(studio.items).length) return false;
  for (let i = 0; i < w.getItemCount(); i++) {   // a hidden layer is not drawn, so never loads
    const it = w.getItemAt(i);
    if (it.getOpacity() > 0 && !it.getFullyLoaded()) return false;
  }
  return true;
};

// --- metrics -----------------------------------------------------------------------------------
function showMetrics(before, after) {
  const rows = [["Dice", "dice"], ["precision", "precision"], ["recall", "recall"], ["IoU", "iou"], ["tumour mm²", "tumour_area_mm2"]];
  document.querySelector("#metrics tbody").innerHTML = rows.map(([label, k]) => {
    const b = before ? before[k] : null, a = after ? after[k] : null;
    const d = (a !== null && a !== undefined && b !== null && b !== undefined) ? a - b : null;
    const cls = d === null ? "" : d > 0 ? "delta-up" : d < 0 ? "delta-down" : "";
    return `<tr><td>${label}</td><td class="num" id="m-before-${k}">${fmt(b)}</td><td class="num" id="m-after-${k}">${fmt(a)}</td>` +
      `<td class="num ${cls}">${d === null ? "" : (d > 0 ? "+" : "") + d.toFixed(3)}</td></tr>`;
  }).join("");
}

// --- prompt panel ------------------------------------------------------------------------------
const lines = (text) => text.split("\n").map((s) => s.trim()).filter(Boolean);

function showPrompts(ps) {
  $("ps-name").value = ps.name;
  $("templates").value = (ps.templates || []).join("\n");
  $("classes").innerHTML = "";
  for (const c of ps.classes) addClass(c);
  refreshTumour(ps.tumour_class);
}

function addClass(c) {
  const div = document.createElement("div");
  div.className = "cls";
  div.innerHTML = `<div class="head"><input type="text" class="c-name" placeholder="class name">` +
    `<button class="c-del" title="remove this class">remove</button></div>` +
    `<div class="note">classnames (one per line)</div><textarea class="c-names" rows="4"></textarea>` +
    `<div class="note">own templates (optional, one per line)</div><textarea class="c-tpl" rows="1"></textarea>`;
  div.querySelector(".c-name").value = c.name || "";
  div.querySelector(".c-names").value = (c.classnames || []).join("\n");
  div.querySelector(".c-tpl").value = (c.templates || []).join("\n");
  div.querySelector(".c-name").oninput = () => refreshTumour();
  div.querySelector(".c-del").onclick = () => { div.remove(); refreshTumour(); };
  $("classes").appendChild(div);
}

function refreshTumour(chosen) {
  const cur = chosen || $("tumour").value;
  const names = [...document.querySelectorAll(".c-name")].map((i) => i.value.trim()).filter(Boolean);
  $("tumour").innerHTML = names.map((n) => `<option ${n === cur ? "selected" : ""}>${esc(n)}</option>`).join("");
}

function readPrompts() {
  const classes = [...document.querySelectorAll(".cls")].map((d) => {
    const c = { name: d.querySelector(".c-name").value.trim(), classnames: lines(d.querySelector(".c-names").value) };
    const t = lines(d.querySelector(".c-tpl").value);
    if (t.length) c.templates = t;
    return c;
  });
  return { name: $("ps-name").value.trim() || "studio", templates: lines($("templates").value), classes, tumour_class: $("tumour").value };
}

async function applySlide() {
  $("b-apply").disabled = true;
  message("applying…");
  try {
    const res = await call(`${api}/apply`, { prompts: readPrompts() });
    studio.draft = res.key; studio.applied = res;
    await Promise.all(Object.keys(studio.layers).filter((n) => n === "mask" || n.startsWith("heat-")).map(addLayer));
    showMetrics(res.before, res.after);
    $("apply-note").textContent = `prompt key ${res.key}: ${res.encoded_prompts} new prompt(s) encoded, ${res.seconds.toFixed(2)} s` +
      (res.same_as_run ? " (the run's own prompts)" : "");
    message("applied: the mask and heat-maps show the new prompts");
  } catch (e) { message(e.message, true); }
  $("b-apply").disabled = false;
}

async function save() {
  try { const r = await call("/api/prompts/save", { prompts: readPrompts() }); message(`saved ${r.saved}`); }
  catch (e) { message(e.message, true); }
}

async function applyCohort() {
  try {
    let st = await call("/api/cohort/apply", { prompts: readPrompts() });
    $("progress").hidden = false;
    while (true) {
      $("progress").max = Math.max(1, st.total); $("progress").value = st.done;
      message(`cohort re-prompt ${st.prompt_key}: ${st.done}/${st.total} slides, ${st.state} (${st.seconds} s)` +
        (st.summary ? ` · ${st.summary}` : "") + (st.errors.length ? ` · ${st.errors.join("; ")}` : ""), st.state === "failed");
      if (st.state !== "running") break;
      await new Promise((r) => setTimeout(r, 1000));
      st = await call(`/api/cohort/jobs/${encodeURIComponent(st.prompt_key)}`);
    }
  } catch (e) { message(e.message, true); }
}

async function loadFile(ev) {
  const f = ev.target.files[0];
  if (!f) return;
  try { const r = await call("/api/prompts/parse", { yaml: await f.text(), name: f.name }); showPrompts(r.prompts); message(`loaded ${f.name}`); }
  catch (e) { message(e.message, true); }
}

// --- start -------------------------------------------------------------------------------------
async function init() {
  const [info, prompts] = await Promise.all([call(api), call("/api/prompts")]);
  studio.info = info;
  $("title").textContent = sid;
  $("sub").textContent = `${info.row.status}` + (info.width ? ` · ${info.width} × ${info.height} px at ${info.mpp0} µm/px · cells ${info.cell_um.toFixed(1)} µm` : "");
  $("prompt-file").textContent = prompts.file;
  showPrompts(prompts.prompts);
  showMetrics(info.metrics, null);
  $("b-add").onclick = () => addClass({ name: "", classnames: [] });
  $("b-apply").onclick = applySlide; $("b-save").onclick = save; $("b-cohort").onclick = applyCohort;
  $("load-file").onchange = loadFile;
  if (!info.width) { message(info.row.error || "this slide has no stored results", true); return; }
  for (const n of info.overlays) studio.layers[n] = { on: n === "mask" || n === "truth", opacity: n === "mask" ? 0.45 : n.startsWith("heat-") ? 0.6 : 1 };
  overlayControls(info.overlays, info.classes);
  if (!info.viewer) { message("the run's manifest no longer lists this slide's file: no viewer", true); return; }
  studio.viewer = OpenSeadragon({
    id: "viewer", prefixUrl: "/static/openseadragon/images/", tileSources: `${api}/dzi.dzi`,
    drawer: "canvas", imageSmoothingEnabled: false, showNavigator: true, maxZoomPixelRatio: 4, crossOriginPolicy: false,
  });
  studio.viewer.addOnceHandler("open", async () => {
    for (const n of [...info.overlays].sort((a, b) => ORDER(a) - ORDER(b))) await addLayer(n);
    studio.ready = true;
  });
}

init().catch((e) => message(e.message, true));
