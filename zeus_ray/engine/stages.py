"""The pipeline's stage functions (engine/pipeline.py wires them into Ray Data): plan a slide and
select its pass's tiles, read a chunk's regions (split shape), encode chunks and write their parts.
Every row is one pickled record (engine/records.py); a stage handles the records it is for and
passes the others on, so a slide's `Planned` record reaches the driver through the same stream as
its chunks' `Encoded` records. No ray import here: these run inside Ray Data's tasks and actors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..maps.selection import PassState, Selection
from ..slides.region_reader import plan_regions
from ..slides.tiling import TileGrid
from ..storage.keys import OK
from . import work
from .records import REC, Chunk, Planned, ReadChunk, pack, unpack
from .shape import chunk_target


@dataclass
class ChunkGroup:
    """The chunks one encoder call takes (they share batches): one chunk of a big pass, or the small
    chunks of several slides' later passes."""
    items: list          # Chunk (fused), or ReadChunk after a reader task (split)

    @property
    def n_tiles(self) -> int:
        return sum((it.chunk if isinstance(it, ReadChunk) else it).n_tiles for it in self.items)


def _rows(objs) -> pa.Table:
    return pa.table({REC: pa.array([pack(o) for o in objs], pa.binary())})


def _cells(batch: pa.Table) -> list:
    return batch.column(REC).to_pylist()


# --- plan --------------------------------------------------------------------------------------

def chunks_for(sid: str, uri: str, grid: TileGrid, keys, pass_no: int, todo: np.ndarray, cfg,
               target: int) -> list[Chunk]:
    """A pass's selected positions as chunks: regions (each decoded once) grouped into chunks of
    about `target` tiles, in row-major region order."""
    rows, cols = np.nonzero(todo)
    want = rows * grid.n_cols + cols
    regions = plan_regions({"tile_id": want, "grid_row": rows, "grid_col": cols}, grid, cfg.tiling.region_tiles,
                           slide_id=sid)
    base = {"slide_id": sid, "uri": uri, "grid": grid, "pass_no": pass_no, "emb_dir": keys.emb_dir,
            "tiling_key": keys.tiling_key, "model_key": keys.model_key, "dtype": cfg.output.embedding_dtype,
            "direct_tiff": cfg.input.reader == "auto", "want_scores": cfg.tiling.mode == "adaptive"}
    out, chunk, n = [], [], 0
    for r in regions:
        chunk.append(r)
        n += r.n_tiles
        if n >= target:
            out.append(Chunk(regions=chunk, **base))
            chunk, n = [], 0
    if chunk:
        out.append(Chunk(regions=chunk, **base))
    return out


def plan_slide(task, store_root: str, cfg, class_matrix, n_classes: int, workers: int, batch: int):
    """(Planned record, its chunks): plan (or reuse) the slide's tiles, rebuild what is stored, and
    select the pass to encode (maps.selection.PassState: the one selection code)."""
    sid = task.entry["slide_id"]
    adaptive = cfg.tiling.mode == "adaptive"
    rec = work.plan_work(store_root, task.entry, cfg, task.keys, task.source, class_matrix if adaptive else None)
    planned = Planned(sid, node=rec.get("node"), timing=rec.get("timing") or {})
    if rec["status"] != OK:
        planned.status, planned.message, planned.reason = rec["status"], rec.get("message"), rec.get("reason")
        return planned, []
    try:
        grid = TileGrid.from_json(rec["grid"])
        kept = np.zeros((grid.n_rows, grid.n_cols), bool)
        kept[rec["rows"], rec["cols"]] = True
        state = PassState(kept, rec["tissue"], Selection.from_tiling(cfg.tiling), n_classes)
        ids = rec["stored_ids"]
        if len(ids):
            state.add(*np.divmod(ids, grid.n_cols), rec["stored_passes"], rec["stored_scores"])
        p, todo = state.select()
        n = int(todo.sum())
        chunks = (chunks_for(sid, task.entry["uri"], grid, task.keys, p, todo, cfg,
                             chunk_target(n, cfg.ray.chunk_tiles, workers, batch)) if n else [])
    except Exception as e:  # noqa: BLE001 - stored parts that do not fit the plan: this slide fails alone
        f = work.failure(sid, e)
        planned.status, planned.message, planned.reason = f["status"], f["message"], f["reason"]
        return planned, []
    planned.pass_no, planned.n_chunks, planned.grid = p, len(chunks), grid
    planned.n_kept, planned.n_stored, planned.n_passes = int(kept.sum()), state.n_encoded, state.n_passes
    planned.state = state
    return planned, chunks


def plan_stage(row: dict, *, store_root: str, cfg, class_matrix, n_classes: int, workers: int, batch: int) -> list:
    """flat_map: a SlideTask row → its Planned row, then one row per chunk."""
    planned, chunks = plan_slide(unpack(row[REC]), store_root, cfg, class_matrix, n_classes, workers, batch)
    if cfg.tiling.mode != "adaptive":   # full overlap: the counts suffice, the record stays small
        planned.state = None
    return [{REC: pack(planned)}] + [{REC: pack(ChunkGroup([c]))} for c in chunks]


# --- read (split shape) -----------------------------------------------------------------------

def read_stage(batch: pa.Table, *, cache_cfg, storage_options) -> pa.Table:
    """map_batches: each chunk's regions read (a CPU task); other records passed on."""
    out = []
    for cell in _cells(batch):
        item = unpack(cell)
        if isinstance(item, ChunkGroup):
            item = ChunkGroup([_read(c, cache_cfg, storage_options) for c in item.items])
        out.append(item)
    return _rows(out)


def _read(chunk: Chunk, cache_cfg, storage_options) -> ReadChunk:
    try:
        return work.read_chunk(chunk, cache_cfg, storage_options)
    except Exception as e:  # noqa: BLE001 - this chunk's slide fails, the others go on
        return ReadChunk(chunk, [], work.node_id(), {}, failure=work.failure(chunk.slide_id, e))


# --- encode -------------------------------------------------------------------------------------

class ChunkEncoder:
    """map_batches callable class on the encoder actor pool: holds the frozen encoder; encodes the
    call's chunks in shared batches (reading their regions itself in the fused shape), writes each
    chunk's part and returns one Encoded record per chunk."""

    def __init__(self, cfg, store_root: str, threads: int, class_matrix):
        from ..encoders.registry import load_encoder
        from ..errors import ZeusError
        from ..storage.store import OutputStore
        work.set_threads(threads)
        self.cfg, self.class_matrix = cfg, class_matrix
        self.store = OutputStore(store_root)
        self.error = None
        try:
            self.encoder = load_encoder(cfg.model)
        except ZeusError as e:   # raised on the first call: one line for the user, no restart loop
            self.encoder, self.error = None, e

    def __call__(self, batch: pa.Table) -> pa.Table:
        items, out = [], []
        for cell in _cells(batch):
            item = unpack(cell)
            if isinstance(item, ChunkGroup):
                items += item.items
            else:
                out.append(item)
        if items:
            if self.error is not None:
                raise self.error
            out += work.encode_chunks(self.encoder, self.store, items, self.class_matrix, self.cfg.cache,
                                      self.cfg.input.storage_options)
        return _rows(out)

