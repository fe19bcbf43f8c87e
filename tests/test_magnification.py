"""Level-0 µm/px resolution (override, metadata, objective power, error) and pyramid level choice,
on the real test slides and on synthetic pyramids with known levels."""
from __future__ import annotations

import logging

import numpy as np
import openslide
import pytest
import tifffile

from zeus_ray.config import MAX_PLAUSIBLE_MPP, MIN_PLAUSIBLE_MPP, JobConfig
from zeus_ray.errors import SlideError
from zeus_ray.slides.magnification import (POSITIONS_PER_TILE_BUDGET, LevelChoice, check_tile_budget, check_upsampling,
                                    choose_level, resolve_mpp)
from zeus_ray.demo.synthetic import write_synthetic_slide
from zeus_ray.slides.planning import plan_slide

from _dpi_tiff import write_dpi_tiff


def _slide(tmp_path, name, mpp=0.25, **kw):
    kw.setdefault("downsamples", (1, 4, 16))
    s = write_synthetic_slide(tmp_path / name, 1024, 768, mpp, tile=128, **kw)
    return openslide.OpenSlide(s.path)


def test_real_slides(slides_dir):
    cmu = openslide.OpenSlide(str(slides_dir / "CMU-1-Small-Region.svs"))
    assert resolve_mpp(cmu, "cmu") == (pytest.approx(0.499), "metadata")
    assert resolve_mpp(cmu, "cmu", override=0.5) == (0.5, "override")

    tcga = openslide.OpenSlide(str(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs"))
    # Each command's message names what that command accepts: `zeus run` has no --mpp flag.
    with pytest.raises(SlideError) as e:
        resolve_mpp(tcga, "tcga")
    msg = str(e.value)
    assert e.value.reason == "no_mpp" and "'tcga'" in msg and "no µm/px" in msg and "no objective power" in msg
    assert "`mpp` column" in msg and "input.default_mpp" in msg and "--mpp" not in msg and "\n" not in msg
    with pytest.raises(SlideError) as e:
        resolve_mpp(tcga, "tcga", command="tiles")
    assert "--mpp 0.25" in str(e.value) and "`mpp` column" not in str(e.value)
    assert resolve_mpp(tcga, "tcga", override=0.25) == (0.25, "override")
    # input.default_mpp is for slides like this one; an override beats it, metadata beats it.
    assert resolve_mpp(tcga, "tcga", default=0.5) == (0.5, "input.default_mpp")
    assert resolve_mpp(tcga, "tcga", override=0.25, default=0.5) == (0.25, "override")
    assert resolve_mpp(cmu, "cmu", default=2.0) == (pytest.approx(0.499), "metadata")
    for bad in (0, -1.0, float("nan"), "abc", 352.8, 0.01, 25):
        for command, name in (("run", "manifest's `mpp`"), ("tiles", "--mpp")):
            with pytest.raises(SlideError) as e:
                resolve_mpp(cmu, "cmu", override=bad, command=command)
            assert e.value.reason == "no_mpp" and name in str(e.value) and "0.05–20 µm/px" in str(e.value)
    assert resolve_mpp(cmu, "cmu", override=MIN_PLAUSIBLE_MPP) == (MIN_PLAUSIBLE_MPP, "override")
    assert resolve_mpp(cmu, "cmu", override=MAX_PLAUSIBLE_MPP) == (MAX_PLAUSIBLE_MPP, "override")


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


def test_mild_upsampling_warns_and_strong_upsampling_fails(tmp_path, caplog):
    s = _slide(tmp_path, "coarse.svs", mpp=2.0, downsamples=(1, 2))     # a 5x scan
    c = choose_level(s, 2.0, 1.0)
    assert c.level == 0 and c.scale == pytest.approx(0.5) and c.upsampled
    with caplog.at_level(logging.WARNING, logger="zeus_ray.slides.magnification"):
        check_upsampling("coarse", c, "metadata", 2.0)                   # 5x read at 10x: allowed
        check_upsampling("coarse", choose_level(s, 2.0, 2.0), "metadata", 2.0)   # not upsampled
        check_upsampling("coarse", choose_level(s, 2.008, 1.0), "metadata", 2.0)  # a "5x" level at 2.008
    assert sum("upsampled ×2" in r.getMessage() for r in caplog.records) == 2
    with pytest.raises(SlideError) as e:                                  # a 2.5x scan at 10x
        check_upsampling("coarse", choose_level(s, 4.0, 1.0), "metadata", 2.0)
    msg = str(e.value)
    assert e.value.reason == "upsampling" and "'coarse'" in msg and "4 µm/px (from metadata)" in msg
    assert "target 1 µm/px" in msg and "tiling.magnification to 5 or less" in msg and "tiling.max_upsampling" in msg
    check_upsampling("coarse", choose_level(s, 4.0, 1.0), "metadata", 4.0)   # raised limit: allowed


def test_tile_budget():
    check_tile_budget("s", 100, 100, 0.5, "metadata")
    with pytest.raises(SlideError) as e:
        check_tile_budget("s", 101, 100, 0.5, "metadata")
    msg = str(e.value)
    assert e.value.reason == "too_many_tiles" and "101 tiles" in msg and "tiling.max_tiles_per_slide (100)" in msg
    # Grid positions bound the tiles from above: only far beyond the budget do they fail early.
    check_tile_budget("s", 100 * POSITIONS_PER_TILE_BUDGET, 100, 0.5, "metadata", positions=True)
    with pytest.raises(SlideError, match="positions") as e:
        check_tile_budget("s", 100 * POSITIONS_PER_TILE_BUDGET + 1, 100, 352.8, "metadata", positions=True)
    assert e.value.reason == "too_many_tiles" and "352.8 µm/px" in str(e.value)


@pytest.mark.parametrize("res, unit, expect", [
    (72, "INCH", "metadata says 352.8 µm/px (72 dpi, unit inch): not a microscopy resolution"),
    (300, "INCH", "metadata says 84.67 µm/px (300 dpi, unit inch): not a microscopy resolution"),
    (0.5, "CENTIMETER", "metadata says 2e+04 µm/px (0.5 px/cm, unit centimeter): not a microscopy resolution"),
    (72, "NONE", "no µm/px in its metadata (TIFF resolution 72 px per unit, unit none: not a length)"),
    (None, None, "no µm/px in its metadata"),
])
def test_implausible_tiff_resolution_is_missing(tmp_path, res, unit, expect):
    """What OpenSlide 4 makes of generic-TIFF resolution tags (generic-tiff reader: px per inch or
    per cm → openslide.mpp-x; unit none → no µm/px) and what we accept of it."""
    s = openslide.OpenSlide(write_dpi_tiff(tmp_path / "s.tif", res, unit or "NONE", size=512))
    if unit == "NONE":
        assert s.properties["tiff.ResolutionUnit"] == "none" and "openslide.mpp-x" not in s.properties
    with pytest.raises(SlideError) as e:
        resolve_mpp(s, "s", command="tiles")
    msg = str(e.value)
    assert e.value.reason == "no_mpp" and "no objective power" in msg and msg.endswith("(e.g. --mpp 0.25 for a 40x scan)")
    assert expect in msg, msg
    # The fallbacks after the metadata: an override, then input.default_mpp.
    assert resolve_mpp(s, "s", override=0.5) == (0.5, "override")
    assert resolve_mpp(s, "s", default=0.25) == (0.25, "input.default_mpp")


@pytest.mark.parametrize("res, unit, mpp", [
    (20000, "CENTIMETER", 0.5), (101600, "INCH", 0.25),     # microscopy resolutions in either unit
    (1e4 / MAX_PLAUSIBLE_MPP, "CENTIMETER", MAX_PLAUSIBLE_MPP), (1e4 / MIN_PLAUSIBLE_MPP, "CENTIMETER", MIN_PLAUSIBLE_MPP),
])
def test_plausible_tiff_resolution_is_used(tmp_path, res, unit, mpp):
    s = openslide.OpenSlide(write_dpi_tiff(tmp_path / "s.tif", res, unit, size=512))
    assert resolve_mpp(s, "s") == (pytest.approx(mpp), "metadata")


def test_implausible_metadata_falls_back_to_objective_power(tmp_path, caplog):
    aperio = "Aperio Image Library v12.0.0\r\n512x512 [0,0 512x512] (256x256) JPEG Q=70|AppMag = {}|MPP = 352.8"
    s = openslide.OpenSlide(write_dpi_tiff(tmp_path / "a.svs", 72, description=aperio.format(20), size=512))
    assert s.properties["openslide.mpp-x"].startswith("352.8")
    with caplog.at_level(logging.WARNING, logger="zeus_ray.slides.magnification"):
        assert resolve_mpp(s, "a") == (pytest.approx(0.5), "objective-power")
    assert any("352.8 µm/px" in r.getMessage() and "objective power 20x" in r.getMessage() for r in caplog.records)
    # An objective power that gives an implausible µm/px is no better (0.1x = 100 µm/px).
    s = openslide.OpenSlide(write_dpi_tiff(tmp_path / "b.svs", 72, description=aperio.format(0.1), size=512))
    with pytest.raises(SlideError) as e:
        resolve_mpp(s, "b")
    assert "metadata says 352.8 µm/px: not a microscopy resolution" in str(e.value)
    assert "objective power 0.1x (100 µm/px): not a microscopy resolution" in str(e.value)


def test_plan_slide_limits(tmp_path, slides_dir):
    """The limits as plan_slide applies them (what `zeus run` and `zeus tiles` call)."""
    # input.default_mpp gives the real frozen section without µm/px or objective power its µm/px.
    tcga = str(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs")
    with pytest.raises(SlideError, match="input.default_mpp"):
        plan_slide(tcga, "tcga", JobConfig())
    cfg = JobConfig.model_validate({"input": {"default_mpp": 0.25}})
    plan = plan_slide(tcga, "tcga", cfg)
    assert (plan.mpp0, plan.mpp_source, plan.grid.level) == (0.25, "input.default_mpp", 1) and plan.n_tiles > 0
    # The tile budget after tissue: exactly the kept tiles pass, one fewer fails.
    n = plan.n_tiles
    cfg.tiling.max_tiles_per_slide = n
    assert plan_slide(tcga, "tcga", cfg).n_tiles == n
    cfg.tiling.max_tiles_per_slide = n - 1
    with pytest.raises(SlideError) as e:
        plan_slide(tcga, "tcga", cfg)
    assert e.value.reason == "too_many_tiles" and f"needs {n:,} tiles" in str(e.value) and "'tcga'" in str(e.value)
    # A slide at 4 µm/px at 10x: 4× upsampling, over the default limit of 2.
    coarse = write_synthetic_slide(tmp_path / "coarse.svs", 512, 384, 4.0, tile=128, downsamples=(1,))
    with pytest.raises(SlideError) as e:
        plan_slide(coarse.path, "coarse", JobConfig())
    assert e.value.reason == "upsampling" and "4 µm/px" in str(e.value)
    assert plan_slide(coarse.path, "coarse", JobConfig.model_validate({"tiling": {"max_upsampling": 4}})).mpp0 == 4.0


def test_grid_positions_fail_before_any_pixel_is_read(slides_dir):
    """unreadable.svs opens but its pixels cannot be decoded: failing with the position count (not
    the read error) shows the grid check runs before the thumbnail read."""
    uri = str(slides_dir / "unreadable.svs")      # 16 × 16 px at 0.499 µm/px
    # 16-px tiles moving by 1 px at 0.25 µm/px (8 and 0.5 level-0 px): 16 × 16 = 256 positions.
    tiling = {"target_mpp": 0.25, "patch_size": 16, "overlap": 0.9375}
    cfg = JobConfig.model_validate({"tiling": tiling | {"max_tiles_per_slide": 12}})
    with pytest.raises(SlideError) as e:                # 256 > 20 × 12
        plan_slide(uri, "u", cfg)
    assert e.value.reason == "too_many_tiles" and "256 positions" in str(e.value)
    cfg.tiling.max_tiles_per_slide = 13                 # 256 ≤ 20 × 13: on to the read, which fails
    with pytest.raises(SlideError) as e:
        plan_slide(uri, "u", cfg)
    assert e.value.reason != "too_many_tiles" and "corrupt" in str(e.value)
