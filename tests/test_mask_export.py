"""Per-slide outputs: GeoJSON round trip through the ground-truth reader, pyramidal TIFF opened by
OpenSlide, heat-map and overlay images."""
from __future__ import annotations

import json

import numpy as np
import openslide
import pytest
import shapely
import shapely.affinity

from zeus_ray.truth.annotations import Annotation, rasterise_annotation, rasterise_geometry, read_annotation
from zeus_ray.results.export import (PRED_RGB, TRUTH_RGB, mask_to_geojson, mask_to_geometry, overlay_png,
                                  similarity_heatmap, write_pyramidal_tiff)
from zeus_ray.truth.metrics import segmentation_metrics


def shapes_mask():
    m = np.zeros((40, 50), bool)
    m[2:20, 2:20] = True          # a square ...
    m[6:16, 6:16] = False         # ... with a hole ...
    m[9:13, 9:13] = True          # ... and an island inside the hole
    m[10, 11] = False             # a one-cell hole in the island
    m[22, 22] = m[23, 23] = m[24, 22] = True   # cells touching only diagonally
    m[30:40, 40:50] = True        # touches the grid border
    m[0, 49] = True               # a lone corner cell
    for i in range(15):           # a 45° staircase triangle (simplification collapses its steps)
        m[25 + i, 2:2 + i + 1] = True
    return m


def roundtrip(mask, cell0, origin, tmp_path, **kw):
    fc = mask_to_geojson(mask, cell0, "Tumour", origin=origin, **kw)
    path = tmp_path / "pred.geojson"
    path.write_text(json.dumps(fc))
    ann = read_annotation(path, tumour_classes=["tumour"])
    shifted = Annotation(ann.source, shapely.affinity.translate(ann.geometry, -origin[0], -origin[1]))
    return fc, rasterise_annotation(shifted, mask.shape, cell0)


@pytest.mark.parametrize("smooth", [True, False])
def test_geojson_round_trip_dice_one(smooth, tmp_path):
    m = shapes_mask()
    fc, back = roundtrip(m, 27.37, (1000.0, 512.5), tmp_path, smooth=smooth,
                         simplify_tolerance_cells=0.3 if smooth else 0.45)
    assert (back == m).all()
    assert segmentation_metrics(back, m)["dice"] == 1.0
    f0 = fc["features"][0]
    assert f0["properties"]["objectType"] == "annotation"
    assert f0["properties"]["classification"]["name"] == "Tumour"
    assert any(len(f["geometry"]["coordinates"]) > 1 for f in fc["features"])   # polygons with holes
    # the island in the hole is its own polygon; so are the lone cells
    assert len(fc["features"]) >= 5


def test_round_trip_random_masks(tmp_path):
    rng = np.random.default_rng(7)
    for k in range(25):
        shape = tuple(rng.integers(1, 35, 2))
        m = rng.random(shape) < rng.uniform(0.1, 0.9)
        _, back = roundtrip(m, float(rng.uniform(0.7, 40)), tuple(rng.uniform(0, 500, 2)), tmp_path)
        assert (back == m).all(), k


def test_edges_corners_and_simplification():
    m = shapes_mask()
    exact = mask_to_geometry(m)                        # unit cells, cell edges, no simplification
    assert exact.area == m.sum() and exact.is_valid
    assert (rasterise_geometry(exact, m.shape, 1.0) == m).all()
    smooth = mask_to_geometry(m, smooth=True)          # corners cut: -1/2 cell per shell, +1/2 per hole
    parts = shapely.get_parts(smooth)
    n_shells, n_holes = len(parts), int(shapely.get_num_interior_rings(parts).sum())
    assert smooth.area == pytest.approx(m.sum() - 0.5 * n_shells + 0.5 * n_holes)
    simple = mask_to_geometry(m, simplify_tolerance_cells=0.3, smooth=True)
    def staircase(g):  # the part holding the 45° triangle
        return next(p for p in shapely.get_parts(g) if p.contains(shapely.Point(3, 38)))
    assert shapely.get_num_coordinates(staircase(exact)) >= 30
    assert shapely.get_num_coordinates(staircase(simple)) <= 8       # the staircase became straight lines
    assert (rasterise_geometry(simple, m.shape, 1.0) == m).all()
    assert int(shapely.get_num_interior_rings(shapely.get_parts(simple)).sum()) == n_holes
    # far too coarse a tolerance would flip cells: the result is checked and the tolerance reduced
    coarse = mask_to_geometry(m, simplify_tolerance_cells=3.0, smooth=True)
    assert (rasterise_geometry(coarse, m.shape, 1.0) == m).all()
    empty = mask_to_geojson(np.zeros((4, 4), bool), 2.0, "Tumour")
    assert empty == {"type": "FeatureCollection", "features": []}


def test_pyramidal_tiff_opened_by_openslide(tmp_path):
    rng = np.random.default_rng(0)
    a = (rng.random((600, 900)) * 255).astype(np.uint8)
    path = tmp_path / "prob.tif"
    shapes = write_pyramidal_tiff(a, path, mpp=4.0, tile=256)
    assert shapes == [(600, 900), (300, 450), (150, 225)]
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert s.level_count == 3
        assert s.level_dimensions == ((900, 600), (450, 300), (225, 150))
        assert s.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(4.0)   # OpenSlide 4 reads the tags
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(4.0)
        px = np.asarray(s.read_region((0, 0), 0, (900, 600)))
        assert (px[..., 0] == a).all() and (px[..., 2] == a).all() and (px[..., 3] == 255).all()
        lvl1 = np.asarray(s.read_region((0, 0), 1, (450, 300)))[..., 0].astype(int)
        assert abs(lvl1 - a.reshape(300, 2, 450, 2).mean(axis=(1, 3))).max() <= 1   # area average


def test_pyramidal_tiff_mask_and_labels(tmp_path):
    m = np.zeros((300, 520), bool)
    m[50:250, 100:400] = True
    write_pyramidal_tiff(m, tmp_path / "mask.tif", mpp=8.0, tile=128)
    with openslide.OpenSlide(str(tmp_path / "mask.tif")) as s:
        assert s.level_count == 4 and s.level_dimensions[0] == (520, 300)
        px = np.asarray(s.read_region((0, 0), 0, (520, 300)))[..., 0]
        assert set(np.unique(px)) == {0, 255} and ((px == 255) == m).all()
    labels = np.repeat(np.repeat(np.arange(12, dtype=np.uint8).reshape(3, 4), 64, 0), 64, 1)
    write_pyramidal_tiff(labels, tmp_path / "labels.tif", mpp=1.0, tile=64, nearest=True)
    with openslide.OpenSlide(str(tmp_path / "labels.tif")) as s:
        lvl = np.asarray(s.read_region((0, 0), 2, s.level_dimensions[2]))[..., 0]
        assert set(np.unique(lvl)) == set(range(12))      # nearest keeps label values
    with pytest.raises(ValueError, match="uint8"):
        write_pyramidal_tiff(np.zeros((4, 4), np.float32), tmp_path / "x.tif", mpp=1.0)


def thumb():
    t = np.full((120, 160, 3), 240, np.uint8)
    t[20:100, 30:130] = (200, 120, 180)  # "tissue"
    return t


def test_similarity_heatmap(tmp_path):
    th = thumb()
    grid = np.full((12, 16), np.nan, np.float32)        # 10 thumbnail px per cell
    grid[2:10, 3:13] = np.linspace(0.1, 0.3, 80).reshape(8, 10)
    img = similarity_heatmap(grid, th, cells_to_thumb=10.0, legend=False)
    assert img.shape == th.shape and img.dtype == np.uint8
    assert (img[:20] == th[:20]).all() and (img[:, :30] == th[:, :30]).all()   # NaN: untouched
    assert (img[25:95, 35:125] != th[25:95, 35:125]).any(axis=-1).all()
    assert img[95, 125, 0] > img[95, 125, 2] and img[22, 32, 2] > img[22, 32, 0]  # JET: high red, low blue
    same = similarity_heatmap(grid, th, legend=False)                           # stretched: same extent
    assert (same == img).all()
    clipped = similarity_heatmap(grid, th, vmin=0.0, vmax=1.0, legend=False)
    assert not (clipped == img).all()
    with_bar = similarity_heatmap(grid, th, cells_to_thumb=10.0)
    assert (with_bar[:80] == img[:80]).all() and not (with_bar[-30:] == img[-30:]).all()
    assert (similarity_heatmap(np.full((3, 3), np.nan), th) == th).all()


def test_overlay_png(tmp_path):
    th = thumb()
    tissue = np.zeros((120, 160), bool)
    tissue[20:100, 30:130] = True
    pred = np.zeros((12, 16), bool)
    pred[4:8, 5:9] = True
    truth = np.zeros((12, 16), bool)
    truth[5:9, 8:12] = True
    img = overlay_png(th, tissue, pred, truth, 0.5, cells_to_thumb=10.0)
    assert img.shape == th.shape and img.dtype == np.uint8
    assert tuple(img[60, 120]) == TRUTH_RGB                   # right edge of the truth contour (col 119)
    assert tuple(img[45, 50]) == PRED_RGB                      # left edge of the prediction (col 50)
    assert img[55, 65, 2] > th[55, 65, 2]                      # prediction interior lightly blue-filled
    other = overlay_png(th, tissue, pred, truth, 0.875, cells_to_thumb=10.0)
    changed = np.argwhere((other != img).any(axis=-1))
    assert len(changed) and changed[:, 0].max() < 40 and changed[:, 1].max() < 80   # only the Dice text
    assert overlay_png(th, None, None, None, None).shape == th.shape
