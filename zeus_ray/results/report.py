"""The cohort report: one self-contained HTML file (inline CSS/JS, overlays as base64 JPEG data URIs,
an inline SVG plot; nothing is fetched), written to <root>/cohort/<prompt_key>/report.html.

Sections: the run's settings, Table 1 / Table 2 (as stored by the run or `zeus evaluate`), the
per-slide Dice distribution per dataset and per centre, a per-slide table, the overlay gallery
(sortable by Dice) and the errors. Every text that comes from data is escaped with html.escape.
"""
from __future__ import annotations

import base64
import html
import io
import math
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from string import Template

import fsspec
import numpy as np
import pandas as pd
from PIL import Image

from .cohort_tables import ERROR_STATUSES, cohort_dir
from ..errors import ZeusError
from ..truth.metrics import format_mean_std
from ..storage.store import OutputStore

THUMB_WIDTH = 240    # gallery thumbnails: at most this wide (and 1.5 × as high), JPEG (~8 KB each)
PAGE_SIZE = 60       # gallery cards shown at a time (a 1,000-slide report stays quick to use)
NO_DICE = ("No annotations were evaluated, so there is no Dice, precision or recall. Give the manifest an "
           "<code>annotation_uri</code> column, or run <code>zeus evaluate RESULTS_DIR --annotations "
           "MANIFEST_OR_DIR</code>.")


def _missing(value) -> bool:
    return value is None or (np.ndim(value) == 0 and bool(pd.isna(value)))


def esc(value) -> str:
    """Escaped text; None, NaN and pandas NA are empty."""
    return "" if _missing(value) else html.escape(str(value), quote=True)


def _num(value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v


def _fmt(value, digits: int = 3) -> str:
    v = _num(value)
    return "n/a" if math.isnan(v) else f"{v:.{digits}f}"


def _nan_if_none(value) -> str:
    v = _num(value)
    return "" if math.isnan(v) else repr(v)


# --- data --------------------------------------------------------------------------------------------

def _read_table(store: OutputStore, out: str, name: str) -> pd.DataFrame | None:
    for ext in ("parquet", "csv"):
        path = f"{out}/{name}.{ext}"
        if store.exists(path):
            if ext == "parquet":
                return store.read_parquet(path).to_pandas()
            return pd.read_csv(io.BytesIO(store.read_bytes(path)), dtype={"slide_id": str})
    return None


def _thumbnail(store: OutputStore, path: str, width: int) -> str | None:
    """overlay.jpg as a base64 JPEG data URI at most `width` px wide, or None when absent."""
    try:
        img = Image.open(io.BytesIO(store.read_bytes(path))).convert("RGB")
    except (FileNotFoundError, OSError):
        return None
    img.thumbnail((width, int(width * 1.5)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=72, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --- sections ----------------------------------------------------------------------------------------

def _settings(run: dict, df: pd.DataFrame) -> str:
    from ..config import MPP_AT_10X
    cfg = run.get("config") or {}
    model, tiling, ev = cfg.get("model") or {}, cfg.get("tiling") or {}, cfg.get("evaluation") or {}
    keys = sorted({str(k) for k in df.get("model_key", pd.Series(dtype=object)).dropna()})
    mpp = tiling.get("target_mpp") or (MPP_AT_10X * 10.0 / tiling["magnification"] if tiling.get("magnification") else None)
    patch, overlap = tiling.get("patch_size"), tiling.get("overlap")
    tiling_text = "n/a"
    if mpp and patch and overlap is not None:
        tiling_text = (f"{patch} px tiles at {mpp:g} µm/px ({MPP_AT_10X * 10.0 / mpp:g}x), stride "
                       f"{round(patch * (1 - overlap))} px ({overlap:.0%} overlap), tiles kept with ≥ "
                       f"{tiling.get('min_tissue_fraction', 'n/a')} tissue")
    evaluated = run.get("evaluate") or {}
    settings = evaluated.get("settings") or ev
    rows = [("Model", model.get("id")), ("Model key", ", ".join(keys) or "n/a (no slide finished)"),
            ("Weights", model.get("weights") or "the model's default source"),
            ("Prompt file", run.get("prompt_file")), ("Prompt key", run.get("prompt_key")),
            ("Classes", ", ".join(map(str, run.get("classes") or []))), ("Tiling", tiling_text),
            ("Evaluation", ", ".join(f"{k} = {v}" for k, v in sorted(settings.items()) if v is not None) or "defaults"),
            ("Post-processing", _postprocess_text(run)),
            ("Annotations", evaluated.get("annotations") or "the run's manifest (annotation_uri)"),
            ("Run", run.get("summary"))]
    from .class_decision import decision_lines   # which annotation classes were the truth
    rows += [("Annotation classes", line) for line in decision_lines(df.to_dict("records"))]
    if evaluated:
        rows.append(("Last zeus evaluate", f"{evaluated.get('at', '')}: {evaluated.get('summary', '')}"))
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return f'<section id="settings"><h2>Run settings</h2><table class="settings">{body}</table></section>'


def _postprocess_text(run: dict) -> str:
    mode = run.get("postprocess") or (run.get("config") or {}).get("postprocess") or "none"
    convention = run.get("metric_convention") or ("reference" if mode == "reference" else "zeus")
    if mode == "none":
        return ("none: the argmax mask as it is; metrics by zeus conventions (an empty prediction has "
                "precision NaN, skipped in the means)")
    k = run.get("smoothing") or {}
    return (f"{mode}: the published ZEUS code's smoothing (Gaussian, kernel {k.get('kernel_um', '?')} µm, "
            f"σ {k.get('sigma_um', '?')} µm, > {k.get('threshold', 0.1):g}, cut to tissue); metrics by the "
            f"{convention} conventions (1e-6 smoothing term)")


def cohort_table_html(table: pd.DataFrame, table_id: str) -> str:
    """Table 1 / Table 2 layout: group keys, slides, 'mean ± std' per metric (as metrics.to_markdown)."""
    keys = [k for k in ("dataset", "model", "center") if k in table.columns]
    head = [("Centre" if k == "center" else k.capitalize()) for k in keys] + ["Slides", "DSC", "Precision", "Recall"]
    rows = []
    for _, r in table.iterrows():
        cells = [f"<td>{esc(r[k])}</td>" for k in keys] + [f'<td class="num">{int(r["n_slides"])}</td>']
        for m in ("dice", "precision", "recall"):
            text = format_mean_std(_num(r[f"{m}_mean"]), _num(r[f"{m}_std"]))
            nan = int(_num(r.get(f"{m}_nan", 0)) or 0)
            note = f' <span class="note">({nan} NaN skipped)</span>' if nan else ""
            cells.append(f'<td class="num" data-m="{m}">{esc(text)}{note}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    return f'<table id="{table_id}"><thead><tr>{th}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _no_dice_reason(df: pd.DataFrame) -> str:
    if not (df["status"] == "ok").any():
        return "No slide has results, so there is no Dice, precision or recall (see Errors)."
    if "annotation_error" in df and df["annotation_error"].fillna("").astype(str).str.len().gt(0).any():
        return "No slide has a Dice: no annotation could be used (see Errors). " + NO_DICE.split(". ", 1)[1]
    return NO_DICE


def _tables(t1: pd.DataFrame | None, t2: pd.DataFrame | None, no_dice: str) -> str:
    if t1 is None:
        return f'<section id="tables"><h2>Cohort tables</h2><p class="note" id="no-dice">{no_dice}</p></section>'
    parts = ['<section id="tables"><h2>Cohort tables</h2>',
             "<h3>Table 1: per dataset and model (mean ± std over slides)</h3>", cohort_table_html(t1, "table1")]
    if t2 is not None:
        parts += ["<h3>Table 2: per dataset, model and centre</h3>", cohort_table_html(t2, "table2")]
    parts.append('<p class="note">std over slides with ddof = 0; slides without a defined value are skipped '
                 "and counted (see the metrics module for the empty cases).</p></section>")
    return "".join(parts)


def dice_plot_svg(df: pd.DataFrame, width: int = 900) -> str:
    """Strip + box plot of per-slide Dice, one row per dataset then one per dataset / centre."""
    d = df[df["dice"].notna()] if "dice" in df else df.iloc[:0]
    groups: list[tuple[str | None, str, list]] = []
    for title, keys in (("Per dataset", ["dataset"]), ("Per centre", ["dataset", "center"])):
        groups.append((title, "", []))
        g = d.assign(**{k: d[k].fillna("all").astype(str) if k in d else "all" for k in keys})
        for key, sub in g.groupby(keys, sort=True):
            label = " / ".join(key) if isinstance(key, tuple) else str(key)
            groups.append((None, label, list(zip(sub["slide_id"].astype(str), sub["dice"].astype(float)))))
    left, right, row_h, head_h, top = 250, 170, 30, 24, 26
    x0, x1 = left, width - right
    x = lambda v: x0 + float(np.clip(v, 0, 1)) * (x1 - x0)
    height = top + sum(head_h if t else row_h for t, _, _ in groups) + 24
    out = [f'<svg id="dice-plot" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
           '<title>Per-slide Dice per dataset and per centre</title>']
    for i in range(11):
        xv = x(i / 10)
        out.append(f'<line x1="{xv:.1f}" y1="{top - 6}" x2="{xv:.1f}" y2="{height - 20}" stroke="#e3e7ee"/>')
        out.append(f'<text x="{xv:.1f}" y="{top - 10}" text-anchor="middle">{i / 10:.1f}</text>')
    out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{height - 4}" text-anchor="middle">Dice (DSC)</text>')
    y = top
    for title, label, pts in groups:
        if title:
            out.append(f'<text x="4" y="{y + 16}" font-weight="600">{esc(title)}</text>')
            y += head_h
            continue
        cy = y + row_h / 2
        short = label if len(label) <= 36 else label[:35] + "…"
        out.append(f'<text x="{x0 - 10}" y="{cy + 4:.1f}" text-anchor="end"><title>{esc(label)}</title>{esc(short)}</text>')
        v = np.array([p[1] for p in pts])
        if len(v) >= 2:
            q1, med, q3 = np.percentile(v, [25, 50, 75])
            out.append(f'<line x1="{x(v.min()):.1f}" y1="{cy}" x2="{x(v.max()):.1f}" y2="{cy}" stroke="#64748b"/>')
            out.append(f'<rect x="{x(q1):.1f}" y="{cy - 8}" width="{max(x(q3) - x(q1), 1):.1f}" height="16" '
                       'fill="#dbe7f5" stroke="#1f3a5f"/>')
            out.append(f'<line x1="{x(med):.1f}" y1="{cy - 8}" x2="{x(med):.1f}" y2="{cy + 8}" stroke="#1f3a5f" stroke-width="2"/>')
        for sid, val in pts:   # deterministic jitter from the slide id
            jy = cy + ((zlib.crc32(sid.encode()) % 1000) / 1000 - 0.5) * 14
            out.append(f'<circle class="pt" cx="{x(val):.1f}" cy="{jy:.1f}" r="3.5" fill="#c2410c" fill-opacity="0.75">'
                       f'<title>{esc(sid)}: Dice {val:.3f}</title></circle>')
        stat = f"n = {len(v)}" + (f", median {np.median(v):.3f}" if len(v) else "")
        out.append(f'<text x="{x1 + 8}" y="{cy + 4:.1f}">{esc(stat)}</text>')
        y += row_h
    out.append("</svg>")
    return "".join(out)


def _plot(df: pd.DataFrame, no_dice: str) -> str:
    body = dice_plot_svg(df) if "dice" in df and df["dice"].notna().any() else f'<p class="note">{no_dice}</p>'
    return ('<section id="distribution"><h2>Per-slide Dice</h2>'
            '<p class="note">Box: quartiles and median; line: min to max; dots: slides (hover for the id).</p>'
            f"{body}</section>")


def _slides_table(df: pd.DataFrame) -> str:
    cols = [("slide_id", "Slide", None), ("dataset", "Dataset", None), ("center", "Centre", None),
            ("status", "Status", None), ("n_tiles", "Tiles", 0), ("tissue_area_mm2", "Tissue mm²", 2),
            ("tumour_area_mm2", "Predicted tumour mm²", 2), ("dice", "Dice", 3), ("precision", "Precision", 3),
            ("recall", "Recall", 3)]
    cols = [c for c in cols if c[0] in df.columns]
    rows = []
    for r in df.to_dict("records"):
        cells = []
        for key, _, digits in cols:
            if digits is None:
                cells.append(f"<td>{esc(r.get(key))}</td>")
            else:
                cells.append(f'<td class="num" data-v="{_nan_if_none(r.get(key))}">{_fmt(r.get(key), digits)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    th = "".join(f"<th>{esc(h)}</th>" for _, h, _ in cols)
    return ('<section id="slides"><h2>Slides</h2><p class="note">Click a column header to sort.</p>'
            f'<table id="slides-table" class="sortable"><thead><tr>{th}</tr></thead><tbody>{"".join(rows)}</tbody>'
            "</table></section>")


def _card(r: dict, thumb: str | None) -> str:
    dice = _num(r.get("dice"))
    img = (f'<img alt="overlay of {esc(r["slide_id"])}" loading="lazy" decoding="async" src="{thumb}">' if thumb
           else '<div class="noimg">no overlay image</div>')
    meta = " · ".join(esc(r.get(k)) for k in ("dataset", "center") if not _missing(r.get(k)))
    lines = [f'<b>{esc(r["slide_id"])}</b>' + (f' <span class="note">{meta}</span>' if meta else ""),
             f'<span class="dice">Dice {_fmt(dice)}</span> · precision {_fmt(r.get("precision"))} · '
             f'recall {_fmt(r.get("recall"))} · tumour {_fmt(r.get("tumour_area_mm2"), 2)} mm²']
    if isinstance(r.get("annotation_error"), str) and r["annotation_error"]:
        lines.append(f'<span class="err">{esc(r["annotation_error"])}</span>')
    return (f'<div class="card" data-id="{esc(r["slide_id"])}" data-dice="{_nan_if_none(dice)}">{img}'
            f'<div class="cap">{"<br>".join(lines)}</div></div>')


def _gallery(store: OutputStore, df: pd.DataFrame, prompt_key: str, width: int, workers: int) -> str:
    ok = [r for r in df.to_dict("records") if r.get("status") == "ok"]
    if not ok:
        return '<section id="overlays"><h2>Overlays</h2><p class="note" id="no-results">No slide has results.</p></section>'

    def thumb(r):
        if not isinstance(r.get("tiling_key"), str):
            return None
        return _thumbnail(store, f"{store.slide_dir(r['slide_id'], 'results', r['tiling_key'], prompt_key)}/overlay.jpg", width)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        thumbs = list(pool.map(thumb, ok))
    buttons = "".join(f'<button type="button" data-key="{k}" data-dir="{d}">{esc(t)}</button>'
                      for k, d, t in (("dice", -1, "Dice ↓"), ("dice", 1, "Dice ↑"), ("id", 1, "Slide id")))
    cards = "".join(_card(r, t) for r, t in zip(ok, thumbs))
    pager = ('' if len(ok) <= PAGE_SIZE else
             ' · <button type="button" id="prev">◀</button> <span id="page"></span> '
             '<button type="button" id="next">▶</button>')
    return ('<section id="overlays"><h2>Overlays</h2><p class="note">Tissue (grey), prediction (blue) and '
            f'ground truth (green) contours.</p><div class="toolbar">Sort: {buttons}{pager}</div>'
            f'<div id="gallery" data-page-size="{PAGE_SIZE}">{cards}</div></section>')


def _errors(df: pd.DataFrame) -> str:
    rows = [(r["slide_id"], r.get("status"), r.get("error")) for r in df.to_dict("records")
            if r.get("status") in ERROR_STATUSES]
    if "annotation_error" in df:
        rows += [(r["slide_id"], "no metrics", r["annotation_error"]) for r in df.to_dict("records")
                 if isinstance(r.get("annotation_error"), str) and r["annotation_error"]]
    if not rows:
        return '<section id="errors"><h2>Errors</h2><p class="note" id="no-errors">No slide failed.</p></section>'
    body = "".join(f'<tr><td>{esc(s)}</td><td>{esc(st)}</td><td class="err">{esc(e)}</td></tr>' for s, st, e in rows)
    return ('<section id="errors"><h2>Errors</h2><table id="errors-table"><thead><tr><th>Slide</th><th>Status</th>'
            f"<th>Reason</th></tr></thead><tbody>{body}</tbody></table></section>")


def _ablation(store: OutputStore, out: str) -> str:
    """The prompt study of `zeus prompts ablate`, when one was run for this prompt key: Δ is the
    mean Dice without that prompt minus the full ensemble's, so Δ > 0 means the prompt hurts."""
    path = f"{out}/ablation/summary.csv"
    if not store.exists(path):
        return ""
    t = pd.read_csv(io.BytesIO(store.read_bytes(path)))
    rows = []
    for r in t.to_dict("records"):
        full = r["variant"] == "full"
        delta = _num(r.get("delta_vs_full"))
        verdict = "" if full or math.isnan(delta) or delta == 0 else ("hurts" if delta > 0 else "helps")
        rows.append(f'<tr><td>{esc(r["dataset"])}</td><td>{esc(r["variant"])}</td><td class="num">{_fmt(r["mean"], 4)}</td>'
                    f'<td class="num">{"" if full else _fmt(delta, 4)}</td><td>{verdict}</td>'
                    f'<td class="num">{esc(r["count"])}</td></tr>')
    return ('<section id="ablation"><h2>Prompt study (leave one out; uses the annotations)</h2>'
            '<p class="note">Δ: mean Dice without that classname or template minus the full ensemble\'s; '
            'a prompt whose removal raises Dice hurts.</p><table id="ablation-table" class="sortable"><thead><tr>'
            '<th>Dataset</th><th>Variant</th><th>Mean Dice</th><th>Δ vs full</th><th>Prompt</th><th>Slides</th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table></section>')


# --- the page ----------------------------------------------------------------------------------------

def build_report(store: OutputStore, prompt_key: str, *, thumb_width: int = THUMB_WIDTH, workers: int = 8) -> str:
    """The report's HTML text for the run with this prompt key under `store`."""
    out = cohort_dir(store, prompt_key)
    if not store.exists(f"{out}/run.json"):
        raise ZeusError(f"{store.uri(out)}: no run.json; is {store.root_uri} the output.root of a `zeus run` "
                        f"with prompt key {prompt_key}?")
    run = store.read_json(f"{out}/run.json")
    df = _read_table(store, out, "slides")
    if df is None:
        raise ZeusError(f"{store.uri(out)}: no slides.parquet or slides.csv; the run did not finish its cohort outputs")
    status = df["status"].value_counts().to_dict()
    n_dice = int(df["dice"].notna().sum()) if "dice" in df else 0
    subtitle = (f"{len(df)} slides: {status.get('ok', 0)} ok, {status.get('no_tissue', 0)} without tissue, "
                f"{status.get('failed', 0)} failed; {n_dice} with Dice. Prompt key {prompt_key}. "
                f"Generated {time.strftime('%Y-%m-%d %H:%M')}.")
    model = ((run.get("config") or {}).get("model") or {}).get("id", "")
    no_dice = _no_dice_reason(df)
    tables = _tables(_read_table(store, out, "table1"), _read_table(store, out, "table2"), no_dice)
    body = "\n".join([_settings(run, df), tables, _plot(df, no_dice), _gallery(store, df, prompt_key, thumb_width, workers),
                      _slides_table(df), _ablation(store, out), _errors(df)])
    template = Template(resources.files("zeus_ray.results").joinpath("report_template.html").read_text(encoding="utf-8"))
    return template.substitute(title=esc(f"zeus_ray report: {model} / {prompt_key}"),
                               heading=esc(f"zeus_ray cohort report: {model}"), subtitle=esc(subtitle), body=body)


def write_report(store: OutputStore, prompt_key: str, out: str | None = None) -> str:
    """Write the report to `out` (a path or URI) or to <root>/cohort/<prompt_key>/report.html; return where."""
    text = build_report(store, prompt_key).encode("utf-8")
    if out is None:
        path = f"{cohort_dir(store, prompt_key)}/report.html"
        store.write_bytes(path, text)
        return store.uri(path)
    with fsspec.open(out, "wb", auto_mkdir=True) as f:
        f.write(text)
    return out
