"""Boundary-adaptive overlap (issue #7): encode overlapping tiles only where the decision can change.

Full overlap encodes every kept position of the stride grid ((patch/stride)² = 16 tiles per tile
area at 448/112). Overlap only changes the mask near contours and where the class decision is
close, so this mode encodes in passes:

1. `first_pass`: the kept positions of the non-overlapping grid (stride = patch), plus a few kept
   tiles for tissue that grid leaves uncovered (positions dropped for low tissue, the last rows).
2. `next_pass`: every kept, not yet encoded tile that
   - covers an undecided tissue cell (`undecided_cells`): one no encoded tile covers, one whose
     margin (best minus second-best overlap-averaged similarity) is below `margin`, or, with
     `disagreement`, one whose covering encoded tiles disagree on the argmax; or
   - straddles the current contour (holds two neighbouring tissue cells whose labels differ):
     overlap moves contours even where both sides are confident;
   dilated by `dilation` positions. With `coarse_first` (the default), pass 2 takes only those on
   the grid of every m/2 positions (m = patch // stride; pass 3 every m/4, …, down to every
   position; a finer grid when none is needed on the coarse one): the contour is first located
   with half-overlapping tiles, so the fully-overlapping tiles are spent on where it ends up, not
   on where the first pass put it. One coarse pass per level keeps the pass count low
   (benchmarks/RESULTS.md). An empty pass ends the loop (each pass adds tiles, so there are at
   most as many passes as kept positions).

Maps average, per cell, the tiles encoded (rasterise.average_maps): wherever every kept tile
covering a cell was encoded, its value is the paper's Eq. 4 exactly. With margin = inf every
tissue cell is undecided: every kept position covering a tissue cell is encoded, and the maps on
the tissue, and the mask, equal full overlap's. With a finite margin the mask is an approximation;
benchmarks/RESULTS.md measures it against full overlap.

Resume: a pass's selection depends only on the tiles of the earlier passes, so the state records the
pass each tile was encoded in (`AdaptiveState.passes`). A run cut short inside pass p restarts by
recomputing pass p's selection from passes < p and encoding only what is missing: the final state
is the one an uninterrupted run gives (a tile's scores do not depend on other tiles).

Pure numpy (+ OpenCV for the dilation); the pipeline supplies `encode_fn` (e.g. a Ray Data pass).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from .errors import ConfigError
from .rasterise import CellGeometry, average_maps, cell_geometry, grid_shape

# encode_fn(positions int64 (N, 2) of (grid_row, grid_col), pass number) -> scores (N, n_classes)
EncodeFn = Callable[[np.ndarray, int], np.ndarray]


def check_settings(margin: float, dilation: int) -> None:
    """Margin ≥ 0 (inf: refine everywhere = full overlap) and an integer dilation ≥ 0."""
    if not (isinstance(margin, (int, float)) and not math.isnan(margin) and margin >= 0):
        raise ConfigError(f"adaptive margin {margin!r}: must be a number ≥ 0 (inf refines everywhere, "
                          f"i.e. full overlap)")
    if isinstance(dilation, bool) or not isinstance(dilation, (int, np.integer)) or dilation < 0:
        raise ConfigError(f"adaptive dilation {dilation!r}: must be a whole number of tile positions ≥ 0")


def _bool_grid(a, name: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or (shape is not None and a.shape != tuple(shape)):
        raise ValueError(f"{name} must be a 2-D array{f' of shape {tuple(shape)}' if shape else ''}, "
                         f"got shape {a.shape}")
    return a.astype(bool, copy=False)


def first_pass(kept, patch_size: int, stride: int, tissue_cells=None) -> np.ndarray:
    """The kept positions of the non-overlapping grid (stride = patch): rows and columns that are
    multiples of patch // stride (when patch is not a multiple of stride the step rounds down, so
    the tiles leave no gap).

    A grid position dropped for low tissue leaves its cells uncovered; so does the grid's last
    row/column band. With `tissue_cells` (H, W), each such tissue cell that a kept tile covers gets
    one kept tile (greedy: the one covering the most still-uncovered tissue cells), so the margin
    decides there as elsewhere, instead of every tile covering it being encoded as undecided."""
    kept = _bool_grid(kept, "kept")
    m = max(1, int(patch_size) // int(stride))
    sel = np.zeros_like(kept)
    sel[::m, ::m] = True
    sel &= kept
    if tissue_cells is None:
        return sel
    geom = cell_geometry(patch_size, stride)
    need = _bool_grid(tissue_cells, "tissue_cells", grid_shape(*kept.shape, geom)).copy()
    k, s = geom.k, geom.s
    need &= _cover(kept, need.shape, geom) & ~_cover(sel, need.shape, geom)
    for i, j in zip(*np.nonzero(need)):          # row-major: fills gaps from the top-left
        if not need[i, j]:
            continue
        best = None                               # (cells it would cover, -row, -col): ties → top-left
        for r in range(max(0, -(-(i - k + 1) // s)), min(kept.shape[0] - 1, i // s) + 1):
            for c in range(max(0, -(-(j - k + 1) // s)), min(kept.shape[1] - 1, j // s) + 1):
                if kept[r, c]:
                    key = (int(need[r * s:r * s + k, c * s:c * s + k].sum()), -r, -c)
                    best = key if best is None or key > best else best
        r, c = -best[1], -best[2]
        sel[r, c] = True
        need[r * s:r * s + k, c * s:c * s + k] = False
    return sel


def _cover(positions: np.ndarray, shape: tuple[int, int], geom: CellGeometry) -> np.ndarray:
    """Cells (H, W) covered by the tiles at `positions` (R, C): each cell looks back k cells."""
    top_left = np.zeros(shape, np.int64)
    rows, cols = np.nonzero(positions)
    top_left[rows * geom.s, cols * geom.s] = 1
    c = np.pad(np.cumsum(np.cumsum(top_left, axis=0), axis=1), ((geom.k, 0), (geom.k, 0)))
    k = geom.k
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) > 0


def cell_maps(encoded, scores, patch_size: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Overlap-averaged class maps (C, H, W) over the encoded positions and the tile count per
    cell (rasterise.average_maps; NaN where no encoded tile covers a cell)."""
    encoded = _bool_grid(encoded, "encoded")
    geom = cell_geometry(patch_size, stride)
    rows, cols = np.nonzero(encoded)
    scores = _check_scores(scores, encoded.shape)
    return average_maps(rows, cols, scores[rows, cols], grid_shape(*encoded.shape, geom), geom)


def _check_scores(scores, shape: tuple[int, int]) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 3 or scores.shape[:2] != shape:
        raise ValueError(f"scores must be (R, C, n_classes) with (R, C) = {shape}, got {scores.shape}")
    return scores


def _analyse(encoded: np.ndarray, scores: np.ndarray, tissue: np.ndarray, geom: CellGeometry, margin: float,
             disagreement: bool) -> tuple[np.ndarray, np.ndarray]:
    """(undecided cells, labels with -1 where not covered or not tissue) of the encoded tiles."""
    if not encoded.any():
        return tissue.copy(), np.full(tissue.shape, -1)
    n_cls = scores.shape[2]
    rows, cols = np.nonzero(encoded)
    s = np.asarray(scores[rows, cols], dtype=np.float64)
    if not np.isfinite(s).all():
        raise ValueError("scores of encoded positions must be finite")
    # One rasterisation gives both the averaged scores and, per class, the fraction of covering
    # tiles whose own argmax is that class (all tiles agree ⇔ some fraction is 1).
    votes = np.eye(n_cls)[np.argmax(s, axis=1)]
    both, counts = average_maps(rows, cols, np.concatenate([s, votes], axis=1), tissue.shape, geom)
    covered = counts > 0
    maps = np.where(covered, both[:n_cls], 0.0)
    if math.isinf(margin):
        low = covered
    elif n_cls < 2:
        low = np.zeros_like(covered)
    else:
        top = np.sort(maps, axis=0)
        low = covered & ((top[-1] - top[-2]) < margin)
    undecided = ~covered | low
    if disagreement:
        undecided |= covered & (np.where(covered, both[n_cls:], 1.0).max(axis=0) < 1.0)
    labels = np.where(covered & tissue, np.argmax(maps, axis=0), -1)
    return tissue & undecided, labels


def undecided_cells(encoded, scores, tissue_cells, patch_size: int, stride: int, margin: float, *,
                    disagreement: bool = False) -> np.ndarray:
    """Tissue cells (H, W) that no encoded tile covers, or whose margin (best minus second-best
    averaged similarity) is below `margin` (every covered cell when margin is inf), or (with
    `disagreement`) whose covering encoded tiles disagree on the argmax."""
    encoded = _bool_grid(encoded, "encoded")
    geom = cell_geometry(patch_size, stride)
    tissue = _bool_grid(tissue_cells, "tissue_cells", grid_shape(*encoded.shape, geom))
    return _analyse(encoded, _check_scores(scores, encoded.shape), tissue, geom, margin, disagreement)[0]


def _positions_holding(cells: np.ndarray, n_rows: int, n_cols: int, geom: CellGeometry,
                       height: int, width: int) -> np.ndarray:
    """(R, C): whether the height × width cell box at each position's top-left holds a True cell."""
    sat = np.zeros((cells.shape[0] + 1, cells.shape[1] + 1), np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(cells, axis=0, dtype=np.int64), axis=1)
    r0, c0 = np.arange(n_rows) * geom.s, np.arange(n_cols) * geom.s
    r1, c1 = np.minimum(r0 + height, cells.shape[0]), np.minimum(c0 + width, cells.shape[1])
    box = sat[np.ix_(r1, c1)] - sat[np.ix_(r0, c1)] - sat[np.ix_(r1, c0)] + sat[np.ix_(r0, c0)]
    return box > 0


def _straddling(labels: np.ndarray, n_rows: int, n_cols: int, geom: CellGeometry) -> np.ndarray:
    """Positions whose tile holds both cells of a contour pair (4-neighbours with different labels):
    the tiles overlap adds across the contour. A pair (i, j)|(i, j+1) is held by the tiles whose
    k × (k-1) box from their top-left holds (i, j); likewise for vertical pairs."""
    k = geom.k
    right = np.zeros(labels.shape, bool)
    right[:, :-1] = (labels[:, :-1] >= 0) & (labels[:, 1:] >= 0) & (labels[:, :-1] != labels[:, 1:])
    down = np.zeros(labels.shape, bool)
    down[:-1] = (labels[:-1] >= 0) & (labels[1:] >= 0) & (labels[:-1] != labels[1:])
    return (_positions_holding(right, n_rows, n_cols, geom, k, k - 1)
            | _positions_holding(down, n_rows, n_cols, geom, k - 1, k))


def pass_step(pass_no: int, patch_size: int, stride: int, coarse_first: bool = True) -> int:
    """The position step of pass `pass_no` ≥ 2: m/2 for pass 2, m/4 for pass 3, …, then 1
    (m = patch // stride); always 1 without coarse_first."""
    m = max(1, int(patch_size) // int(stride))
    return max(1, (m // 2) >> max(0, pass_no - 2)) if coarse_first else 1


def _coarsest(need: np.ndarray, step: int) -> np.ndarray:
    """`need` restricted to the coarsest grid of every h positions (h = step, step/2, …, 1) holding any of it."""
    h = int(step)
    while h > 1:
        if need[::h, ::h].any():
            out = np.zeros_like(need)
            out[::h, ::h] = need[::h, ::h]
            return out
        h //= 2
    return need


def next_pass(kept, encoded, scores, tissue_cells, patch_size: int, stride: int, *,
              margin: float, dilation: int, disagreement: bool = False, step: int = 1) -> np.ndarray:
    """The positions (R, C) to encode next, kept and not yet encoded:
    - every tile covering an undecided cell (`undecided_cells`), and
    - every tile straddling the current contour (it holds two 4-neighbour tissue cells whose labels
      differ): overlap moves contours even where both sides are confident;
    then dilated by `dilation` positions (a (2d+1)² square on the position grid; for the undecided
    cells that equals growing them by d strides). With `step` > 1 (`pass_step`), only those on the
    grid of every `step` positions, or if none is there, every step/2, …. Empty when nothing is
    left at all: the loop ends."""
    check_settings(margin, dilation)
    kept = _bool_grid(kept, "kept")
    encoded = _bool_grid(encoded, "encoded", kept.shape)
    geom = cell_geometry(patch_size, stride)
    tissue = _bool_grid(tissue_cells, "tissue_cells", grid_shape(*kept.shape, geom))
    undecided, labels = _analyse(encoded, _check_scores(scores, kept.shape), tissue, geom, margin, disagreement)
    need = (_positions_holding(undecided, *kept.shape, geom, geom.k, geom.k)
            | _straddling(labels, *kept.shape, geom))
    if dilation and need.any():
        size = 2 * int(dilation) + 1
        need = cv2.dilate(need.astype(np.uint8), np.ones((size, size), np.uint8)).astype(bool)
    need &= kept & ~encoded
    return _coarsest(need, step)


@dataclass
class AdaptiveState:
    """What a run has encoded: `passes` int16 (R, C), 0 = not encoded, p = encoded in pass p (1 is
    the first pass); `scores` float64 (R, C, n_classes), NaN where not encoded. Persist both (e.g.
    a pass column beside each tile's scores) to resume; `from_records` rebuilds it."""
    passes: np.ndarray
    scores: np.ndarray

    @property
    def encoded(self) -> np.ndarray:
        return self.passes > 0

    @property
    def n_encoded(self) -> int:
        return int(np.count_nonzero(self.passes))

    @property
    def n_passes(self) -> int:
        return int(self.passes.max(initial=0))

    @property
    def pass_counts(self) -> list[int]:
        """Tiles encoded in each pass, pass 1 first."""
        return np.bincount(self.passes.ravel(), minlength=self.n_passes + 1)[1:].tolist()

    def records(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(grid_rows, grid_cols, passes, scores (N, n_classes)) of the encoded positions, row-major."""
        rows, cols = np.nonzero(self.passes)
        return rows, cols, self.passes[rows, cols], self.scores[rows, cols]

    @classmethod
    def from_records(cls, n_rows: int, n_cols: int, grid_rows, grid_cols, passes, scores) -> "AdaptiveState":
        """Rebuild a (possibly partial) state from stored rows, e.g. after a crash."""
        rows, cols = np.asarray(grid_rows, np.int64), np.asarray(grid_cols, np.int64)
        passes, scores = np.asarray(passes), np.asarray(scores, np.float64)
        scores = scores.reshape(len(scores), -1) if scores.size else np.zeros((len(rows), 0))
        if not (len(rows) == len(cols) == len(passes) == len(scores)):
            raise ValueError("grid_rows, grid_cols, passes and scores must have one entry per tile")
        if len(rows) and (rows.min() < 0 or cols.min() < 0 or rows.max() >= n_rows or cols.max() >= n_cols
                          or passes.min() < 1):
            raise ValueError("a stored tile lies outside the grid or has a pass number < 1")
        state = cls(np.zeros((n_rows, n_cols), np.int16), np.full((n_rows, n_cols, scores.shape[1]), np.nan))
        state.passes[rows, cols] = passes
        state.scores[rows, cols] = scores
        return state


def _encode(state: AdaptiveState | None, todo: np.ndarray, p: int, encode_fn: EncodeFn) -> AdaptiveState:
    rows, cols = np.nonzero(todo)
    out = np.asarray(encode_fn(np.stack([rows, cols], axis=1).astype(np.int64), p), dtype=np.float64)
    if out.ndim != 2 or len(out) != len(rows) or not np.isfinite(out).all():
        raise ValueError(f"encode_fn must return finite scores (N, n_classes) for its N = {len(rows)} "
                         f"positions, got shape {out.shape}")
    if state is None or state.n_encoded == 0:
        state = AdaptiveState(np.zeros(todo.shape, np.int16), np.full((*todo.shape, out.shape[1]), np.nan))
    elif out.shape[1] != state.scores.shape[2]:
        raise ValueError(f"encode_fn returned {out.shape[1]} classes, the state holds {state.scores.shape[2]}")
    state.passes[rows, cols] = p
    state.scores[rows, cols] = out
    return state


def run_adaptive(kept, tissue_cells, encode_fn: EncodeFn, patch_size: int, stride: int, *,
                 margin: float, dilation: int, disagreement: bool = False, coarse_first: bool = True,
                 state: AdaptiveState | None = None, max_passes: int | None = None) -> AdaptiveState:
    """Encode passes until none is needed (or `max_passes` passes exist); return the state.

    encode_fn(positions int64 (N, 2) of (grid_row, grid_col), pass number) returns the class
    scores (N, n_classes) of those tiles; it is called once per non-empty pass. `state`, from a
    run that stopped (even inside a pass), is continued: its last pass is completed, then the loop
    goes on, to the state an uninterrupted run reaches. Raises ConfigError when the state's last pass
    holds tiles these settings would not select (it was made with another margin, dilation,
    disagreement, coarse_first, tissue or kept set; a mismatch that selects a superset goes unnoticed)."""
    check_settings(margin, dilation)
    kept = _bool_grid(kept, "kept")
    geom = cell_geometry(patch_size, stride)
    _bool_grid(tissue_cells, "tissue_cells", grid_shape(*kept.shape, geom))
    if max_passes is not None and max_passes < 1:
        raise ConfigError(f"adaptive max_passes {max_passes!r}: must be ≥ 1 (or unset)")

    def select(p: int, before: np.ndarray) -> np.ndarray:   # pass p's selection, from passes < p
        if p == 1:
            return first_pass(kept, patch_size, stride, tissue_cells)
        return next_pass(kept, before, state.scores, tissue_cells, patch_size, stride,
                         margin=margin, dilation=dilation, disagreement=disagreement,
                         step=pass_step(p, patch_size, stride, coarse_first))

    if state is None or state.n_encoded == 0:
        state, p = None, 1
        todo = first_pass(kept, patch_size, stride, tissue_cells)
    else:
        if state.passes.shape != kept.shape or state.scores.shape[:2] != kept.shape:
            raise ValueError(f"state is for a {state.passes.shape} grid, kept is {kept.shape}")
        state = AdaptiveState(state.passes.copy(), state.scores.copy())
        p = state.n_passes
        sel = select(p, (state.passes > 0) & (state.passes < p))
        done = state.passes == p
        if (state.encoded & ~kept).any() or (done & ~sel).any():
            raise ConfigError(f"adaptive resume: the stored tiles of pass {p} are not what these settings "
                              f"select (margin={margin}, dilation={dilation}, disagreement={disagreement}, "
                              f"coarse_first={coarse_first}); "
                              f"re-run with the settings that made them, or delete the slide's stored tiles "
                              f"to start over")
        todo = sel & ~done
    while True:
        if todo.any():
            state = _encode(state, todo, p, encode_fn)
        if state is None:   # an empty first pass: no kept tile covers tissue
            state = AdaptiveState(np.zeros(kept.shape, np.int16), np.zeros((*kept.shape, 0)))
        if max_passes is not None and p >= max_passes:
            break
        todo = select(p + 1, state.encoded)
        if not todo.any():
            break
        p += 1
    return state
