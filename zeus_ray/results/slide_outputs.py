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
from ..maps.postprocess import apply_postprocess, metric_convention, official_order_smoothing
from ..maps.rasterise import argmax_mask, resample_nearest
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
                 cell_um: float, long_px: int, pv=None, origin_um=(0.0, 0.0)) -> tuple[np.ndarray, float] | None:
    """overlay.jpg: tissue, prediction and ground-truth contours and the Dice over the preview
    (`pv`: (rgb, µm/px) just read, else the stored picture). Cell-grid masks are placed by the
    grid's (x, y) origin `origin_um`; masks of the preview's shape are drawn as they are."""
    pv = pv or preview(store, res, tiles_dir, long_px)
    if pv is not None:
        rgb, mpp = pv
        if origin_um[0] or origin_um[1]:
            hw = rgb.shape[:2]
            tumour, tissue, truth = (m if m is None or np.shape(m)[:2] == hw else
                                     resample_nearest(np.asarray(m, bool), cell_um, hw, mpp, False,
                                                      offset=(-origin_um[1], -origin_um[0]))
                                     for m in (tumour, tissue, truth))
        store.write_bytes(f"{res}/overlay.jpg", jpeg_bytes(overlay_png(rgb, tissue, tumour, truth, dice,
                                                                       cells_to_thumb=cell_um / mpp, title=title)))
    return pv


def metric_truth(annotation_uri: str, cells_shape: tuple[int, int], *, cell0: float, cell_um: float, mpp0: float,
                 evaluation: dict, tumour_class_name: str | None = None,
                 storage_options: dict | None = None, origin0=(0.0, 0.0)) -> tuple[int, np.ndarray]:
    """(f, truth): the ground truth on the metric grid, `f` × finer than the cell grid (default 4:
    28 µm at 112 µm cells), rasterised at the metric cells' centres."""
    f, truth, _ = _metric_truth(annotation_uri, cells_shape, cell0=cell0, cell_um=cell_um, mpp0=mpp0,
                                evaluation=evaluation, tumour_class_name=tumour_class_name,
                                storage_options=storage_options, origin0=origin0)
    return f, truth


def _metric_truth(annotation_uri: str, cells_shape: tuple[int, int], *, cell0: float, cell_um: float, mpp0: float,
                  evaluation: dict, tumour_class_name: str | None, storage_options: dict | None, origin0=(0.0, 0.0)):
    """metric_truth, and the annotation's class decision (class_decision.CLASS_COLUMNS)."""
    f = max(1, int(round(cell_um / (evaluation.get("metric_mpp") or cell_um / 4))))
    ann = read_with_settings(annotation_uri, evaluation, mpp0=mpp0, tumour_class_name=tumour_class_name,
                             storage_options=storage_options)
    truth = rasterise_annotation(ann, (cells_shape[0] * f, cells_shape[1] * f), cell0 / f, origin0)
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
             storage_options: dict | None = None, origin0=(0.0, 0.0)) -> tuple[dict, np.ndarray]:
    """The slide's metrics (with its class decision, class_decision.CLASS_COLUMNS) and its truth on
    the cell grid (for drawing)."""
    f, truth, classes = _metric_truth(annotation_uri, tumour.shape, cell0=cell0, cell_um=cell_um, mpp0=mpp0,
                                      evaluation=evaluation, tumour_class_name=tumour_class_name,
                                      storage_options=storage_options, origin0=origin0)
    return metrics_on_grid(tumour, tissue, truth, f, cell_um, post) | classes, truth[f // 2::f, f // 2::f]


def evaluate_canvas(annotation_uri: str, pred: np.ndarray, tissue: np.ndarray, *, px_um: float, mpp0: float,
                    evaluation: dict, tumour_class_name: str | None = None,
                    storage_options: dict | None = None) -> tuple[dict, np.ndarray]:
    """Metrics of a slide-aligned mask of `px_um` pixels (the reference canvas) against the truth
    rasterised at its pixel centres, inside `tissue`, with the published code's conventions."""
    ann = read_with_settings(annotation_uri, evaluation, mpp0=mpp0, tumour_class_name=tumour_class_name,
                             storage_options=storage_options)
    truth = rasterise_annotation(ann, pred.shape, px_um / mpp0)
    m = segmentation_metrics(pred, truth, tissue, cell_area_mm2=(px_um / 1000.0) ** 2, convention="reference")
    m["metric_mpp"] = px_um
    m["postprocess"] = "reference"
    return m | decision_columns(ann), truth


def _canvas_shape(grid, px_um: float) -> tuple[int, int]:
    """(H, W) pixels of `px_um` covering the slide."""
    return (max(1, math.ceil(grid.height * grid.mpp0 / px_um - 1e-6)),
            max(1, math.ceil(grid.width * grid.mpp0 / px_um - 1e-6)))


def write_outputs(store: OutputStore, job: dict, sg, *, maps, counts, labels, probs, tumour) -> dict:
    """Write every output of the slide except the similarity table; return the row's extra columns.

    With `postprocess: reference` the mask written, the viewer rasters and the metrics come from
    the official-order smoothing on the slide's pixel canvas at the target µm/px (slide-aligned);
    cell-grid outputs (labels, maps.npz) name the grid's origin (tiling.anchor)."""
    keys, entry, out_cfg = job["keys"], job["entry"], job.get("output") or {}
    res, grid, cell_um, cell0 = keys.res_dir, sg.grid, sg.cell_um, sg.cell0
    class_names, ti = job["class_names"], job["tumour_index"]
    tumour_name = class_names[ti]
    tissue = sg.tissue_cells
    ox0, oy0 = sg.origin0
    shifted = bool(ox0 or oy0)
    mode = job.get("postprocess") or "none"
    argmax_tumour = tumour
    fine = fine_tissue = None
    if mode == "reference":
        px = grid.target_mpp
        shape_px = _canvas_shape(grid, px)
        uncut = argmax_mask(maps) == ti            # the official code blurs the argmax before any tissue cut
        fine_tissue = resample_nearest(sg.tissue_mask, sg.tissue_mpp, shape_px, px, False)
        fine = official_order_smoothing(uncut, cell_um / px, (ox0 * grid.mpp0 / px, oy0 * grid.mpp0 / px),
                                        shape_px, grid.patch_size, fine_tissue)
        mask_mpp, mask_img, mask0 = px, fine, px / grid.mpp0
        area = float(fine.sum() * (px / 1000.0) ** 2)
    elif mode != "none":
        tumour = apply_postprocess(mode, tumour, tissue, cell_um=cell_um, patch_um=grid.patch_size * grid.target_mpp,
                                   px_um=grid.target_mpp)
    if fine is None:
        mask_mpp, mask_img, mask0 = cell_um, tumour, cell0
        area = float(tumour.sum() * (cell_um / 1000.0) ** 2)
    out: dict = {"tumour_area_mm2": area, "postprocess": mode}
    origin_text = "0,0" if fine is not None else f"{ox0:g},{oy0:g}"

    name = f"mask_{mask_mpp:.2f}mpp.png" if fine is None else f"mask_{mask_mpp:.6g}mpp.png"   # the canvas: exact µm/px
    store.write_bytes(f"{res}/{name}", png_bytes((mask_img * 255).astype(np.uint8),
                      mpp=mask_mpp, cell0=mask0, origin=origin_text))
    store.write_bytes(f"{res}/labels_{cell_um:.2f}mpp.png", png_bytes((labels + 1).astype(np.uint8),
                      classes="background," + ",".join(class_names), mpp=cell_um, origin=f"{ox0:g},{oy0:g}"))
    buf = io.BytesIO()
    np.savez_compressed(buf, maps=maps, probs=probs, counts=counts, tissue=tissue, cell_um=cell_um, cell0=cell0,
                        classes=np.array(class_names), origin0=np.array([ox0, oy0]))
    store.write_bytes(f"{res}/maps.npz", buf.getvalue())

    d = viewer_downsample(cell0)
    shape = (math.ceil(grid.height / d), math.ceil(grid.width / d))
    viewer_mask = resample_nearest(mask_img, mask0, shape, d, False, offset=(0.0, 0.0) if fine is not None
                                   else (-oy0, -ox0))
    if fine is not None or shifted:   # polygons of the slide-aligned viewer raster
        geojson = mask_to_geojson(viewer_mask, d, tumour_name)
    else:
        geojson = mask_to_geojson(tumour, cell0, tumour_name)
    store.write_json(f"{res}/prediction.geojson", geojson)
    prob = (np.nan_to_num(probs[ti], nan=0.0) * 255).round().astype(np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        write_pyramidal_tiff(viewer_mask, Path(tmp) / "mask.tiff", mpp=grid.mpp0 * d, nearest=True)
        write_pyramidal_tiff(resample_nearest(prob, cell0, shape, d, 0, offset=(-oy0, -ox0)),
                             Path(tmp) / f"prob_{tumour_name}.tiff", mpp=grid.mpp0 * d)
        store.upload_dir(tmp, res)
    out["viewer_downsample"] = d

    truth = None
    if entry.get("annotation_uri"):
        try:
            common = dict(evaluation=job.get("evaluation") or {}, tumour_class_name=job.get("tumour_class_name"),
                          storage_options=job.get("storage_options"))
            if fine is not None:
                m, truth_px = evaluate_canvas(entry["annotation_uri"], fine, fine_tissue, px_um=mask_mpp,
                                              mpp0=grid.mpp0, **common)
                truth = ("slide", truth_px, mask_mpp)
            else:
                post = {"mode": mode, "patch_um": grid.patch_size * grid.target_mpp, "px_um": grid.target_mpp}
                m, truth_cells = evaluate(entry["annotation_uri"], argmax_tumour, tissue, cell0=cell0, cell_um=cell_um,
                                          mpp0=grid.mpp0, post=post, origin0=(ox0, oy0), **common)
                truth = ("cells", truth_cells, cell_um)
            store.write_json(f"{res}/metrics.json", m)
            out.update({k: m[k] for k in ("dice", "precision", "recall", "iou", "pred_area_mm2",
                                          "true_area_mm2", "metric_mpp", *CLASS_COLUMNS)})
        except AnnotationError as e:   # only this slide's metrics are missing
            log.warning("%s", e)
            out["annotation_error"] = str(e)

    long_px = int(out_cfg.get("preview_px", 1024))
    fresh = ensure_preview(store, job, grid, long_px)
    pv = fresh or preview(store, res, keys.tiles_dir, long_px)
    if pv is None:
        return out
    rgb, mpp = pv
    hw = rgb.shape[:2]
    origin_um = (oy0 * grid.mpp0, ox0 * grid.mpp0)

    def on_thumb(a, px_um, fill=False, slide_aligned=False):
        """A cell-grid (or slide-aligned) array at the preview's pixel centres."""
        return resample_nearest(a, px_um, hw, mpp, fill, offset=(0.0, 0.0) if slide_aligned
                                else (-origin_um[0], -origin_um[1]))

    truth_thumb = None if truth is None else on_thumb(truth[1], truth[2], slide_aligned=truth[0] == "slide")
    pred_thumb = on_thumb(fine, mask_mpp, slide_aligned=True) if fine is not None else on_thumb(tumour, cell_um)
    draw_overlay(store, res, keys.tiles_dir, entry["slide_id"], pred_thumb, on_thumb(tissue, cell_um), truth_thumb,
                 out.get("dice"), cell_um, long_px, pv)
    if out_cfg.get("heatmaps"):
        inside = lambda a: on_thumb(np.where(tissue, a, np.nan), cell_um, np.nan)  # noqa: E731 - only over tissue
        for i, name in enumerate(class_names):
            store.write_bytes(f"{res}/heatmap_sim_{name}.jpg", jpeg_bytes(
                similarity_heatmap(inside(maps[i]), rgb, cells_to_thumb=1.0)))
        store.write_bytes(f"{res}/heatmap_prob_{tumour_name}.jpg", jpeg_bytes(similarity_heatmap(
            inside(probs[ti]), rgb, vmin=0.0, vmax=1.0, cells_to_thumb=1.0)))
    return out
