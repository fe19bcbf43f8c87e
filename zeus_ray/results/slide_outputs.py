"""Per-slide outputs of the reduce, beside the similarity table:
- on the cell grid (exact, small): mask_<µm>mpp.png, labels_<µm>mpp.png, maps.npz;
- for viewers: prediction.geojson (QuPath polygons, level-0 px), mask.tiff and prob_<tumour>.tiff
  (pyramidal, covering exactly the slide's extent at `VIEWER_DOWNSAMPLE` level-0 px per pixel, with
  µm/px set, so OpenSlide and QuPath lay them over the slide);
- a preview: overlay.jpg (tissue, prediction and ground-truth contours over the slide), and with
  `output.heatmaps` similarity/probability heat-maps;
- metrics.json against the annotation when the manifest gives one.
"""
from __future__ import annotations

import io
import logging
import math
import re
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, PngImagePlugin

from ..truth.annotations import rasterise_annotation, read_with_settings
from .class_decision import CLASS_COLUMNS, decision_columns
from ..errors import AnnotationError
from .export import mask_to_geojson, overlay_png, similarity_heatmap, write_pyramidal_tiff
from ..truth.metrics import segmentation_metrics
from ..maps.postprocess import apply_postprocess, metric_convention
from ..maps.rasterise import resample_nearest
from ..storage.store import OutputStore

log = logging.getLogger(__name__)

# Level-0 px per pixel of the viewer rasters: 16 keeps a 100k px wide slide's mask at 6,250 px
# while a 112 µm cell (224 px at 0.5 µm/px) spans 14 pixels. Finer only for cells under 16 px.
VIEWER_DOWNSAMPLE = 16
PREVIEW_MIN_MPP = 2.0   # previews never finer than this (a 2 µm/px read is cheap; 10x is 1 µm/px)
_PREVIEW = re.compile(r"/(?:thumbnail|preview)_([\d.]+)mpp\.jpg$")


def viewer_downsample(cell0: float) -> int:
    return VIEWER_DOWNSAMPLE if cell0 >= VIEWER_DOWNSAMPLE else max(1, int(cell0))


def png_bytes(arr: np.ndarray, **info) -> bytes:
    """PNG with text chunks (µm/px, origin: how to place a cell-grid image on the slide)."""
    meta = PngImagePlugin.PngInfo()
    for k, v in info.items():
        meta.add_text(k, str(v))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", pnginfo=meta, compress_level=3)
    return buf.getvalue()


def jpeg_bytes(rgb: np.ndarray, quality: int = 88) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return buf.tobytes()


def _previews(store: OutputStore, *dirs: str) -> list[tuple[float, str]]:
    """(µm/px, path) of the pictures of the slide stored in `dirs` (a result folder's
    preview_*.jpg, a tiles folder's thumbnail_*.jpg), finest first."""
    found = []
    for d in dirs:
        if store.exists(d):
            found += [(float(m.group(1)), p) for p in store.ls(d) if (m := _PREVIEW.search(p))]
    return sorted(found)


def load_preview(store: OutputStore, *dirs: str) -> tuple[np.ndarray, float] | None:
    """The finest RGB picture of the slide stored in `dirs`, and its µm/px."""
    found = _previews(store, *dirs)
    if not found:
        return None
    mpp, path = found[0]
    rgb = cv2.imdecode(np.frombuffer(store.read_bytes(path), np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    return np.ascontiguousarray(rgb), mpp


def ensure_preview(store: OutputStore, job: dict, grid, long_px: int) -> tuple[np.ndarray, float] | None:
    """For a small slide (a biopsy) whose tissue thumbnail is under a third of a `long_px` preview
    on its long side, read a finer picture (local slides only: a bucket slide is not fetched again
    for a preview) and store it as preview_<mpp>mpp.jpg beside the results (later redraws use it);
    returns it with its µm/px, or None when the stored pictures will do.
    Larger slides keep the thumbnail: a finer read costs more than the rest of their reduce."""
    keys, entry = job["keys"], job["entry"]
    found = _previews(store, keys.res_dir, keys.tiles_dir)
    side_um = max(grid.width, grid.height) * grid.mpp0
    want = max(side_um / long_px, PREVIEW_MIN_MPP, grid.mpp0)
    if (not found or side_um / found[0][0] >= long_px / 3 or want >= found[0][0] / 1.5
            or "://" in entry["uri"]):
        return None
    from ..slides.planning import mpp_label, read_preview
    try:
        rgb, mpp = read_preview(entry["uri"], entry["slide_id"], None, grid.mpp0, long_px, PREVIEW_MIN_MPP)
        store.write_bytes(f"{keys.res_dir}/preview_{mpp_label(mpp)}mpp.jpg", jpeg_bytes(rgb))
        return rgb, mpp
    except Exception as e:  # noqa: BLE001 - the preview is a view: the thumbnail will do
        log.info("slide %s: no finer preview (%s)", entry["slide_id"], e)
        return None


def preview(store: OutputStore, res: str, tiles_dir: str, long_px: int) -> tuple[np.ndarray, float] | None:
    """The stored picture previews are drawn on, at most about `long_px` px on its long side."""
    found = load_preview(store, res, tiles_dir)
    if found is None:
        return None
    rgb, mpp = found
    if max(rgb.shape[:2]) > long_px * 1.25:   # a large slide's thumbnail: shrink to the preview size
        f = long_px / max(rgb.shape[:2])
        size = (max(1, round(rgb.shape[1] * f)), max(1, round(rgb.shape[0] * f)))
        mpp *= rgb.shape[1] / size[0]
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return rgb, mpp


def draw_overlay(store: OutputStore, res: str, tiles_dir: str, title: str, tumour, tissue, truth, dice,
                 cell_um: float, long_px: int, pv=None) -> tuple[np.ndarray, float] | None:
    """overlay.jpg: tissue, prediction and ground-truth contours and the Dice over the preview
    (`pv`: (rgb, µm/px) just read, else the stored picture)."""
    pv = pv or preview(store, res, tiles_dir, long_px)
    if pv is not None:
        rgb, mpp = pv
        store.write_bytes(f"{res}/overlay.jpg", jpeg_bytes(overlay_png(rgb, tissue, tumour, truth, dice,
                                                                       cells_to_thumb=cell_um / mpp, title=title)))
    return pv


def metric_truth(annotation_uri: str, cells_shape: tuple[int, int], *, cell0: float, cell_um: float, mpp0: float,
                 evaluation: dict, tumour_class_name: str | None = None,
                 storage_options: dict | None = None) -> tuple[int, np.ndarray]:
    """(f, truth): the ground truth on the metric grid, `f` × finer than the cell grid (default 4:
    28 µm at 112 µm cells), rasterised at the metric cells' centres."""
    f, truth, _ = _metric_truth(annotation_uri, cells_shape, cell0=cell0, cell_um=cell_um, mpp0=mpp0,
                                evaluation=evaluation, tumour_class_name=tumour_class_name,
                                storage_options=storage_options)
    return f, truth


def _metric_truth(annotation_uri: str, cells_shape: tuple[int, int], *, cell0: float, cell_um: float, mpp0: float,
                  evaluation: dict, tumour_class_name: str | None, storage_options: dict | None):
    """metric_truth, and the annotation's class decision (class_decision.CLASS_COLUMNS)."""
    f = max(1, int(round(cell_um / (evaluation.get("metric_mpp") or cell_um / 4))))
    ann = read_with_settings(annotation_uri, evaluation, mpp0=mpp0, tumour_class_name=tumour_class_name,
                             storage_options=storage_options)
    truth = rasterise_annotation(ann, (cells_shape[0] * f, cells_shape[1] * f), cell0 / f)
    return f, truth, decision_columns(ann)


def metrics_on_grid(tumour: np.ndarray, tissue: np.ndarray, truth: np.ndarray, f: int, cell_um: float,
                    post: dict | None = None) -> dict:
    """Dice, precision, recall, … of the cell-grid prediction against the metric-grid truth, inside
    tissue. The prediction reaches the metric grid by nearest neighbour, or, with `post`
    {"mode": "reference", "patch_um", "px_um"}, through the reference smoothing evaluated there."""
    mode = (post or {}).get("mode", "none")
    valid = resample_nearest(tissue, f, truth.shape, 1, False)
    if mode == "none":
        pred = resample_nearest(tumour, f, truth.shape, 1, False)
    else:
        pred = apply_postprocess(mode, tumour, tissue, cell_um=cell_um, patch_um=post["patch_um"],
                                 px_um=post["px_um"], subdivide=f)
    m = segmentation_metrics(pred, truth, valid, cell_area_mm2=((cell_um / f) / 1000.0) ** 2,
                             convention=metric_convention(mode))
    m["metric_mpp"] = cell_um / f
    m["postprocess"] = mode
    return m


def evaluate(annotation_uri: str, tumour: np.ndarray, tissue: np.ndarray, *, cell0: float, cell_um: float,
             mpp0: float, evaluation: dict, tumour_class_name: str | None = None, post: dict | None = None,
             storage_options: dict | None = None) -> tuple[dict, np.ndarray]:
    """The slide's metrics (with its class decision, class_decision.CLASS_COLUMNS) and its truth on
    the cell grid (for drawing)."""
    f, truth, classes = _metric_truth(annotation_uri, tumour.shape, cell0=cell0, cell_um=cell_um, mpp0=mpp0,
                                      evaluation=evaluation, tumour_class_name=tumour_class_name,
                                      storage_options=storage_options)
    return metrics_on_grid(tumour, tissue, truth, f, cell_um, post) | classes, truth[f // 2::f, f // 2::f]


def write_outputs(store: OutputStore, job: dict, sg, *, maps, counts, labels, probs, tumour) -> dict:
    """Write every output of the slide except the similarity table; return the row's extra columns."""
    keys, entry, out_cfg = job["keys"], job["entry"], job.get("output") or {}
    res, grid, cell_um, cell0 = keys.res_dir, sg.grid, sg.cell_um, sg.cell0
    class_names, ti = job["class_names"], job["tumour_index"]
    tumour_name = class_names[ti]
    tissue = sg.tissue_cells
    post = {"mode": job.get("postprocess") or "none", "patch_um": grid.patch_size * grid.target_mpp,
            "px_um": grid.target_mpp}
    argmax_tumour = tumour
    if post["mode"] != "none":   # the mask written (not the labels) is the post-processed one
        tumour = apply_postprocess(post["mode"], tumour, tissue, cell_um=cell_um, patch_um=post["patch_um"],
                                   px_um=post["px_um"])
    out: dict = {"tumour_area_mm2": float(tumour.sum() * (cell_um / 1000.0) ** 2), "postprocess": post["mode"]}

    store.write_bytes(f"{res}/mask_{cell_um:.2f}mpp.png", png_bytes((tumour * 255).astype(np.uint8),
                      mpp=cell_um, cell0=cell0, origin="0,0"))
    store.write_bytes(f"{res}/labels_{cell_um:.2f}mpp.png", png_bytes((labels + 1).astype(np.uint8),
                      classes="background," + ",".join(class_names), mpp=cell_um))
    buf = io.BytesIO()
    np.savez_compressed(buf, maps=maps, probs=probs, counts=counts, tissue=tissue, cell_um=cell_um, cell0=cell0,
                        classes=np.array(class_names))
    store.write_bytes(f"{res}/maps.npz", buf.getvalue())
    store.write_json(f"{res}/prediction.geojson", mask_to_geojson(tumour, cell0, tumour_name))

    d = viewer_downsample(cell0)
    shape = (math.ceil(grid.height / d), math.ceil(grid.width / d))
    prob = (np.nan_to_num(probs[ti], nan=0.0) * 255).round().astype(np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        write_pyramidal_tiff(resample_nearest(tumour, cell0, shape, d, False), Path(tmp) / "mask.tiff",
                             mpp=grid.mpp0 * d, nearest=True)
        write_pyramidal_tiff(resample_nearest(prob, cell0, shape, d, 0), Path(tmp) / f"prob_{tumour_name}.tiff",
                             mpp=grid.mpp0 * d)
        store.upload_dir(tmp, res)
    out["viewer_downsample"] = d

    truth = None
    if entry.get("annotation_uri"):
        try:
            m, truth = evaluate(entry["annotation_uri"], argmax_tumour, tissue, cell0=cell0, cell_um=cell_um,
                                mpp0=grid.mpp0, evaluation=job.get("evaluation") or {},
                                tumour_class_name=job.get("tumour_class_name"), post=post,
                                storage_options=job.get("storage_options"))
            store.write_json(f"{res}/metrics.json", m)
            out.update({k: m[k] for k in ("dice", "precision", "recall", "iou", "pred_area_mm2",
                                          "true_area_mm2", "metric_mpp", *CLASS_COLUMNS)})
        except AnnotationError as e:   # only this slide's metrics are missing
            log.warning("%s", e)
            out["annotation_error"] = str(e)

    long_px = int(out_cfg.get("preview_px", 1024))
    fresh = ensure_preview(store, job, grid, long_px)
    pv = draw_overlay(store, res, keys.tiles_dir, entry["slide_id"], tumour, tissue, truth, out.get("dice"),
                      cell_um, long_px, fresh)
    if pv is not None and out_cfg.get("heatmaps"):
        rgb, mpp = pv
        inside = lambda a: np.where(tissue, a, np.nan)  # noqa: E731 - heat-maps only over tissue
        for i, name in enumerate(class_names):
            store.write_bytes(f"{res}/heatmap_sim_{name}.jpg", jpeg_bytes(
                similarity_heatmap(inside(maps[i]), rgb, cells_to_thumb=cell_um / mpp)))
        store.write_bytes(f"{res}/heatmap_prob_{tumour_name}.jpg", jpeg_bytes(similarity_heatmap(
            inside(probs[ti]), rgb, vmin=0.0, vmax=1.0, cells_to_thumb=cell_um / mpp)))
    return out
