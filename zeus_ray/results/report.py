"""The cohort report: one self-contained HTML file (inline CSS/JS, overlays as base64 JPEG data URIs,
an inline SVG plot; nothing is fetched), written to <root>/cohort/<prompt_key>/report.html.

Sections: the run's settings, Table 1 / Table 2 (as stored by the run or `zeus evaluate`), the
per-slide Dice distribution per dataset and per centre, a per-slide table, the overlay gallery
(sortable by Dice) and the errors. This module gathers the values; the page is the jinja2 template
templates/report.html.j2, rendered with autoescape on, so every text that comes from data is escaped.
"""
from __future__ import annotations

import base64
import io
import math
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import fsspec
import jinja2
import numpy as np
import pandas as pd
from PIL import Image

from ..errors import ZeusError
from ..truth.metrics import format_mean_std
from ..storage.keys import ERROR_STATUSES
from ..storage.store import OutputStore

THUMB_WIDTH = 240    # gallery thumbnails: at most this wide (and 1.5 × as high), JPEG (~8 KB each)
PAGE_SIZE = 60       # gallery cards shown at a time (a 1,000-slide report stays quick to use)


def _missing(value) -> bool:
    return value is None or (np.ndim(value) == 0 and bool(pd.isna(value)))


def _text(value) -> str:
    """The template's `text` filter: None, NaN and pandas NA are empty (autoescape escapes the rest)."""
    return "" if _missing(value) else str(value)


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


# --- sections: plain values for the template -----------------------------------------------------------

def _settings(run: dict, df: pd.DataFrame) -> list[tuple[str, object]]:
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
    return rows


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


def cohort_table(table: pd.DataFrame | None) -> dict | None:
    """Table 1 / Table 2 layout: group keys, slides, 'mean ± std' per metric (as metrics.to_markdown)."""
    if table is None:
        return None
    keys = [k for k in ("dataset", "model", "center") if k in table.columns]
    head = [("Centre" if k == "center" else k.capitalize()) for k in keys] + ["Slides", "DSC", "Precision", "Recall"]
    rows = [{"groups": [r[k] for k in keys], "n_slides": int(r["n_slides"]),
             "metrics": [{"name": m, "text": format_mean_std(_num(r[f"{m}_mean"]), _num(r[f"{m}_std"])),
                          "nan": int(_num(r.get(f"{m}_nan", 0)) or 0)} for m in ("dice", "precision", "recall")]}
            for _, r in table.iterrows()]
    return {"head": head, "rows": rows}


def _no_dice_reason(df: pd.DataFrame) -> str:
    """Which note the template shows where there is no Dice."""
    if not (df["status"] == "ok").any():
        return "no_results"
    if "annotation_error" in df and df["annotation_error"].fillna("").astype(str).str.len().gt(0).any():
        return "no_usable_annotation"
    return "no_annotations"


def dice_plot(df: pd.DataFrame, width: int = 900) -> dict | None:
    """Strip + box plot of per-slide Dice, one row per dataset then one per dataset / centre: the
    SVG's coordinates (the template draws it); None when no slide has a Dice."""
    if "dice" not in df or not df["dice"].notna().any():
        return None
    d = df[df["dice"].notna()]
    groups: list[tuple[str | None, str, list]] = []
    for title, keys in (("Per dataset", ["dataset"]), ("Per centre", ["dataset", "center"])):
        groups.append((title, "", []))
        g = d.assign(**{k: d[k].fillna("all").astype(str) if k in d else "all" for k in keys})
        for key, sub in g.groupby(keys, sort=True):
            label = " / ".join(key) if isinstance(key, tuple) else str(key)
            groups.append((None, label, list(zip(sub["slide_id"].astype(str), sub["dice"].astype(float)))))
    left, right, row_h, head_h, top = 250, 170, 30, 24, 26
    x0, x1 = left, width - right
    xf = lambda v: x0 + float(np.clip(v, 0, 1)) * (x1 - x0)  # noqa: E731
    x = lambda v: f"{xf(v):.1f}"  # noqa: E731
    height = top + sum(head_h if t else row_h for t, _, _ in groups) + 24
    rows, y = [], top
    for title, label, pts in groups:
        if title:
            rows.append({"title": title, "y": y})
            y += head_h
            continue
        cy = y + row_h / 2
        v = np.array([p[1] for p in pts])
        box = None
        if len(v) >= 2:
            q1, med, q3 = np.percentile(v, [25, 50, 75])
            box = {"lo": x(v.min()), "hi": x(v.max()), "q1": x(q1), "med": x(med),
                   "width": f"{max(xf(q3) - xf(q1), 1):.1f}"}
        points = [{"cx": x(val), "title": f"{sid}: Dice {val:.3f}",   # deterministic jitter from the slide id
                   "cy": f"{cy + ((zlib.crc32(sid.encode()) % 1000) / 1000 - 0.5) * 14:.1f}"} for sid, val in pts]
        rows.append({"title": None, "label": label, "short": label if len(label) <= 36 else label[:35] + "…",
                     "cy": cy, "ty": f"{cy + 4:.1f}", "box": box, "points": points,
                     "stat": f"n = {len(v)}" + (f", median {np.median(v):.3f}" if len(v) else "")})
        y += row_h
    return {"width": width, "height": height, "top": top, "x0": x0, "x1": x1, "mid": f"{(x0 + x1) / 2:.1f}",
            "ticks": [(x(i / 10), f"{i / 10:.1f}") for i in range(11)], "rows": rows}


def _slides_table(df: pd.DataFrame) -> dict:
    cols = [("slide_id", "Slide", None), ("dataset", "Dataset", None), ("center", "Centre", None),
            ("status", "Status", None), ("n_tiles", "Tiles", 0), ("tissue_area_mm2", "Tissue mm²", 2),
            ("tumour_area_mm2", "Predicted tumour mm²", 2), ("dice", "Dice", 3), ("precision", "Precision", 3),
            ("recall", "Recall", 3)]
    cols = [c for c in cols if c[0] in df.columns]
    rows = [[{"num": False, "text": r.get(key)} if digits is None else
             {"num": True, "v": _nan_if_none(r.get(key)), "text": _fmt(r.get(key), digits)}
             for key, _, digits in cols] for r in df.to_dict("records")]
    return {"head": [h for _, h, _ in cols], "rows": rows}


def _card(r: dict, thumb: str | None) -> dict:
    dice = _num(r.get("dice"))
    err = r.get("annotation_error")
    return {"slide_id": r["slide_id"], "thumb": thumb, "dice_value": _nan_if_none(dice),
            "meta": [r.get(k) for k in ("dataset", "center") if not _missing(r.get(k))],
            "dice": _fmt(dice), "precision": _fmt(r.get("precision")), "recall": _fmt(r.get("recall")),
            "tumour": _fmt(r.get("tumour_area_mm2"), 2), "annotation_error": err if isinstance(err, str) else ""}


def _gallery(store: OutputStore, df: pd.DataFrame, prompt_key: str, width: int, workers: int) -> dict | None:
    ok = [r for r in df.to_dict("records") if r.get("status") == "ok"]
    if not ok:
        return None

    def thumb(r):
        if not isinstance(r.get("tiling_key"), str):
            return None
        return _thumbnail(store, f"{store.slide_dir(r['slide_id'], 'results', r['tiling_key'], prompt_key)}/overlay.jpg", width)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        thumbs = list(pool.map(thumb, ok))
    return {"cards": [_card(r, t) for r, t in zip(ok, thumbs)], "paged": len(ok) > PAGE_SIZE,
            "page_size": PAGE_SIZE}


def _errors(df: pd.DataFrame) -> list[tuple]:
    rows = [(r["slide_id"], r.get("status"), r.get("error")) for r in df.to_dict("records")
            if r.get("status") in ERROR_STATUSES]
    if "annotation_error" in df:
        rows += [(r["slide_id"], "no metrics", r["annotation_error"]) for r in df.to_dict("records")
                 if isinstance(r.get("annotation_error"), str) and r["annotation_error"]]
    return rows


def _ablation(store: OutputStore, out: str) -> list[dict]:
    """The prompt study of `zeus prompts ablate`, when one was run for this prompt key: Δ is the
    mean Dice without that prompt minus the full ensemble's, so Δ > 0 means the prompt hurts."""
    path = f"{out}/ablation/summary.csv"
    if not store.exists(path):
        return []
    rows = []
    for r in pd.read_csv(io.BytesIO(store.read_bytes(path))).to_dict("records"):
        full = r["variant"] == "full"
        delta = _num(r.get("delta_vs_full"))
        verdict = "" if full or math.isnan(delta) or delta == 0 else ("hurts" if delta > 0 else "helps")
        rows.append({"dataset": r["dataset"], "variant": r["variant"], "mean": _fmt(r["mean"], 4),
                     "delta": "" if full else _fmt(delta, 4), "verdict": verdict, "count": r["count"]})
    return rows


# --- the page ----------------------------------------------------------------------------------------

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("zeus_ray.results", "templates"), autoescape=True,
                          trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
_ENV.filters["text"] = _text


def build_report(store: OutputStore, prompt_key: str, *, thumb_width: int = THUMB_WIDTH, workers: int = 8) -> str:
    """The report's HTML text for the run with this prompt key under `store`."""
    out = store.cohort_dir(prompt_key)
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
    return _ENV.get_template("report.html.j2").render(
        title=f"zeus_ray report: {model} / {prompt_key}", heading=f"zeus_ray cohort report: {model}",
        subtitle=subtitle, settings=_settings(run, df), no_dice=_no_dice_reason(df),
        table1=cohort_table(_read_table(store, out, "table1")), table2=cohort_table(_read_table(store, out, "table2")),
        plot=dice_plot(df), gallery=_gallery(store, df, prompt_key, thumb_width, workers),
        slides=_slides_table(df), ablation=_ablation(store, out), errors=_errors(df))


def write_report(store: OutputStore, prompt_key: str, out: str | None = None) -> str:
    """Write the report to `out` (a path or URI) or to <root>/cohort/<prompt_key>/report.html; return where."""
    text = build_report(store, prompt_key).encode("utf-8")
    if out is None:
        path = f"{store.cohort_dir(prompt_key)}/report.html"
        store.write_bytes(path, text)
        return store.uri(path)
    with fsspec.open(out, "wb", auto_mkdir=True) as f:
        f.write(text)
    return out
