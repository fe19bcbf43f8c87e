"""The cell-grid rasteriser against a brute-force full-resolution average (paper Eq. 4)."""
import numpy as np
import pytest

from zeus_ray.maps.rasterise import (argmax_mask, average_maps, cell_geometry, grid_shape,
                                resample_mask_to_grid, softmax_maps)


def brute_force(rows, cols, scores, patch, stride, n_rows, n_cols):
    """Every pixel averages all tiles covering it, at full resolution, with a python loop."""
    h = (n_rows - 1) * stride + patch
    w = (n_cols - 1) * stride + patch
    acc = np.zeros((scores.shape[1], h, w))
    cnt = np.zeros((h, w))
    for r, c, s in zip(rows, cols, scores):
        acc[:, r * stride:r * stride + patch, c * stride:c * stride + patch] += s[:, None, None]
        cnt[r * stride:r * stride + patch, c * stride:c * stride + patch] += 1
    with np.errstate(invalid="ignore"):
        return acc / cnt, cnt


@pytest.mark.parametrize("patch,stride,keep", [(8, 2, 1.0), (8, 2, 0.6), (12, 8, 0.7), (6, 6, 0.8), (9, 3, 0.5)])
@pytest.mark.parametrize("n_cls", [2, 4])
def test_matches_full_resolution_average(patch, stride, keep, n_cls):
    rng = np.random.default_rng(patch * 100 + stride * 10 + n_cls)
    n_rows, n_cols = 7, 9
    rr, cc = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    sel = rng.random(rr.size) < keep
    rows, cols = rr.ravel()[sel], cc.ravel()[sel]
    scores = rng.normal(size=(len(rows), n_cls))
    geom = cell_geometry(patch, stride)
    shape = grid_shape(n_rows, n_cols, geom)
    maps, counts = average_maps(rows, cols, scores, shape, geom)
    ref, ref_cnt = brute_force(rows, cols, scores, patch, stride, n_rows, n_cols)
    # Expand cells to pixels: each cell is geom.cell × geom.cell pixels.
    up = np.repeat(np.repeat(maps, geom.cell, axis=1), geom.cell, axis=2)
    up_cnt = np.repeat(np.repeat(counts, geom.cell, axis=0), geom.cell, axis=1)
    assert up.shape == ref.shape
    np.testing.assert_array_equal(up_cnt, ref_cnt)
    np.testing.assert_allclose(np.nan_to_num(up, nan=-9), np.nan_to_num(ref, nan=-9), atol=1e-6)
    lab = argmax_mask(maps)
    ref_lab = np.where(ref_cnt > 0, np.argmax(np.nan_to_num(ref, nan=-np.inf), axis=0), -1)
    np.testing.assert_array_equal(np.repeat(np.repeat(lab, geom.cell, 0), geom.cell, 1), ref_lab)


def test_448_112_covers_4x4_cells():
    geom = cell_geometry(448, 112)
    assert (geom.cell, geom.k, geom.s) == (112, 4, 1)
    maps, counts = average_maps(np.array([0]), np.array([0]), np.array([[0.2, 0.3]]), grid_shape(1, 1, geom), geom)
    assert counts.shape == (4, 4) and (counts == 1).all()
    assert np.allclose(maps[1], 0.3)


def test_rejects_bad_input():
    geom = cell_geometry(4, 2)
    with pytest.raises(ValueError):
        average_maps(np.array([0, 0]), np.array([1, 1]), np.zeros((2, 2)), (6, 6), geom)
    with pytest.raises(ValueError):
        average_maps(np.array([5]), np.array([0]), np.zeros((1, 2)), (6, 6), geom)


def test_valid_mask_and_softmax():
    maps = np.array([[[0.1, 0.5], [np.nan, 0.2]], [[0.3, 0.1], [np.nan, 0.1]]], dtype=np.float32)
    lab = argmax_mask(maps, valid=np.array([[1, 1], [1, 0]]))
    np.testing.assert_array_equal(lab, [[1, 0], [-1, -1]])
    p = softmax_maps(maps, 100.0)
    np.testing.assert_allclose(p[:, 0, 0].sum(), 1.0, rtol=1e-6)
    assert p[1, 0, 0] > 0.99


def test_resample_mask_cell_centres():
    mask = np.zeros((10, 10), np.uint8)
    mask[:5, :] = 1                  # top half, at 2 µm/px → rows 0..9 µm
    out = resample_mask_to_grid(mask, 2.0, (3, 3), 8.0)   # cell centres at 4, 12, 20 µm
    np.testing.assert_array_equal(out[:, 0], [True, False, False])
