"""What workers do for one slide (inside the pipeline's Ray Data stages and the reduce tasks; no Ray
calls here): plan its tiles, read regions, encode chunks and write their parts, reduce. The records
for the driver (engine/records.py) hold counts, positions, class scores in adaptive mode and where
outputs are — never embeddings or pixels. Timings are per stage: wall seconds and the process's CPU seconds.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import contextmanager

import numpy as np

from ..errors import SlideError, ZeusError
from ..storage.keys import FAILED, NO_TISSUE, OK
from ..storage.store import OutputStore
from ..storage.parts import part_name, part_table, read_parts
from .records import Chunk, Encoded, ReadChunk, ReduceJob, Reduced, status_row

log = logging.getLogger(__name__)


@contextmanager
def timed(timings: dict, stage: str):
    """Add the block's wall and CPU seconds to timings[stage] = [wall, cpu]."""
    w, c = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        acc = timings.setdefault(stage, [0.0, 0.0])
        acc[0] += time.perf_counter() - w
        acc[1] += time.process_time() - c


def merge_timing(into: dict, t: dict | None) -> None:
    """Add a record's per-stage [wall, cpu] seconds to `into`."""
    for stage, (wall, cpu) in (t or {}).items():
        acc = into.setdefault(stage, [0.0, 0.0])
        acc[0] += wall
        acc[1] += cpu


def node_id() -> str:
    import ray
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def failure(sid: str, e: BaseException) -> dict:
    """The failed record's fields: one line naming the slide (a ZeusError's own message, else the
    exception's type and text) and the reason (SlideError.reason, else the exception's type)."""
    if isinstance(e, ZeusError):
        return {"status": FAILED, "message": str(e).splitlines()[0], "reason": getattr(e, "reason", "error")}
    log.exception("slide %s failed", sid)
    text = str(e).splitlines()[0] if str(e) else ""
    return {"status": FAILED, "message": f"slide {sid!r}: {type(e).__name__}: {text}".rstrip(": "),
            "reason": type(e).__name__}


# --- plan ----------------------------------------------------------------------------------------

def ensure_tiles(store: OutputStore, entry: dict, cfg, tiles_dir: str, source):
    """The slide's tiles table, grid, status and tissue mask (array, µm/px): a complete tiles folder
    of the same slide file is reused, otherwise the slide is planned and its tiles unit committed."""
    from ..results.reduce import load_tissue_mask
    from ..slides.planning import plan_slide, write_tiles_outputs
    from ..slides.tiling import grid_from_table_metadata

    sid = entry["slide_id"]
    done = store.complete(tiles_dir)
    if done is not None and done.get("source") == source:
        tiles = store.read_parquet(f"{tiles_dir}/tiles.parquet")
        mask, mask_mpp = load_tissue_mask(store, tiles_dir)
        return tiles, grid_from_table_metadata(tiles), done["status"], mask, mask_mpp
    plan = plan_slide(entry["uri"], sid, cfg, mpp_override=entry.get("mpp"))
    with tempfile.TemporaryDirectory() as tmp:
        write_tiles_outputs(plan, tmp, preview=cfg.output.tiling_preview)
        store.upload_dir(tmp, tiles_dir)
    store.commit(tiles_dir, {"slide_id": sid, "tiling_key": plan.tiling_key, "status": plan.status,
                             "n_tiles": plan.n_tiles, "source": source})
    return plan.tiles, plan.grid, plan.status, plan.tissue.mask, plan.tissue.mpp


def no_tiles_message(sid: str, status: str) -> str:
    why = "no tissue found" if status == "no_tissue" else "tissue found, but no tile reaches tiling.min_tissue_fraction"
    return f"slide {sid!r}: {why} (zero tiles)"


def plan_work(store_root: str, entry: dict, cfg, keys, source, class_matrix) -> dict:
    """Plan (or reuse) one slide's tiles and say what is stored: the tile positions, the tissue cells
    (adaptive mode), and the stored parts' tile ids and passes (+ class scores in adaptive mode, which
    needs them to select; `class_matrix` is None in full mode)."""
    from ..maps.rasterise import cell_geometry, grid_shape, resample_mask_to_grid
    sid = entry["slide_id"]
    t: dict = {}
    rec = {"slide_id": sid, "timing": t, "node": node_id()}
    try:
        store = OutputStore(store_root)
        with timed(t, "plan"):
            tiles, grid, status, mask, mask_mpp = ensure_tiles(store, entry, cfg, keys.tiles_dir, source)
        if tiles.num_rows == 0:
            return rec | {"status": NO_TISSUE, "message": no_tiles_message(sid, status), "reason": status}
        tiles = tiles.sort_by("tile_id")
        rec |= {"status": OK, "grid": grid.to_json(), "tile_ids": tiles["tile_id"].to_numpy(),
                "rows": tiles["grid_row"].to_numpy(), "cols": tiles["grid_col"].to_numpy(), "tissue": None}
        with timed(t, "resume"):
            ids, passes, emb = read_parts(store, keys.emb_dir, with_embeddings=class_matrix is not None)
            check_stored_tiles(sid, ids, rec["tile_ids"], keys.emb_dir)
        rec |= {"stored_ids": ids, "stored_passes": passes, "stored_scores": None}
        if class_matrix is not None:   # adaptive: selection needs the tissue cells and the stored scores
            geom = cell_geometry(grid.patch_size, grid.stride)
            rec["tissue"] = resample_mask_to_grid(mask, mask_mpp, grid_shape(grid.n_rows, grid.n_cols, geom),
                                                  geom.cell * grid.target_mpp, grid.origin_um)
            if emb is not None:
                from ..results.reduce import cosine_scores
                rec["stored_scores"] = cosine_scores(emb, class_matrix)
        return rec
    except Exception as e:  # noqa: BLE001 - one bad slide never stops the cohort
        return rec | failure(sid, e)


def check_stored_tiles(sid: str, stored_ids: np.ndarray, tile_ids: np.ndarray, emb_dir: str) -> None:
    """Stored embedding parts must hold tiles of the slide's grid (sorted `tile_ids`); parts from
    another grid (a folder edited or copied by hand) fail this slide in one line, not the cohort."""
    if len(stored_ids) and not np.isin(stored_ids, tile_ids, assume_unique=True).all():
        raise SlideError(sid, f"the embeddings stored in {emb_dir} are not of this slide's tiles (another "
                              "file's?); delete that folder and run again", reason="stale_embeddings")


# --- read and encode -----------------------------------------------------------------------------

_HANDLES: dict = {}     # uri → (OpenSlide, TiffLevels or None), most recently used last
MAX_HANDLES = 8


def _slide(chunk: Chunk, cache_cfg, storage_options):
    """The chunk's slide and its direct TIFF reader (None where OpenSlide reads), from a bounded
    per-worker cache of open handles. The handles share one OpenSlide tile cache (a cache per
    handle would grow a worker by its size per slide); direct reads keep their own (tiff_levels)."""
    import openslide

    from ..slides.access import open_slide_file
    from ..slides.tiff_levels import TiffLevels
    uri = chunk.uri
    handle = _HANDLES.pop(uri, None)
    if handle is None:
        if len(_HANDLES) >= MAX_HANDLES:
            slide, tiff = _HANDLES.pop(next(iter(_HANDLES)))
            slide.close()
            if tiff is not None:
                tiff.close()
        slide, path = open_slide_file(uri, chunk.slide_id, cache_cfg, storage_options)
        if hasattr(openslide, "OpenSlideCache"):
            if not _TILE_CACHE:
                _TILE_CACHE.append(openslide.OpenSlideCache(TILE_CACHE_BYTES))
            slide.set_cache(_TILE_CACHE[0])
        handle = (slide, TiffLevels.open(path, slide) if chunk.direct_tiff else None)
    _HANDLES[uri] = handle
    return handle


_TILE_CACHE: list = []
TILE_CACHE_BYTES = 32 << 20   # one OpenSlide cache shared by the worker's handles


def read_regions(chunk: Chunk, cache_cfg, storage_options=None):
    """Yield (tile_ids, uint8 tiles (n, P, P, 3)) region by region, each region decoded once."""
    from ..slides.region_reader import read_region_tiles
    slide, tiff = _slide(chunk, cache_cfg, storage_options)
    for r in chunk.regions:
        yield read_region_tiles(slide, chunk.grid, r, tiff=tiff)


def _encode_stream(encoder, pieces, batch: int, t: dict):
    """Encode (ids, images) pieces in full batches of `batch` tiles as they come; the tiles past the
    last full batch wait for the next piece, so only a call's last batch can be partial (a batch of
    a tile or two costs more per tile than a full one). At most a region and a batch of pixels are
    held (not a whole chunk's: 256 tiles at 448 px are 150 MB)."""
    ids, emb, buf, n = [], [], [], 0

    def flush(k: int) -> None:   # encode the first k buffered tiles, keep the rest
        with timed(t, "encode"):   # the join into one batch (a copy) counts as encode
            images = np.concatenate(buf) if len(buf) > 1 else buf[0]
            emb.append(encoder.encode_images(images[:k]))
        buf[:] = [images[k:]] if k < len(images) else []

    it = iter(pieces)
    while True:
        with timed(t, "read"):
            piece = next(it, None)
        if piece is None:
            break
        ids.append(piece[0])
        buf.append(piece[1])
        n += len(piece[0])
        if n >= batch:
            flush(n - n % batch)
            n %= batch
    if n:
        flush(n)
    if not emb:   # nothing was read
        return None, None
    return np.concatenate(ids), np.concatenate(emb)


def encode_chunks(encoder, store: OutputStore, items: list, class_matrix=None, cache_cfg=None,
                  storage_options=None) -> list[Encoded]:
    """Encode chunks in shared batches, then write each chunk's part; one record per chunk. An item
    is a Chunk (fused shape: its regions are read here) or a ReadChunk (split shape: read by a
    reader task). The small chunks of adaptive passes and of biopsies fill batches together: a
    partial batch costs more per tile than a full one. A chunk whose slide cannot be read fails alone."""
    t: dict = {}
    node = node_id()
    chunks = [it.chunk if isinstance(it, ReadChunk) else it for it in items]
    recs = [Encoded(c.slide_id, c.pass_no, encode_node=node,
                    read_node=it.read_node if isinstance(it, ReadChunk) else node) for c, it in zip(chunks, items)]
    recs[0].timing = t
    for it in items:   # the readers' time, counted with the call's
        if isinstance(it, ReadChunk):
            merge_timing(t, it.timing)
    errors: dict = {}

    def pieces():   # (item index, tile id) pairs and tiles, item after item
        for k, it in enumerate(items):
            if isinstance(it, ReadChunk) and it.failure is not None:
                errors[k] = it.failure
                continue
            try:
                source = it.pieces if isinstance(it, ReadChunk) else read_regions(it, cache_cfg, storage_options)
                for ids, images in source:
                    yield np.stack([np.full(len(ids), k), ids], axis=1), images
            except Exception as e:  # noqa: BLE001 - this chunk's slide fails, the others go on
                errors[k] = e
    try:
        keys, emb = _encode_stream(encoder, pieces(), getattr(encoder, "batch_size", 64), t)
    except Exception as e:  # noqa: BLE001 - the encoder failed: every chunk of the call fails
        return [_failed(rec, e) for rec in recs]
    if keys is None:   # nothing was read
        keys, emb = np.empty((0, 2), np.int64), None
    out = []
    for k, (chunk, rec) in enumerate(zip(chunks, recs)):
        if k in errors:
            out.append(_failed(rec, errors[k]))
            continue
        mine = keys[:, 0] == k
        if not mine.any():
            out.append(_failed(rec, {"status": FAILED, "reason": "error",
                                     "message": f"slide {chunk.slide_id!r}: no tiles were read for a chunk"}))
            continue
        out.append(_write_part(store, chunk, rec, keys[mine, 1], emb[mine], t, class_matrix))
    return out


def _failed(rec: Encoded, e) -> Encoded:
    """The record failed with an exception, or with a reader's failure fields."""
    f = e if isinstance(e, dict) else failure(rec.slide_id, e)
    rec.status, rec.message, rec.reason, rec.n = f["status"], f["message"], f["reason"], 0
    return rec


def _write_part(store: OutputStore, chunk: Chunk, rec: Encoded, ids: np.ndarray, emb: np.ndarray, t: dict,
                class_matrix=None) -> Encoded:
    """Write one chunk's part and complete its record (+ class scores in adaptive mode)."""
    from ..results.reduce import cosine_scores
    try:
        with timed(t, "write"):
            order = np.argsort(ids)
            ids = ids[order]
            # What is stored is what is scored, so a re-prompt from the store gives the same maps.
            emb = emb[order].astype(chunk.dtype).astype(np.float32)
            path = f"{chunk.emb_dir}/{part_name(chunk.pass_no, ids[0])}"
            store.write_parquet(path, part_table(chunk.slide_id, ids, chunk.grid.n_cols, chunk.pass_no, emb,
                                                 chunk.tiling_key, chunk.model_key, chunk.dtype))
        rec.status, rec.n, rec.part, rec.tile_ids = OK, len(ids), path, ids
        if chunk.want_scores and class_matrix is not None:
            rec.scores = cosine_scores(emb, class_matrix)
        return rec
    except Exception as e:  # noqa: BLE001 - this slide fails, the cohort goes on
        return _failed(rec, e)


def read_chunk(chunk: Chunk, cache_cfg, storage_options=None) -> ReadChunk:
    """Split shape: a reader task reads a chunk's regions for an encoder actor elsewhere."""
    t: dict = {}
    pieces = []
    with timed(t, "read"):
        for ids, images in read_regions(chunk, cache_cfg, storage_options):
            pieces.append((ids, images))
    return ReadChunk(chunk, pieces, node_id(), t)


# --- reduce --------------------------------------------------------------------------------------

def reduce_work(store_root: str, job: ReduceJob) -> Reduced:
    """The slide's reduce (results.reduce.reduce_slide) from its stored parts; a failure becomes the
    slide's failed row."""
    from ..results.reduce import reduce_slide
    sid = job.entry["slide_id"]
    t: dict = {}
    try:
        with timed(t, "reduce"):
            row = reduce_slide(OutputStore(store_root), job.as_job())
        return Reduced(sid, row, t)
    except Exception as e:  # noqa: BLE001 - one bad slide never stops the cohort
        f = failure(sid, e)
        return Reduced(sid, status_row(job.entry, f["status"], f["message"], f["reason"]), t)


def set_threads(n: int) -> None:
    """Intra-op threads of torch and OpenCV in a worker (Ray sets OMP_NUM_THREADS from num_cpus)."""
    import cv2
    n = max(1, int(n))
    cv2.setNumThreads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:
        pass
