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


def _window_sum(scattered: np.ndarray, k: int) -> np.ndarray:
    """out[..., i, j] = sum of scattered[..., i-k+1..i, j-k+1..j] (a backwards-looking k×k box)."""
    c = np.cumsum(np.cumsum(scattered, axis=-2), axis=-1)
    pad = [(0, 0)] * (c.ndim - 2) + [(k, 0), (k, 0)]
    c = np.pad(c, pad)
    return c[..., k:, k:] - c[..., :-k, k:] - c[..., k:, :-k] + c[..., :-k, :-k]


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
    sums = _window_sum(scattered, geom.k)
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


def resample_mask_to_grid(mask: np.ndarray, mask_mpp: float, shape: tuple[int, int],
                          cell_um: float) -> np.ndarray:
    """Nearest sample of a binary mask (at mask_mpp µm/px) at each cell centre of the grid."""
    h, w = shape
    ys = ((np.arange(h) + 0.5) * cell_um / mask_mpp).astype(np.int64)
    xs = ((np.arange(w) + 0.5) * cell_um / mask_mpp).astype(np.int64)
    inside_y = ys < mask.shape[0]
    inside_x = xs < mask.shape[1]
    out = np.zeros((h, w), dtype=bool)
    out[np.ix_(inside_y, inside_x)] = mask[np.ix_(ys[inside_y], xs[inside_x])] > 0
    return out
