"""Magnification: a slide's level-0 µm/px and the pyramid level to read for a target µm/px.

The paper assumed level 0 is 10x; we resolve µm/px per slide instead: a user override, else the
metadata (openslide.mpp-x/-y), else the objective power with the convention 10x = 1.0 µm/px
(20x = 0.5, 40x = 0.25), else a clear per-slide error.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from .config import mpp_for_magnification
from .errors import SlideError

log = logging.getLogger(__name__)

# A level counts as the target resolution when it is at most this much coarser (scanners write
# e.g. 1.004 µm/px for a nominal 10x level).
LEVEL_TOLERANCE = 0.01
# mpp-x and mpp-y further apart than this mean non-square pixels, which the tiling cannot honour.
ANISOTROPY_LIMIT = 0.05

_warned_upsampling: set[tuple] = set()


def _positive(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def resolve_mpp(slide, slide_id: str, override: float | None = None) -> tuple[float, str]:
    """Level-0 µm/px of `slide` and where it came from: "override", "metadata" or
    "objective-power". Raises SlideError(reason="no_mpp") when nothing gives it."""
    if override is not None:
        mpp = _positive(override)
        if mpp is None:
            raise SlideError(slide_id, f"mpp override {override!r} is not a positive number of µm/px "
                             "(e.g. --mpp 0.25 for a 40x scan)", reason="no_mpp")
        return mpp, "override"

    props = slide.properties
    mx = _positive(props.get("openslide.mpp-x"))
    my = _positive(props.get("openslide.mpp-y"))
    if mx is not None and my is not None:
        if abs(mx - my) / min(mx, my) > ANISOTROPY_LIMIT:
            raise SlideError(slide_id, f"pixels are not square in its metadata (mpp-x {mx:g}, mpp-y {my:g} µm/px); "
                             "give the µm/px to use with --mpp or an `mpp` column in the manifest",
                             reason="no_mpp")
        return (mx + my) / 2, "metadata"
    if mx is not None or my is not None:
        return (mx if mx is not None else my), "metadata"

    power = _positive(props.get("openslide.objective-power"))
    if power is not None:
        mpp = mpp_for_magnification(power)
        log.warning("slide %r: no µm/px in its metadata; assuming %.4g µm/px from objective power %gx",
                    slide_id, mpp, power)
        return mpp, "objective-power"

    raise SlideError(slide_id, "no µm/px (openslide.mpp-x) and no objective power in its metadata; give it "
                     "with --mpp 0.25 on the command line or an `mpp` column in the manifest",
                     reason="no_mpp")


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
    upsampled when a finer one exists; level 0 when even level 0 is coarser than the target."""
    if not (mpp0 > 0 and target_mpp > 0):
        raise ValueError(f"mpp0 ({mpp0}) and target_mpp ({target_mpp}) must be positive")
    downsamples = slide.level_downsamples
    fine_enough = [i for i, ds in enumerate(downsamples) if mpp0 * ds <= target_mpp * (1 + LEVEL_TOLERANCE)]
    best = max(fine_enough, key=lambda i: downsamples[i], default=0)
    ds = float(downsamples[best])
    choice = LevelChoice(level=best, level_mpp=mpp0 * ds, downsample=ds, scale=target_mpp / (mpp0 * ds))
    if choice.upsampled:
        key = (tuple(slide.dimensions), round(mpp0, 6), round(target_mpp, 6))
        if key not in _warned_upsampling:
            _warned_upsampling.add(key)
            log.warning("slide of %dx%d px at %.4g µm/px is coarser than the target %.4g µm/px: tiles are "
                        "upsampled ×%.2f (lower the target magnification to avoid interpolation)",
                        *slide.dimensions, mpp0, target_mpp, 1 / choice.scale)
    return choice
