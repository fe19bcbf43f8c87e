"""Boundary-adaptive overlap on the cluster (tiling.mode = adaptive): the pass loop of
adaptive.py run over a wave of slides (`ray.adaptive_wave`), one Ray Data job per pass over every
slide of the wave that still needs tiles.

Per slide, each completed pass is stored as `pass-NN.parquet` (tile ids, positions, embeddings)
in the slide's embedding folder, written whole. A run that stops inside a pass resumes from the
stored passes: the next selection is computed from them, so only missing tiles are read. A new
prompt set starts from every tile stored so far and encodes only the tiles it newly needs.

The driver keeps per slide only what selection needs (positions and class scores); the slide's
reduce reads its embeddings back from the pass files, so memory does not grow with the cohort.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .adaptive import first_pass, next_pass, pass_step
from .ray_stages import (FAILED, NO_TISSUE, encode_dataset, ensure_tiles, guarded, no_tiles_message, region_rows,
                         stream_slides)
from .slide_reduce import SlideGrid, cosine_scores, embeddings_from_table, load_slide_grid
from .store import OutputStore

log = logging.getLogger(__name__)


@dataclass
class SlideState:
    uri: str
    sg: SlideGrid
    kept: np.ndarray                      # (R, C) positions of tiles with enough tissue
    encoded: np.ndarray                   # (R, C) bool
    scores: np.ndarray                    # (R, C, n_classes), NaN where not encoded
    n_passes: int = 0

    def add(self, ids: np.ndarray, emb: np.ndarray, class_matrix: np.ndarray) -> None:
        rows, cols = np.divmod(ids, self.sg.grid.n_cols)   # tile_id = grid_row * n_cols + grid_col
        self.encoded[rows, cols] = True
        self.scores[rows, cols] = cosine_scores(emb, class_matrix)

    def selection(self, cfg) -> np.ndarray:
        t = cfg.tiling
        if not self.encoded.any():
            return first_pass(self.kept, t.patch_size, t.stride, self.sg.tissue_cells)
        return next_pass(self.kept, self.encoded, self.scores, self.sg.tissue_cells, t.patch_size, t.stride,
                         margin=t.adaptive_margin, dilation=t.adaptive_dilation, disagreement=t.adaptive_disagreement,
                         step=pass_step(self.n_passes + 1, t.patch_size, t.stride, t.adaptive_coarse_first))


def _plan_task(store_root, entry, cfg, tiles_dir, source):
    """Plan one slide (or reuse its tiles): (status row or None, n_tiles)."""
    def plan():
        tiles, _, status = ensure_tiles(OutputStore(store_root), entry, cfg, tiles_dir, source)
        if tiles.num_rows == 0:
            return {"kind": [NO_TISSUE], "message": [no_tiles_message(entry["slide_id"], status)]}
        return None
    return guarded(entry["slide_id"], plan)


def _pass_table(ids: np.ndarray, emb: np.ndarray, n_cols: int, p: int, dtype: str) -> pa.Table:
    rows, cols = np.divmod(ids, n_cols)
    d = emb.shape[1]
    return pa.table({"tile_id": pa.array(ids, pa.int64()), "grid_row": pa.array(rows, pa.int32()),
                     "grid_col": pa.array(cols, pa.int32()), "pass": pa.array(np.full(len(ids), p), pa.int16()),
                     "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(dtype).ravel()), d)})


def _load_state(store: OutputStore, uri: str, keys, class_matrix: np.ndarray) -> SlideState:
    sg = load_slide_grid(store, keys.tiles_dir)
    shape = (sg.grid.n_rows, sg.grid.n_cols)
    kept = np.zeros(shape, bool)
    kept[sg.tiles["grid_row"].to_numpy(), sg.tiles["grid_col"].to_numpy()] = True
    st = SlideState(uri, sg, kept, np.zeros(shape, bool), np.full((*shape, len(class_matrix)), np.nan))
    for path in sorted(store.fs.glob(f"{keys.emb_dir}/pass-*.parquet")):   # resume / earlier prompt sets
        table = store.read_parquet(path)
        st.add(table["tile_id"].to_numpy(), embeddings_from_table(table), class_matrix)
        st.n_passes += 1
    return st


def run_adaptive_passes(cfg, store: OutputStore, entries, keys_of, source_ids, class_matrix, summary,
                        on_status, on_complete) -> None:
    """Every slide's passes until it converges; on_complete(sid, None, None) then means: reduce
    from the slide's stored pass files. Slides go in waves of `ray.adaptive_wave`."""
    wave = cfg.ray.adaptive_wave
    for i in range(0, len(entries), wave):
        _run_wave(cfg, store, entries[i:i + wave], keys_of, source_ids, class_matrix, summary, on_status,
                  on_complete)


def _run_wave(cfg, store: OutputStore, entries, keys_of, source_ids, class_matrix, summary,
              on_status, on_complete) -> None:
    import ray
    import ray.data

    plan = ray.remote(_plan_task).options(num_cpus=1, memory=1024 * 2**20,
                                         resources=cfg.ray.reader_resources or None)
    refs = {e.slide_id: plan.remote(store.root_uri, e.as_dict(), cfg, keys_of[e.slide_id].tiles_dir,
                                    source_ids[e.slide_id]) for e in entries}
    states: dict[str, SlideState] = {}
    for e in entries:
        status = ray.get(refs[e.slide_id])
        if status is not None:
            on_status(e.slide_id, str(status["kind"][0]), str(status["message"][0]))
        else:
            states[e.slide_id] = _load_state(store, e.uri, keys_of[e.slide_id], class_matrix)

    dtype = cfg.output.embedding_dtype
    while states:
        items, todo = [], {}
        for sid, st in list(states.items()):
            sel = st.selection(cfg)
            if not sel.any():        # converged: every tile this prompt set needs is encoded
                del states[sid]
                summary.tiles_full += int(st.kept.sum())
                summary.tiles_stored += int(st.encoded.sum())
                on_complete(sid, None, None)
                continue
            rows, cols = np.nonzero(sel)
            want = np.sort(rows * st.sg.grid.n_cols + cols)
            subset = st.sg.tiles.take(pa.array(np.searchsorted(st.sg.tiles["tile_id"].to_numpy(), want)))
            batch = region_rows(sid, st.uri, st.sg.grid, subset, cfg.tiling.region_tiles)
            items += [{k: v[i] for k, v in batch.items()} for i in range(len(batch["slide_id"]))]
            todo[sid] = len(want)
        if not items:
            break
        log.info("adaptive pass: %d tiles on %d slides", sum(todo.values()), len(todo))

        def pass_status(sid, kind, message):
            states.pop(sid, None)
            on_status(sid, kind if kind != "tile" else FAILED, message)

        def pass_complete(sid, ids, emb):
            st = states[sid]
            order = np.argsort(ids)
            ids, emb = ids[order], emb[order].astype(dtype).astype(np.float32)   # as stored
            st.n_passes += 1
            store.write_parquet(f"{keys_of[sid].emb_dir}/pass-{st.n_passes:02d}.parquet",
                                _pass_table(ids, emb, st.sg.grid.n_cols, st.n_passes, dtype))
            st.add(ids, emb, class_matrix)

        t0 = time.perf_counter()
        ds = encode_dataset(cfg, ray.data.from_items(items, override_num_blocks=len(items)))
        stream_slides(ds, summary, pass_status, pass_complete)
        summary.passes.append((sum(todo.values()), time.perf_counter() - t0))
        for sid in [s for s in todo if s in states and not states[s].encoded.any()]:
            pass_status(sid, FAILED, f"slide {sid!r}: no tile of its first adaptive pass was encoded")
