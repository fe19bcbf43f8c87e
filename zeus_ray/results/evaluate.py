"""`zeus evaluate`: metrics for existing results from stored outputs only.

Per complete slide result it reads the tumour mask (mask_<µm>mpp.png) and the tissue cells and
grid scale (maps.npz), reads the slide's annotation, computes the metrics with the same code as the
run (`slide_outputs.evaluate`), and rewrites metrics.json, the overlay, result.json and the marker
row; then the cohort's slides/errors tables, Table 1/2 and the report. No slide is opened and no
model is loaded (neither openslide nor torch is imported).

Annotations come from the run's manifest (run.json → config.input.manifest, its annotation_uri
column), or from an override: a CSV/Parquet with slide_id, annotation_uri, or a folder holding
<slide_id>.geojson / .json / .xml / .png / .tif / .tiff. A slide without an annotation gets no
metrics; a malformed one gets its error in `annotation_error` and the others are evaluated.
"""
from __future__ import annotations

import io
import logging
import posixpath
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import ValidationError

from ..config import EvaluationConfig, mpp_for_magnification, output_storage_options, parse_overrides
from ..errors import AnnotationError, ConfigError, ZeusError
from ..storage.remote import filesystem
from .class_decision import CLASS_COLUMNS
from ..storage.store import MARKER, OutputStore

log = logging.getLogger(__name__)

# The metric columns of a slide row (as slide_outputs.write_outputs fills them).
METRIC_COLUMNS = ("dice", "precision", "recall", "iou", "pred_area_mm2", "true_area_mm2", "metric_mpp")
ANNOTATION_EXTS = (".geojson", ".json", ".xml", ".png", ".tif", ".tiff")   # folder look-up order


# --- which run -------------------------------------------------------------------------------------

def cohort_runs(store: OutputStore) -> list[tuple[str, float]]:
    """(prompt key, run.json modification time) of every cohort folder, newest first."""
    runs = []
    for path in store.glob(store.path("cohort", "*", "run.json")):
        info = store.info(path)
        t = info.get("mtime") or info.get("LastModified") or info.get("updated") or 0
        t = t.timestamp() if hasattr(t, "timestamp") else float(t)
        runs.append((posixpath.basename(posixpath.dirname(path)), t))
    return sorted(runs, key=lambda r: (-r[1], r[0]))


def resolve_prompt_key(store: OutputStore, prompt_key: str | None = None) -> str:
    """The given key (checked), else the only run, else the newest run (the others are logged)."""
    runs = cohort_runs(store)
    keys = [k for k, _ in runs]
    if not runs:
        raise ZeusError(f"{store.root_uri}: no cohort/<prompt_key>/run.json found; is this the output.root "
                        "of a `zeus run`?")
    if prompt_key is not None:
        if prompt_key not in keys:
            raise ZeusError(f"{store.root_uri}: no run with prompt key {prompt_key!r}; runs there: {', '.join(keys)}")
        return prompt_key
    if len(runs) > 1:
        log.warning("%s holds %d runs (prompt keys, newest first: %s); using the newest, %s "
                    "(choose with --prompt-key)", store.root_uri, len(runs), ", ".join(keys), keys[0])
    return keys[0]


# --- settings and annotations ----------------------------------------------------------------------

def evaluation_settings(run: dict, overrides: list[str] | None) -> dict:
    """The run's evaluation section with `--set evaluation.key=value` overrides, validated."""
    other = [p for p in overrides or [] if not p.strip().startswith(("evaluation.", "output.storage_options."))]
    if other:
        raise ConfigError(f"--set {other[0]!r}: zeus evaluate takes only evaluation.<key>=value "
                          "(e.g. --set evaluation.tumour_classes=[Tumor]) and output.storage_options.<key>=value; "
                          "other settings need a new `zeus run`")
    over = parse_overrides(overrides)
    base = dict((run.get("config") or {}).get("evaluation") or {})
    try:
        return EvaluationConfig.model_validate(base | over.get("evaluation", {})).model_dump()
    except ValidationError as e:
        msg = "; ".join(f"evaluation.{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"evaluation settings: {msg}") from None


def _join(base: str, uri: str) -> str:
    """A manifest's relative path, resolved against the manifest's folder (as the run does)."""
    if "://" in uri or Path(uri).is_absolute():
        return uri
    return posixpath.join(base, uri) if "://" in base else str(Path(base) / uri)


def _table_lookup(fs, path: str, uri: str) -> dict[str, str]:
    try:
        with fs.open(path, "rb") as f:
            df = pd.read_parquet(f) if uri.endswith(".parquet") else pd.read_csv(f, dtype=str)
    except Exception as e:  # noqa: BLE001 - any parser/backend error: one line naming the file
        raise ConfigError(f"--annotations {uri}: cannot read ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    missing = [c for c in ("slide_id", "annotation_uri") if c not in df.columns]
    if missing:
        raise ConfigError(f"--annotations {uri}: missing column(s) {missing}; a manifest needs slide_id, annotation_uri")
    base = posixpath.dirname(uri) if "://" in uri else str(Path(uri).resolve().parent)
    out = {}
    for sid, ann in zip(df["slide_id"], df["annotation_uri"]):
        if isinstance(sid, str) and isinstance(ann, str) and ann.strip():
            out[sid.strip()] = _join(base, ann.strip())
    return out


def _folder_lookup(fs, path: str, uri: str) -> dict[str, str]:
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    found: dict[str, str] = {}
    for p in sorted(fs.ls(path, detail=False), key=lambda p: _rank(p)):
        name = posixpath.basename(p.rstrip("/"))
        ext = next((e for e in ANNOTATION_EXTS if name.lower().endswith(e)), None)
        if ext is not None:
            found.setdefault(name[: -len(ext)], p if local else fs.unstrip_protocol(p))
    if not found:
        raise ConfigError(f"--annotations {uri}: folder holds no {'/'.join(ANNOTATION_EXTS)} file named <slide_id>.<ext>")
    return found


def _rank(p: str) -> int:
    name = p.lower()
    return next((i for i, e in enumerate(ANNOTATION_EXTS) if name.endswith(e)), len(ANNOTATION_EXTS))


def annotation_lookup(run: dict, annotations: str | None) -> tuple[dict[str, str], str]:
    """slide_id → annotation URI, and where they came from (for messages and run.json)."""
    inp = (run.get("config") or {}).get("input") or {}
    opts = inp.get("storage_options")   # the run's input options (credentials come from the environment)
    if annotations is None:
        manifest = inp.get("manifest")
        if not manifest:
            return {}, "none (the run listed slides with input.glob; give --annotations)"
        from ..cohort_input.manifest import read_manifest
        try:
            entries = read_manifest(manifest, opts)
        except ConfigError as e:
            raise ConfigError(f"{e} (the run's manifest, from run.json, gives the annotations: run from the folder "
                              "the run started in, or give --annotations MANIFEST_OR_DIR)") from None
        return {e.slide_id: e.annotation_uri for e in entries if e.annotation_uri}, f"manifest {manifest}"
    fs, path = filesystem(annotations, opts)
    if fs.isdir(path):
        return _folder_lookup(fs, path, annotations), f"folder {annotations}"
    if fs.exists(path):
        return _table_lookup(fs, path, annotations), f"manifest {annotations}"
    raise ConfigError(f"--annotations {annotations}: not found; give a manifest (CSV/Parquet with slide_id, "
                      "annotation_uri) or a folder of <slide_id>.geojson/.xml/.png files")


# --- one slide -------------------------------------------------------------------------------------

def _load_grid(store: OutputStore, res: str, tumour_class: str | None):
    """(mask as written, argmax tumour cells, tissue cells, µm per cell, level-0 px per cell) from the
    stored outputs; the argmax comes from the labels image (it differs from the mask only when a
    post-processing was on)."""
    with np.load(io.BytesIO(store.read_bytes(f"{res}/maps.npz"))) as z:
        tissue, cell_um, cell0 = z["tissue"].astype(bool), float(z["cell_um"]), float(z["cell0"])
        origin0 = tuple(float(v) for v in z["origin0"]) if "origin0" in z.files else (0.0, 0.0)
    names = store.ls(res)
    masks = [p for p in names if re.search(r"/mask_[\d.]+mpp\.png$", p)]
    labels = [p for p in names if re.search(r"/labels_[\d.]+mpp\.png$", p)]
    if not masks or not labels:
        raise FileNotFoundError(f"no mask_<µm>mpp.png or labels_<µm>mpp.png in {res}")
    tumour = np.array(Image.open(io.BytesIO(store.read_bytes(masks[0]))).convert("L")) > 0
    img = Image.open(io.BytesIO(store.read_bytes(labels[0])))
    classes = img.info.get("classes", "").split(",")
    argmax = (np.array(img) == classes.index(tumour_class)) if tumour_class in classes else tumour
    mask_mpp = float(re.search(r"/mask_([\d.]+)mpp\.png$", masks[0]).group(1))
    # postprocess: reference writes its mask on the slide's pixel canvas, not on the cell grid
    if (tumour.shape != tissue.shape and abs(mask_mpp - cell_um) < 0.005) or argmax.shape != tissue.shape:
        raise ValueError(f"mask {tumour.shape} and maps.npz tissue {tissue.shape} differ")
    return tumour, argmax, tissue, cell_um, cell0, origin0, mask_mpp


def evaluate_slide(store: OutputStore, row: dict, prompt_key: str, annotation_uri: str | None,
                   evaluation: dict, preview_px: int = 1024, tumour_class_name: str | None = None,
                   post: dict | None = None, storage_options: dict | None = None) -> dict:
    """Recompute one slide's metrics; return the row's new metric columns and annotation_error."""
    from .slide_outputs import evaluate
    sid = row["slide_id"]
    res = store.slide_dir(sid, "results", str(row["tiling_key"]), prompt_key)
    upd: dict = {k: None for k in (*METRIC_COLUMNS, *CLASS_COLUMNS)} | {"annotation_error": None}
    done = store.complete(res)
    if done is None:
        return upd | {"annotation_error": f"slide {sid!r}: results folder {store.uri(res)} has no {MARKER}; "
                                          "re-run `zeus run` to complete it"}
    try:
        tumour, argmax, tissue, cell_um, cell0, origin0, mask_mpp = _load_grid(store, res, tumour_class_name)
    except Exception as e:  # noqa: BLE001 - a damaged result folder: this slide only
        return upd | {"annotation_error": f"slide {sid!r}: stored results in {store.uri(res)} cannot be read "
                                          f"({type(e).__name__}: {e}); re-run `zeus run` on it"}
    truth = None
    if annotation_uri is not None:
        try:
            mpp0 = cell_um / cell0
            if tumour.shape != tissue.shape:   # the reference canvas: its metrics on its own pixels
                from ..maps.rasterise import resample_nearest
                from .reduce import load_tissue_mask
                from .slide_outputs import evaluate_canvas
                tmask, tmpp = load_tissue_mask(store, store.slide_dir(sid, "tiles", str(row["tiling_key"])))
                m, truth_px = evaluate_canvas(annotation_uri, tumour, resample_nearest(tmask, tmpp, tumour.shape, mask_mpp, False),
                                              px_um=mask_mpp, mpp0=mpp0, evaluation=evaluation,
                                              tumour_class_name=tumour_class_name, storage_options=storage_options)
                truth = resample_nearest(truth_px, mask_mpp, tissue.shape, cell_um, False,
                                         offset=(origin0[1] * mpp0, origin0[0] * mpp0))
            else:
                m, truth = evaluate(annotation_uri, argmax, tissue, cell0=cell0, cell_um=cell_um, mpp0=mpp0,
                                    evaluation=evaluation, tumour_class_name=tumour_class_name, post=post,
                                    storage_options=storage_options, origin0=origin0)
            upd.update({k: m[k] for k in (*METRIC_COLUMNS, *CLASS_COLUMNS)})
            store.write_json(f"{res}/metrics.json", m)
        except AnnotationError as e:
            log.warning("slide %s: %s", sid, e)
            upd["annotation_error"] = str(e)
        except Exception as e:  # noqa: BLE001 - anything else: this slide's metrics only
            log.exception("slide %s: evaluation failed", sid)
            upd["annotation_error"] = f"slide {sid!r}: evaluation failed ({type(e).__name__}: {e})"
    if upd["dice"] is None and store.exists(f"{res}/metrics.json"):
        store.rm(f"{res}/metrics.json")   # no stale metrics beside a slide that has none now
    from .slide_outputs import draw_overlay
    if tumour.shape != tissue.shape:   # the overlay is drawn on cells: the canvas mask at cell centres
        from ..maps.rasterise import resample_nearest
        tumour = resample_nearest(tumour, mask_mpp, tissue.shape, cell_um, False,
                                  offset=(origin0[1] * cell_um / cell0, origin0[0] * cell_um / cell0))
    draw_overlay(store, res, store.slide_dir(sid, "tiles", str(row["tiling_key"])), sid, tumour, tissue, truth,
                 upd["dice"], cell_um, preview_px, origin_um=(origin0[0] * cell_um / cell0, origin0[1] * cell_um / cell0))
    new = done | upd | {"annotation_uri": annotation_uri}
    store.write_json(f"{res}/result.json", new)
    store.commit(res, new)   # the marker carries the row a re-run reuses
    return upd


# --- the cohort ------------------------------------------------------------------------------------

@dataclass
class EvaluateSummary:
    root: str
    prompt_key: str
    annotations: str
    evaluated: int = 0       # slides with metrics
    errors: int = 0          # slides whose annotation (or stored result) could not be used
    unannotated: int = 0     # result complete, no annotation given
    not_ok: int = 0          # slides that failed or had no tissue in the run
    seconds: float = 0.0
    table1_md: str = ""
    errors_list: list = field(default_factory=list)   # (slide_id, why it has no metrics)
    class_lines: list = field(default_factory=list)   # class_decision.decision_lines of the evaluated slides

    def line(self) -> str:
        return (f"zeus evaluate: {self.evaluated} slides evaluated, {self.errors} with annotation errors, "
                f"{self.unannotated} without annotation, {self.not_ok} without results (failed or no tissue); "
                f"prompt key {self.prompt_key}; annotations from {self.annotations}; {self.seconds:.1f} s")


def evaluate_results(root: str, prompt_key: str | None = None, annotations: str | None = None,
                     overrides: list[str] | None = None, workers: int = 4, report: bool = True) -> EvaluateSummary:
    from .cohort_tables import write_slide_tables
    t0 = time.perf_counter()
    store = OutputStore(root, output_storage_options(overrides))
    pk = resolve_prompt_key(store, prompt_key)
    out = store.cohort_dir(pk)
    run = store.read_json(f"{out}/run.json")
    if not store.exists(f"{out}/slides.parquet"):
        raise ZeusError(f"{store.uri(out)}: no slides.parquet; the run did not write its cohort tables (re-run `zeus run`)")
    ev = evaluation_settings(run, overrides)
    lookup, source = annotation_lookup(run, annotations)
    df = store.read_parquet(f"{out}/slides.parquet").to_pandas()
    rows = df.to_dict("records")
    summary = EvaluateSummary(root=store.root_uri, prompt_key=pk, annotations=source)

    ok = [r for r in rows if r.get("status") == "ok"]
    with ThreadPoolExecutor(max(1, workers)) as pool:   # bucket I/O overlaps; numpy work is small
        conf = run.get("config") or {}
        px = int((conf.get("output") or {}).get("preview_px") or 1024)
        tiling = conf.get("tiling") or {}
        mpp = tiling.get("target_mpp") or mpp_for_magnification(float(tiling.get("magnification") or 10.0))
        post = {"mode": conf.get("postprocess") or "none", "patch_um": int(tiling.get("patch_size", 448)) * mpp,
                "px_um": mpp}
        opts = (conf.get("input") or {}).get("storage_options")
        updates = list(pool.map(lambda r: evaluate_slide(store, r, pk, lookup.get(r["slide_id"]), ev, px,
                                                         run.get("tumour_class"), post, opts), ok))
    for r, upd in zip(ok, updates):
        r.update(upd)
        if upd["annotation_error"]:
            summary.errors += 1
            summary.errors_list.append((r["slide_id"], upd["annotation_error"]))
        elif upd["dice"] is None:
            summary.unannotated += 1
        else:
            summary.evaluated += 1
    summary.not_ok = len(rows) - len(ok)
    for r in rows:
        if r.get("status") != "ok":   # no results: no metrics
            r.update({k: None for k in (*METRIC_COLUMNS, *CLASS_COLUMNS)} | {"annotation_error": None})

    new = pd.DataFrame(rows, columns=list(df.columns) + [c for c in (*METRIC_COLUMNS, *CLASS_COLUMNS, "annotation_error")
                                                         if c not in df.columns])
    for c in METRIC_COLUMNS:
        new[c] = pd.to_numeric(new[c], errors="coerce").astype(float)
    for c in ("annotation_error", *CLASS_COLUMNS):
        new[c] = new[c].astype("string")
    from .class_decision import decision_lines
    summary.class_lines = decision_lines(rows)
    model_id = ((run.get("config") or {}).get("model") or {}).get("id", "model")
    write_slide_tables(store, out, new, model_id)
    summary.seconds = time.perf_counter() - t0
    table1 = f"{out}/table1.md"
    summary.table1_md = store.read_bytes(table1).decode() if summary.evaluated and store.exists(table1) else ""
    run["evaluate"] = {"annotations": source, "settings": ev, "summary": summary.line(),
                       "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    store.write_json(f"{out}/run.json", run)
    if report:
        from .report import write_report
        write_report(store, pk)
    return summary
