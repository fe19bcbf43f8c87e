"""Embedding parts: what encoder workers write, one Parquet file per (slide, pass, chunk).

A slide's embeddings are the part files in its embedding folder
(`<root>/slides/<id>/embeddings/<tiling key>/<model>/pass-PP-TTTTTTTTT.parquet`, PP the pass and
TTTTTTTTT the chunk's first tile id), each with the columns `part_table` writes: slide_id,
tile_id, grid_row, grid_col, pass, embedding (fixed-size list), tiling_key, model_key. Workers write
them whole (OutputStore.write_bytes), so a part exists complete or not at all; names never collide
(a chunk holds only tiles no earlier part holds, so its first tile id is new). The folder's
`_COMPLETE.json` marker is written once every pass the slide needs is stored.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .store import OutputStore

PART_GLOB = "pass-*.parquet"


def part_name(pass_no: int, first_tile_id: int) -> str:
    return f"pass-{int(pass_no):02d}-{int(first_tile_id):09d}.parquet"


def part_table(slide_id: str, tile_ids: np.ndarray, n_cols: int, pass_no: int, emb: np.ndarray,
               tiling_key: str, model_key: str, dtype: str) -> pa.Table:
    rows, cols = np.divmod(np.asarray(tile_ids, np.int64), n_cols)   # tile_id = grid_row * n_cols + grid_col
    n, d = emb.shape
    return pa.table({
        "slide_id": pa.array([slide_id] * n, pa.string()),
        "tile_id": pa.array(tile_ids, pa.int64()),
        "grid_row": pa.array(rows, pa.int32()),
        "grid_col": pa.array(cols, pa.int32()),
        "pass": pa.array(np.full(n, pass_no), pa.int16()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(dtype).ravel()), d),
        "tiling_key": pa.array([tiling_key] * n, pa.string()),
        "model_key": pa.array([model_key] * n, pa.string()),
    })


def embeddings_from_table(table: pa.Table) -> np.ndarray:
    """(N, D) float32 from the fixed-size-list `embedding` column (stored float16 or float32)."""
    col = table["embedding"].combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size).astype(np.float32)


def part_paths(store: OutputStore, emb_dir: str) -> list[str]:
    if not store.exists(emb_dir):
        return []
    return sorted(store.glob(f"{emb_dir}/{PART_GLOB}"))


def read_parts(store: OutputStore, emb_dir: str, with_embeddings: bool = True):
    """(tile_ids int64, passes int16, embeddings float32 (N, D) or None) of every stored part, in
    tile_id order. Empty arrays when none is stored."""
    cols = ["tile_id", "pass"] + (["embedding"] if with_embeddings else [])
    tables = [store.read_parquet(p, columns=cols) for p in part_paths(store, emb_dir)]
    if not tables:
        return np.zeros(0, np.int64), np.zeros(0, np.int16), None
    table = pa.concat_tables(tables).sort_by("tile_id")
    ids = table["tile_id"].to_numpy()
    if len(np.unique(ids)) != len(ids):
        raise RuntimeError(f"{emb_dir}: a tile is stored in two parts (delete the folder to recompute it)")
    emb = embeddings_from_table(table) if with_embeddings else None
    return ids, table["pass"].to_numpy().astype(np.int16), emb
