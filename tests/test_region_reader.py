"""The region reader: one read per block of tiles, tiles cut from memory, compared with a naive
per-tile read_region + resize on a synthetic pyramid and on the real 20x slide."""
import pickle

import cv2
import numpy as np
import openslide
import pytest
from shapely.geometry import Point, box

from zeus_ray.config import TissueConfig
from zeus_ray.errors import SlideError
from zeus_ray.slides.magnification import choose_level
from zeus_ray.slides.region_reader import (MAX_REGION_PX, ReadStats, block_tiles, plan_regions, read_region_tiles,
                                    read_tile_naive)
from zeus_ray.demo.synthetic import write_synthetic_slide
from zeus_ray.slides.tiling import grid_positions, make_grid, tile_table
from zeus_ray.slides.tissue import TissueMask, read_thumbnail, segment_tissue


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """40x (0.25 µm/px), downsamples 1/4/16, tissue reaching the right edge."""
    tissue = Point(2600, 2300).buffer(1500).union(box(4200, 600, 6144, 3800))
    path = tmp_path_factory.mktemp("rr") / "p40.svs"
    return write_synthetic_slide(path, 6144, 4608, 0.25, tissue=tissue, lesions=None, downsamples=(1, 4, 16))


def plan(slide, mpp0, target, min_fraction=0.25):
    choice = choose_level(slide, mpp0, target)
    g = make_grid(*slide.dimensions, mpp0, target, 448, 112, choice.level, choice.downsample)
    thumb, tmpp = read_thumbnail(slide, mpp0, 8.0)
    return g, tile_table(g, segment_tissue(thumb, tmpp, TissueConfig()), min_fraction, "s")


def read_all(slide, g, regions, stats=None):
    ids, imgs = zip(*(read_region_tiles(slide, g, r, stats) for r in regions))
    return np.concatenate(ids), np.concatenate(imgs)


def test_plan_regions_partitions_tiles_into_blocks():
    g = make_grid(9000, 7000, 0.5, 1.0, 448, 112)
    rows, cols = grid_positions(g)
    keep = np.random.default_rng(1).random(len(rows)) < 0.6
    tiles = {"tile_id": rows[keep] * g.n_cols + cols[keep], "grid_row": rows[keep], "grid_col": cols[keep]}
    regions = plan_regions(tiles, g, 4, slide_id="s")
    ids = np.concatenate([r.tile_ids for r in regions])
    assert sorted(ids.tolist()) == sorted(tiles["tile_id"].tolist())            # each tile once
    for r in regions:
        assert np.ptp(r.grid_rows) < 4 and np.ptp(r.grid_cols) < 4                # within one block
        assert len({(a // 4, b // 4) for a, b in zip(r.grid_rows, r.grid_cols)}) == 1
        # Every tile's box lies inside the read (level 0 here: read box = level-0 box).
        x = np.floor(r.grid_cols * g.stride0 + 0.5)
        y = np.floor(r.grid_rows * g.stride0 + 0.5)
        assert np.all(x >= r.location[0]) and np.all(y >= r.location[1])
        assert np.all(x + g.patch0 <= r.location[0] + r.read_size[0])
        assert np.all(y + g.patch0 <= r.location[1] + r.read_size[1])
        assert np.all(r.offsets[:, 0] + 448 <= r.out_size[0] + 1)
    assert pickle.loads(pickle.dumps(regions[0])).tile_ids.tolist() == regions[0].tile_ids.tolist()
    assert plan_regions({"tile_id": [], "grid_row": [], "grid_col": []}, g, 4) == []
    # Regions stay bounded when only a fine level exists (40x level 0 for 10x: ×4 resize).
    g4 = make_grid(40000, 30000, 0.25, 1.0, 448, 112)
    r = block_tiles(g4, 8)
    assert r < 8 and ((r - 1) * 112 + 448) * g4.scale <= MAX_REGION_PX


def test_sparse_selections_are_read_in_smaller_regions():
    """A dense block (full overlap) stays one read; a sparse one (an adaptive pass's contour band)
    splits where that decodes fewer pixels than the extra reads cost, and every tile is read once."""
    g = make_grid(9000, 7000, 0.5, 1.0, 448, 112)
    rows, cols = grid_positions(g)
    dense = {"tile_id": rows * g.n_cols + cols, "grid_row": rows, "grid_col": cols}
    blocks = {(r // 8, c // 8) for r, c in zip(rows, cols)}
    assert len(plan_regions(dense, g, 8, slide_id="s")) == len(blocks)
    # Two far corners of each block (a contour crossing it); a first pass (positions every 4) is
    # dense enough to stay whole: non-overlapping tiles fill their box.
    corners = np.flatnonzero((rows % 8 == cols % 8) & np.isin(rows % 8, [0, 7]))
    sparse = {k: v[corners] for k, v in dense.items()}
    grid4 = np.flatnonzero((rows % 4 == 0) & (cols % 4 == 0))
    first = {k: v[grid4] for k, v in dense.items()}
    assert len(plan_regions(first, g, 8, slide_id="s")) == len({(r // 8, c // 8) for r, c in zip(rows[grid4], cols[grid4])})
    regions = plan_regions(sparse, g, 8, slide_id="s")
    assert sorted(np.concatenate([r.tile_ids for r in regions]).tolist()) == sorted(sparse["tile_id"].tolist())
    unsplit = sum(((np.ptp(sparse["grid_col"][m]) * g.stride0 + g.patch0) *
                   (np.ptp(sparse["grid_row"][m]) * g.stride0 + g.patch0))
                  for m in [(sparse["grid_row"] // 8 == a) & (sparse["grid_col"] // 8 == b) for a, b in blocks])
    decoded = sum(r.decoded_px for r in regions)
    assert len(regions) > len(blocks) and decoded < 0.6 * unsplit


def test_pyramid_level_1_is_bit_identical_to_naive(pyramid):
    slide = openslide.OpenSlide(pyramid.path)
    g, tiles = plan(slide, 0.25, 1.0)
    assert (g.level, g.scale, g.read_size) == (1, 1.0, 448)
    regions = plan_regions(tiles, g, 8)
    stats = ReadStats()
    ids, imgs = read_all(slide, g, regions, stats)
    assert imgs.shape == (tiles.num_rows, 448, 448, 3) and imgs.dtype == np.uint8
    assert sorted(ids.tolist()) == sorted(tiles.column("tile_id").to_pylist())
    xy = dict(zip(tiles.column("tile_id").to_pylist(), zip(tiles.column("x").to_pylist(), tiles.column("y").to_pylist())))
    for i in range(0, len(ids), 7):
        naive = read_tile_naive(slide, g, *xy[ids[i]])
        np.testing.assert_array_equal(imgs[i], naive)
    # Each pixel decoded about once: far under the 16 reads per pixel of the naive loop.
    assert stats.tiles == len(ids) and stats.regions == len(regions)
    assert stats.decoded_px < 0.5 * g.read_size ** 2 * stats.tiles


def test_pyramid_edge_tiles_are_white_outside_the_slide(pyramid):
    slide = openslide.OpenSlide(pyramid.path)
    g, tiles = plan(slide, 0.25, 1.0)
    last = g.n_cols - 1
    rows = tiles.filter(np.asarray(tiles.column("grid_col")) == last)
    assert rows.num_rows > 0                                   # the tissue box reaches the right edge
    ids, imgs = read_all(slide, g, plan_regions(rows, g, 8))
    x = rows.column("x")[0].as_py()
    inside = (6144 - x) // 4                                   # level-1 px of the tile inside the slide
    assert inside < 448
    assert (imgs[:, :, inside + 1:] == 255).all()
    assert (imgs[:, :, : inside - 1] < 250).any()


def test_pyramid_20x_resized_from_level_0_matches_naive(pyramid):
    slide = openslide.OpenSlide(pyramid.path)
    g, tiles = plan(slide, 0.25, 0.5, min_fraction=0.9)
    assert (g.level, g.read_size) == (0, 896)
    sub = tiles.slice(0, 12)
    ids, imgs = read_all(slide, g, plan_regions(sub, g, 8))
    by_id = dict(zip(ids.tolist(), imgs))
    assert len(by_id) == 12
    for tid, x, y in zip(*(sub.column(c).to_pylist() for c in ("tile_id", "x", "y"))):
        naive = read_tile_naive(slide, g, x, y)
        assert np.abs(naive.astype(int) - by_id[tid]).mean() < 1    # exact ×2: the same pixel grid


def blur(a):
    return cv2.GaussianBlur(a.astype(np.float32), (0, 0), 2)[8:-8, 8:-8]


def test_real_20x_slide_tiles_come_from_896_px_reads(slides_dir):
    slide = openslide.OpenSlide(str(slides_dir / "CMU-1-Small-Region.svs"))
    g, tiles = plan(slide, 0.499, 1.0)
    assert g.level == 0 and abs(g.read_size - 448 / 0.499) <= 1 and g.read_size in (897, 898)
    regions = plan_regions(tiles, g, 8)
    stats = ReadStats()
    ids, imgs = read_all(slide, g, regions, stats)
    assert len(regions) < tiles.num_rows / 8
    assert stats.decoded_px <= 1.5 * g.read_size ** 2 * stats.tiles
    xy = dict(zip(tiles.column("tile_id").to_pylist(), zip(tiles.column("x").to_pylist(), tiles.column("y").to_pylist())))
    diffs, shifted = [], []
    for i in range(0, len(ids), 5):
        naive = read_tile_naive(slide, g, *xy[ids[i]])
        a, b = blur(naive), blur(imgs[i])
        diffs.append(np.abs(a - b).mean())
        shifted.append(np.abs(a[:, 2:] - b[:, :-2]).mean())      # the same tile 2 px off
    # Both resample 898 → 448 with sub-pixel phase differences; after a light blur they agree
    # closely, and much more closely than a 2-pixel misalignment would.
    assert np.mean(diffs) < 2.5 and max(diffs) < 5
    assert np.mean(diffs) < 0.5 * np.mean(shifted)


def test_corrupt_tile_data_fails_at_read_time(slides_dir):
    slide = openslide.OpenSlide(str(slides_dir / "unreadable.svs"))     # opens fine
    g = make_grid(16, 16, 0.499, 1.0, 448, 112)
    t = tile_table(g, TissueMask(mask=np.ones((1, 1), np.uint8), mpp=8.0), 0.0, "unreadable")
    (region,) = plan_regions(t, g, 8)
    with pytest.raises(SlideError, match="unreadable.*corrupt") as e:
        read_region_tiles(slide, g, region)
    assert e.value.reason == "unreadable"
