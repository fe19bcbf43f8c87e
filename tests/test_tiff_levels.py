"""Direct TIFF tile reads (tiff_levels) give OpenSlide's pixels, bit for bit, on real SVS files (RGB
JPEG with shared tables, JPEG 2000), the YCbCr JPEG synthetic pyramid and a generic tiled TIFF; the
engine's reads are the same with `input.reader` auto and openslide; damage fails as one line."""
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from shapely.geometry import Point, box

from zeus_ray.config import JobConfig, TissueConfig
from zeus_ray.engine import work
from zeus_ray.engine.records import Chunk
from zeus_ray.errors import SlideError
from zeus_ray.slides.magnification import choose_level
from zeus_ray.slides.region_reader import plan_regions, read_region_tiles, region_rgb
from zeus_ray.demo.synthetic import write_synthetic_slide
from zeus_ray.slides.tiff_levels import TiffLevels
from zeus_ray.slides.tiling import make_grid, tile_table
from zeus_ray.slides.tissue import TissueMask, read_thumbnail, segment_tissue


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """20x (0.5 µm/px), downsamples 1/4/16 (exact), tissue reaching the right edge."""
    tissue = Point(1500, 1300).buffer(900).union(box(2600, 300, 3584, 2200))
    path = tmp_path_factory.mktemp("tl") / "p20.svs"
    return write_synthetic_slide(path, 3584, 2688, 0.5, tissue=tissue, lesions=None, downsamples=(1, 4, 16)).path


def openslide_rgb(slide, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    ds = slide.level_downsamples[level]
    return region_rgb(slide.read_region((round(x * ds), round(y * ds)), level, (w, h)), (w, h))


def compare_random_regions(path, levels, n=25, seed=0):
    path = Path(path)
    slide = openslide.OpenSlide(str(path))
    tiff = TiffLevels.open(str(path), slide)
    assert tiff is not None and all(tiff.has(lv) for lv in levels)
    rng = np.random.default_rng(seed)
    for level in levels:
        W, H = slide.level_dimensions[level]
        cases = [(0, 0, W, H), (-37, -5, 300, 200), (W - 100, H - 60, 250, 150)]   # whole, and over the edges
        for _ in range(n):
            w, h = (int(v) for v in rng.integers(1, [min(W, 700) + 1, min(H, 700) + 1]))
            cases.append((int(rng.integers(-50, W - 1)), int(rng.integers(-50, H - 1)), w, h))
        for x, y, w, h in cases:
            got = tiff.read(level, x, y, w, h)
            assert got.shape == (h, w, 3) and got.dtype == np.uint8
            np.testing.assert_array_equal(got, openslide_rgb(slide, level, x, y, w, h),
                                          err_msg=f"{path.name} level {level} region {(x, y, w, h)}")
    tiff.close()


def test_real_svs_pixels_match_openslide(slides_dir):
    compare_random_regions(slides_dir / "CMU-1-Small-Region.svs", [0])          # RGB JPEG, shared tables
    compare_random_regions(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs", [0])     # JPEG 2000 (33005)


def test_level_with_fractional_downsample_reads_from_its_integer_origin(slides_dir):
    """TCGA level 1 has downsample 2.0005: at origin (0, 0) both readers agree; elsewhere OpenSlide
    resamples to location / downsample, this reader starts at the integer level pixel."""
    path = slides_dir / "TCGA-CR-7395-01A-01-TS1.svs"
    slide = openslide.OpenSlide(str(path))
    tiff = TiffLevels.open(str(path), slide)
    assert slide.level_downsamples[1] != 2 and tiff.has(1)
    np.testing.assert_array_equal(tiff.read(1, 0, 0, 600, 500), openslide_rgb(slide, 1, 0, 0, 600, 500))
    # The integer-origin read is the level image itself: its shifted window is the same pixels.
    whole = tiff.read(1, 0, 0, 900, 800)
    np.testing.assert_array_equal(tiff.read(1, 301, 157, 400, 300), whole[157:457, 301:701])


def test_synthetic_pyramid_every_level(pyramid):
    compare_random_regions(pyramid, [0, 1, 2], n=10)                             # YCbCr JPEG, ds 1/4/16


@pytest.mark.parametrize("thumb_mpp, block_px", [(2.0, 4096), (2.0, 256), (8.0, 4096), (0.5, 1024)])
def test_thumbnails_and_previews_match_openslide(pyramid, slides_dir, thumb_mpp, block_px):
    """read_thumbnail with the direct reader (previews, tiles_stage.read_preview) gives OpenSlide's
    thumbnail, also when read in blocks (block edges inside the level) and over the slide's edge."""
    class DirectOnly(openslide.OpenSlide):   # the direct reader must do every read here
        def read_region(self, *args):
            raise AssertionError("read through OpenSlide")

    for path, mpp0 in ((pyramid, 0.5), (slides_dir / "CMU-1-Small-Region.svs", 0.499)):
        want, _ = read_thumbnail(openslide.OpenSlide(str(path)), mpp0, thumb_mpp, block_px)
        slide = DirectOnly(str(path))
        tiff = TiffLevels.open(str(path), slide)
        got, _ = read_thumbnail(slide, mpp0, thumb_mpp, block_px, tiff=tiff, slide_id="s")
        assert got.shape == want.shape and got.shape[0] > 8
        np.testing.assert_array_equal(got, want, err_msg=f"{Path(path).name} at {thumb_mpp} µm/px, blocks {block_px}")
        tiff.close()


def test_generic_tiled_tiff(tmp_path):
    rng = np.random.default_rng(3)
    img = np.repeat(np.repeat((rng.random((250, 325, 3)) * 255).astype(np.uint8), 4, 0), 4, 1)
    path = tmp_path / "generic.tif"
    tifffile.imwrite(path, img, tile=(256, 256), compression="jpeg", photometric="rgb")
    assert openslide.OpenSlide(str(path)).properties["openslide.vendor"] == "generic-tiff"
    compare_random_regions(path, [0], n=10)


@pytest.mark.parametrize("target", [1.0, 3.0])
def test_region_reads_identical_to_openslide_path(pyramid, target):
    """read_region_tiles with the direct reader cuts the same tiles (level 0 shrunk 2×, level 1
    shrunk 1.5×) as through OpenSlide."""
    slide = openslide.OpenSlide(str(pyramid))
    tiff = TiffLevels.open(str(pyramid), slide)
    choice = choose_level(slide, 0.5, target)
    g = make_grid(*slide.dimensions, 0.5, target, 448, 112, choice.level, choice.downsample)
    thumb, tmpp = read_thumbnail(slide, 0.5, 8.0)
    t = tile_table(g, segment_tissue(thumb, tmpp, TissueConfig()), 0.25, "s")
    regions = plan_regions(t, g, 8, slide_id="s")
    assert regions and regions[0].level == choice.level and choice.level == (0 if target == 1.0 else 1)
    for r in regions:
        ids_a, a = read_region_tiles(slide, g, r)
        ids_b, b = read_region_tiles(slide, g, r, tiff=tiff)
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(a, b)


def test_engine_reads_follow_input_reader(pyramid):
    """The worker's region reads open the direct reader with input.reader=auto and not with
    openslide; the tiles are the same either way."""
    cfg = JobConfig()
    slide = openslide.OpenSlide(str(pyramid))
    g = make_grid(*slide.dimensions, 0.5, 1.0, 448, 112)
    thumb, tmpp = read_thumbnail(slide, 0.5, 8.0)
    regions = plan_regions(tile_table(g, segment_tissue(thumb, tmpp, TissueConfig()), 0.25, "s"), g, 8, "s")[:3]
    out = {}
    for direct in (True, False):
        work._HANDLES.clear()
        chunk = Chunk(slide_id="s", uri=str(pyramid), grid=g, pass_no=1, emb_dir="", tiling_key="", model_key="",
                      dtype="float16", direct_tiff=direct, regions=regions, want_scores=False)
        out[direct] = list(work.read_regions(chunk, cfg.cache))
        assert (work._HANDLES[str(pyramid)][1] is not None) is direct
    work._HANDLES.clear()
    for (ia, a), (ib, b) in zip(out[True], out[False]):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(a, b)


def test_damaged_tile_fails_with_one_line(slides_dir):
    path = slides_dir / "unreadable.svs"
    slide = openslide.OpenSlide(str(path))
    tiff = TiffLevels.open(str(path), slide)
    g = make_grid(16, 16, 0.499, 1.0, 448, 112)
    (region,) = plan_regions(tile_table(g, TissueMask(mask=np.ones((1, 1), np.uint8), mpp=8.0), 0.0, "unreadable"), g, 8)
    with pytest.raises(SlideError, match="unreadable.*corrupt") as e:
        read_region_tiles(slide, g, region, tiff=tiff)
    assert e.value.reason == "unreadable" and "\n" not in str(e.value)


def test_other_vendors_keep_openslide(tmp_path, slides_dir):
    """A vendor outside Aperio/generic TIFF (here: the property faked on a real handle) never gets a
    direct reader, whatever its file looks like."""
    path = slides_dir / "CMU-1-Small-Region.svs"

    class Other:
        properties = {"openslide.vendor": "ventana"}
        level_dimensions = openslide.OpenSlide(str(path)).level_dimensions
    assert TiffLevels.open(str(path), Other()) is None
