"""Per-slide viewer outputs and metrics, written beside the mask by the reduce:
QuPath GeoJSON of the prediction, pyramidal TIFFs (mask and tumour probability), heat-maps,
the overlay PNG, and metrics against the annotation when the manifest gives one."""
from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .annotations import rasterise_annotation, read_annotation
from .errors import AnnotationError
from .mask_export import mask_to_geojson, overlay_png, similarity_heatmap, write_pyramidal_tiff
from .metrics import segmentation_metrics
from .store import OutputStore

log = logging.getLogger(__name__)


def load_display(store: OutputStore, tiles_dir: str) -> tuple[np.ndarray, float] | None:
    """The clean RGB thumbnail written by the plan stage (display_<mpp>mpp.png) and its µm/px."""
    import re
    for p in store.fs.ls(tiles_dir, detail=False):
        m = re.search(r"display_([\d.]+)mpp\.png$", p)
        if m:
            return np.array(Image.open(io.BytesIO(store.read_bytes(p))).convert("RGB")), float(m.group(1))
    return None


def _upsample(mask: np.ndarray, f: int) -> np.ndarray:
    return mask if f == 1 else np.repeat(np.repeat(mask, f, axis=0), f, axis=1)


def evaluate(annotation_uri: str, tumour: np.ndarray, tissue: np.ndarray, *, cell0: float, cell_um: float,
             mpp0: float, evaluation: dict) -> tuple[dict, np.ndarray]:
    """Metrics on the metric grid (default: 4 × finer than the cell grid; prediction and tissue
    brought to it by nearest neighbour, ground truth rasterised at its cell centres)."""
    f = max(1, int(round(cell_um / (evaluation.get("metric_mpp") or cell_um / 4))))
    ann = read_annotation(annotation_uri, tumour_classes=evaluation.get("tumour_classes"),
                          exclude_classes=evaluation.get("exclude_classes"), mpp0=mpp0,
                          mask_downsample=evaluation.get("mask_downsample"), mask_mpp=evaluation.get("mask_mpp"))
    pred, valid = _upsample(tumour, f), _upsample(tissue, f)
    truth = rasterise_annotation(ann, pred.shape, cell0 / f)
    m = segmentation_metrics(pred, truth, valid, cell_area_mm2=((cell_um / f) / 1000.0) ** 2)
    m["metric_mpp"] = cell_um / f
    return m, truth[::f, ::f] if f > 1 else truth


def write_outputs(store: OutputStore, entry: dict, res: str, *, tumour, tissue, maps, probs, class_names,
                  tumour_index, grid, cell_um, tiles_dir, evaluation: dict | None = None) -> dict:
    cell0 = cell_um / grid.mpp0
    tumour_name = class_names[tumour_index]
    out: dict = {}
    store.write_json(f"{res}/prediction.geojson", mask_to_geojson(tumour, cell0, tumour_name))
    with tempfile.TemporaryDirectory() as tmp:
        write_pyramidal_tiff((tumour * 255).astype(np.uint8), Path(tmp) / "mask.tiff", mpp=cell_um, nearest=True)
        prob = np.nan_to_num(probs[tumour_index], nan=0.0)
        write_pyramidal_tiff((prob * 255).round().astype(np.uint8), Path(tmp) / f"prob_{tumour_name}.tiff", mpp=cell_um)
        store.upload_dir(tmp, res)

    truth = None
    ev = evaluation or {}
    if entry.get("annotation_uri"):
        try:
            m, truth = evaluate(entry["annotation_uri"], tumour, tissue, cell0=cell0, cell_um=cell_um,
                                mpp0=grid.mpp0, evaluation=ev)
            store.write_json(f"{res}/metrics.json", m)
            out.update({k: m[k] for k in ("dice", "precision", "recall", "iou", "pred_area_mm2",
                                          "true_area_mm2", "metric_mpp")})
        except AnnotationError as e:   # only this slide's metrics are missing
            log.warning("%s", e)
            out["annotation_error"] = str(e)

    display = load_display(store, tiles_dir)
    if display is not None:
        thumb, thumb_mpp = display
        scale = cell_um / thumb_mpp
        inside = lambda m: np.where(tissue, m, np.nan)  # heat-maps only over tissue
        for i, name in enumerate(class_names):
            _png(store, f"{res}/heatmap_sim_{name}.png", similarity_heatmap(inside(maps[i]), thumb, cells_to_thumb=scale))
        _png(store, f"{res}/heatmap_prob_{tumour_name}.png",
             similarity_heatmap(inside(probs[tumour_index]), thumb, vmin=0.0, vmax=1.0, cells_to_thumb=scale))
        _png(store, f"{res}/overlay.png", overlay_png(thumb, tissue, tumour, truth, out.get("dice"),
                                                     cells_to_thumb=scale, title=entry["slide_id"]))
    return out


def _png(store: OutputStore, path: str, rgb: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=3)   # 3: most of 6's size, far faster
    store.write_bytes(path, buf.getvalue())
