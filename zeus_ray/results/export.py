"""Per-slide outputs from a cell-grid mask: QuPath GeoJSON, pyramidal TIFF, heat-map and overlay images.

Cell (i, j) of a grid with `cell0` level-0 px per cell covers level-0 [j*cell0, (j+1)*cell0) ×
[i*cell0, (i+1)*cell0), shifted by `origin`. Images are RGB uint8 (OpenCV is only used for drawing,
so colours are given in RGB order).
"""
from __future__ import annotations

import io
import logging
import math
import os

import cv2
import fsspec
import numpy as np
import shapely
import shapely.affinity
from shapely.geometry import Polygon, mapping
from shapely.geometry.base import BaseGeometry

from ..truth.annotations import rasterise_geometry
from ..maps.rasterise import resample_nearest

log = logging.getLogger(__name__)

# Colours of the overlay (RGB): ground truth green and prediction blue as in the paper's Figure 2.
TISSUE_RGB = (90, 90, 90)
PRED_RGB = (0, 70, 255)
TRUTH_RGB = (0, 190, 0)


def _cut_corners(ring: np.ndarray) -> np.ndarray:
    """Replace every vertex V of an axis-aligned ring by V - d_in/2 and V + d_out/2 (unit directions):
    the polygon through the midpoints of the cell edges, with each corner cut at 45°."""
    d_in = ring - np.roll(ring, 1, axis=0)
    d_out = np.roll(ring, -1, axis=0) - ring
    d_in /= np.linalg.norm(d_in, axis=1, keepdims=True)
    d_out /= np.linalg.norm(d_out, axis=1, keepdims=True)
    return np.stack([ring - 0.5 * d_in, ring + 0.5 * d_out], axis=1).reshape(-1, 2)


def mask_to_geometry(mask: np.ndarray, cell0: float = 1.0, origin=(0.0, 0.0),
                     simplify_tolerance_cells: float = 0.0, smooth: bool = False) -> BaseGeometry:
    """The True cells of `mask` as a (Multi)Polygon with holes, in level-0 px (cell units × cell0 + origin).

    Edges: cv2.findContours traces pixel centres, not edges. Upsampling the mask ×2 (nearest) makes
    every boundary sub-pixel the first (even index 2j) or last (odd, 2j+1) sub-pixel of its cell on
    that side, so ceil(s / 2) maps the traced sub-pixels exactly onto cell corners (j or j+1); the
    8-connected diagonal steps cv2 takes at inner corners collapse onto the corner they cut. Shells
    and holes come from the RETR_CCOMP hierarchy.

    smooth=False: the boundary follows cell edges (area = cells exactly); every cell centre is 0.5 cell
    from it. smooth=True: corners are cut at 45° through the edge midpoints (area = cells minus 1/2
    cell per shell plus 1/2 per hole); every centre stays >= sqrt(2)/4 = 0.354 cell from it, and a
    staircase becomes a straight line that simplification can collapse.

    Simplification (Douglas-Peucker, preserve_topology) moves the boundary by about the tolerance,
    so a tolerance below that margin (0.5 cell, or 0.354 with smooth) should let no cell centre change
    side. The result is verified by rasterising it at cell centres; when it differs from `mask` the
    tolerance is halved (down to no simplification), so the returned outline always rasterises
    back to exactly `mask`.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    if not m.any():
        return Polygon()
    pad = 2  # even, so sub-pixel parity is unchanged
    up = np.pad(np.repeat(np.repeat(m.view(np.uint8), 2, axis=0), 2, axis=1), pad)
    contours, hier = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    rings = []
    for c in contours:
        r = ((c[:, 0, :] - pad + 1) // 2).astype(np.float64)
        r = r[np.any(r != np.roll(r, 1, axis=0), axis=1)]  # drop the collapsed diagonal steps
        rings.append(_cut_corners(r) if smooth else r)
    hier = hier[0]
    polys = []
    for i, (_, _, child, parent) in enumerate(hier):
        if parent != -1:
            continue
        holes = []
        while child != -1:
            holes.append(rings[child])
            child = hier[child][0]
        p = Polygon(rings[i], holes)
        polys.append(p if p.is_valid else shapely.make_valid(p))  # rings touching at a corner
    geom = shapely.union_all(polys)
    geom = shapely.union_all([g for g in shapely.get_parts(geom) if g.geom_type in ("Polygon", "MultiPolygon")])
    tol = float(simplify_tolerance_cells)
    while tol > 0.02:
        simple = geom.simplify(tol, preserve_topology=True)
        # Checked, not assumed: GEOS's topology-preserving simplifier can move a ring's start vertex
        # by more than the tolerance, which could flip a cell centre.
        if simple.is_valid and np.array_equal(rasterise_geometry(simple, m.shape, 1.0), m):
            geom = simple
            break
        log.debug("simplification by %.3g cell changed the raster; retrying with half", tol)
        tol /= 2
    return shapely.affinity.affine_transform(geom, [cell0, 0, 0, cell0, origin[0], origin[1]])


def mask_to_geojson(mask: np.ndarray, cell0: float, class_name: str, origin=(0.0, 0.0),
                    simplify_tolerance_cells: float = 0.3, smooth: bool = True, color=(200, 0, 0),
                    decimals: int = 3) -> dict:
    """A QuPath-importable GeoJSON FeatureCollection of the mask's polygons in level-0 px.

    One Feature per polygon (holes included) with `properties.objectType = "annotation"` and
    `classification = {name, color}` (QuPath >= 0.3 layout). By default corners are cut through the
    cell-edge midpoints and the outline simplified with 0.3 cell, which keeps the cell-centre raster
    identical to `mask` (see mask_to_geometry; smooth=False with a tolerance < 0.5 gives blocky
    cell-edge outlines with the exact cell area). Coordinates are rounded to `decimals`; rings are
    oriented exterior counter-clockwise, holes clockwise (RFC 7946).
    """
    geom = mask_to_geometry(mask, cell0, origin, simplify_tolerance_cells, smooth)
    geom = shapely.orient_polygons(geom, exterior_cw=False)
    feats = []
    for poly in shapely.get_parts(geom):
        if poly.is_empty:
            continue
        rings = mapping(poly)["coordinates"]
        feats.append({"type": "Feature",
                      "geometry": {"type": "Polygon", "coordinates": [[[round(x, decimals), round(y, decimals)]
                                                                       for x, y in r] for r in rings]},
                      "properties": {"objectType": "annotation", "isLocked": False,
                                     "classification": {"name": class_name, "color": [int(c) for c in color]}}})
    return {"type": "FeatureCollection", "features": feats}


def _write_bytes(data: bytes, path) -> str:
    path = os.fspath(path)
    fs, p = fsspec.core.url_to_fs(path)
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(p, "wb") as f:
        f.write(data)
    return path


def write_pyramidal_tiff(mask_or_prob: np.ndarray, path, mpp: float, tile: int = 256,
                         nearest: bool = False) -> list[tuple[int, int]]:
    """A tiled, zlib-compressed pyramidal TIFF (one page per level, each half the previous size until
    a level fits in one tile) with XResolution/YResolution in px/cm (ResolutionUnit = centimetre)
    set from `mpp` µm/px at level 0 and scaled per level.

    mask_or_prob: uint8 (H, W) or (H, W, 3); bool is written as 0/255. Levels are downsampled with
    area averaging (a mask's edges turn grey at coarse levels), or nearest for label images.
    Returns the (height, width) of every level. OpenSlide opens it as a generic tiled TIFF.
    """
    import tifffile
    a = np.asarray(mask_or_prob)
    a = a.astype(np.uint8) * 255 if a.dtype == bool else a
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3) or 0 in a.shape:
        raise ValueError(f"expected a non-empty uint8 (H, W) or (H, W, 3) array, got {a.dtype} {a.shape}")
    if tile % 16 or tile <= 0:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    buf = io.BytesIO()
    h0, w0 = a.shape[:2]
    shapes = []
    with tifffile.TiffWriter(buf, bigtiff=a.nbytes > 2**31) as tw:
        level = a
        while True:
            ds = w0 / level.shape[1]
            res = 1e4 / (mpp * ds)  # px per cm
            tw.write(level, tile=(tile, tile), compression="zlib", photometric="rgb" if a.ndim == 3 else "minisblack",
                     resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=1 if shapes else 0,
                     metadata=None, software="zeus_ray")
            shapes.append(level.shape[:2])
            if max(level.shape[:2]) <= tile:
                break
            size = (max(1, math.ceil(level.shape[1] / 2)), max(1, math.ceil(level.shape[0] / 2)))
            level = cv2.resize(level, size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)
    _write_bytes(buf.getvalue(), path)
    return shapes


def _to_thumb(arr: np.ndarray, thumb_hw, cells_to_thumb: float | None, fill):
    """Nearest-sample a grid array at thumbnail pixel centres. cells_to_thumb = thumbnail px per
    cell; None stretches the grid over the thumbnail (both cover the same extent)."""
    a = np.asarray(arr)
    h, w = thumb_hw
    if a.shape[:2] == (h, w):
        return a
    cell = (h / a.shape[0], w / a.shape[1]) if cells_to_thumb is None else cells_to_thumb
    return resample_nearest(a, cell, (h, w), 1.0, fill)


def _text(img, text, org, scale, color=(0, 0, 0), box=True):
    font, thick = cv2.FONT_HERSHEY_SIMPLEX, max(1, round(scale * 2))
    (tw, th), base = cv2.getTextSize(text, font, scale, thick)
    x, y = org
    if box:
        cv2.rectangle(img, (x - 3, y - th - 3), (x + tw + 3, y + base + 1), (255, 255, 255), -1)
    cv2.putText(img, text, (x, y), font, scale, color, thick, cv2.LINE_AA)
    return th + base + 6


def similarity_heatmap(values: np.ndarray, thumb_rgb: np.ndarray, *, vmin: float | None = None,
                       vmax: float | None = None, alpha: float = 0.6, colormap: int = cv2.COLORMAP_JET,
                       cells_to_thumb: float | None = None, legend: bool = True) -> np.ndarray:
    """A class map (similarity or probability, NaN outside tissue) coloured with an OpenCV colormap
    and blended over the thumbnail; NaN cells leave the thumbnail untouched. vmin/vmax default to
    the map's finite min/max (pass 0 and 1 for probabilities). A small colour bar with the range
    is drawn in the bottom-right corner when `legend` and the image is large enough."""
    thumb = np.ascontiguousarray(thumb_rgb[..., :3], dtype=np.uint8)
    grid = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(grid)
    if not finite.any():
        return thumb.copy()
    lo = float(np.min(grid[finite])) if vmin is None else float(vmin)
    hi = float(np.max(grid[finite])) if vmax is None else float(vmax)
    span = hi - lo if hi > lo else 1e-12
    # Colour the (small) grid first, then sample it at thumbnail pixels, then blend with OpenCV:
    # per-pixel float arithmetic on a whole thumbnail was the slowest step of a slide's reduce.
    idx = np.clip((np.nan_to_num(grid, nan=lo) - lo) / span * 255.0, 0, 255).astype(np.uint8)
    colour = np.ascontiguousarray(cv2.applyColorMap(idx, colormap)[..., ::-1])  # BGR → RGB
    colour = _to_thumb(colour, thumb.shape[:2], cells_to_thumb, 0)
    ok = _to_thumb(finite, thumb.shape[:2], cells_to_thumb, False)
    blend = cv2.addWeighted(thumb, 1 - alpha, np.ascontiguousarray(colour), alpha, 0)
    out = np.where(ok[..., None], blend, thumb)
    h, w = out.shape[:2]
    bw, bh = min(160, w // 3), 10
    if legend and bw >= 48 and h >= 60:
        bar = cv2.applyColorMap(np.tile(np.linspace(0, 255, bw).astype(np.uint8), (bh, 1)), colormap)[..., ::-1]
        x0, y0 = w - bw - 8, h - bh - 22
        cv2.rectangle(out, (x0 - 4, y0 - 4), (x0 + bw + 4, h - 2), (255, 255, 255), -1)
        out[y0:y0 + bh, x0:x0 + bw] = bar
        _text(out, f"{lo:.3g}", (x0, h - 7), 0.35, box=False)
        t = f"{hi:.3g}"
        tw = cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, 0.35, 1)[0][0]
        _text(out, t, (x0 + bw - tw, h - 7), 0.35, box=False)
    return out


def overlay_png(thumb_rgb: np.ndarray, tissue: np.ndarray | None, pred: np.ndarray | None,
                truth: np.ndarray | None, dice: float | None, *, cells_to_thumb: float | None = None,
                thickness: int = 2, pred_fill_alpha: float = 0.25, title: str | None = None) -> np.ndarray:
    """The thumbnail with tissue (grey), prediction (blue, lightly filled) and ground-truth (green)
    contours, the Dice in the top-left corner and a legend below it, as in the paper's Figure 2.

    Masks of the thumbnail's shape are used as they are; others (the cell grid) are sampled at
    thumbnail pixel centres with `cells_to_thumb` thumbnail px per cell (None: stretched)."""
    out = np.ascontiguousarray(thumb_rgb[..., :3], dtype=np.uint8).copy()
    hw = out.shape[:2]
    layers = []
    for m, colour, th in ((tissue, TISSUE_RGB, 1), (pred, PRED_RGB, thickness), (truth, TRUTH_RGB, thickness)):
        if m is not None:
            layers.append((_to_thumb(np.asarray(m, dtype=bool), hw, cells_to_thumb, False), colour, th))
    if pred is not None and pred_fill_alpha > 0:
        p = layers[1 if tissue is not None else 0][0]
        # Blend the whole picture and copy it in under the prediction, both in OpenCV: masked
        # arithmetic in numpy took most of a small slide's overlay time.
        tint = np.empty_like(out)
        tint[:] = PRED_RGB
        cv2.copyTo(cv2.addWeighted(out, 1 - pred_fill_alpha, tint, pred_fill_alpha, 0),
                   np.ascontiguousarray(p).view(np.uint8), out)
    for m, colour, th in layers:
        contours, _ = cv2.findContours(m.view(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, th, cv2.LINE_AA)
    scale = float(np.clip(min(hw) / 700, 0.4, 1.2))
    y = 8 + int(22 * scale)
    label = "Dice n/a" if dice is None or math.isnan(dice) else f"Dice {dice:.3f}"
    y += _text(out, f"{title}  {label}" if title else label, (8, y), scale)
    for name, colour, present in (("tissue", TISSUE_RGB, tissue is not None),
                                  ("prediction", PRED_RGB, pred is not None),
                                  ("ground truth", TRUTH_RGB, truth is not None)):
        if present:
            y += _text(out, name, (8, y), scale * 0.7, color=colour)
    return out
