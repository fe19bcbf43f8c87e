"""Tissue segmentation (CLAM-style, µm-based parameters) on drawn images, a synthetic slide and the
real slides."""
import math

import cv2
import numpy as np
import openslide
import pytest
from shapely.geometry import Point, box

from zeus_ray.config import TissueConfig
from zeus_ray.demo.synthetic import write_synthetic_slide
from zeus_ray.slides.tissue import read_thumbnail, segment_tissue

PINK = (228, 156, 196)   # saturation ≈ 80
WHITE = (242, 242, 242)


def canvas(h_um, w_um, mpp):
    return np.full((round(h_um / mpp), round(w_um / mpp), 3), WHITE, np.uint8)


def disc(img, mpp, cx_um, cy_um, r_um, color):
    cv2.circle(img, (round(cx_um / mpp), round(cy_um / mpp)), round(r_um / mpp), color, -1)


def drawing(mpp):
    """A 1.2 mm disc with a 300 µm hole (kept) and a 100 µm hole (filled: below
    min_hole_area), plus a 60 µm speck (dropped: below min_tissue_area)."""
    img = canvas(2000, 3000, mpp)
    disc(img, mpp, 1000, 1000, 600, PINK)
    disc(img, mpp, 1000, 1000, 150, WHITE)      # 0.071 mm² ≥ 0.05 mm²: a hole
    disc(img, mpp, 1300, 700, 50, WHITE)        # 0.008 mm²: filled
    disc(img, mpp, 2500, 1000, 30, PINK)        # 0.003 mm² speck: dropped
    return img


@pytest.mark.parametrize("mpp", [4.0, 8.0])
def test_filters_holes_and_specks_in_micrometres(mpp):
    tm = segment_tissue(drawing(mpp), mpp, TissueConfig())
    assert tm.mpp == mpp and tm.mask.dtype == np.uint8 and set(np.unique(tm.mask)) <= {0, 1}
    assert len(tm.contours) == 1 and len(tm.holes) == 1
    expected = math.pi * (0.6 ** 2 - 0.15 ** 2)            # mm²: the small hole is filled
    band = 2 * math.pi * (0.6 + 0.15) * mpp * 1e-3          # one pixel around every edge
    assert abs(tm.area_mm2 - expected) < band
    # Centre of the disc still background (the big hole), the small hole filled, speck gone.
    assert tm.mask[round(1000 / mpp), round(1000 / mpp)] == 0
    assert tm.mask[round(700 / mpp), round(1300 / mpp)] == 1
    assert tm.mask[:, round(2300 / mpp):].sum() == 0
    # No shift: the mask's centroid is the disc's centre (an even closing kernel would move it).
    ys, xs = np.nonzero(tm.mask)
    assert abs((xs.mean() + 0.5) * mpp - 1000) < mpp / 2 + 4   # the filled small hole pulls ≤ 4 µm
    assert abs((ys.mean() + 0.5) * mpp - 1000) < mpp / 2 + 4


def test_same_parameters_mean_the_same_at_any_resolution():
    a = segment_tissue(drawing(4.0), 4.0, TissueConfig())
    b = segment_tissue(drawing(8.0), 8.0, TissueConfig())
    assert abs(a.area_mm2 - b.area_mm2) < 0.02
    assert len(a.holes) == len(b.holes) == 1


def test_max_holes_keeps_the_largest_and_net_area_decides():
    mpp = 8.0
    img = canvas(2000, 2000, mpp)
    disc(img, mpp, 1000, 1000, 800, PINK)
    for (x, y, r) in [(700, 700, 200), (1300, 700, 160), (1000, 1350, 140)]:
        disc(img, mpp, x, y, r, WHITE)
    tm = segment_tissue(img, mpp, TissueConfig(max_holes=2))
    assert len(tm.holes) == 2
    assert tm.mask[round(700 / mpp), round(700 / mpp)] == 0 and tm.mask[round(700 / mpp), round(1300 / mpp)] == 0
    assert tm.mask[round(1350 / mpp), round(1000 / mpp)] == 1      # the smallest hole is filled
    # A thin ring: large outline, small net area → dropped when min area exceeds the net area.
    ring = canvas(2000, 2000, mpp)
    disc(ring, mpp, 1000, 1000, 800, PINK)
    disc(ring, mpp, 1000, 1000, 760, WHITE)
    net = math.pi * (0.8 ** 2 - 0.76 ** 2) * 1e6                # µm²
    assert segment_tissue(ring, mpp, TissueConfig(min_tissue_area_um2=net * 0.5)).area_mm2 > 0
    assert segment_tissue(ring, mpp, TissueConfig(min_tissue_area_um2=net * 2)).empty


def test_otsu_finds_faint_tissue_a_fixed_threshold_misses():
    mpp = 8.0
    img = canvas(1600, 1600, mpp)
    disc(img, mpp, 800, 800, 500, (236, 232, 235))              # saturation ≈ 4
    assert segment_tissue(img, mpp, TissueConfig()).empty
    tm = segment_tissue(img, mpp, TissueConfig(use_otsu=True))
    assert abs(tm.area_mm2 - math.pi * 0.25) < 0.05


def test_blank_and_kernel_skipping():
    tm = segment_tissue(canvas(800, 800, 8.0), 8.0, TissueConfig(median_blur_um=0, close_um=0))
    assert tm.empty and tm.area_mm2 == 0 and tm.contours == [] and tm.holes == []
    with pytest.raises(ValueError):
        segment_tissue(np.zeros((5, 5), np.uint8), 8.0, TissueConfig())


def test_thumbnail_of_a_pyramid_is_exact_size_and_aligned(tmp_path):
    # 40x slide, 8000 × 6000 px, a box and a disc of tissue at known level-0 px.
    tissue = box(2048, 1024, 5120, 4096).union(Point(6900, 3000).buffer(900))  # 0.16 mm²
    s = write_synthetic_slide(tmp_path / "s.svs", 8000, 6000, 0.25, tissue=tissue, lesions=None,
                              downsamples=(1, 4, 16))
    slide = openslide.OpenSlide(s.path)
    thumb, mpp = read_thumbnail(slide, 0.25, 8.0)
    assert mpp == 8.0 and thumb.shape == (math.ceil(6000 / 32), math.ceil(8000 / 32), 3)
    small_blocks, _ = read_thumbnail(slide, 0.25, 8.0, block_px=100)   # many blocks, same image
    assert np.abs(small_blocks.astype(int) - thumb).mean() < 2.0
    tm = segment_tissue(thumb, mpp, TissueConfig())
    ys, xs = np.nonzero(tm.mask[:, : round(5600 / 32)])               # the box only
    assert abs(xs.min() * 32 - 2048) <= 32 and abs((xs.max() + 1) * 32 - 5120) <= 32
    assert abs(ys.min() * 32 - 1024) <= 32 and abs((ys.max() + 1) * 32 - 4096) <= 32
    assert abs(tm.area_mm2 - tissue.area * 0.25 ** 2 / 1e6) < 0.06
    # Finer than level 0 is clamped to level 0.
    _, mpp = read_thumbnail(slide, 0.25, 0.1, block_px=64)
    assert mpp == 0.25


def test_real_slides(slides_dir):
    cmu = openslide.OpenSlide(str(slides_dir / "CMU-1-Small-Region.svs"))
    thumb, mpp = read_thumbnail(cmu, 0.499, 8.0)
    tm = segment_tissue(thumb, mpp, TissueConfig())
    # A strip of skin: about a third of the 1.1 × 1.5 mm field is tissue.
    assert 0.4 < tm.area_mm2 < 0.9 and len(tm.contours) >= 1
    sat = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[:, :, 1]
    assert sat[tm.mask == 1].mean() > 3 * sat[tm.mask == 0].mean()
    small = openslide.OpenSlide(str(slides_dir / "small.svs"))
    thumb, mpp = read_thumbnail(small, 0.499, 8.0)
    assert thumb.shape == (1, 1, 3) and segment_tissue(thumb, mpp, TissueConfig()).empty
