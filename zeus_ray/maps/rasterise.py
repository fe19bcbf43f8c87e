"""Overlap-averaged class maps on the cell grid (pure numpy).

The stride grid is split into cells of `gcd(patch, stride)` target px, so every tile covers exactly
k × k cells (k = patch / cell) and neighbouring tiles are s = stride / cell cells apart; with 448/112
that is 4 × 4 cells and a step of 1. Each cell's score is the mean over the tiles covering it, which
is the paper's pixel-wise average (Eq. 4) evaluated once per cell instead of per pixel: every pixel
of a cell is covered by the same set of tiles, so the argmax is identical.

Summation uses an integral image: scatter each tile's scores at its top-left cell, take 2-D
cumulative sums, and difference them over k × k windows. O(cells) and exact in float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import gcd

import numpy as np


@dataclass(frozen=True)
class CellGeometry:
    cell: int   # cell side, px at the target resolution
    k: int      # cells per tile side
    s: int      # cells per stride


def cell_geometry(patch_size: int, stride: int) -> CellGeometry:
    cell = gcd(int(patch_size), int(stride))
    return CellGeometry(cell=cell, k=patch_size // cell, s=stride // cell)


def grid_shape(n_rows: int, n_cols: int, geom: CellGeometry) -> tuple[int, int]:
    """Cells covered by an n_rows × n_cols grid of tile positions."""
    return (max(n_rows - 1, 0) * geom.s + geom.k, max(n_cols - 1, 0) * geom.s + geom.k)


def integral(a: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Summed-area table over the last two axes with a leading zero row and column:
    sat[..., i, j] = a[..., :i, :j].sum(). The one box-sum helper of the project."""
    a = np.asarray(a)
    sat = np.zeros(a.shape[:-2] + (a.shape[-2] + 1, a.shape[-1] + 1), dtype)
    np.cumsum(np.cumsum(a, axis=-2, dtype=dtype), axis=-1, out=sat[..., 1:, 1:])
    return sat


def box_sums(sat: np.ndarray, r0, r1, c0, c1) -> np.ndarray:
    """Sums of the boxes [r0, r1) × [c0, c1) for every (row box, column box) pair: 1-D row bounds
    r0, r1 and column bounds c0, c1 give a (len(r0), len(c0)) grid (over the last two axes)."""
    r0, r1 = np.asarray(r0)[:, None], np.asarray(r1)[:, None]
    c0, c1 = np.asarray(c0)[None, :], np.asarray(c1)[None, :]
    return sat[..., r1, c1] - sat[..., r0, c1] - sat[..., r1, c0] + sat[..., r0, c0]


def window_sum(a: np.ndarray, k: int) -> np.ndarray:
    """out[..., i, j] = sum of a[..., i-k+1..i, j-k+1..j] (a backwards-looking k × k box)."""
    h, w = a.shape[-2:]
    # k more zero rows/columns in front: q[m + k] = sat[m] and q[< k] = 0, so slices do the clipping.
    q = np.pad(integral(a), [(0, 0)] * (a.ndim - 2) + [(k, 0), (k, 0)])
    return q[..., k + 1:, k + 1:] - q[..., 1:h + 1, k + 1:] - q[..., k + 1:, 1:w + 1] + q[..., 1:h + 1, 1:w + 1]


def average_maps(grid_rows: np.ndarray, grid_cols: np.ndarray, scores: np.ndarray,
                 shape: tuple[int, int], geom: CellGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Per-class mean score of the tiles covering each cell.

    scores: (N, C) per-tile class similarities; shape: the cell grid (H, W).
    Returns maps (C, H, W) float32 (NaN where no tile covers a cell) and counts (H, W) int32.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or len(scores) != len(grid_rows) or len(grid_rows) != len(grid_cols):
        raise ValueError("scores must be (N, C) with one row per tile position")
    h, w = shape
    r = np.asarray(grid_rows, dtype=np.int64) * geom.s
    c = np.asarray(grid_cols, dtype=np.int64) * geom.s
    if len(r) and (r.min() < 0 or c.min() < 0 or r.max() + geom.k > h or c.max() + geom.k > w):
        raise ValueError("a tile lies outside the cell grid")
    n_cls = scores.shape[1]
    scattered = np.zeros((n_cls + 1, h, w), dtype=np.float64)
    flat = r * w + c
    # Tile positions are unique, so a plain fancy-index add is exact (no np.add.at needed).
    if len(np.unique(flat)) != len(flat):
        raise ValueError("duplicate tile positions")
    scattered[:n_cls].reshape(n_cls, -1)[:, flat] = scores.T
    scattered[n_cls].reshape(-1)[flat] = 1.0
    sums = window_sum(scattered, geom.k)
    counts = np.rint(sums[n_cls]).astype(np.int32)
    with np.errstate(invalid="ignore", divide="ignore"):
        maps = (sums[:n_cls] / counts).astype(np.float32)
    maps[:, counts == 0] = np.nan
    return maps, counts


def argmax_mask(maps: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Class index per cell (int16), -1 where no tile covers the cell or outside `valid`."""
    covered = ~np.isnan(maps).any(axis=0)
    labels = np.where(covered, np.nanargmax(np.where(covered, maps, 0.0), axis=0), -1).astype(np.int16)
    if valid is not None:
        labels[~valid.astype(bool)] = -1
    return labels


def softmax_maps(maps: np.ndarray, logit_scale: float) -> np.ndarray:
    """Class probabilities per cell from averaged cosines and the model's logit scale."""
    z = maps.astype(np.float64) * logit_scale
    covered = ~np.isnan(z).any(axis=0)
    z -= np.where(covered, np.max(np.where(covered, z, 0.0), axis=0), 0.0)  # NaN stays NaN
    e = np.exp(z)
    return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)


def resample_nearest(arr: np.ndarray, src_px, shape: tuple[int, int], dst_px, fill=0, offset=0.0) -> np.ndarray:
    """Nearest sample of a grid `arr` (pixels `src_px` wide) at the pixel centres of a grid of
    `shape` (pixels `dst_px` wide): both in the same unit, both starting at 0 unless `offset`
    (where the destination grid starts in the source grid's frame, e.g. a tile grid anchored at
    the tissue); a size or offset may be a (y, x) pair. Pixels whose centre falls outside `arr`
    get `fill`. The one nearest resampler of the project (masks to cells, cells to previews and
    viewer rasters, mask annotations to cells)."""
    a = np.asarray(arr)
    sy, sx = (src_px, src_px) if np.ndim(src_px) == 0 else src_px
    dy, dx = (dst_px, dst_px) if np.ndim(dst_px) == 0 else dst_px
    oy, ox = (offset, offset) if np.ndim(offset) == 0 else offset
    h, w = int(shape[0]), int(shape[1])
    ri = np.floor((oy + (np.arange(h) + 0.5) * dy) / sy).astype(np.int64)
    ci = np.floor((ox + (np.arange(w) + 0.5) * dx) / sx).astype(np.int64)
    out = np.full((h, w) + a.shape[2:], fill, dtype=a.dtype)
    if oy == 0 and ox == 0:
        nr, nc = int((ri < a.shape[0]).sum()), int((ci < a.shape[1]).sum())   # indices grow: a prefix is inside
        out[:nr, :nc] = a.take(ri[:nr], axis=0).take(ci[:nc], axis=1)          # two takes: far faster than np.ix_
        return out
    rok = np.flatnonzero((ri >= 0) & (ri < a.shape[0]))     # indices grow: a contiguous run is inside
    cok = np.flatnonzero((ci >= 0) & (ci < a.shape[1]))
    if len(rok) and len(cok):
        out[rok[0]:rok[-1] + 1, cok[0]:cok[-1] + 1] = a.take(ri[rok], axis=0).take(ci[cok], axis=1)
    return out


def resample_mask_to_grid(mask: np.ndarray, mask_mpp: float, shape: tuple[int, int],
                          cell_um: float, origin_um=(0.0, 0.0)) -> np.ndarray:
    """Nearest sample of a binary mask (at mask_mpp µm/px, from the slide's top-left) at each cell
    centre of the grid, whose (x, y) origin is `origin_um` µm from the slide's top-left."""
    return resample_nearest(np.asarray(mask) > 0, mask_mpp, shape, cell_um, False,
                            offset=(origin_um[1], origin_um[0]))
