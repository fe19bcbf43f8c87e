"""Tile-grid geometry (pure): positions, coverage, tissue fractions against brute force, the tiles
table and its grid metadata."""
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zeus_ray.errors import ZeusError
from zeus_ray.slides.tissue import TissueMask
from zeus_ray.slides.tiling import (GRID_METADATA_KEY, TILES_SCHEMA, grid_from_table_metadata, grid_positions,
                             make_grid, tile_origins, tile_table, tissue_fractions)


def test_cmu_20x_to_10x_reads_level0_twice_the_size():
    g = make_grid(2220, 2967, 0.499, 1.0, 448, 112, level=0, level_downsample=1.0)
    assert g.level == 0 and g.read_size == 898            # 448 µm / 0.499 µm/px = 897.8 px
    assert math.isclose(g.scale, 1 / 0.499) and math.isclose(g.stride0, 112 / 0.499)
    assert g.cell == 112 and g.patch0 == pytest.approx(897.796, abs=1e-3)
    # Fewest positions whose boxes reach the edge: 6·224.45 + 897.8 ≥ 2220, 5 positions would not.
    assert (g.n_cols, g.n_rows) == (7, 11)
    x, y = tile_origins(g, np.array([0, 3, 10]), np.array([0, 1, 6]))
    assert list(x) == [0, 224, 1347] and list(y) == [0, 673, 2244]   # round half up of c·stride0


def test_40x_pyramid_at_10x_reads_level_1_native():
    g = make_grid(40000, 30000, 0.25, 1.0, 448, 112, level=1, level_downsample=4.0)
    assert (g.scale, g.read_size, g.stride0, g.patch0) == (1.0, 448, 448.0, 1792.0)
    assert g.level_mpp == 1.0 and g.n_cols == math.ceil((40000 - 1792) / 448) + 1


@pytest.mark.parametrize("seed", range(30))
def test_grid_covers_every_pixel_with_fewest_positions(seed):
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(1, 5000)), int(rng.integers(1, 5000))
    mpp0 = float(rng.uniform(0.2, 1.2))
    patch = int(rng.choice([64, 224, 256, 448]))
    stride = int(rng.choice([d for d in range(1, patch + 1) if patch % d == 0 and d >= patch // 8]))
    g = make_grid(w, h, mpp0, mpp0 * float(rng.uniform(1.0, 4.0)), patch, stride)
    for extent, n in ((w, g.n_cols), (h, g.n_rows)):
        starts = np.floor(np.arange(n) * g.stride0 + 0.5)
        # Coverage: consecutive boxes overlap or touch, the first starts at 0, the last reaches the
        # edge. Without overlap, fractional box sizes leave gaps under one level-0 px.
        assert starts[0] == 0 and starts[-1] + g.patch0 >= extent
        gap = 1.0 if stride == patch else 0.0
        assert np.all(starts[1:] < starts[:-1] + g.patch0 + gap) if gap else np.all(starts[1:] <= starts[:-1] + g.patch0)
        # Minimality: one position fewer would not reach the edge.
        if n > 1:
            assert starts[-2] + g.patch0 < extent
    rows, cols = grid_positions(g)
    assert len(rows) == g.n_rows * g.n_cols and len(set(zip(rows.tolist(), cols.tolist()))) == len(rows)


def brute_force_fractions(g, mask, mask_mpp, rows, cols):
    """Area of each tile box ∩ tissue pixels, by per-pixel overlap lengths (a separable exact sum)."""
    k = g.mpp0 / mask_mpp
    out = []
    for r, c in zip(rows, cols):
        x0, y0 = math.floor(c * g.stride0 + 0.5) * k, math.floor(r * g.stride0 + 0.5) * k
        x1, y1 = x0 + g.patch0 * k, y0 + g.patch0 * k
        jx = np.arange(mask.shape[1])
        iy = np.arange(mask.shape[0])
        ox = np.clip(np.minimum(x1, jx + 1) - np.maximum(x0, jx), 0, None)
        oy = np.clip(np.minimum(y1, iy + 1) - np.maximum(y0, iy), 0, None)
        out.append(oy @ mask.astype(float) @ ox / (g.patch0 * k) ** 2)
    return np.array(out)


@pytest.mark.parametrize("mask_mpp,mpp0,target", [(8.0, 0.499, 1.0), (8.0, 0.25, 1.0), (3.7, 0.2631, 0.5)])
def test_tissue_fraction_is_area_exact(mask_mpp, mpp0, target):
    rng = np.random.default_rng(7)
    w, h = 6000, 4500
    g = make_grid(w, h, mpp0, target, 448, 112)
    mask = (rng.random((math.ceil(h * mpp0 / mask_mpp), math.ceil(w * mpp0 / mask_mpp))) < 0.4).astype(np.uint8)
    rows, cols = grid_positions(g)
    got = tissue_fractions(g, mask, mask_mpp, rows, cols)
    ref = brute_force_fractions(g, mask, mask_mpp, rows, cols)
    np.testing.assert_allclose(got, ref, atol=1e-9)
    assert got.min() >= 0 and got.max() <= 1


def test_tile_table_contract_and_filter(tmp_path):
    g = make_grid(4000, 3000, 0.5, 1.0, 448, 112)
    mask = np.zeros((math.ceil(3000 / 16), math.ceil(4000 / 16)), np.uint8)
    mask[40:120, 50:200] = 1                               # a tissue block
    tm = TissueMask(mask=mask, mpp=8.0)
    t = tile_table(g, tm, 0.25, "slide-1")
    assert t.schema.remove_metadata() == TILES_SCHEMA
    rows, cols = grid_positions(g)
    frac = brute_force_fractions(g, mask, 8.0, rows, cols)
    keep = frac >= 0.25
    assert t.num_rows == keep.sum() > 0
    d = t.to_pydict()
    assert d["tile_id"] == [int(r * g.n_cols + c) for r, c in zip(rows[keep], cols[keep])]
    assert d["x"] == [math.floor(c * g.stride0 + 0.5) for c in cols[keep]]
    assert d["y"] == [math.floor(r * g.stride0 + 0.5) for r in rows[keep]]
    assert set(d["level"]) == {0} and set(d["read_size"]) == {896} and set(d["size"]) == {448}
    assert set(d["slide_id"]) == {"slide-1"}
    np.testing.assert_allclose(d["tissue_fraction"], frac[keep], atol=1e-6)
    # The grid survives a Parquet round trip in the schema metadata.
    pq.write_table(t, tmp_path / "t.parquet")
    back = pq.read_table(tmp_path / "t.parquet")
    assert grid_from_table_metadata(back) == g == grid_from_table_metadata(back.schema)
    assert GRID_METADATA_KEY in back.schema.metadata
    # Threshold 0 keeps every tile that touches tissue, never a tile without any.
    t0 = tile_table(g, tm, 0.0, "slide-1")
    assert t0.num_rows == (frac > 0).sum() < g.n_positions
    assert tile_table(g, TissueMask(mask=np.zeros_like(mask), mpp=8.0), 0.0, "s").num_rows == 0


def test_bad_inputs():
    g = make_grid(100, 100, 0.5, 1.0, 448, 112)
    assert (g.n_rows, g.n_cols) == (1, 1)
    with pytest.raises(ZeusError, match="safe folder name"):
        tile_table(g, TissueMask(mask=np.ones((4, 4), np.uint8), mpp=8.0), 0.2, "../evil")
    with pytest.raises(ValueError, match="grid metadata"):
        grid_from_table_metadata(pa.table({"a": [1]}))
    with pytest.raises(ValueError):
        make_grid(0, 10, 0.5, 1.0, 448, 112)
    with pytest.raises(ValueError):
        make_grid(10, 10, 0.5, 1.0, 448, 500)
