"""Level-0 µm/px resolution (override, metadata, objective power, error) and pyramid level choice,
on the real test slides and on synthetic pyramids with known levels."""
from __future__ import annotations

import logging

import numpy as np
import openslide
import pytest
import tifffile

from zeus_ray.errors import SlideError
from zeus_ray.magnification import LevelChoice, choose_level, resolve_mpp
from zeus_ray.synthetic import write_synthetic_slide


def _slide(tmp_path, name, mpp=0.25, **kw):
    kw.setdefault("downsamples", (1, 4, 16))
    s = write_synthetic_slide(tmp_path / name, 1024, 768, mpp, tile=128, **kw)
    return openslide.OpenSlide(s.path)


def test_real_slides(slides_dir):
    cmu = openslide.OpenSlide(str(slides_dir / "CMU-1-Small-Region.svs"))
    assert resolve_mpp(cmu, "cmu") == (pytest.approx(0.499), "metadata")
    assert resolve_mpp(cmu, "cmu", override=0.5) == (0.5, "override")

    tcga = openslide.OpenSlide(str(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs"))
    with pytest.raises(SlideError) as e:
        resolve_mpp(tcga, "tcga")
    msg = str(e.value)
    assert e.value.reason == "no_mpp" and "'tcga'" in msg and "--mpp" in msg and "`mpp` column" in msg
    assert resolve_mpp(tcga, "tcga", override=0.25) == (0.25, "override")
    for bad in (0, -1.0, float("nan"), "abc"):
        with pytest.raises(SlideError) as e:
            resolve_mpp(cmu, "cmu", override=bad)
        assert e.value.reason == "no_mpp" and "override" in str(e.value)


def test_objective_power_fallback_and_no_metadata(tmp_path):
    s = _slide(tmp_path, "mag.svs", metadata="objective-power")   # AppMag = 40, no MPP
    assert "openslide.mpp-x" not in s.properties
    assert resolve_mpp(s, "mag") == (pytest.approx(0.25), "objective-power")
    for fmt in ("svs", "tiff"):
        s = _slide(tmp_path, f"none.{fmt}", metadata="none", fmt=fmt)
        with pytest.raises(SlideError) as e:
            resolve_mpp(s, "none")
        assert e.value.reason == "no_mpp"


def _generic_tiff(path, res_x, res_y):
    """A one-level tiled TIFF with the given resolution tags (pixels per cm)."""
    tifffile.imwrite(path, np.full((256, 256, 3), 230, np.uint8), photometric="rgb", tile=(128, 128),
                     resolution=(res_x, res_y), resolutionunit="CENTIMETER", metadata=None)
    return openslide.OpenSlide(str(path))


def test_mpp_x_and_y(tmp_path):
    near = _generic_tiff(tmp_path / "near.tif", 1e4 / 0.500, 1e4 / 0.504)  # 0.8 % apart: averaged
    assert resolve_mpp(near, "near") == (pytest.approx(0.502, abs=1e-6), "metadata")
    far = _generic_tiff(tmp_path / "far.tif", 1e4 / 0.5, 1e4 / 0.6)         # not square pixels
    with pytest.raises(SlideError) as e:
        resolve_mpp(far, "far")
    assert e.value.reason == "no_mpp" and "not square" in str(e.value)


def test_choose_level_real_slides(slides_dir):
    cmu = openslide.OpenSlide(str(slides_dir / "CMU-1-Small-Region.svs"))
    c = choose_level(cmu, 0.499, 1.0)    # 20x, one level: 10x tiles are ~896-px reads halved
    assert (c.level, c.downsample) == (0, 1.0) and c.scale == pytest.approx(2.004, abs=1e-3)
    assert not c.upsampled and round(448 * c.scale) == 898
    tcga = openslide.OpenSlide(str(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs"))
    c = choose_level(tcga, 0.25, 1.0)    # levels 1 and ~2: the coarser one is still finer than 1.0
    assert c.level == 1 and c.level_mpp == pytest.approx(0.5001, abs=1e-4)
    assert c.scale == pytest.approx(1.0 / (0.25 * tcga.level_downsamples[1]))
    c = choose_level(tcga, 0.25, 0.4)
    assert c.level == 0 and c.scale == pytest.approx(1.6)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    return _slide(tmp_path_factory.mktemp("pyr"), "p.svs")


@pytest.mark.parametrize("target, level, scale", [
    (0.25, 0, 1.0), (0.5, 0, 2.0), (0.99, 0, 3.96), (1.0, 1, 1.0), (2.0, 1, 2.0),
    (4.0, 2, 1.0), (10.0, 2, 2.5),
])
def test_choose_level_synthetic_pyramid(pyramid, target, level, scale):
    s = pyramid
    assert s.level_downsamples == (1.0, 4.0, 16.0)
    c = choose_level(s, 0.25, target)
    assert isinstance(c, LevelChoice)
    assert c.level == level and c.scale == pytest.approx(scale) and not c.upsampled
    assert c.level_mpp == pytest.approx(0.25 * s.level_downsamples[level])


def test_level_tolerance(tmp_path):
    # A level at 1.004 µm/px counts as 10x (within 1 %); one at 1.012 does not.
    s = _slide(tmp_path, "a.svs", mpp=0.251)
    c = choose_level(s, 0.251, 1.0)
    assert c.level == 1 and c.scale == pytest.approx(1.0 / 1.004) and not c.upsampled
    s = _slide(tmp_path, "b.svs", mpp=0.253)
    assert choose_level(s, 0.253, 1.0).level == 0


def test_upsampling_is_flagged_and_warned_once(tmp_path, caplog):
    s = _slide(tmp_path, "coarse.svs", mpp=2.0, downsamples=(1, 2))
    with caplog.at_level(logging.WARNING, logger="zeus_ray.magnification"):
        c = choose_level(s, 2.0, 1.0)
        again = choose_level(s, 2.0, 1.0)
    assert c == again and c.level == 0 and c.scale == pytest.approx(0.5) and c.upsampled
    assert sum("upsampled" in r.getMessage() for r in caplog.records) == 1
