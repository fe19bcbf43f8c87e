"""Optional post-processing of the tumour mask: the published ZEUS code's smoothing, to compare our
numbers with the paper's.

`official_order_smoothing` is what `postprocess: reference` runs: the official order and arithmetic
(the un-cut argmax painted on the pixel canvas of the target resolution, uint8 0/255, OpenCV's
uint8 Gaussian blur, > 10 %, then the tissue cut), the mask written at that pixel. The cell-grid
`reference_smoothing` below (cut first, float blur evaluated per cell) is kept for cheap previews
of large slides: it agrees with the official pixels only against a float blur of the un-cut argmax. OFF by default (`postprocess: none`); `postprocess: reference` turns on
this smoothing and the reference evaluation's metric conventions (metrics.segmentation_metrics
with convention="reference").

What the reference does (read, not copied: github.com/cvblab/ZEUS, inference/process_embeddings.py
at commit f4c842e, `generate_and_save_masks`, lines 89-111; the same in smoreno18/ZEUS 4e3b85d):
the 0/255 argmax mask on level-0 pixels (level 0 taken to be 10x) goes through cv2.GaussianBlur
with a square kernel of 2 × patch + 1 px (897 px for 448-px tiles) and sigma 0, for which OpenCV
uses σ = 0.3 · ((k − 1)/2 − 1) + 0.8 (134.9 px); pixels above 10 % of 255 are tumour; then the
tissue mask cuts it. (The PNG the evaluation reads is saved before that cut, and the evaluation,
evaluation/eval_segmentation.py, counts tissue pixels only, which comes to the same.)

How we do it, in µm, on our cell grid: the reference's pixel is our target-resolution pixel
(`px_um`, 1 µm at 10x) and its kernel is 2 × patch_um + px_um wide. Our mask is constant on cells
of `cell_um` (n = cell_um / px_um reference pixels). Blurring such a mask at the reference
resolution and reading the result at a point y is a weighted sum over cells, the weight of a cell
being the kernel's mass over that cell's extent seen from y. We compute those weights exactly from
OpenCV's own sampled kernel (each tap spread over its pixel, which reproduces the discrete
convolution at pixel centres) and evaluate the blur at the centres of `subdivide` × `subdivide`
sub-cells per cell. The 2-D kernel is separable, so the operator is one banded matrix per axis.
Borders reflect as OpenCV's default (BORDER_REFLECT_101, mirror about the first/last pixel centre)
at the edges of the cell grid. Accuracy: the blur values are exact (float64, no resampling of the
kernel); the only approximation is where the decision is sampled: with subdivide = n the result
is the reference's own pixel grid (tests/test_postprocess.py: identical to a direct
cv2.GaussianBlur on the 1-µm map except where the blur is within float noise of the threshold);
with subdivide = 1 every cell takes the reference's decision at its centre, so the contour is
quantised to the cell (in that test Dice 0.94 against the 1-µm result at 112-µm cells, ≥ 0.98 on
the 28-µm metric grid, subdivide = 4). The reference itself blurs in uint8 fixed point (up to ±2
grey levels off the exact blur: Dice 0.997 against the float blur).
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import sparse

MODES = ("none", "reference")
THRESHOLD = 0.1           # the reference keeps pixels whose blurred 0/255 mask is > 255 · 0.1
_BLOCK_ELEMENTS = 1 << 22  # output elements per block when applying the column operator


def reference_kernel(patch_um: float, px_um: float) -> dict:
    """The reference's Gaussian for tiles of `patch_um` at `px_um` µm per pixel: kernel size and
    σ in pixels (as OpenCV derives σ from the size when given sigma 0) and in µm."""
    if not (patch_um > 0 and px_um > 0):
        raise ValueError(f"patch_um {patch_um} and px_um {px_um} must be > 0")
    radius = max(1, int(round(patch_um / px_um)))
    ksize = 2 * radius + 1
    sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    return {"kernel_px": ksize, "sigma_px": sigma, "kernel_um": ksize * px_um, "sigma_um": sigma * px_um,
            "px_um": px_um, "threshold": THRESHOLD}


def _kernel_cdf(ksize: int, sigma: float):
    """K(u): the kernel's mass at offsets ≤ u (px), each tap spread evenly over its pixel."""
    taps = cv2.getGaussianKernel(ksize, sigma, cv2.CV_64F)[:, 0]
    r = ksize // 2
    knots = np.arange(-r, r + 2) - 0.5
    values = np.concatenate([[0.0], np.cumsum(taps)])
    return lambda u: np.interp(u, knots, values)


def _axis_operator(n_cells: int, n: float, s: int, r: int, cdf) -> sparse.csr_matrix | np.ndarray:
    """(n_cells·s, n_cells) weights: the blur at the centre of each sub-cell from each cell."""
    y = ((np.arange(n_cells)[:, None] + (np.arange(s)[None, :] + 0.5) / s) * n).ravel()  # px
    length = n_cells * n
    reach = r + 1.0
    rows, cols, vals = [], [], []

    def add(j, lo, hi):
        """Cells j (broadcast against y) seen over x in [lo, hi): mass K(y - lo) - K(y - hi)."""
        w = np.where(lo < hi, cdf(y[:, None] - lo) - cdf(y[:, None] - hi), 0.0)
        i, k = np.nonzero(w > 0)
        rows.append(i)
        cols.append(np.broadcast_to(j, w.shape)[i, k])
        vals.append(w[i, k])

    taps = int(np.ceil(2 * reach / n)) + 3
    j = np.floor((y - reach) / n).astype(np.int64)[:, None] - 1 + np.arange(taps)[None, :]
    j = np.clip(j, -1, n_cells)          # out-of-grid cells are handled by the reflections below
    inside = (j >= 0) & (j < n_cells)
    add(np.where(inside, j, 0), np.where(inside, j * n, 0.0), np.where(inside, (j + 1) * n, 0.0))
    m = np.arange(min(n_cells, int(np.ceil((reach + 1) / n)) + 1))
    # BORDER_REFLECT_101: pixel -p is pixel p, i.e. x < 0 reads the mask at 1 - x ...
    add(m[None, :], (1 - (m + 1) * n)[None, :], np.minimum(1 - m * n, 0.0)[None, :])
    # ... and x >= L reads it at 2L - 1 - x.
    mr = n_cells - 1 - m
    add(mr[None, :], np.maximum(2 * length - 1 - (mr + 1) * n, length)[None, :],
        (2 * length - 1 - mr * n)[None, :])
    op = sparse.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                           shape=(n_cells * s, n_cells)).tocsr()   # duplicates (reflections) add up
    return op.toarray() if op.nnz > 0.1 * op.shape[0] * op.shape[1] else op


def reference_smoothing(tumour_mask_cells: np.ndarray, tissue_cells: np.ndarray | None, cell_um: float,
                        patch_um: float, *, px_um: float = 1.0, threshold: float = THRESHOLD,
                        subdivide: int = 1) -> np.ndarray:
    """The reference code's smoothing of a tumour mask on a grid of `cell_um` µm cells.

    patch_um: the tile side in µm (patch_size × target µm/px; 448 at 10x); px_um: the reference's
    pixel, our target µm/px (1.0 at 10x): the kernel is 2 × patch_um + px_um wide (897 µm at 10x)
    with σ = 0.3 · (patch_um / px_um − 1) · px_um + 0.8 · px_um (134.9 µm). Returns a bool mask on
    the grid `subdivide` × finer than the cell grid (shape (H·s, W·s)): blurred tumour fraction
    > threshold, cut to tissue. `tissue_cells` may be given on the cell grid or on that finer
    grid; None skips the cut. See the module docstring for the accuracy.
    """
    tumour = np.asarray(tumour_mask_cells, dtype=bool)
    s = int(subdivide)
    if tumour.ndim != 2 or s < 1 or not cell_um > 0:
        raise ValueError(f"need a 2-D mask, subdivide ≥ 1 and cell_um > 0 (got shape {tumour.shape}, "
                         f"subdivide {subdivide}, cell_um {cell_um})")
    h, w = tumour.shape
    out_shape = (h * s, w * s)
    tissue = None
    if tissue_cells is not None:
        tissue = np.asarray(tissue_cells, dtype=bool)
        if tissue.shape == (h, w):
            tissue = np.repeat(np.repeat(tissue, s, axis=0), s, axis=1)
        elif tissue.shape != out_shape:
            raise ValueError(f"tissue mask shape {tissue.shape} is neither the cell grid {(h, w)} "
                             f"nor the output grid {out_shape}")
    if not tumour.any():
        return np.zeros(out_shape, dtype=bool)
    k = reference_kernel(patch_um, px_um)
    cdf = _kernel_cdf(k["kernel_px"], k["sigma_px"])
    n, r = cell_um / px_um, k["kernel_px"] // 2
    rows_op, cols_op = _axis_operator(h, n, s, r, cdf), _axis_operator(w, n, s, r, cdf)
    partial = rows_op @ tumour.astype(np.float64)      # (H·s, W): blurred along rows
    out = np.empty(out_shape, dtype=bool)
    step = max(1, _BLOCK_ELEMENTS // out_shape[1])
    for i in range(0, out_shape[0], step):             # bounded memory on large slides
        block = cols_op @ partial[i:i + step].T        # (W·s, rows)
        out[i:i + step] = np.asarray(block).T > threshold
    return out & tissue if tissue is not None else out


def official_order_smoothing(tumour_cells: np.ndarray, cell_px: float, origin_px, canvas_shape: tuple[int, int],
                             patch_px: int, tissue: np.ndarray | None = None) -> np.ndarray:
    """The published ZEUS code's smoothing in its order, on the slide's pixel canvas.

    tumour_cells: the argmax tumour mask on the cell grid, NOT cut to tissue (uncovered cells
    False: the official code's empty score canvas gives its first class, normal); cell_px: a
    cell's side in canvas px (target px); origin_px: (x, y) of the cell grid's origin in canvas px
    (a grid anchored at the tissue); canvas_shape: (H, W) canvas px (the slide at the target
    resolution); patch_px: the tile side in canvas px. Steps: paint the cells on the canvas as
    0/255 uint8, cv2.GaussianBlur with a (2·patch+1)² kernel and sigma 0 (OpenCV's uint8 fixed
    point and its default border, as the official code), keep > 255 · 0.1, then cut to `tissue`
    (a bool mask of the canvas shape, or None). Returns bool (H, W).
    """
    from .rasterise import resample_nearest
    canvas = resample_nearest(np.asarray(tumour_cells, bool), cell_px, canvas_shape, 1.0, False,
                              offset=(-float(origin_px[1]), -float(origin_px[0])))
    if not canvas.any():
        return canvas
    ksize = max(int(2 * patch_px + 1), 3)
    ksize += 1 - ksize % 2
    blurred = cv2.GaussianBlur(canvas.view(np.uint8) * np.uint8(255), (ksize, ksize), 0)
    out = blurred > 255 * THRESHOLD
    if tissue is not None:
        out &= np.asarray(tissue, bool)
    return out


def apply_postprocess(mode: str, tumour: np.ndarray, tissue: np.ndarray | None, *, cell_um: float,
                      patch_um: float, px_um: float, subdivide: int = 1) -> np.ndarray:
    """The tumour mask after `mode` ("none" or "reference"), on the grid `subdivide` × finer
    than the cell grid. "none" repeats each cell (nearest neighbour), cut to tissue as given."""
    if mode == "reference":
        return reference_smoothing(tumour, tissue, cell_um, patch_um, px_um=px_um, subdivide=subdivide)
    if mode != "none":
        raise ValueError(f"postprocess {mode!r}: use one of {', '.join(MODES)}")
    s = int(subdivide)
    up = np.repeat(np.repeat(np.asarray(tumour, dtype=bool), s, axis=0), s, axis=1)
    if tissue is not None:
        t = np.asarray(tissue, dtype=bool)
        up &= t if t.shape == up.shape else np.repeat(np.repeat(t, s, axis=0), s, axis=1)
    return up


def metric_convention(mode: str) -> str:
    """The metric convention that goes with a post-processing mode (metrics.segmentation_metrics)."""
    return "reference" if mode == "reference" else "zeus"


def postprocess_label(cfg) -> dict:
    """What metrics.json and run.json should say about the mask's post-processing, e.g.
    {"postprocess": "none", "metric_convention": "zeus"}; with "reference" also the kernel in µm."""
    mode = getattr(cfg, "postprocess", "none")
    label = {"postprocess": mode, "metric_convention": metric_convention(mode)}
    if mode == "reference":
        k = reference_kernel(cfg.tiling.patch_size * cfg.tiling.mpp, cfg.tiling.mpp)
        label["smoothing"] = {"kernel_um": round(k["kernel_um"], 3), "sigma_um": round(k["sigma_um"], 3),
                              "threshold": k["threshold"], "border": "reflect101", "mask_mpp": cfg.tiling.mpp,
                              "order": "un-cut argmax on the target-px canvas, uint8 blur, > 10 %, tissue cut",
                              "source": "cvblab/ZEUS inference/process_embeddings.py (Gaussian blur, > 10 %, tissue cut)"}
    return label
