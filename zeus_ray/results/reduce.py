"""Per-slide reduce (no Ray): stored embedding parts → similarities → overlap-averaged maps →
argmax → mask → outputs.

Runs once per slide (engine/work.reduce_work) when its passes are done, reading only that slide's
parts: no global shuffle. Everything is written under the slide's result folder, marker last
(store.OutputStore).
"""
from __future__ import annotations

import io
import logging
import re
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from ..errors import ZeusError
from ..maps.rasterise import argmax_mask, average_maps, cell_geometry, grid_shape, resample_mask_to_grid, softmax_maps
from ..storage.keys import embeddings_marker
from ..storage.store import OutputStore
from ..slides.tiling import TileGrid, grid_from_table_metadata

log = logging.getLogger(__name__)


def cosine_scores(emb: np.ndarray, class_matrix: np.ndarray) -> np.ndarray:
    """Raw cosines (N, C). Matmul first, then divide by the row norms: stored float16 embeddings
    are renormalised this way without a copy of the (N, D) matrix."""
    scores = emb @ class_matrix.T
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return (scores / np.maximum(norms, 1e-12)).astype(np.float32)


def similarity_table(slide_id: str, tiles: pa.Table, scores: np.ndarray, class_names: list[str],
                     keys) -> pa.Table:
    n = len(tiles)
    cols = {"slide_id": pa.array([slide_id] * n, pa.string()), "tile_id": tiles["tile_id"],
            "grid_row": tiles["grid_row"], "grid_col": tiles["grid_col"]}
    for i, name in enumerate(class_names):
        cols[f"sim_{name}"] = pa.array(scores[:, i], pa.float32())
    cols["prompt_key"] = pa.array([keys.prompt_key] * n, pa.string())
    cols["model_key"] = pa.array([keys.model_key] * n, pa.string())
    table = pa.table(cols)
    return table.replace_schema_metadata({b"zeus.classes": ",".join(class_names).encode()})


def load_tissue_mask(store: OutputStore, tiles_dir: str) -> tuple[np.ndarray, float]:
    """The tissue mask PNG of the tiles stage and its µm/px (from the file name)."""
    names = [p for p in store.ls(tiles_dir) if re.search(r"tissue_mask_([\d.]+)mpp\.png$", p)]
    if not names:
        raise FileNotFoundError(f"no tissue mask in {tiles_dir}")
    mpp = float(re.search(r"tissue_mask_([\d.]+)mpp\.png$", names[0]).group(1))
    mask = np.array(Image.open(io.BytesIO(store.read_bytes(names[0]))).convert("L")) > 0
    return mask, mpp


@dataclass
class SlideGrid:
    """A slide's tiles (sorted by tile_id), grid geometry and tissue on the cell grid."""
    tiles: pa.Table
    grid: TileGrid
    geom: object
    shape: tuple[int, int]
    cell_um: float
    tissue_cells: np.ndarray
    tissue_mask: np.ndarray | None = None   # the tiles stage's tissue mask (slide-aligned) and its µm/px
    tissue_mpp: float | None = None

    @property
    def cell0(self) -> float:
        return self.cell_um / self.grid.mpp0

    @property
    def origin0(self) -> tuple[float, float]:
        """(x, y) level-0 px of the cell grid's origin (the tile grid's: tiling.anchor)."""
        return float(self.grid.origin_x), float(self.grid.origin_y)

    def maps(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return average_maps(self.tiles["grid_row"].to_numpy(), self.tiles["grid_col"].to_numpy(), scores,
                            self.shape, self.geom)

    def labels(self, maps: np.ndarray) -> np.ndarray:
        return argmax_mask(maps, valid=self.tissue_cells)


def load_slide_grid(store: OutputStore, tiles_dir: str) -> SlideGrid:
    tiles = store.read_parquet(f"{tiles_dir}/tiles.parquet")
    grid = grid_from_table_metadata(tiles)
    geom = cell_geometry(grid.patch_size, grid.stride)
    shape = grid_shape(grid.n_rows, grid.n_cols, geom)
    cell_um = geom.cell * grid.target_mpp
    tissue, tissue_mpp = load_tissue_mask(store, tiles_dir)
    return SlideGrid(tiles.sort_by("tile_id"), grid, geom, shape, cell_um,
                     resample_mask_to_grid(tissue, tissue_mpp, shape, cell_um, grid.origin_um), tissue, tissue_mpp)


def load_embeddings(store: OutputStore, emb_dir: str, sg: SlideGrid) -> np.ndarray:
    """The stored embeddings (every part) in tile_id order; `sg.tiles` is narrowed to the stored
    tiles (adaptive mode stores a subset)."""
    from ..storage.parts import read_parts
    ids, _, emb = read_parts(store, emb_dir)
    if emb is None:
        raise ZeusError(f"{emb_dir}: no stored embeddings (run `zeus run` on the slide)")
    sg.tiles = _subset(sg.tiles, ids, emb_dir)
    return emb


def _subset(tiles: pa.Table, tile_ids: np.ndarray, where: str) -> pa.Table:
    """The rows of `tiles` (sorted by tile_id) with the given sorted ids; all must exist."""
    if len(tile_ids) == len(tiles) and np.array_equal(tile_ids, tiles["tile_id"].to_numpy()):
        return tiles
    known = tiles["tile_id"].to_numpy()
    pos = np.searchsorted(known, tile_ids)
    if (pos >= len(known)).any() or not np.array_equal(known[np.minimum(pos, len(known) - 1)], tile_ids):
        raise ZeusError(f"{where}: embeddings name tiles that are not in tiles.parquet (delete the folder to recompute)")
    return tiles.take(pa.array(pos))


def slide_maps(sg: SlideGrid, scores: np.ndarray, logit_scale: float):
    """(maps (C, H, W), counts, labels, probs): overlap-averaged class maps on the cell grid, the
    argmax inside tissue (-1 outside or uncovered), softmax probabilities."""
    maps, counts = sg.maps(scores)
    return maps, counts, sg.labels(maps), softmax_maps(maps, logit_scale)


def reduce_slide(store: OutputStore, job: dict) -> dict:
    """One slide's results from its stored embeddings; returns its result row.

    job: entry (manifest row + source), keys (keys.Keys), class_names, tumour_index, class_matrix,
    logit_scale, evaluation and output (config sections as dicts), postprocess, and
    embeddings_info (n_tiles, n_tiles_full, passes) when the embedding unit is to be committed."""
    t0 = time.perf_counter()
    entry, keys = job["entry"], job["keys"]
    sid = entry["slide_id"]
    info = job.get("embeddings_info")
    if info is not None and store.complete(keys.emb_dir) is None:
        store.commit(keys.emb_dir, embeddings_marker(keys, sid, entry.get("source"), info))
    sg = load_slide_grid(store, keys.tiles_dir)
    n_full = len(sg.tiles)
    embeddings = load_embeddings(store, keys.emb_dir, sg)
    tiles, class_names = sg.tiles, job["class_names"]
    scores = cosine_scores(embeddings, job["class_matrix"])
    store.write_parquet(f"{keys.res_dir}/similarities.parquet",
                        similarity_table(sid, tiles, scores, class_names, keys))
    maps, counts, labels, probs = slide_maps(sg, scores, job["logit_scale"])
    tumour = labels == job["tumour_index"]
    row = {
        "slide_id": sid, "status": "ok", "error": None, "n_tiles": int(len(tiles)), "n_tiles_full": n_full,
        "dataset": entry.get("dataset"), "center": entry.get("center"),
        "tissue_area_mm2": float(sg.tissue_cells.sum() * (sg.cell_um / 1000.0) ** 2),
        "mask_mpp": sg.cell_um, "results_uri": store.uri(keys.res_dir),
        "model_key": keys.model_key, "prompt_key": keys.prompt_key, "tiling_key": keys.tiling_key,
        "source": entry.get("source"),
    }
    from . import slide_outputs  # viewer outputs and metrics kept apart from the core reduce
    row.update(slide_outputs.write_outputs(store, job, sg, maps=maps, counts=counts, labels=labels, probs=probs,
                                           tumour=tumour))
    row["reduce_seconds"] = round(time.perf_counter() - t0, 4)
    store.write_json(f"{keys.res_dir}/result.json", row)
    store.commit(keys.res_dir, row)
    return row
