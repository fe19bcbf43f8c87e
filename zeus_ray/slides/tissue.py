"""CLAM-style tissue segmentation on a low-resolution thumbnail (OpenCV).

Steps: HSV saturation → median blur → fixed or Otsu threshold → morphological closing →
contours with a two-level hierarchy (tissue, holes) → area filters. Every length and area in
`TissueConfig` is in µm / µm², converted to thumbnail pixels here, so that the parameters mean
the same whatever the thumbnail's resolution.

Mask geometry: thumbnail pixel (i, j) covers level-0 px [j·s, (j+1)·s) × [i·s, (i+1)·s) with
s = mask mpp / level-0 mpp; the thumbnail is ceil(W/s) × ceil(H/s) px (the last row/column may
reach past the slide edge, where it is background).

Defaults (TissueConfig) and why:
- thumbnail_mpp 8 µm/px: a 448 µm (10x) tile spans 56 mask px, so tissue fractions resolve to
  ~2 %; a 100,000 px wide 40x slide gives a 3,125 px thumbnail (cheap to read and segment).
- saturation_threshold 8, median blur 56 µm (7 px at 8 µm/px), closing 32 µm (rounded up to an
  odd 5 px): CLAM's usual settings (sthresh 8, mthresh 7, close 4) at this resolution. The fixed
  threshold counts a boundary pixel that is only partly tissue as tissue, so the mask runs about
  one thumbnail pixel (8 µm) outside the tissue edge: generous, never clipping tissue.
- min_tissue_area 0.1 mm² (a 316 µm square, under one 10x tile): drops dust and specks but keeps
  small fragments of skin biopsies; the net area (outline minus holes) is compared.
- min_hole_area 0.05 mm², max_holes 8: only sizeable lumina or tears become holes.
Tissue area is the mask's pixel count × mpp², not the contour area.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..config import TissueConfig
from .region_reader import rgba_to_rgb


@dataclass
class TissueMask:
    mask: np.ndarray            # uint8 (H, W), 1 = tissue
    mpp: float                  # µm per mask pixel (both axes)
    contours: list[np.ndarray] = field(default_factory=list)  # kept tissue outlines, mask px (N,1,2) int32
    holes: list[np.ndarray] = field(default_factory=list)     # kept holes, mask px

    @property
    def area_mm2(self) -> float:
        """Tissue area from the mask's pixel count (pixels are mpp × mpp µm)."""
        return float(self.mask.sum(dtype=np.int64)) * (self.mpp * 1e-3) ** 2

    @property
    def empty(self) -> bool:
        return not self.mask.any()


def _odd_kernel(um: float, mpp: float, odd: bool = True) -> int:
    """Kernel side in px from a width in µm: odd (even sizes round up; with `odd` False kept as
    given), ≥ 3, or 0 (skip) when the width is under 2.5 px."""
    k = int(round(um / mpp))
    if k < 3:
        return 0
    return k if k % 2 or not odd else k + 1


def median_then_threshold(img: np.ndarray, k: int, thresh: int) -> np.ndarray:
    """threshold(medianBlur(img, k)) > thresh as 0/1 uint8, exactly, without the median: a median
    exceeds t iff most of its window does (thresholding is monotone), so a k × k majority count
    of the binary image gives the same pixels as OpenCV's median (same replicated border) at a
    fraction of the cost (a 7-px uint8 median is OpenCV's slow histogram path)."""
    binary = (img > thresh).astype(np.uint8)
    if not k:
        return binary
    count = cv2.boxFilter(binary, -1, (k, k), normalize=False, borderType=cv2.BORDER_REPLICATE)
    return (count >= (k * k + 1) // 2).astype(np.uint8)


def segment_tissue(thumb_rgb: np.ndarray, thumb_mpp: float, cfg: TissueConfig) -> TissueMask:
    """Tissue mask of an RGB uint8 thumbnail whose pixels are `thumb_mpp` µm wide."""
    if thumb_rgb.ndim != 3 or thumb_rgb.shape[2] != 3 or thumb_rgb.dtype != np.uint8:
        raise ValueError(f"segment_tissue expects uint8 (H, W, 3), got {thumb_rgb.dtype} {thumb_rgb.shape}")
    sat = np.ascontiguousarray(cv2.cvtColor(thumb_rgb, cv2.COLOR_RGB2HSV)[:, :, 1])
    k = _odd_kernel(cfg.median_blur_um, thumb_mpp)
    if cfg.use_otsu:
        _, binary = cv2.threshold(cv2.medianBlur(sat, k) if k else sat, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    else:
        binary = median_then_threshold(sat, k, cfg.saturation_threshold)
    # Odd kernel: OpenCV anchors an even kernel off-centre and the closing would shift the mask.
    c = _odd_kernel(cfg.close_um, thumb_mpp, cfg.odd_kernels)
    if c:
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, np.ones((c, c), np.uint8))

    px_area = thumb_mpp ** 2  # µm² per thumbnail px
    # RETR_CCOMP: top-level outer contours and their holes (islands inside holes are top-level again).
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    kept_tissue: list[np.ndarray] = []
    kept_holes: list[np.ndarray] = []
    if hierarchy is not None:
        hierarchy = hierarchy[0]  # rows: next, prev, first_child, parent
        for i, cnt in enumerate(contours):
            if hierarchy[i][3] != -1:
                continue
            holes = []
            child = hierarchy[i][2]
            while child != -1:
                holes.append(contours[child])
                child = hierarchy[child][0]
            hole_areas = [cv2.contourArea(h) * px_area for h in holes]
            # Net area (outline minus all holes), as CLAM does, so a ring of tissue is not
            # kept just because its outline is large.
            if cv2.contourArea(cnt) * px_area - sum(hole_areas) < cfg.min_tissue_area_um2:
                continue
            kept_tissue.append(cnt)
            big = sorted((a, j) for j, a in enumerate(hole_areas) if a >= cfg.min_hole_area_um2)
            kept_holes.extend(holes[j] for _, j in big[::-1][:cfg.max_holes])

    mask = np.zeros(binary.shape, np.uint8)
    if kept_tissue:
        cv2.drawContours(mask, kept_tissue, -1, 1, thickness=cv2.FILLED)
    if kept_holes:
        # A hole's contour runs through the tissue pixels around it: clear the filled hole, then
        # give its outline back to the tissue so only background pixels are removed.
        cv2.drawContours(mask, kept_holes, -1, 0, thickness=cv2.FILLED)
        if cfg.hole_outlines:
            cv2.drawContours(mask, kept_holes, -1, 1, thickness=1)
    return TissueMask(mask=mask, mpp=float(thumb_mpp), contours=kept_tissue, holes=kept_holes)


def read_thumbnail(slide, mpp0: float, thumb_mpp: float, block_px: int = 4096, tiff=None,
                   slide_id: str = "") -> tuple[np.ndarray, float]:
    """RGB uint8 thumbnail of an OpenSlide at `thumb_mpp` µm/px (never finer than level 0).

    The result is ceil(W/s) × ceil(H/s) px with s = thumb_mpp / mpp0, so pixel (i, j) covers
    level-0 [j·s, (j+1)·s) × [i·s, (i+1)·s) exactly; outside the slide is white. It is built from
    the coarsest level at least as fine as the thumbnail, read in blocks of at most `block_px`
    level px a side (a 40x slide without a pyramid is never read whole) and resized with
    INTER_AREA; block edges are placed to within one level px. Returns (rgb, µm/px).
    `tiff` (tiff_levels.TiffLevels): its levels are decoded straight from the file (the same pixels
    as OpenSlide's; several times faster).
    """
    thumb_mpp = max(float(thumb_mpp), float(mpp0))
    s = thumb_mpp / mpp0
    w0, h0 = slide.dimensions
    tw, th = max(1, math.ceil(w0 / s)), max(1, math.ceil(h0 / s))
    level = slide.get_best_level_for_downsample(s)
    ds = slide.level_downsamples[level]
    lw, lh = slide.level_dimensions[level]
    ratio = s / ds                                  # level px per thumbnail px (≥ 1 up to rounding)
    if abs(ratio - 1) * max(tw, th) < 0.5:
        # The level is the thumbnail's scale up to OpenSlide's averaged downsample (e.g. 15.988 for
        # 16 when a side was rounded up): read it as is, every pixel within half a pixel of its box.
        ratio = 1.0
    block = max(16, int(block_px / max(ratio, 1.0)))  # thumbnail px per block side
    out = np.empty((th, tw, 3), np.uint8)
    for ty0 in range(0, th, block):
        ty1 = min(th, ty0 + block)
        for tx0 in range(0, tw, block):
            tx1 = min(tw, tx0 + block)
            lx0, ly0 = math.floor(tx0 * ratio), math.floor(ty0 * ratio)
            lx1, ly1 = max(lx0 + 1, math.ceil(tx1 * ratio)), max(ly0 + 1, math.ceil(ty1 * ratio))
            # Read only what lies inside the level (outside is white anyway): no transparent pixels
            # to composite, and a thumbnail at the level's own scale needs no resize.
            rw, rh = max(1, min(lx1, lw) - lx0), max(1, min(ly1, lh) - ly0)
            if tiff is not None and tiff.has(level):
                rgb = tiff.read(level, lx0, ly0, rw, rh, slide_id)
            else:
                rgb = rgba_to_rgb(slide.read_region((round(lx0 * ds), round(ly0 * ds)), level, (rw, rh)))
            if (rw, rh) != (lx1 - lx0, ly1 - ly0):
                rgb = np.pad(rgb, ((0, ly1 - ly0 - rh), (0, lx1 - lx0 - rw), (0, 0)), constant_values=255)
            size = (tx1 - tx0, ty1 - ty0)
            if (rgb.shape[1], rgb.shape[0]) != size:
                interp = cv2.INTER_AREA if size[0] <= rgb.shape[1] else cv2.INTER_LINEAR
                rgb = cv2.resize(rgb, size, interpolation=interp)
            out[ty0:ty1, tx0:tx1] = rgb
    return out, thumb_mpp
