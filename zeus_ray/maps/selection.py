"""Which tiles each pass encodes (pure numpy): the selection behind every `zeus run`.

`PassState` is one slide's record of what is encoded (the pass of each tile and its class scores);
`PassState.select()` names the next pass's tiles, `PassState.add()` takes their scores. The pass
engine (zeus_ray/engine/) drives it for every slide, and benchmarks/bench_adaptive.py drives the
same two calls with stored scores, so the figures that chose the defaults come from this code.

- `tiling.mode: full` (the paper): one pass, every kept position of the stride grid
  ((patch/stride)² = 16 tiles per tile area at 448/112).
- `tiling.mode: adaptive`: overlap only changes the mask near contours and where the class decision
  is close, so tiles are encoded in passes:
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
     with half-overlapping tiles, so the fully-overlapping tiles are spent on where it ends up.
     An empty pass ends the loop (each pass adds tiles, so it ends).

Maps average, per cell, the tiles encoded (rasterise.average_maps): wherever every kept tile
covering a cell was encoded, its value is the paper's Eq. 4 exactly. With margin = inf every
tissue cell is undecided: every kept position covering a tissue cell is encoded, and the maps on
the tissue, and the mask, equal full overlap's. With a finite margin the mask is an approximation;
benchmarks/RESULTS.md measures it against full overlap.

Resume: a pass's selection depends only on the tiles of the earlier passes, so the state records the
pass each tile was encoded in. A run cut short inside pass p restarts by recomputing pass p's
selection from passes < p and encoding only what is missing: the final state is the one an
uninterrupted run gives (a tile's scores do not depend on other tiles). New prompts start from every
stored tile and encode only what their scores newly select.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import ConfigError
from .rasterise import CellGeometry, average_maps, box_sums, cell_geometry, grid_shape, integral, window_sum


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
    return window_sum(top_left, geom.k) > 0


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
    r0, c0 = np.arange(n_rows) * geom.s, np.arange(n_cols) * geom.s
    r1, c1 = np.minimum(r0 + height, cells.shape[0]), np.minimum(c0 + width, cells.shape[1])
    return box_sums(integral(cells, np.int64), r0, r1, c0, c1) > 0


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


@dataclass(frozen=True)
class Selection:
    """The settings that decide which tiles are encoded (all are part of the tiling key)."""
    mode: str = "full"                  # "full" or "adaptive"
    patch_size: int = 448
    stride: int = 112
    margin: float = 0.0
    dilation: int = 0
    disagreement: bool = False
    coarse_first: bool = True

    @classmethod
    def from_tiling(cls, t) -> "Selection":
        """From a config.TilingConfig."""
        return cls(t.mode, t.patch_size, t.stride, t.adaptive_margin, t.adaptive_dilation,
                   t.adaptive_disagreement, t.adaptive_coarse_first)


class PassState:
    """One slide's encoded tiles: `passes` int16 (R, C), 0 = not encoded, p = encoded in pass p;
    `scores` float64 (R, C, n_classes), NaN where not encoded (adaptive mode only: full overlap
    needs no scores to select)."""

    def __init__(self, kept, tissue_cells, sel: Selection, n_classes: int):
        self.kept = _bool_grid(kept, "kept")
        self.sel = sel
        if sel.mode not in ("full", "adaptive"):
            raise ConfigError(f"tiling.mode={sel.mode!r}: use full or adaptive")
        if sel.mode == "adaptive":
            check_settings(sel.margin, sel.dilation)
            shape = grid_shape(*self.kept.shape, cell_geometry(sel.patch_size, sel.stride))
            self.tissue = _bool_grid(tissue_cells, "tissue_cells", shape)
        self.passes = np.zeros(self.kept.shape, np.int16)
        self.scores = np.full((*self.kept.shape, n_classes), np.nan)

    @property
    def encoded(self) -> np.ndarray:
        return self.passes > 0

    @property
    def n_encoded(self) -> int:
        return int(np.count_nonzero(self.passes))

    @property
    def n_passes(self) -> int:
        return int(self.passes.max(initial=0))

    def add(self, rows, cols, pass_no, scores=None) -> None:
        """Record tiles (grid rows, cols) as encoded in pass `pass_no` (one for all, or one each),
        with their class scores (N, n_classes) when selection needs them."""
        rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        if len(rows) and not self.kept[rows, cols].all():
            raise ValueError("a stored tile is not a kept position of this slide's grid")
        self.passes[rows, cols] = pass_no
        if scores is not None:
            self.scores[rows, cols] = np.asarray(scores, np.float64).reshape(len(rows), -1)

    def _pass(self, p: int, before: np.ndarray) -> np.ndarray:
        """Pass p's full selection, from the tiles encoded in `before` (passes < p)."""
        s = self.sel
        if p == 1:
            return self.kept.copy() if s.mode == "full" else first_pass(self.kept, s.patch_size, s.stride,
                                                                          self.tissue)
        if s.mode == "full":
            return np.zeros_like(self.kept)
        return next_pass(self.kept, before, self.scores, self.tissue, s.patch_size, s.stride, margin=s.margin,
                         dilation=s.dilation, disagreement=s.disagreement,
                         step=pass_step(p, s.patch_size, s.stride, s.coarse_first))

    def select(self) -> tuple[int, np.ndarray]:
        """(pass number, positions (R, C) to encode in it); an empty selection means converged.
        The last stored pass is completed first (resume, or new prompts that select more there)."""
        p = self.n_passes
        if p == 0:
            return 1, self._pass(1, self.encoded)
        todo = self._pass(p, (self.passes > 0) & (self.passes < p)) & ~self.encoded
        if todo.any():
            return p, todo
        return p + 1, self._pass(p + 1, self.encoded) & ~self.encoded


def converge(state: PassState, scores_of, max_passes: int | None = None) -> list[tuple[int, np.ndarray]]:
    """What the pass engine does for one slide, synchronously: encode each selected pass with
    `scores_of(rows, cols, pass_no) -> (N, n_classes)` until nothing is selected (or `max_passes`).
    For tests and for benchmarks that replay stored scores. Returns [(pass, positions (N, 2))]."""
    log = []
    while True:
        p, todo = state.select()
        if not todo.any() or (max_passes is not None and p > max_passes):
            return log
        rows, cols = np.nonzero(todo)
        state.add(rows, cols, p, scores_of(rows, cols, p))
        log.append((p, np.stack([rows, cols], axis=1)))
