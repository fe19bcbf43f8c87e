"""Synthetic whole-slide images with known µm/px, tissue shapes and lesion polygons.

Used by tests, the demo and benchmarks. Slides are written tile by tile (never held in memory),
each pyramid level rendered procedurally at its own resolution: polygons are rasterised per tile
at that level and filled from periodic H&E-like textures (white background, pink stroma with
fibres and sparse spindle nuclei, lesions with dense purple nuclei) generated once per level, with
nucleus sizes in µm so a level looks right at its magnification.

Formats: "svs" writes an Aperio-style ImageDescription (MPP, AppMag) so OpenSlide reports
openslide.mpp-x/-y and objective-power; "tiff" writes a generic tiled pyramidal TIFF with
the resolution tags (pixels per cm), which OpenSlide 4's generic-tiff reader turns into
openslide.mpp-x/-y (checked in tests/test_synthetic.py).
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import shapely
import tifffile
from shapely.geometry import MultiPolygon, Polygon, mapping

from ..config import MPP_AT_10X

BACKGROUND = (240, 240, 240)
STROMA = (228, 156, 196)       # eosin pink
LESION_BASE = (192, 122, 182)  # purplish (basophilic) cytoplasm between the nuclei
NUCLEUS = (88, 52, 136)        # haematoxylin purple
_TEXTURE_PX = 1024             # texture period at each level (rounded up to a multiple of the tile)

# per tissue class: nuclei per mm², radius range (µm), elongation range (long/short axis)
_NUCLEI = {"stroma": (450.0, (2.0, 3.0), (1.8, 3.0)), "lesion": (7000.0, (3.2, 4.8), (1.0, 1.5))}


@dataclass(frozen=True)
class SyntheticSlide:
    path: str
    width: int
    height: int
    mpp: float
    tissue: MultiPolygon
    lesions: MultiPolygon
    downsamples: tuple[int, ...]

    def write_geojson(self, path: str | Path, classification: str = "Tumor") -> str:
        """The lesions as a QuPath-style GeoJSON FeatureCollection (level-0 px): ground truth."""
        feats = [{"type": "Feature", "geometry": mapping(p),
                  "properties": {"objectType": "annotation", "classification": {"name": classification}}}
                 for p in self.lesions.geoms]
        Path(path).write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
        return str(path)


def _multi(geom) -> MultiPolygon:
    if geom is None or geom.is_empty:
        return MultiPolygon()
    if isinstance(geom, Polygon):
        return MultiPolygon([geom])
    if isinstance(geom, MultiPolygon):
        return geom
    polys = [g for g in getattr(geom, "geoms", []) if isinstance(g, Polygon) and not g.is_empty]
    return MultiPolygon(polys)


def _blob(rng, cx, cy, radius, n=256) -> Polygon:
    """A smooth random closed shape: a circle with a few low-order harmonics."""
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, 6):
        r += rng.uniform(0, 0.14 / math.sqrt(k)) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return Polygon(np.c_[cx + radius * r * np.cos(theta), cy + radius * r * np.sin(theta)]).buffer(0)


def default_shapes(width: int, height: int, seed: int = 0) -> tuple[MultiPolygon, MultiPolygon]:
    """Two tissue blobs and one lesion inside the larger one (level-0 px)."""
    rng = np.random.default_rng(seed)
    s = min(width, height)
    ax, ay = width * rng.uniform(0.3, 0.38), height * rng.uniform(0.45, 0.55)
    a = _blob(rng, ax, ay, 0.3 * s)
    b = _blob(rng, width * rng.uniform(0.74, 0.78), height * rng.uniform(0.4, 0.6), 0.16 * s)
    tissue = _multi(a.union(b))
    lesion = _blob(rng, ax + rng.uniform(-0.05, 0.05) * s, ay + rng.uniform(-0.05, 0.05) * s, 0.13 * s)
    return tissue, _multi(lesion.intersection(a))


def _smooth_noise(rng, size: int, sigma_px: tuple[float, float]) -> np.ndarray:
    """Periodic Gaussian-filtered noise (filtered in Fourier space, so it tiles seamlessly),
    scaled to unit std. sigma_px = (y, x) allows oriented, fibre-like structure."""
    f = np.fft.rfft2(rng.standard_normal((size, size), dtype=np.float32))
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f *= np.exp(-2 * np.pi ** 2 * ((fy * sigma_px[0]) ** 2 + (fx * sigma_px[1]) ** 2))
    f[0, 0] = 0  # zero mean: otherwise a wide filter leaves mostly the DC term, blown up below
    out = np.fft.irfft2(f, s=(size, size))
    return (out / (out.std() + 1e-8)).astype(np.float32)


def _nuclei_alpha(rng, size: int, level_mpp: float, kind: str) -> np.ndarray | float:
    """Coverage (0..1) of nuclei on a periodic size×size canvas. Nuclei smaller than a pixel at
    this level are not drawn one by one: their mean coverage (a float) is returned instead."""
    density, (rmin, rmax), (emin, emax) = _NUCLEI[kind]
    area_mm2 = (size * level_mpp / 1000.0) ** 2
    mean_cov = min(0.6, density * math.pi * ((rmin + rmax) / 2) ** 2 * 1e-6)  # ellipse area = π r²
    if rmin / level_mpp < 1.0:
        return mean_cov
    n = rng.poisson(density * area_mm2)
    canvas = np.zeros((size, size), np.uint8)
    xs, ys = rng.uniform(0, size, n), rng.uniform(0, size, n)
    radii = rng.uniform(rmin, rmax, n) / level_mpp
    elong = rng.uniform(emin, emax, n)
    angles = rng.uniform(0, 180, n)
    shades = rng.integers(170, 256, n)
    reach = radii * elong + 2
    for dx in (-size, 0, size):           # wrapped copies make the texture periodic
        for dy in (-size, 0, size):
            cx, cy = xs + dx, ys + dy
            sel = np.flatnonzero((cx > -reach) & (cx < size + reach) & (cy > -reach) & (cy < size + reach))
            for i in sel:
                cv2.ellipse(canvas, (int(cx[i] * 16), int(cy[i] * 16)),
                            (max(1, int(radii[i] * elong[i] * 16)), max(1, int(radii[i] / elong[i] * 16))),
                            float(angles[i]), 0, 360, int(shades[i]), -1, cv2.LINE_AA, 4)
    return canvas.astype(np.float32) / 255.0


@functools.lru_cache(maxsize=12)
def _texture(seed: int, level: int, size: int, level_mpp: float, kind: str) -> np.ndarray:
    """A periodic size×size×3 uint8 texture for one class at one level (cached: tests and demos
    write many slides with the same parameters; the result is read-only)."""
    rng = np.random.default_rng([seed, level, ("background", "stroma", "lesion").index(kind)])
    grain = rng.standard_normal((size, size, 1), dtype=np.float32)
    if kind == "background":
        low = _smooth_noise(rng, size, (200 / level_mpp, 200 / level_mpp))[..., None]
        out = np.clip(np.float32(BACKGROUND) + 1.5 * low + 1.5 * grain, 0, 255).astype(np.uint8)
        out.flags.writeable = False
        return out
    base = np.float32(STROMA if kind == "stroma" else LESION_BASE)
    fib = _smooth_noise(rng, size, (max(0.7, 1.5 / level_mpp), max(0.7, 12 / level_mpp)))  # fibres along x
    low = _smooth_noise(rng, size, (max(1.0, 60 / level_mpp),) * 2)
    img = base * (1 + 0.05 * low[..., None] + (0.07 if kind == "stroma" else 0.03) * fib[..., None])
    alpha = _nuclei_alpha(rng, size, level_mpp, kind)
    if isinstance(alpha, float):   # sub-pixel nuclei: blend their mean colour, with some variation
        alpha = np.clip(alpha * (1 + 0.15 * low), 0, 1)
    alpha = alpha[..., None]
    img = img * (1 - alpha) + np.float32(NUCLEUS) * alpha + 3.0 * grain
    out = np.clip(img, 0, 255).astype(np.uint8)
    out.flags.writeable = False
    return out


def _rasterise(geom: MultiPolygon, x0: float, y0: float, d: int, t: int) -> np.ndarray:
    """Mask (t×t uint8) of `geom` (level-0 px) over the level tile whose top-left level px is
    (x0, y0); pixel centres are tested, as the ground-truth rasteriser does."""
    mask = np.zeros((t, t), np.uint8)
    x0_0, y0_0, x1_0, y1_0 = x0 * d, y0 * d, (x0 + t) * d, (y0 + t) * d
    for poly in geom.geoms:
        bx0, by0, bx1, by1 = poly.bounds
        if bx1 < x0_0 or bx0 > x1_0 or by1 < y0_0 or by0 > y1_0:
            continue
        rings = [poly.exterior, *poly.interiors]
        pts = [np.round((np.asarray(r.coords)[:, :2] / d - (x0 + 0.5, y0 + 0.5)) * 16).astype(np.int32)
               for r in rings]
        cv2.fillPoly(mask, pts, 1, cv2.LINE_8, 4)   # one call per polygon: holes cut by even-odd
    return mask


def _level_tiles(width, height, d, t, tissue, lesions, textures):
    """Yield the tiles of one level in row-major order."""
    lw, lh = math.ceil(width / d), math.ceil(height / d)
    nx, ny = math.ceil(lw / t), math.ceil(lh / t)
    period = textures["background"].shape[0]
    span = t * d
    for row in range(ny):
        # Classify a whole row of tiles at once: inside, outside or crossing each geometry.
        boxes = shapely.box(np.arange(nx) * span, row * span, (np.arange(nx) + 1) * span, (row + 1) * span)
        t_in, t_hit = shapely.contains(tissue, boxes), shapely.intersects(tissue, boxes)
        l_in, l_hit = shapely.contains(lesions, boxes), shapely.intersects(lesions, boxes)
        ty = (row * t) % period
        for col in range(nx):
            tx = (col * t) % period
            bg = textures["background"][ty:ty + t, tx:tx + t]
            if l_in[col]:
                yield textures["lesion"][ty:ty + t, tx:tx + t]
                continue
            if not t_hit[col] and not l_hit[col]:
                yield bg
                continue
            if t_in[col]:
                out = textures["stroma"][ty:ty + t, tx:tx + t].copy()
            else:
                m = _rasterise(tissue, col * t, row * t, d, t).astype(bool)
                out = np.where(m[..., None], textures["stroma"][ty:ty + t, tx:tx + t], bg)
            if l_hit[col]:
                m = _rasterise(lesions, col * t, row * t, d, t).astype(bool)
                out = np.where(m[..., None], textures["lesion"][ty:ty + t, tx:tx + t], out)
            yield out


def write_synthetic_slide(path, width: int, height: int, mpp: float, *, tissue=None, lesions=None,
                          downsamples=(1, 4, 16), tile: int = 256, fmt: str = "svs",
                          compression: str | None = "jpeg", seed: int = 0,
                          metadata: str = "mpp") -> SyntheticSlide:
    """Write a pyramidal tiled TIFF (`fmt` "svs" or "tiff") that OpenSlide opens with level-0
    µm/px `mpp`. `tissue`/`lesions` are shapely (Multi)Polygons in level-0 px (default: two
    random tissue blobs and one lesion inside the larger; lesions count as tissue). Level i is
    `downsamples[i]` times smaller (integers, the first 1).

    `metadata` says what the file tells about its resolution, to test the fallbacks: "mpp"
    (µm/px, and the objective power in an SVS), "objective-power" (SVS AppMag only) or "none"."""
    downsamples = tuple(int(d) for d in downsamples)
    if fmt not in ("svs", "tiff"):
        raise ValueError(f"fmt {fmt!r}: use 'svs' or 'tiff'")
    if not downsamples or downsamples[0] != 1 or any(b <= a for a, b in zip(downsamples, downsamples[1:])):
        raise ValueError(f"downsamples {downsamples}: must start at 1 and increase")
    if tile % 16 or tile <= 0:
        raise ValueError(f"tile {tile}: must be a positive multiple of 16")
    if width <= 0 or height <= 0 or not mpp > 0:
        raise ValueError(f"bad size {width}x{height} or mpp {mpp}")
    if metadata not in ("mpp", "objective-power", "none") or (metadata == "objective-power" and fmt != "svs"):
        raise ValueError(f"metadata {metadata!r}: use 'mpp', 'none' or (svs only) 'objective-power'")
    if tissue is None and lesions is None:
        tissue, lesions = default_shapes(width, height, seed)
    lesions = _multi(lesions)
    tissue = _multi(lesions if tissue is None else shapely.union(tissue, lesions))  # lesions are tissue
    shapely.prepare(tissue)
    shapely.prepare(lesions)

    mag = MPP_AT_10X * 10.0 / mpp
    quality = 90
    codec = compression.upper() if compression else "NONE"
    fields = {"mpp": f"|AppMag = {mag:g}|MPP = {mpp:.6g}", "objective-power": f"|AppMag = {mag:g}", "none": ""}
    desc0 = (f"Aperio Image Library v12.0.0 zeus_ray synthetic\r\n{width}x{height} [0,0 {width}x{height}] "
             f"({tile}x{tile}) {codec}/RGB Q={quality}{fields[metadata]}|Filename = {Path(path).stem}")
    kwargs = dict(photometric="rgb", tile=(tile, tile), metadata=None)
    if compression:
        kwargs["compression"] = compression
        if compression.lower() == "jpeg":
            kwargs["compressionargs"] = {"level": quality}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2 ** 31) as tw:
        for i, d in enumerate(downsamples):
            lw, lh = math.ceil(width / d), math.ceil(height / d)
            # Texture period: a multiple of the tile (tiles never wrap), no larger than the level.
            period = tile * math.ceil(min(_TEXTURE_PX, max(lw, lh)) / tile)
            textures = {k: _texture(seed, i, period, mpp * d, k) for k in ("background", "stroma", "lesion")}
            extra = {}
            if fmt == "svs":
                extra["description"] = desc0 if i == 0 else f"Aperio Image Library v12.0.0 zeus_ray synthetic\r\n{width}x{height} -> {lw}x{lh}"
            elif metadata == "mpp":
                extra["resolution"] = (1e4 / (mpp * d), 1e4 / (mpp * d))
                extra["resolutionunit"] = "CENTIMETER"
            tw.write(_level_tiles(width, height, d, tile, tissue, lesions, textures), shape=(lh, lw, 3),
                     dtype=np.uint8, subfiletype=1 if i else 0, **kwargs, **extra)
    return SyntheticSlide(str(path), width, height, float(mpp), tissue, lesions, downsamples)


def write_unsupported_tiff(path) -> str:
    """A plain stripped (non-tiled) RGB TIFF: a valid image that OpenSlide rejects."""
    img = np.full((64, 64, 3), 200, np.uint8)
    tifffile.imwrite(path, img, photometric="rgb", metadata=None)
    return str(path)
