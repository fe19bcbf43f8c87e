"""Tile-grid geometry (pure: numpy and pyarrow, no OpenSlide).

Conventions (docs/ARCHITECTURE.md): coordinates are level-0 px; the grid starts at its origin, the
slide's (0, 0) by default (`tiling.anchor: tissue`: the tissue's bounding box, as the published ZEUS
code); tile (r, c) has its top-left at origin + (round(c·stride0), round(r·stride0)) with
stride0 = stride · target_mpp / mpp0 and covers patch0 = patch · target_mpp / mpp0 level-0 px
(floats). Rounding is half-up (floor(v + 0.5)), not Python's banker's rounding, so positions do not
depend on parity. The grid has the fewest rows/columns that cover the slide: the last tile's box
reaches the slide's right/bottom edge and, with any overlap (stride < patch, target no finer than
level 0), neighbouring boxes overlap, so every level-0 pixel lies inside some tile's box. Without
overlap, fractional box sizes can leave gaps narrower than one level-0 px between boxes.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import pyarrow as pa

from ..maps.rasterise import integral
from ..storage.store import check_slide_id

GRID_METADATA_KEY = b"zeus.grid"

TILES_SCHEMA = pa.schema([
    ("slide_id", pa.string()),
    ("tile_id", pa.int64()),          # grid_row * n_cols + grid_col: unique and stable per grid
    ("x", pa.int64()),                # level-0 px of the top-left
    ("y", pa.int64()),
    ("level", pa.int32()),            # pyramid level read
    ("read_size", pa.int32()),        # px at that level for one tile
    ("size", pa.int32()),             # px at the target resolution (fed to preprocessing)
    ("grid_row", pa.int32()),         # position on the stride grid
    ("grid_col", pa.int32()),
    ("tissue_fraction", pa.float32()),
])


def round_half_up(v):
    return np.floor(np.asarray(v, dtype=np.float64) + 0.5).astype(np.int64)


@dataclass(frozen=True)
class TileGrid:
    width: int               # level-0 slide size, px
    height: int
    mpp0: float              # level-0 µm/px
    target_mpp: float        # µm/px of the tiles
    patch_size: int          # tile side, target px
    stride: int              # target px between neighbouring tiles
    cell: int                # gcd(patch_size, stride): rasterisation cell, target px
    level: int               # pyramid level read
    level_downsample: float  # its downsample from level 0
    scale: float             # target_mpp / level_mpp: level px per target px (> 1 downsamples)
    read_size: int           # px at `level` read for one tile (round(patch_size · scale))
    stride0: float           # level-0 px between neighbouring tiles
    patch0: float            # level-0 px covered by one tile
    n_rows: int
    n_cols: int
    origin_x: int = 0        # level-0 px of tile (0, 0)'s top-left (tiling.anchor)
    origin_y: int = 0
    padding: str = "white"   # pixels past the slide's edge: white or black (tiling.padding)

    @property
    def origin_um(self) -> tuple[float, float]:
        """(x, y) of the grid's origin in µm from the slide's top-left."""
        return self.origin_x * self.mpp0, self.origin_y * self.mpp0

    @property
    def level_mpp(self) -> float:
        return self.mpp0 * self.level_downsample

    @property
    def n_positions(self) -> int:
        return self.n_rows * self.n_cols

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "TileGrid":
        return cls(**json.loads(text))


def _count(extent: int, stride0: float, patch0: float) -> int:
    """Fewest grid positions n ≥ 1 with round((n-1)·stride0) + patch0 ≥ extent."""
    n = max(1, math.ceil((extent - patch0) / stride0) + 1)
    while int(round_half_up((n - 1) * stride0)) + patch0 < extent:
        n += 1
    while n > 1 and int(round_half_up((n - 2) * stride0)) + patch0 >= extent:
        n -= 1
    return n


def _starts(extent: int, stride0: float) -> int:
    """Positions n with round((n-1)·stride0) < extent."""
    n = max(1, math.ceil(extent / stride0))
    while n > 1 and int(round_half_up((n - 1) * stride0)) >= extent:
        n -= 1
    while int(round_half_up(n * stride0)) < extent:
        n += 1
    return n


def make_grid(width: int, height: int, mpp0: float, target_mpp: float, patch_size: int, stride: int,
              level: int = 0, level_downsample: float = 1.0, origin: tuple[int, int] = (0, 0),
              padding: str = "white", every_start: bool = False) -> TileGrid:
    """The tile grid of a width × height (level-0 px) slide read from `level`, its tile (0, 0) at
    `origin` (level-0 px inside the slide); it covers the slide from there to its right/bottom edge
    with the fewest positions, or with `every_start` has every position whose top-left lies inside
    the slide (CLAM's grid, whose tiles run past the edge: tiling.selection four_point)."""
    if not (width > 0 and height > 0):
        raise ValueError(f"slide size {width}x{height} must be positive")
    if not (mpp0 > 0 and target_mpp > 0 and level_downsample > 0):
        raise ValueError("mpp0, target_mpp and level_downsample must be positive")
    if not (0 < stride <= patch_size):
        raise ValueError(f"stride {stride} must be in 1..patch_size ({patch_size})")
    ox, oy = int(origin[0]), int(origin[1])
    if not (0 <= ox < width and 0 <= oy < height):
        raise ValueError(f"grid origin {origin} lies outside the {width}x{height} slide")
    f = target_mpp / mpp0            # level-0 px per target px
    stride0, patch0 = stride * f, patch_size * f
    scale = target_mpp / (mpp0 * level_downsample)
    return TileGrid(
        width=int(width), height=int(height), mpp0=float(mpp0), target_mpp=float(target_mpp),
        patch_size=int(patch_size), stride=int(stride), cell=math.gcd(int(patch_size), int(stride)),
        level=int(level), level_downsample=float(level_downsample), scale=float(scale),
        read_size=max(1, int(round_half_up(patch_size * scale))), stride0=stride0, patch0=patch0,
        n_rows=_starts(height - oy, stride0) if every_start else _count(height - oy, stride0, patch0),
        n_cols=_starts(width - ox, stride0) if every_start else _count(width - ox, stride0, patch0),
        origin_x=ox, origin_y=oy, padding=str(padding))


def grid_positions(grid: TileGrid) -> tuple[np.ndarray, np.ndarray]:
    """All (grid_row, grid_col) of the grid, row-major, int64."""
    rows, cols = np.divmod(np.arange(grid.n_positions, dtype=np.int64), grid.n_cols)
    return rows, cols


def tile_origins(grid: TileGrid, rows, cols) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 (x, y) of the top-left of tiles (rows, cols)."""
    return (grid.origin_x + round_half_up(np.asarray(cols) * grid.stride0),
            grid.origin_y + round_half_up(np.asarray(rows) * grid.stride0))


def _box_integral(sat: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """∫∫ of the mask over [0, x) × [0, y) for real (x, y) in mask px. The mask is constant per
    pixel, so this integral is bilinear inside each pixel: bilinear interpolation of the
    summed-area table is exact."""
    h, w = sat.shape[0] - 1, sat.shape[1] - 1
    x = np.clip(x, 0, w)
    y = np.clip(y, 0, h)
    ix = np.minimum(np.floor(x).astype(np.int64), max(w - 1, 0))
    iy = np.minimum(np.floor(y).astype(np.int64), max(h - 1, 0))
    fx, fy = x - ix, y - iy
    return (sat[iy, ix] * (1 - fx) * (1 - fy) + sat[iy, ix + 1] * fx * (1 - fy)
            + sat[iy + 1, ix] * (1 - fx) * fy + sat[iy + 1, ix + 1] * fx * fy)


def tissue_fractions(grid: TileGrid, mask: np.ndarray, mask_mpp: float, rows, cols) -> np.ndarray:
    """Area-exact tissue fraction of each tile's level-0 box [x, x+patch0) × [y, y+patch0):
    the area of its intersection with the tissue pixels (squares of mask_mpp µm, pixel (i, j)
    covering level-0 [j·s, (j+1)·s), s = mask_mpp / mpp0) over the box area. Outside the mask
    counts as background. Vectorised with a summed-area table."""
    m = np.asarray(mask)
    sat = integral(m != 0, np.int32 if m.size < 2**31 else np.int64)
    x, y = tile_origins(grid, rows, cols)
    k = grid.mpp0 / mask_mpp  # mask px per level-0 px
    x0, y0 = x * k, y * k
    x1, y1 = (x + grid.patch0) * k, (y + grid.patch0) * k
    area = (_box_integral(sat, x1, y1) - _box_integral(sat, x0, y1)
            - _box_integral(sat, x1, y0) + _box_integral(sat, x0, y0))
    return np.clip(area / (grid.patch0 * k) ** 2, 0.0, 1.0)


def _level0_contours(contours, mask_mpp: float, mpp0: float) -> list[np.ndarray]:
    """Mask-px contours in level-0 px, truncated to integers as CLAM scales them."""
    s = mask_mpp / mpp0
    return [np.asarray(np.asarray(c, np.float64) * s, dtype=np.int32) for c in contours]


def tissue_anchor(contours, mask_mpp: float, mpp0: float) -> tuple[int, int]:
    """Level-0 top-left of the bounding box of all tissue contours ((0, 0) without tissue)."""
    if not len(contours):
        return 0, 0
    boxes = np.array([cv2.boundingRect(c) for c in _level0_contours(contours, mask_mpp, mpp0)])
    return max(0, int(boxes[:, 0].min())), max(0, int(boxes[:, 1].min()))


def four_point_keep(grid: TileGrid, contours, holes, mask_mpp: float, rows, cols) -> np.ndarray:
    """CLAM's four-point rule, as the published ZEUS code selects tiles: a tile is kept for a tissue
    contour when its top-left lies in the contour's bounding box [x, x+w) × [y, y+h), one of the 4
    points centre ± (patch0 // 2) // 2 (level-0 px, integers) is inside or on the contour and the
    centre is not strictly inside a hole. Contours and holes are in mask px (TissueMask)."""
    x, y = tile_origins(grid, rows, cols)
    keep = np.zeros(len(x), bool)
    half = int(round_half_up(grid.patch0)) // 2
    shift = half // 2
    cx, cy = x + half, y + half
    level0_holes = _level0_contours(holes, mask_mpp, grid.mpp0)
    for cont in _level0_contours(contours, mask_mpp, grid.mpp0):
        bx, by, bw, bh = cv2.boundingRect(cont)
        cand = np.flatnonzero(~keep & (x >= bx) & (x < bx + bw) & (y >= by) & (y < by + bh))
        for i in cand:
            pts = ((cx[i] - shift, cy[i] - shift), (cx[i] + shift, cy[i] + shift),
                   (cx[i] + shift, cy[i] - shift), (cx[i] - shift, cy[i] + shift))
            if not any(cv2.pointPolygonTest(cont, (float(px), float(py)), False) >= 0 for px, py in pts):
                continue
            centre = (float(cx[i]), float(cy[i]))
            keep[i] = not any(cv2.pointPolygonTest(h, centre, False) > 0 for h in level0_holes)
    return keep


def tile_table(grid: TileGrid, tissue_mask, min_fraction: float, slide_id: str,
               selection: str = "fraction") -> pa.Table:
    """The tiles table (`TILES_SCHEMA`) for tiles whose tissue fraction is ≥ min_fraction and > 0
    (a tile without any tissue is never kept), or with `selection` "four_point" those
    four_point_keep keeps, with the grid as JSON in the schema metadata (key b"zeus.grid").
    `tissue_mask` is a tissue.TissueMask (mask + mpp, contours and holes)."""
    check_slide_id(slide_id)
    rows, cols = grid_positions(grid)
    frac = tissue_fractions(grid, tissue_mask.mask, tissue_mask.mpp, rows, cols)
    if selection == "four_point":
        keep = four_point_keep(grid, tissue_mask.contours, tissue_mask.holes, tissue_mask.mpp, rows, cols)
    elif selection == "fraction":
        keep = (frac >= min_fraction) & (frac > 0)
    else:
        raise ValueError(f"tiling.selection {selection!r}: use fraction or four_point")
    rows, cols, frac = rows[keep], cols[keep], frac[keep]
    x, y = tile_origins(grid, rows, cols)
    n = len(rows)
    table = pa.table({
        "slide_id": pa.array([slide_id] * n, pa.string()),
        "tile_id": pa.array(rows * grid.n_cols + cols, pa.int64()),
        "x": pa.array(x, pa.int64()),
        "y": pa.array(y, pa.int64()),
        "level": pa.array(np.full(n, grid.level), pa.int32()),
        "read_size": pa.array(np.full(n, grid.read_size), pa.int32()),
        "size": pa.array(np.full(n, grid.patch_size), pa.int32()),
        "grid_row": pa.array(rows, pa.int32()),
        "grid_col": pa.array(cols, pa.int32()),
        "tissue_fraction": pa.array(frac.astype(np.float32), pa.float32()),
    }, schema=TILES_SCHEMA)
    return table.replace_schema_metadata({GRID_METADATA_KEY: grid.to_json().encode()})


def grid_from_table_metadata(source) -> TileGrid:
    """The TileGrid stored with a tiles table: accepts a pa.Table, a pa.Schema or its metadata dict."""
    meta = source
    if isinstance(source, pa.Table):
        meta = source.schema.metadata
    elif isinstance(source, pa.Schema):
        meta = source.metadata
    if not meta or GRID_METADATA_KEY not in meta:
        raise ValueError("tiles table has no grid metadata (key 'zeus.grid'); was it written by `zeus tiles`?")
    return TileGrid.from_json(meta[GRID_METADATA_KEY])
