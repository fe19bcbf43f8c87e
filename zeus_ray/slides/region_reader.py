"""Read overlapping tiles by decoding each slide pixel about once.

A naive per-tile `read_region` decodes every pixel (patch/stride)² times (16× at 75 % overlap).
Here kept tiles are grouped into blocks of region_tiles × region_tiles grid positions; each block
is ONE `read_region` at the chosen level covering the bounding box of its kept tiles, converted to
RGB (transparent = white), resized ONCE to the target resolution (INTER_AREA when downsampling),
and the tiles are cut from memory. Per tile that decodes ((R-1)·stride + patch)² / R² target px² of
region instead of patch²: with 448/112 and R = 8, 0.12 × the tile area (plus block margins).

Alignment: each tile is cut at its table position (level-0 x, y) mapped into the resized region
and rounded, so its pixels sit within half a target pixel of its box (plus the sub-pixel placement
OpenSlide gives a level read at a non-integer downsample).

`plan_regions` is pure and returns small picklable `Region`s, one Ray task's worth of work each.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import pyarrow as pa

from .access import slide_read_errors
from .tiling import TileGrid, round_half_up, tile_origins

# Largest region side in level px: bounds memory (RGBA at 4096² is 64 MB) when only a fine level
# exists and the resize factor is large; the block side shrinks to fit.
MAX_REGION_PX = 4096


@dataclass(frozen=True, eq=False)
class Region:
    slide_id: str
    level: int
    location: tuple[int, int]       # level-0 top-left passed to read_region
    read_size: tuple[int, int]      # (w, h) px at `level`: pixels decoded
    out_size: tuple[int, int]       # (w, h) target px after the single resize
    tile_ids: np.ndarray            # int64 (N,)
    offsets: np.ndarray             # int64 (N, 2): each tile's (u, v) top-left in the resized region
    grid_rows: np.ndarray = field(repr=False)
    grid_cols: np.ndarray = field(repr=False)
    origin: tuple[int, int]         # the integer level px at `location`: reads count read_size from it

    @property
    def n_tiles(self) -> int:
        return len(self.tile_ids)

    @property
    def decoded_px(self) -> int:
        return self.read_size[0] * self.read_size[1]


@dataclass
class ReadStats:
    """Accumulated by read_region_tiles (decoded px = px returned by read_region at the level)."""
    regions: int = 0
    tiles: int = 0
    decoded_px: int = 0
    seconds: float = 0.0


def block_tiles(grid: TileGrid, region_tiles: int) -> int:
    """Tiles per region side: `region_tiles`, shrunk so a region stays within MAX_REGION_PX."""
    fit = int((MAX_REGION_PX / grid.scale - grid.patch_size) // grid.stride) + 1
    return max(1, min(int(region_tiles), fit))


def _columns(tiles) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if isinstance(tiles, pa.Table):
        get = lambda name: tiles.column(name).to_numpy()  # noqa: E731
    else:
        get = lambda name: np.asarray(tiles[name])  # noqa: E731
    return (get("tile_id").astype(np.int64), get("grid_row").astype(np.int64),
            get("grid_col").astype(np.int64))


def plan_regions(tiles, grid: TileGrid, region_tiles: int, slide_id: str = "") -> list[Region]:
    """Group tiles (a tiles pa.Table or a mapping with tile_id, grid_row, grid_col arrays) into
    blocks of region_tiles × region_tiles grid positions; one Region per non-empty block, covering
    the bounding box of its tiles, in row-major block order."""
    if not slide_id and isinstance(tiles, pa.Table) and tiles.num_rows:
        slide_id = tiles.column("slide_id")[0].as_py()
    ids, rows, cols = _columns(tiles)
    if len(ids) == 0:
        return []
    r = block_tiles(grid, region_tiles)
    n_block_cols = grid.n_cols // r + 1
    block = (rows // r) * n_block_cols + cols // r
    order = np.lexsort((cols, rows, block))
    ids, rows, cols, block = ids[order], rows[order], cols[order], block[order]
    starts = np.flatnonzero(np.r_[True, block[1:] != block[:-1]])
    ends = np.r_[starts[1:], len(block)]
    ds, scale = grid.level_downsample, grid.scale
    groups = [g for s, e in zip(starts, ends) for g in _split_sparse(rows[s:e], cols[s:e], ids[s:e], grid)]
    regions = []
    for br, bc, bi in groups:
        x, y = tile_origins(grid, br, bc)
        # Integer level-px origin at or before the first tile; location is its level-0 equivalent.
        lx, ly = math.floor(x.min() / ds), math.floor(y.min() / ds)
        margin = max(2, math.ceil(scale))  # room for rounding and the resize kernel
        rw = math.ceil((x.max() + grid.patch0) / ds - lx) + margin
        rh = math.ceil((y.max() + grid.patch0) / ds - ly) + margin
        if grid.read_size == grid.patch_size:   # native resolution: no resize
            ow, oh = rw, rh
        else:
            ow, oh = max(1, int(round_half_up(rw / scale))), max(1, int(round_half_up(rh / scale)))
        # Tile top-left in the resized region, from its table position (not from the stride) so
        # every tile stays within half a target pixel of its level-0 box.
        u = round_half_up((x / ds - lx) * ow / rw)
        v = round_half_up((y / ds - ly) * oh / rh)
        regions.append(Region(
            slide_id=slide_id, level=grid.level,
            location=(int(round_half_up(lx * ds)), int(round_half_up(ly * ds))),
            read_size=(rw, rh), out_size=(ow, oh), tile_ids=bi, offsets=np.stack([u, v], axis=1),
            grid_rows=br, grid_cols=bc, origin=(lx, ly)))
    return regions


# Read cost model for sparse selections: a read_region call costs about READ_CALL_PX decoded level
# px of fixed overhead (≈3 ms against ≈12 ns per px, as timed on the development machine).
READ_CALL_PX = 250_000


def _bbox_px(rows: np.ndarray, cols: np.ndarray, grid: TileGrid) -> float:
    """Level px decoded by one read covering these tiles' boxes."""
    side = lambda v: (v.max() - v.min()) * grid.stride0 + grid.patch0  # noqa: E731 - level-0 px
    return side(cols) * side(rows) / grid.level_downsample ** 2


def _split_sparse(rows, cols, ids, grid: TileGrid) -> list[tuple]:
    """One block's tiles as one read, or, when they are sparse (an adaptive pass along a contour),
    as the reads of its quadrants when that decodes fewer pixels than it costs in calls. A dense
    block (full overlap) never splits: its quadrants' boxes overlap and cover more than it does."""
    whole = _bbox_px(rows, cols, grid) + READ_CALL_PX
    if len(ids) == 1 or whole <= 2 * READ_CALL_PX:
        return [(rows, cols, ids)]
    r_mid, c_mid = (rows.min() + rows.max() + 1) / 2, (cols.min() + cols.max() + 1) / 2
    quad = (rows >= r_mid).astype(int) * 2 + (cols >= c_mid)
    parts = [np.flatnonzero(quad == q) for q in range(4)]
    parts = [p for p in parts if len(p)]
    if len(parts) == 1:
        return [(rows, cols, ids)]
    split = sum(_bbox_px(rows[p], cols[p], grid) + READ_CALL_PX for p in parts)
    if split >= whole:
        return [(rows, cols, ids)]
    return [g for p in parts for g in _split_sparse(rows[p], cols[p], ids[p], grid)]


def rgba_to_rgb(img, padding: str = "white") -> np.ndarray:
    """PIL RGBA (OpenSlide.read_region) → RGB uint8 array; transparent pixels (outside the scanned
    area) become white, or with `padding` "black" the alpha is dropped as PIL's convert('RGB')
    does (OpenSlide's transparent pixels are black: the published ZEUS code's tiles). Opaque
    images, the common case, skip the blending."""
    from PIL import Image

    if padding == "black":
        return np.asarray(img.convert("RGB"))
    if img.getchannel("A").getextrema()[0] < 255:
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return np.asarray(img.convert("RGB"))


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (img.shape[1], img.shape[0]) == tuple(size):
        return img
    shrink = size[0] < img.shape[1]
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def region_rgb(img, size: tuple[int, int], padding: str = "white") -> np.ndarray:
    """A read_region result as RGB at `size`. An opaque region (the common case) is resized with
    its alpha channel and the alpha dropped after: the same pixels as converting first, with two
    fewer passes over the full-resolution image; a region with transparent pixels is composited
    over white first."""
    arr = np.asarray(img)
    if arr[..., 3].min() < 255:
        return _resize(rgba_to_rgb(img, padding), size)
    return np.ascontiguousarray(_resize(arr, size)[..., :3])


def read_region_tiles(slide, grid: TileGrid, region: Region, stats: ReadStats | None = None,
                      tiff=None) -> tuple[np.ndarray, np.ndarray]:
    """Decode `region` with one read (straight from the TIFF tiles when `tiff`, a
    tiff_levels.TiffLevels, serves its level; else OpenSlide's read_region), resize once, cut its
    tiles. Returns (tile_ids int64 (N,), tiles uint8 (N, P, P, 3)). Decoding errors → SlideError."""
    t0 = time.perf_counter()
    padding = getattr(grid, "padding", "white")
    fill = 0 if padding == "black" else 255
    if tiff is not None and tiff.has(region.level):
        rgb = _resize(tiff.read(region.level, *region.origin, *region.read_size, slide_id=region.slide_id,
                                fill=fill), region.out_size)
    else:
        with slide_read_errors(region.slide_id):
            img = slide.read_region(region.location, region.level, region.read_size)
        rgb = region_rgb(img, region.out_size, padding)
    p = grid.patch_size
    need_w = int(region.offsets[:, 0].max()) + p
    need_h = int(region.offsets[:, 1].max()) + p
    if need_w > rgb.shape[1] or need_h > rgb.shape[0]:  # rounding at the far edge: pad as past the edge
        rgb = np.pad(rgb, ((0, max(0, need_h - rgb.shape[0])), (0, max(0, need_w - rgb.shape[1])), (0, 0)),
                     constant_values=fill)
    out = np.empty((region.n_tiles, p, p, 3), np.uint8)
    for i, (u, v) in enumerate(region.offsets):
        out[i] = rgb[v:v + p, u:u + p]
    if stats is not None:
        stats.regions += 1
        stats.tiles += region.n_tiles
        stats.decoded_px += region.decoded_px
        stats.seconds += time.perf_counter() - t0
    return region.tile_ids, out


def read_tile_naive(slide, grid: TileGrid, x: int, y: int, slide_id: str = "") -> np.ndarray:
    """Reference reader: one read_region of read_size px at the level for one tile, resized to
    patch_size. Decodes every pixel (patch/stride)² times at full overlap; used by tests and the
    benchmark as the baseline."""
    with slide_read_errors(slide_id):
        img = slide.read_region((int(x), int(y)), grid.level, (grid.read_size, grid.read_size))
    return region_rgb(img, (grid.patch_size, grid.patch_size), getattr(grid, "padding", "white"))
