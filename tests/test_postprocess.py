"""`postprocess: reference`: our µm-based port of the published ZEUS smoothing against a direct
transcription of the published arithmetic (cv2.GaussianBlur, kernel 2 × 448 + 1 px, sigma 0,
> 10 %, tissue cut) on a 1-µm/px map, and the reference evaluation's metric conventions."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from zeus_ray.config import config_reference, load_config
from zeus_ray.errors import ConfigError
from zeus_ray.truth.metrics import segmentation_metrics
from zeus_ray.maps.postprocess import (apply_postprocess, metric_convention, postprocess_label, reference_kernel,
                                  reference_smoothing)

CELL = 112          # µm per cell at 10x with 448/112 tiles (the reference's pixel: 1 µm)
N = 10              # 10 × 10 cells = a 1120 × 1120 px map at 1 µm/px (the kernel is 897 px)


def dice(a, b) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def up(mask, f):
    return np.repeat(np.repeat(mask, f, axis=0), f, axis=1)


@pytest.fixture(scope="module")
def maps():
    """A cell-grid argmax mask (a lesion touching the left border, a 2 × 3 one, a single cell) and
    tissue, and the published arithmetic applied to them at 1 µm/px: float and uint8 (as published)."""
    cells = np.zeros((N, N), bool)
    cells[3:7, 0:3] = True
    cells[5, 3] = True
    cells[7:9, 6:9] = True
    cells[1, 7] = True
    tissue = np.ones((N, N), bool)
    tissue[0:2, 0:2] = False
    tissue[9, :] = False
    fine, tfine = up(cells, CELL), up(tissue, CELL)
    k = 2 * 448 + 1                                              # the reference: 2 × patch + 1 px, sigma 0
    blur = cv2.GaussianBlur(fine.astype(np.float32), (k, k), 0)
    ref = (blur > 0.1) & tfine
    blur8 = cv2.GaussianBlur((fine * 255).astype(np.uint8), (k, k), 0)
    ref8 = (blur8 > 255 * 0.1) & tfine
    return {"cells": cells, "tissue": tissue, "fine": fine, "tfine": tfine, "blur": blur, "ref": ref, "ref8": ref8}


def test_kernel_is_the_references_in_um():
    k = reference_kernel(448, 1.0)
    assert k["kernel_px"] == 897 and k["sigma_px"] == pytest.approx(134.9)
    assert k["kernel_um"] == pytest.approx(897) and k["sigma_um"] == pytest.approx(134.9)
    # the σ formula is the one OpenCV applies for sigma 0
    assert np.allclose(cv2.getGaussianKernel(897, 0, cv2.CV_64F), cv2.getGaussianKernel(897, 134.9, cv2.CV_64F))
    k20 = reference_kernel(448 * 0.5, 0.5)                       # 448 px tiles at 20x: the same in px
    assert k20["kernel_px"] == 897 and k20["kernel_um"] == pytest.approx(448.5)


def test_exact_on_the_1um_grid(maps):
    """From the coarse cell mask, evaluated at every 1-µm pixel centre (subdivide = 112), and from
    the 1-µm mask itself (cell_um = 1): the published float arithmetic, pixel for pixel (borders
    included: the big lesion touches the left edge)."""
    ref, blur = maps["ref"], maps["blur"]
    assert ref.sum() > maps["fine"].sum() * 1.3                  # the smoothing grows the tumour a lot
    for mine in (reference_smoothing(maps["cells"], maps["tissue"], CELL, 448, px_um=1.0, subdivide=CELL),
                 reference_smoothing(maps["fine"], maps["tfine"], 1.0, 448, px_um=1.0)):
        assert mine.shape == ref.shape
        differ = mine != ref
        # only where the float32 transcription sits within float noise of the threshold
        assert np.all(np.abs(blur[differ] - 0.1) < 1e-5), np.count_nonzero(differ)
        assert np.count_nonzero(differ) <= 5


def test_agrees_with_the_published_uint8_arithmetic(maps):
    """The reference blurs a uint8 image (OpenCV fixed point, ±2 grey levels off the exact blur)."""
    mine = reference_smoothing(maps["cells"], maps["tissue"], CELL, 448, px_um=1.0, subdivide=CELL)
    assert dice(mine, maps["ref8"]) >= 0.995


def test_cell_and_metric_grids(maps):
    cells, tissue, ref = maps["cells"], maps["tissue"], maps["ref"]
    coarse = reference_smoothing(cells, tissue, CELL, 448, px_um=1.0)
    assert coarse.shape == cells.shape
    assert dice(coarse, ref[CELL // 2::CELL, CELL // 2::CELL]) >= 0.98   # the reference at the cell centres
    assert dice(up(coarse, CELL), ref) >= 0.9                   # contour quantised to 112 µm
    metric = reference_smoothing(cells, tissue, CELL, 448, px_um=1.0, subdivide=4)   # the 28-µm metric grid
    assert metric.shape == (4 * N, 4 * N) and dice(up(metric, CELL // 4), ref) >= 0.98
    assert dice(up(cells & tissue, CELL), ref) < 0.8            # without the smoothing: far off


def test_works_in_um_at_any_magnification_and_cell_size(maps):
    cells, tissue = maps["cells"], maps["tissue"]
    at10x = reference_smoothing(cells, tissue, CELL, 448, px_um=1.0, subdivide=2)
    # the same physical layout at 20x: 0.5 µm px, 56-µm cells (112 px), 224-µm tiles (448 px)
    at20x = reference_smoothing(cells, tissue, 56, 224, px_um=0.5, subdivide=2)
    assert np.array_equal(at10x, reference_smoothing(cells, tissue, 112, 448, px_um=1.0, subdivide=2))
    assert np.array_equal(at20x, at10x)                          # the same geometry in its own pixels
    # a 56-µm cell grid of the same mask: its cell centres are the 112-µm grid's sub-cell centres
    assert np.array_equal(reference_smoothing(up(cells, 2), up(tissue, 2), 56, 448, px_um=1.0), at10x)


def test_tissue_cut_empty_and_bad_input():
    cells = np.zeros((6, 6), bool)
    assert not reference_smoothing(cells, None, CELL, 448).any()
    cells[2:4, 2:4] = True
    free = reference_smoothing(cells, None, CELL, 448)
    assert free.sum() > 4                                        # dilated beyond the 2 × 2 block
    tissue = np.ones((6, 6), bool)
    tissue[:, 4:] = False
    cut = reference_smoothing(cells, tissue, CELL, 448)
    assert np.array_equal(cut, free & tissue)
    fine_tissue = up(tissue, 2)
    assert np.array_equal(reference_smoothing(cells, fine_tissue, CELL, 448, subdivide=2),
                          reference_smoothing(cells, None, CELL, 448, subdivide=2) & fine_tissue)
    with pytest.raises(ValueError, match="tissue mask shape"):
        reference_smoothing(cells, np.ones((5, 5), bool), CELL, 448)
    with pytest.raises(ValueError):
        reference_smoothing(cells, None, CELL, 448, subdivide=0)


def test_apply_postprocess_modes():
    cells = np.zeros((5, 5), bool)
    cells[2, 2] = cells[2, 3] = True
    tissue = np.ones((5, 5), bool)
    tissue[2, 3] = False
    none = apply_postprocess("none", cells, tissue, cell_um=CELL, patch_um=448, px_um=1.0, subdivide=4)
    assert np.array_equal(none, up(cells & tissue, 4))
    ref = apply_postprocess("reference", cells, tissue, cell_um=CELL, patch_um=448, px_um=1.0, subdivide=4)
    assert np.array_equal(ref, reference_smoothing(cells, tissue, CELL, 448, subdivide=4))
    assert ref.sum() > none.sum()
    with pytest.raises(ValueError, match="postprocess 'blur'"):
        apply_postprocess("blur", cells, tissue, cell_um=CELL, patch_um=448, px_um=1.0)


def test_config_key_and_labels():
    cfg = load_config(None)
    assert cfg.postprocess == "none"
    assert postprocess_label(cfg) == {"postprocess": "none", "metric_convention": "zeus"}
    ref = load_config(None, ["postprocess=reference", "tiling.magnification=20"])
    label = postprocess_label(ref)
    assert label["postprocess"] == "reference" and label["metric_convention"] == "reference"
    assert label["smoothing"]["kernel_um"] == pytest.approx(448.5)   # 897 px at 0.5 µm/px
    assert metric_convention("reference") == "reference" and metric_convention("none") == "zeus"
    with pytest.raises(ConfigError, match="postprocess"):
        load_config(None, ["postprocess=gaussian"])
    assert "\npostprocess: 'none'  # none: the argmax mask" in config_reference()


# --- metric conventions: the empty cases --------------------------------------------------------------

def _masks():
    z = np.zeros((5, 5), bool)
    t = z.copy()
    t[1:3, 1:3] = True          # 4 cells
    return z, t


def test_zeus_convention_empty_cases():
    z, t = _masks()
    both = segmentation_metrics(z, z)
    assert both["dice"] == both["precision"] == both["recall"] == 1.0 and both["metric_convention"] == "zeus"
    no_truth = segmentation_metrics(t, z)
    assert no_truth["dice"] == no_truth["precision"] == 0.0 and math.isnan(no_truth["recall"])
    no_pred = segmentation_metrics(z, t)
    assert no_pred["dice"] == no_pred["recall"] == 0.0 and math.isnan(no_pred["precision"])


def test_reference_convention_empty_cases():
    z, t = _masks()
    e = 1e-6
    both = segmentation_metrics(z, z, convention="reference")
    assert both["dice"] == both["precision"] == both["recall"] == 1.0
    assert both["metric_convention"] == "reference"
    no_truth = segmentation_metrics(t, z, convention="reference")          # 4 false-positive cells
    assert no_truth["recall"] == 1.0                                       # ours: NaN
    assert no_truth["dice"] == pytest.approx(e / (4 + e)) and no_truth["precision"] == pytest.approx(e / (4 + e))
    no_pred = segmentation_metrics(z, t, convention="reference")           # 4 missed cells
    assert no_pred["precision"] == 1.0                                     # ours: NaN, skipped in tables
    assert no_pred["dice"] == pytest.approx(e / (4 + e)) and no_pred["recall"] == pytest.approx(e / (4 + e))
    assert not any(math.isnan(r[m]) for r in (both, no_truth, no_pred) for m in ("dice", "precision", "recall"))


def test_reference_convention_ordinary_case_and_tissue():
    truth = np.zeros((8, 8), bool)
    truth[1:5, 1:5] = True
    pred = np.zeros((8, 8), bool)
    pred[2:6, 2:6] = True
    valid = np.ones((8, 8), bool)
    valid[:, 5:] = False                                                   # only tissue counts
    ours = segmentation_metrics(pred, truth, valid)
    ref = segmentation_metrics(pred, truth, valid, convention="reference")
    assert (ref["tp"], ref["fp"], ref["fn"]) == (ours["tp"], ours["fp"], ours["fn"]) == (9, 3, 7)
    for m in ("dice", "precision", "recall", "iou"):
        assert ref[m] == pytest.approx(ours[m], abs=1e-6) and ref[m] != ours[m]
    with pytest.raises(ValueError, match="metric convention"):
        segmentation_metrics(pred, truth, convention="paper")
