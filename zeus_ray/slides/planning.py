"""The per-slide tiles stage: open → µm/px → level → thumbnail → tissue → grid → tile table, and
its outputs (tiles.parquet, tissue mask PNG, annotated thumbnail PNG, a JSON summary).

Used by `zeus tiles` and by the cohort pipeline's plan stage. Pixels are not read per tile here:
`region_reader` does that later from `SlidePlan.tiles` and `SlidePlan.grid`.
"""
from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import JobConfig
from .magnification import LevelChoice, check_tile_budget, check_upsampling, choose_level, resolve_mpp
from .access import fingerprint, localise, open_slide, open_slide_file, slide_read_errors
from ..storage.keys import TILING_VERSION
from ..storage.store import check_slide_id, stable_hash
from .tiling import TileGrid, make_grid, tile_origins, tile_table, tissue_anchor
from .tissue import TissueMask, read_thumbnail, segment_tissue


OK, NO_TISSUE, NO_TILES = "ok", "no_tissue", "no_tiles"


@dataclass
class SlidePlan:
    slide_id: str
    uri: str
    fingerprint: str
    mpp0: float
    mpp_source: str              # override, metadata or objective-power
    level: LevelChoice
    grid: TileGrid
    tissue: TissueMask
    tiles: pa.Table              # the tiles contract, grid JSON in its schema metadata
    tiling_key: str
    status: str                  # ok, no_tissue (no tissue found), no_tiles (tissue, but no tile reaches the threshold)
    display: np.ndarray          # RGB thumbnail (the tissue thumbnail): the preview outputs are drawn on
    display_mpp: float
    seconds: float

    @property
    def n_tiles(self) -> int:
        return self.tiles.num_rows

    @property
    def tissue_area_mm2(self) -> float:
        return self.tissue.area_mm2

    def summary(self) -> dict:
        return {"slide_id": self.slide_id, "uri": self.uri, "status": self.status, "n_tiles": self.n_tiles,
                "tissue_area_mm2": round(self.tissue_area_mm2, 6), "mpp0": self.mpp0,
                "mpp_source": self.mpp_source, "level": self.grid.level, "level_mpp": self.grid.level_mpp,
                "read_size": self.grid.read_size, "tiling_key": self.tiling_key,
                "fingerprint": self.fingerprint, "tissue_mask_mpp": self.tissue.mpp,
                "grid": json.loads(self.grid.to_json()), "seconds": round(self.seconds, 3)}


def make_tiling_key(fp: str, mpp0: float, cfg: JobConfig) -> str:
    """Hash of everything that decides which tiles exist and where: the slide's content, its
    level-0 µm/px (an override moves every tile), the target, patch, stride, tissue parameters and
    the tissue threshold."""
    t = cfg.tiling
    key = {"v": TILING_VERSION, "fingerprint": fp, "mpp0": mpp0, "target_mpp": t.mpp,
           "patch": t.patch_size, "stride": t.stride, "min_fraction": t.min_tissue_fraction,
           "tissue": cfg.tissue.model_dump()}
    key.update(grid_rule(cfg))
    return stable_hash(key)


def grid_rule(cfg: JobConfig) -> dict:
    """The tiling keys that are not at their defaults among anchor, selection and padding (left out
    at the defaults, so that existing keys, and the outputs stored under them, stay valid)."""
    t = cfg.tiling
    return {k: getattr(t, k) for k, default in (("anchor", "slide"), ("selection", "fraction"), ("padding", "white"))
            if getattr(t, k) != default}


def plan_slide(uri: str, slide_id: str, cfg: JobConfig, mpp_override: float | None = None,
               command: str = "run") -> SlidePlan:
    """Plan one slide's tiles. Raises SlideError (missing, remote, unsupported, unreadable, no_mpp,
    upsampling, too_many_tiles; `command`, "run" or "tiles", picks how a no_mpp message says to give
    the µm/px); a slide without tissue is not an error: status no_tissue and zero tiles."""
    t0 = time.perf_counter()
    check_slide_id(slide_id)
    opts = cfg.input.storage_options
    slide = open_slide(uri, slide_id, cfg.cache, opts)
    try:
        fp = fingerprint(localise(uri, cfg.cache, slide_id, opts))   # a cache hit for remote slides
        mpp0, source = resolve_mpp(slide, slide_id, mpp_override, cfg.input.default_mpp, command)
        target = cfg.tiling.mpp
        choice = choose_level(slide, mpp0, target)
        check_upsampling(slide_id, choice, source, cfg.tiling.max_upsampling)
        w, h = slide.dimensions
        grid = make_grid(w, h, mpp0, target, cfg.tiling.patch_size, cfg.tiling.stride,
                         choice.level, choice.downsample)
        # Fail fast on an implausible grid, before any pixel is read (positions bound the tiles).
        check_tile_budget(slide_id, grid.n_positions, cfg.tiling.max_tiles_per_slide, mpp0, source,
                          positions=True)
        # One read: the tissue thumbnail is also the preview the outputs are drawn on (the reduce
        # reads a finer one for small slides, outside planning).
        with slide_read_errors(slide_id):
            thumb, thumb_mpp = read_thumbnail(slide, mpp0, cfg.tissue.thumbnail_mpp)
    finally:
        slide.close()
    tissue = segment_tissue(thumb, thumb_mpp, cfg.tissue)
    origin = (0, 0)
    if cfg.tiling.anchor == "tissue":
        origin = tissue_anchor(tissue.contours, tissue.mpp, mpp0)
    four_point = cfg.tiling.selection == "four_point"
    if origin != (0, 0) or cfg.tiling.padding != "white" or four_point:
        grid = make_grid(w, h, mpp0, target, cfg.tiling.patch_size, cfg.tiling.stride, choice.level,
                         choice.downsample, origin=origin, padding=cfg.tiling.padding, every_start=four_point)
    tiles = tile_table(grid, tissue, cfg.tiling.min_tissue_fraction, slide_id, cfg.tiling.selection)
    check_tile_budget(slide_id, tiles.num_rows, cfg.tiling.max_tiles_per_slide, mpp0, source)
    status = NO_TISSUE if tissue.empty else (NO_TILES if tiles.num_rows == 0 else OK)
    key = make_tiling_key(fp, mpp0, cfg)
    meta = dict(tiles.schema.metadata)
    meta[b"zeus.tiling_key"] = key.encode()
    tiles = tiles.replace_schema_metadata(meta)
    return SlidePlan(slide_id=slide_id, uri=uri, fingerprint=fp, mpp0=mpp0, mpp_source=source, level=choice,
                     grid=grid, tissue=tissue, tiles=tiles, tiling_key=key, status=status, display=thumb,
                     display_mpp=thumb_mpp, seconds=time.perf_counter() - t0)


def read_preview(uri: str, slide_id: str, cache_cfg, mpp0: float, long_px: int,
                 min_mpp: float = 0.0, storage_options: dict | None = None) -> tuple[np.ndarray, float]:
    """An RGB picture of the whole slide with about `long_px` px on its long side, never finer than
    `min_mpp` µm/px nor level 0 (for previews finer than the tissue thumbnail). Aperio and generic
    TIFF levels are decoded straight from the file (tiff_levels), as tiles are."""
    from .tiff_levels import TiffLevels
    slide, path = open_slide_file(uri, slide_id, cache_cfg, storage_options)
    tiff = None
    try:
        tiff = TiffLevels.open(path, slide)
        w, h = slide.dimensions
        with slide_read_errors(slide_id):
            return read_thumbnail(slide, mpp0, max(max(w, h) * mpp0 / long_px, min_mpp, mpp0), tiff=tiff,
                                  slide_id=slide_id)
    finally:
        if tiff is not None:
            tiff.close()
        slide.close()


def mpp_label(mpp: float) -> str:
    """µm/px for file names: two decimals when exact (8.00), else up to 6 significant digits."""
    two = f"{mpp:.2f}"
    return two if abs(float(two) - mpp) < 1e-9 else f"{mpp:.6g}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _png(rgb_or_gray: np.ndarray) -> bytes:
    img = rgb_or_gray[:, :, ::-1] if rgb_or_gray.ndim == 3 else rgb_or_gray
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def draw_thumbnail(plan: SlidePlan) -> np.ndarray:
    """Thumbnail for a person to check the tiling at a glance. With 75 % overlap, outlines of every
    tile would be unreadable, so each kept tile is drawn as the stride × stride cell at its centre
    (blue, one cell per tile: the cells tile the plane without overlap), the area covered by the
    kept tiles is outlined in blue, and the tissue contour is drawn in green."""
    img = plan.display.copy()
    h, w = img.shape[:2]
    k = plan.mpp0 / plan.display_mpp                 # display px per level-0 px
    g = plan.grid
    rows = plan.tiles.column("grid_row").to_numpy().astype(np.int64)
    cols = plan.tiles.column("grid_col").to_numpy().astype(np.int64)
    x, y = tile_origins(g, rows, cols)
    thick = max(1, round(max(h, w) / 800))
    dark = (20, 60, 200)
    foot = np.zeros((h, w), np.uint8)
    cells = np.zeros((h, w), np.uint8)
    c0 = (g.patch0 - g.stride0) / 2                  # centre cell offset inside a tile
    for xi, yi in zip(x, y):
        cv2.rectangle(foot, (int(xi * k), int(yi * k)),
                      (math.ceil((xi + g.patch0) * k) - 1, math.ceil((yi + g.patch0) * k) - 1), 1, cv2.FILLED)
        cv2.rectangle(cells, (round((xi + c0) * k), round((yi + c0) * k)),
                      (round((xi + c0 + g.stride0) * k) - 1, round((yi + c0 + g.stride0) * k) - 1), 1, cv2.FILLED)
    sel = cells.astype(bool)
    img[sel] = (img[sel] * 0.6 + np.array([40, 90, 230], np.float32) * 0.4).astype(np.uint8)
    if g.stride0 * k >= 6:                           # cell borders only when cells are visible
        for xi, yi in zip(x, y):
            cv2.rectangle(img, (round((xi + c0) * k), round((yi + c0) * k)),
                          (round((xi + c0 + g.stride0) * k) - 1, round((yi + c0 + g.stride0) * k) - 1), dark, 1)
    contours, _ = cv2.findContours(foot, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, dark, thick)
    t = plan.tissue.mpp / plan.display_mpp           # display px per tissue-mask px
    for cnts, color in ((plan.tissue.contours, (0, 200, 0)), (plan.tissue.holes, (0, 140, 0))):
        scaled = [np.round((c.astype(np.float64) + 0.5) * t - 0.5).astype(np.int32) for c in cnts]
        cv2.drawContours(img, scaled, -1, color, thick + 1)
    lines = [f"{plan.slide_id}: {plan.n_tiles} tiles of {g.patch_size} px at {g.target_mpp:g} um/px, "
             f"tissue {plan.tissue_area_mm2:.2f} mm2 (green)",
             "blue cells: one per kept tile, at its centre; blue line: area covered by kept tiles"]
    scale = max(0.35, min(0.8, w / 1400))
    y_text = 0
    for text in lines:
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        cv2.rectangle(img, (0, y_text), (min(w, tw + 8), y_text + th + base + 6), (255, 255, 255), cv2.FILLED)
        cv2.putText(img, text, (4, y_text + th + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
        y_text += th + base + 6
    return img


def write_tiles_outputs(plan: SlidePlan, out_dir: str | Path, preview: bool = True) -> dict[str, str]:
    """Write tiles.parquet, tissue_mask_<mpp>mpp.png (0/255, 1 px = <mpp> µm), the plain RGB
    thumbnail thumbnail_<mpp>mpp.jpg (what viewer outputs are drawn on), tiles.json and, with
    `preview`, the annotated thumbnail.png; each file is written under a temporary name then
    renamed. Returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    tiles_path = out / "tiles.parquet"
    tmp = tiles_path.with_name(f".tiles.parquet.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(plan.tiles, tmp)
        os.replace(tmp, tiles_path)
    finally:
        tmp.unlink(missing_ok=True)
    paths["tiles"] = str(tiles_path)
    mask_path = out / f"tissue_mask_{mpp_label(plan.tissue.mpp)}mpp.png"
    _atomic_write(mask_path, _png(plan.tissue.mask * np.uint8(255)))
    paths["tissue_mask"] = str(mask_path)
    rgb_path = out / f"thumbnail_{mpp_label(plan.display_mpp)}mpp.jpg"
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(plan.display[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 90])
    _atomic_write(rgb_path, buf.tobytes())
    paths["thumbnail_rgb"] = str(rgb_path)
    if preview:
        thumb_path = out / "thumbnail.png"
        _atomic_write(thumb_path, _png(draw_thumbnail(plan)))
        paths["thumbnail"] = str(thumb_path)
    summary_path = out / "tiles.json"
    _atomic_write(summary_path, json.dumps(plan.summary(), indent=1).encode())
    paths["summary"] = str(summary_path)
    return paths
