"""Per-slide reduce (no Ray): embeddings → similarities → overlap-averaged maps → mask → outputs.

Runs as one Ray task per slide (pipeline.py), reading only that slide's rows: no global shuffle.
Everything is written under the slide's result folder, marker last (store.OutputStore).
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

from .rasterise import argmax_mask, average_maps, cell_geometry, grid_shape, resample_mask_to_grid, softmax_maps
from .store import OutputStore
from .tiling import GRID_METADATA_KEY, TileGrid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Keys:
    tiling_key: str      # tiling + tissue parameters (the slide's fingerprint is in its tiles marker)
    model_key: str
    prompt_key: str
    tiles_dir: str
    emb_dir: str
    res_dir: str


def embedding_table(slide_id: str, tiles: pa.Table, emb: np.ndarray, keys: Keys, dtype: str) -> pa.Table:
    """Embeddings contract: slide_id, tile_id, grid_row, grid_col, embedding (fixed-size list)."""
    n, d = emb.shape
    values = pa.array(emb.astype(dtype).ravel())
    return pa.table({
        "slide_id": pa.array([slide_id] * n, pa.string()),
        "tile_id": tiles["tile_id"], "grid_row": tiles["grid_row"], "grid_col": tiles["grid_col"],
        "embedding": pa.FixedSizeListArray.from_arrays(values, d),
        "tiling_key": pa.array([keys.tiling_key] * n, pa.string()),
        "model_key": pa.array([keys.model_key] * n, pa.string()),
    })


def embeddings_from_table(table: pa.Table) -> np.ndarray:
    col = table["embedding"].combine_chunks()
    d = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32)


def cosine_scores(emb: np.ndarray, class_matrix: np.ndarray) -> np.ndarray:
    """Raw cosines (N, C). Matmul first, then divide by the row norms: stored float16 embeddings
    are renormalised this way without a copy of the (N, D) matrix."""
    scores = emb @ class_matrix.T
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return (scores / np.maximum(norms, 1e-12)).astype(np.float32)


def similarity_table(slide_id: str, tiles: pa.Table, scores: np.ndarray, class_names: list[str],
                     keys: Keys) -> pa.Table:
    n = len(tiles)
    cols = {"slide_id": pa.array([slide_id] * n, pa.string()), "tile_id": tiles["tile_id"],
            "grid_row": tiles["grid_row"], "grid_col": tiles["grid_col"]}
    for i, name in enumerate(class_names):
        cols[f"sim_{name}"] = pa.array(scores[:, i], pa.float32())
    cols["prompt_key"] = pa.array([keys.prompt_key] * n, pa.string())
    cols["model_key"] = pa.array([keys.model_key] * n, pa.string())
    table = pa.table(cols)
    return table.replace_schema_metadata({b"zeus.classes": ",".join(class_names).encode()})


def _png(arr: np.ndarray, **info) -> bytes:
    buf = io.BytesIO()
    from PIL import PngImagePlugin
    meta = PngImagePlugin.PngInfo()
    for k, v in info.items():
        meta.add_text(k, str(v))
    Image.fromarray(arr).save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def load_tissue_mask(store: OutputStore, tiles_dir: str) -> tuple[np.ndarray, float]:
    """The tissue mask PNG of the tiles stage and its µm/px (from the file name)."""
    names = [p for p in store.fs.ls(tiles_dir, detail=False) if re.search(r"tissue_mask_([\d.]+)mpp\.png$", p)]
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

    @property
    def cell0(self) -> float:
        return self.cell_um / self.grid.mpp0

    def maps(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return average_maps(self.tiles["grid_row"].to_numpy(), self.tiles["grid_col"].to_numpy(), scores,
                            self.shape, self.geom)

    def labels(self, maps: np.ndarray) -> np.ndarray:
        return argmax_mask(maps, valid=self.tissue_cells)


def load_slide_grid(store: OutputStore, tiles_dir: str) -> SlideGrid:
    tiles = store.read_parquet(f"{tiles_dir}/tiles.parquet")
    grid = TileGrid.from_json(tiles.schema.metadata[GRID_METADATA_KEY])
    geom = cell_geometry(grid.patch_size, grid.stride)
    shape = grid_shape(grid.n_rows, grid.n_cols, geom)
    cell_um = geom.cell * grid.target_mpp
    tissue, tissue_mpp = load_tissue_mask(store, tiles_dir)
    return SlideGrid(tiles.sort_by("tile_id"), grid, geom, shape, cell_um,
                     resample_mask_to_grid(tissue, tissue_mpp, shape, cell_um))


def load_embeddings(store: OutputStore, emb_dir: str, sg: SlideGrid | None = None) -> np.ndarray:
    """The stored embeddings in tile_id order; with `sg`, its tiles are narrowed to the stored ones
    (adaptive mode stores a subset)."""
    table = store.read_parquet(f"{emb_dir}/embeddings.parquet").sort_by("tile_id")
    if sg is not None:
        sg.tiles = _subset(sg.tiles, table["tile_id"].to_numpy(), "")
    return embeddings_from_table(table)


def read_passes(store: OutputStore, emb_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """(tile_ids, embeddings) of every adaptive pass stored in `emb_dir` (pass-NN.parquet)."""
    tables = [store.read_parquet(p) for p in sorted(store.fs.glob(f"{emb_dir}/pass-*.parquet"))]
    if not tables:
        raise RuntimeError(f"{emb_dir}: no adaptive pass is stored")
    table = pa.concat_tables([t.select(["tile_id", "embedding"]) for t in tables])
    return table["tile_id"].to_numpy(), embeddings_from_table(table)


def _subset(tiles: pa.Table, tile_ids: np.ndarray, sid: str) -> pa.Table:
    """The rows of `tiles` (sorted by tile_id) with the given sorted ids; all must exist."""
    if len(tile_ids) == len(tiles) and np.array_equal(tile_ids, tiles["tile_id"].to_numpy()):
        return tiles
    pos = np.searchsorted(tiles["tile_id"].to_numpy(), tile_ids)
    if (pos >= len(tiles)).any() or not np.array_equal(tiles["tile_id"].to_numpy()[np.minimum(pos, len(tiles) - 1)], tile_ids):
        raise RuntimeError(f"slide {sid!r}: embeddings name tiles that are not in tiles.parquet")
    return tiles.take(pa.array(pos))


def reduce_slide(store: OutputStore, entry: dict, keys: Keys, class_names: list[str], tumour_index: int,
                 class_matrix: np.ndarray, logit_scale: float, embeddings: np.ndarray | None,
                 tile_ids: np.ndarray | None, embedding_dtype: str = "float16",
                 evaluation: dict | None = None, from_passes: bool = False) -> dict:
    """Write the slide's embedding table (when new: given, or with `from_passes` gathered from the
    adaptive pass files) and its results; return its result row."""
    t0 = time.perf_counter()
    sid = entry["slide_id"]
    sg = load_slide_grid(store, keys.tiles_dir)
    if embeddings is None and from_passes:
        tile_ids, embeddings = read_passes(store, keys.emb_dir)
    tiles, grid, cell_um, tissue_cells = sg.tiles, sg.grid, sg.cell_um, sg.tissue_cells
    n_full = len(tiles)
    if embeddings is not None:
        order = np.argsort(tile_ids)
        tile_ids = np.asarray(tile_ids)[order]
        tiles = _subset(tiles, tile_ids, sid)
        # Score what is stored (e.g. float16), so a later re-prompt from the store gives the same maps.
        embeddings = embeddings[order].astype(embedding_dtype).astype(np.float32)
        store.write_parquet(f"{keys.emb_dir}/embeddings.parquet",
                            embedding_table(sid, tiles, embeddings, keys, embedding_dtype))
        store.commit(keys.emb_dir, {"slide_id": sid, "n_tiles": len(tiles), "n_tiles_full": n_full,
                                    "tiling_key": keys.tiling_key, "model_key": keys.model_key,
                                    "source": entry.get("source")})
        sg.tiles = tiles   # adaptive mode: maps average the encoded tiles only
    else:
        embeddings = load_embeddings(store, keys.emb_dir, sg)
        tiles = sg.tiles
    scores = cosine_scores(embeddings, class_matrix)
    store.write_parquet(f"{keys.res_dir}/similarities.parquet", similarity_table(sid, tiles, scores, class_names, keys))

    maps, counts = sg.maps(scores)
    labels = sg.labels(maps)
    tumour = labels == tumour_index
    cell_mm2 = (cell_um / 1000.0) ** 2
    probs = softmax_maps(maps, logit_scale)

    res = keys.res_dir
    store.write_bytes(f"{res}/mask_{cell_um:.2f}mpp.png", _png((tumour * 255).astype(np.uint8),
                      mpp=cell_um, cell0=sg.cell0, origin="0,0"))
    store.write_bytes(f"{res}/labels_{cell_um:.2f}mpp.png", _png((labels + 1).astype(np.uint8),
                      classes="background," + ",".join(class_names), mpp=cell_um))
    buf = io.BytesIO()
    np.savez_compressed(buf, maps=maps, probs=probs, counts=counts, tissue=tissue_cells,
                        cell_um=cell_um, cell0=sg.cell0,
                        classes=np.array(class_names))
    store.write_bytes(f"{res}/maps.npz", buf.getvalue())
    row = {
        "slide_id": sid, "status": "ok", "error": None, "n_tiles": int(len(tiles)), "n_tiles_full": n_full,
        "dataset": entry.get("dataset"), "center": entry.get("center"),
        "tissue_area_mm2": float(tissue_cells.sum() * cell_mm2),
        "tumour_area_mm2": float(tumour.sum() * cell_mm2),
        "mask_mpp": cell_um, "results_uri": store.uri(res),
        "model_key": keys.model_key, "prompt_key": keys.prompt_key, "tiling_key": keys.tiling_key,
        "source": entry.get("source"),
    }
    from . import slide_outputs  # viewer outputs and metrics (#5) kept apart from the core reduce
    row.update(slide_outputs.write_outputs(store, entry, res, tumour=tumour, tissue=tissue_cells, maps=maps,
                                           probs=probs, class_names=class_names, tumour_index=tumour_index,
                                           grid=grid, cell_um=cell_um, tiles_dir=keys.tiles_dir,
                                           evaluation=evaluation))
    row["reduce_seconds"] = round(time.perf_counter() - t0, 4)
    store.write_json(f"{res}/result.json", row)
    store.commit(res, row)
    return row
