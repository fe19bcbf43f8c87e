"""Synthetic slides: OpenSlide opens them with the stated size, levels and µm/px, and their pixels
follow the tissue and lesion polygons at every level."""
from __future__ import annotations

import json

import cv2
import numpy as np
import openslide
import pytest
import shapely
import tifffile
from shapely.geometry import Polygon, box, shape

from zeus_ray.demo.synthetic import BACKGROUND, write_synthetic_slide, write_unsupported_tiff


def _patch(slide, level, x0, y0, size=32) -> np.ndarray:
    """RGB patch centred on level-0 point (x0, y0), read at `level`."""
    d = slide.level_downsamples[level]
    loc = (int(x0 - size / 2 * d), int(y0 - size / 2 * d))
    return np.asarray(slide.read_region(loc, level, (size, size)).convert("RGB")).astype(np.float32)


@pytest.mark.parametrize("fmt, vendor", [("svs", "aperio"), ("tiff", "generic-tiff")])
def test_opens_with_size_levels_and_mpp(tmp_path, fmt, vendor):
    s = write_synthetic_slide(tmp_path / f"s.{fmt}", 2000, 1500, 0.5, downsamples=(1, 4, 16), tile=256, fmt=fmt)
    o = openslide.OpenSlide(s.path)
    assert o.properties["openslide.vendor"] == vendor
    assert o.dimensions == (2000, 1500) and o.level_count == 3
    assert o.level_dimensions == ((2000, 1500), (500, 375), (125, 94))
    assert o.level_downsamples[1] == pytest.approx(4.0) and o.level_downsamples[2] == pytest.approx(16, rel=0.01)
    # OpenSlide 4 reports mpp for both: from MPP in the Aperio description, and from the TIFF
    # resolution tags (pixels per cm) for a generic TIFF. Only the SVS carries an objective power.
    assert float(o.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    assert float(o.properties["openslide.mpp-y"]) == pytest.approx(0.5)
    assert o.properties.get("openslide.objective-power") == ("20" if fmt == "svs" else None)
    assert s.width == 2000 and s.height == 1500 and s.mpp == 0.5 and s.downsamples == (1, 4, 16)


def test_default_shapes_and_colours_at_every_level(tmp_path):
    s = write_synthetic_slide(tmp_path / "d.svs", 4096, 3072, 0.25, downsamples=(1, 4, 16), seed=3)
    assert s.tissue.area > 0.1 * 4096 * 3072 and len(s.tissue.geoms) == 2
    assert len(s.lesions.geoms) == 1 and s.lesions.within(s.tissue.buffer(1))
    o = openslide.OpenSlide(s.path)
    lesion_pt = s.lesions.buffer(-300).representative_point()
    stroma_pt = s.tissue.difference(s.lesions.buffer(600)).buffer(-300).representative_point()
    bg_pt = box(0, 0, 4096, 3072).difference(s.tissue.buffer(600)).representative_point()
    for level in range(3):
        size = 32 if level < 2 else 8
        les, stroma, bg = (_patch(o, level, p.x, p.y, size) for p in (lesion_pt, stroma_pt, bg_pt))
        # White background with slight noise.
        assert np.all(np.abs(bg.mean((0, 1)) - BACKGROUND) < 6) and 0 < bg.std() < 8, level
        # Pink stroma: red above green, clearly darker than the background.
        r, g, b = stroma.mean((0, 1))
        assert r > g + 40 and b > g and stroma.mean() < 215, level
        # Lesion: dense purple nuclei make it darker and bluer than the stroma.
        assert les.mean() < stroma.mean() - 15, level
        lr, lg, lb = les.mean((0, 1))
        assert lb - lr > b - r, level

    # Nuclei are drawn as structure at 40x: a lesion patch has far more contrast than the stroma.
    def grey_std(pt):
        return _patch(o, 0, pt.x, pt.y, 256).mean(axis=2).std()
    assert grey_std(lesion_pt) > 1.5 * grey_std(stroma_pt) and grey_std(stroma_pt) > 5


def test_given_polygons_with_holes_are_rasterised_exactly(tmp_path):
    ring = Polygon([(100, 100), (1100, 100), (1100, 800), (100, 800)],
                   [[(700, 300), (1000, 300), (1000, 600), (700, 600)]])
    lesion = Polygon([(200, 200), (584, 200), (584, 680), (200, 680)])
    s = write_synthetic_slide(tmp_path / "g.tiff", 1200, 900, 1.0, tissue=ring, lesions=lesion,
                              downsamples=(1, 4), tile=128, fmt="tiff", compression="zlib")
    o = openslide.OpenSlide(s.path)
    for level, d in enumerate((1, 4)):
        w, h = o.level_dimensions[level]
        rgb = np.asarray(o.read_region((0, 0), level, (w, h)).convert("RGB")).astype(np.float32)
        is_tissue = rgb.min(axis=2) <= 225
        # Expected masks at this level's pixel centres; pixels next to a boundary may go either way.
        xs, ys = np.meshgrid((np.arange(w) + 0.5) * d, (np.arange(h) + 0.5) * d)
        want_tissue = shapely.contains_xy(ring.union(lesion), xs, ys).astype(np.uint8)
        want_lesion = shapely.contains_xy(lesion, xs, ys)
        k = np.ones((3, 3), np.uint8)
        inner = cv2.erode(want_tissue, k).astype(bool)
        outer = ~cv2.dilate(want_tissue, k).astype(bool)
        assert np.all(is_tissue[inner]) and not np.any(is_tissue[outer]), level
        assert not is_tissue[int(450 / d), int(850 / d)]  # inside the hole
        # Lesion vs stroma on 32-µm blocks: a grey threshold between them separates the blocks.
        b = 32 // d
        grey = cv2.resize(rgb.mean(axis=2), (w // b, h // b), interpolation=cv2.INTER_AREA)
        les = cv2.resize(want_lesion.astype(np.float32), (w // b, h // b), interpolation=cv2.INTER_AREA)
        tis = cv2.resize(want_tissue.astype(np.float32), (w // b, h // b), interpolation=cv2.INTER_AREA)
        les_blocks, stroma_blocks = grey[les > 0.999], grey[(tis > 0.999) & (les < 0.001)]
        assert len(les_blocks) > 100 and len(stroma_blocks) > 100
        les_med, stroma_med = np.median(les_blocks), np.median(stroma_blocks)
        assert stroma_med - les_med > 20, level
        cut = (les_med + stroma_med) / 2
        assert (les_blocks < cut).mean() > 0.97 and (stroma_blocks > cut).mean() > 0.97, level


def test_deterministic_and_seeded(tmp_path):
    a = write_synthetic_slide(tmp_path / "a.svs", 1024, 768, 0.5, tile=128, seed=1)
    b = write_synthetic_slide(tmp_path / "b.svs", 1024, 768, 0.5, tile=128, seed=1)
    c = write_synthetic_slide(tmp_path / "c.svs", 1024, 768, 0.5, tile=128, seed=2)
    pages = [[p.asarray() for p in tifffile.TiffFile(x.path).pages] for x in (a, b, c)]
    assert len(pages[0]) == 3 and all(np.array_equal(p, q) for p, q in zip(pages[0], pages[1]))
    assert not np.array_equal(pages[0][0], pages[2][0])
    assert a.tissue.equals(b.tissue) and not a.tissue.equals(c.tissue)


def test_geojson_ground_truth(tmp_path):
    s = write_synthetic_slide(tmp_path / "g.svs", 1024, 768, 0.5, tile=128)
    doc = json.loads(open(s.write_geojson(tmp_path / "gt.geojson")).read())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 1
    f = doc["features"][0]
    assert f["properties"]["classification"]["name"] == "Tumor"
    assert shape(f["geometry"]).equals(s.lesions.geoms[0])


def test_unsupported_tiff_and_bad_arguments(tmp_path):
    p = write_unsupported_tiff(tmp_path / "plain.tif")
    assert tifffile.imread(p).shape == (64, 64, 3) and not tifffile.TiffFile(p).pages[0].is_tiled
    with pytest.raises(openslide.OpenSlideUnsupportedFormatError):
        openslide.OpenSlide(p)
    for kw in ({"downsamples": (2, 4)}, {"downsamples": (1, 4, 4)}, {"tile": 100}, {"fmt": "png"},
               {"metadata": "objective-power", "fmt": "tiff"}):
        with pytest.raises(ValueError):
            write_synthetic_slide(tmp_path / "x.svs", 256, 256, 0.5, **kw)
