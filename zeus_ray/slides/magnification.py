"""Magnification: a slide's level-0 µm/px, the pyramid level to read for a target µm/px, and the
plausibility limits on a slide's geometry (µm/px range, upsampling, tile budget).

The paper assumed level 0 is 10x; we resolve µm/px per slide instead: a user override, else the
metadata (openslide.mpp-x/-y), else the objective power with the convention 10x = 1.0 µm/px
(20x = 0.5, 40x = 0.25), else input.default_mpp, else a clear per-slide error. Metadata outside
MIN_PLAUSIBLE_MPP–MAX_PLAUSIBLE_MPP counts as missing: generic TIFFs often carry a screen
resolution (OpenSlide's generic-tiff reader turns 72 dpi with unit inch into 352.8 µm/px).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from ..config import MAX_PLAUSIBLE_MPP, MIN_PLAUSIBLE_MPP, MPP_AT_10X, mpp_for_magnification
from ..errors import SlideError

log = logging.getLogger(__name__)

# A level counts as the target resolution when it is at most this much coarser (scanners write
# e.g. 1.004 µm/px for a nominal 10x level).
LEVEL_TOLERANCE = 0.01
# mpp-x and mpp-y further apart than this mean non-square pixels, which the tiling cannot honour.
ANISOTROPY_LIMIT = 0.05
# Grid positions above this multiple of tiling.max_tiles_per_slide fail before the thumbnail is
# read (see check_tile_budget).
POSITIONS_PER_TILE_BUDGET = 20

# How each command lets a user give a slide's µm/px: `zeus run` through the manifest or the
# config, `zeus tiles` through its --mpp flag.
_OVERRIDE_HINTS = {
    "run": "give its level-0 µm/px in the manifest's `mpp` column, or input.default_mpp for every slide "
           "without a usable one (e.g. --set input.default_mpp=0.25 for 40x scans)",
    "tiles": "give its level-0 µm/px with --mpp (e.g. --mpp 0.25 for a 40x scan)",
}
_BAD_OVERRIDE = {"run": ("the manifest's `mpp`", "fix that column (level-0 µm/px, e.g. 0.25 for a 40x scan)"),
                 "tiles": ("--mpp", "give level-0 µm/px (e.g. --mpp 0.25 for a 40x scan)")}


def _positive(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def plausible_mpp(mpp: float | None) -> bool:
    return mpp is not None and MIN_PLAUSIBLE_MPP <= mpp <= MAX_PLAUSIBLE_MPP


def _range() -> str:
    return f"{MIN_PLAUSIBLE_MPP:g}–{MAX_PLAUSIBLE_MPP:g} µm/px"


def _tiff_resolution(props) -> str:
    """The generic-TIFF resolution tags OpenSlide derived µm/px from, e.g. "72 dpi, unit inch"."""
    if props.get("openslide.vendor") != "generic-tiff" or "tiff.XResolution" not in props:
        return ""
    res, unit = props.get("tiff.XResolution"), props.get("tiff.ResolutionUnit", "none")
    per = {"inch": "dpi", "centimeter": "px/cm"}.get(unit, "px per unit")
    return f"{res} {per}, unit {unit}"


def resolve_mpp(slide, slide_id: str, override: float | None = None, default: float | None = None,
                command: str = "run", warn: bool = True) -> tuple[float, str]:
    """Level-0 µm/px of `slide` and where it came from: "override", "metadata", "objective-power"
    or "input.default_mpp". Raises SlideError(reason="no_mpp") when nothing plausible gives it;
    the message's hint names what `command` ("run" or "tiles") accepts. `warn`: log the fallbacks."""
    hint = _OVERRIDE_HINTS[command]
    if override is not None:
        mpp = _positive(override)
        if not plausible_mpp(mpp):
            name, fix = _BAD_OVERRIDE[command]
            raise SlideError(slide_id, f"{name} {override!r} is not a microscopy resolution ({_range()}); {fix}",
                             reason="no_mpp")
        return mpp, "override"

    props = slide.properties
    found = []      # what the metadata said that we could not use, for the message
    mx = _positive(props.get("openslide.mpp-x"))
    my = _positive(props.get("openslide.mpp-y"))
    if mx is not None or my is not None:
        if all(v is None or plausible_mpp(v) for v in (mx, my)):
            if mx is not None and my is not None:
                if abs(mx - my) / min(mx, my) > ANISOTROPY_LIMIT:
                    raise SlideError(slide_id, f"pixels are not square in its metadata (mpp-x {mx:g}, mpp-y {my:g} "
                                     f"µm/px); {hint}", reason="no_mpp")
                return (mx + my) / 2, "metadata"
            return (mx if mx is not None else my), "metadata"
        tags = _tiff_resolution(props)
        found.append(f"metadata says {mx if mx is not None else my:.4g} µm/px" + (f" ({tags})" if tags else "")
                     + f": not a microscopy resolution ({_range()})")
    else:
        # OpenSlide gives no µm/px for TIFF resolution tags without a physical unit (unit none).
        tags = _tiff_resolution(props)
        found.append("no µm/px in its metadata" + (f" (TIFF resolution {tags}: not a length)" if tags else
                                                    " (openslide.mpp-x)"))

    power = _positive(props.get("openslide.objective-power"))
    if power is not None:
        mpp = mpp_for_magnification(power)
        if plausible_mpp(mpp):
            if warn:
                log.warning("slide %r: %s; assuming %.4g µm/px from objective power %gx", slide_id,
                            "; ".join(found), mpp, power)
            return mpp, "objective-power"
        found.append(f"objective power {power:g}x ({mpp:.4g} µm/px): not a microscopy resolution")
    else:
        found.append("no objective power")

    what = "; ".join(found)
    if default is not None:
        if warn:
            log.warning("slide %r: %s; using input.default_mpp %g µm/px", slide_id, what, default)
        return float(default), "input.default_mpp"
    raise SlideError(slide_id, f"{what}; {hint}", reason="no_mpp")


@dataclass(frozen=True)
class LevelChoice:
    """The pyramid level to read and how to scale it to the target resolution.

    `scale` = target_mpp / level_mpp: a read of `round(patch * scale)` level px is resized to
    `patch` px. scale > 1 downsamples; scale < 1 (`upsampled`) means the slide is coarser than the
    target and tiles are interpolated.
    """
    level: int
    level_mpp: float
    downsample: float
    scale: float

    @property
    def upsampled(self) -> bool:
        return self.level_mpp > (1 + LEVEL_TOLERANCE) * self.target_mpp

    @property
    def target_mpp(self) -> float:
        return self.scale * self.level_mpp


def choose_level(slide, mpp0: float, target_mpp: float) -> LevelChoice:
    """The coarsest level whose µm/px is still ≤ target_mpp (1 % tolerance), so that no level is
    upsampled when a finer one exists; level 0 when even level 0 is coarser than the target
    (check_upsampling decides whether that is allowed)."""
    if not (mpp0 > 0 and target_mpp > 0):
        raise ValueError(f"mpp0 ({mpp0}) and target_mpp ({target_mpp}) must be positive")
    downsamples = slide.level_downsamples
    fine_enough = [i for i, ds in enumerate(downsamples) if mpp0 * ds <= target_mpp * (1 + LEVEL_TOLERANCE)]
    best = max(fine_enough, key=lambda i: downsamples[i], default=0)
    ds = float(downsamples[best])
    return LevelChoice(level=best, level_mpp=mpp0 * ds, downsample=ds, scale=target_mpp / (mpp0 * ds))


def check_upsampling(slide_id: str, choice: LevelChoice, mpp_source: str, max_upsampling: float) -> None:
    """Fail (reason "upsampling") when the tiles would be interpolated from a slide more than
    `max_upsampling` × coarser than the target (1 % tolerance: a "5x" scan at 2.008 µm/px still
    passes at 10x with the default 2); warn when they are upsampled less than that."""
    if not choice.upsampled:
        return
    factor = 1 / choice.scale
    if factor > max_upsampling * (1 + LEVEL_TOLERANCE):
        finest = choice.level_mpp / max_upsampling          # the finest target this slide allows
        raise SlideError(slide_id, f"level 0 is {choice.level_mpp:.4g} µm/px (from {mpp_source}), {factor:.3g}× "
                         f"coarser than the target {choice.target_mpp:.4g} µm/px (tiling.max_upsampling "
                         f"{max_upsampling:g}); lower tiling.magnification to {MPP_AT_10X * 10 / finest:.3g} or less "
                         f"(tiling.target_mpp ≥ {finest:.4g}), or raise tiling.max_upsampling", reason="upsampling")
    log.warning("slide %r: level 0 is %.4g µm/px, coarser than the target %.4g µm/px: tiles are upsampled ×%.2f "
                "(lower the target magnification to avoid interpolation)", slide_id, choice.level_mpp,
                choice.target_mpp, factor)


def check_tile_budget(slide_id: str, n_tiles: int, max_tiles: int, mpp0: float, mpp_source: str,
                      positions: bool = False) -> None:
    """Fail (reason "too_many_tiles") when a slide needs more than tiling.max_tiles_per_slide tiles.

    Called twice. Before the thumbnail is read, with the grid's position count (`positions`): an
    upper bound on the kept tiles, but a sparse biopsy on a huge scan keeps few of them, so it fails
    only beyond POSITIONS_PER_TILE_BUDGET × the budget. That is ≥ 100× the positions of the largest
    real WSI at the defaults (so only a wrong µm/px or a misconfigured grid reaches it), and where a
    slide with under 5 % tissue would still fit, while the per-position arrays of the tissue step
    (about 50 bytes each) reach half a GB. After the tissue step, with the kept tiles: exact.
    """
    limit = max_tiles * POSITIONS_PER_TILE_BUDGET if positions else max_tiles
    if n_tiles <= limit:
        return
    what = (f"its tile grid has {n_tiles:,} positions, over {POSITIONS_PER_TILE_BUDGET}× "
            f"tiling.max_tiles_per_slide ({max_tiles:,})" if positions else
            f"it needs {n_tiles:,} tiles, over tiling.max_tiles_per_slide ({max_tiles:,})")
    raise SlideError(slide_id, f"{what} at level-0 {mpp0:.4g} µm/px (from {mpp_source}); check its µm/px, or raise "
                     "tiling.max_tiles_per_slide if the slide is that large", reason="too_many_tiles")
