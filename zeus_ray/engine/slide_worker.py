"""The fused shape's one operator: an encoder actor takes a whole slide and does everything for it,
plan → pass 1 → [later passes] → reduce, in its own process (no tile pixels, embeddings or class
scores leave it; only the slide's result row comes back).

Why a whole slide per call rather than the split shape's chunk stream (docs/ARCHITECTURE.md, Engine):
on CPU nodes the plan, read and reduce are short and the encoder holds the CPUs, so every extra
process (a plan or reduce task, an object-store copy of tiles) is paid from the encoders' time;
measured, the chunk stream with plan and reduce tasks ran at about 0.6 of this shape. A slide's
adaptive passes run back to back here, so an adaptive run is one execution with no pass boundary.
The cohort's slides come largest file first, so the last calls are the small slides.
No ray import here: this runs inside Ray Data's actors.
"""
from __future__ import annotations

import pyarrow as pa

from ..storage.keys import FAILED, OK
from . import work
from .records import REC, Reduced, ReduceJob, SlideTask, pack, status_row, unpack
from .stages import chunks_for, plan_slide


def run_slide(encoder, store, task: SlideTask, cfg, prompts: dict) -> Reduced:
    """One slide to its result row: plan (or reuse what is stored), encode each selected pass in
    chunks of `ray.chunk_tiles` tiles (maps.selection.PassState selects; full overlap is its
    one-pass case), write the parts, reduce."""
    entry, sid = task.entry, task.entry["slide_id"]
    cm = prompts["class_matrix"]
    adaptive = cfg.tiling.mode == "adaptive"
    planned, chunks = plan_slide(task, store, cfg, cm, len(prompts["class_names"]), 1, cfg.ray.chunk_tiles)
    timing: dict = {}
    work.merge_timing(timing, planned.timing)
    if planned.status != OK:
        return Reduced(sid, status_row(entry, planned.status, planned.message, planned.reason), timing,
                       node=planned.node)
    state, grid = planned.state, planned.grid
    pass_tiles: dict = {}
    while chunks:
        for rec in work.encode_chunks(encoder, store, chunks, cm if adaptive else None, cfg.cache,
                                      cfg.input.storage_options):
            work.merge_timing(timing, rec.timing)
            if rec.status != OK:
                return Reduced(sid, status_row(entry, FAILED, rec.message, rec.reason), timing, pass_tiles,
                               planned.node)
            pass_tiles[rec.pass_no] = pass_tiles.get(rec.pass_no, 0) + rec.n
            state.add(*divmod(rec.tile_ids, grid.n_cols), rec.pass_no, rec.scores)
        p, todo = state.select()
        chunks = (chunks_for(sid, entry["uri"], grid, task.keys, p, todo, cfg, cfg.ray.chunk_tiles)
                  if todo.any() else [])
    info = {"n_tiles": state.n_encoded, "n_tiles_full": int(state.kept.sum()), "passes": state.n_passes}
    done = work.reduce_work(store, reduce_job(entry, task.source, task.keys, prompts, cfg, info))
    work.merge_timing(timing, done.timing)
    full, stored = (info["n_tiles_full"], info["n_tiles"]) if adaptive else (0, 0)
    return Reduced(sid, done.row, timing, pass_tiles, planned.node, full, stored)


def reduce_job(entry: dict, source, keys, prompts: dict, cfg, info: dict | None) -> ReduceJob:
    """What a slide's reduce needs (the driver's for stored embeddings, a slide worker's for its own)."""
    return ReduceJob(entry=entry | {"source": source}, keys=keys, class_names=prompts["class_names"],
                     tumour_index=prompts["tumour_index"], class_matrix=prompts["class_matrix"],
                     logit_scale=prompts["logit_scale"], evaluation=cfg.evaluation.model_dump(),
                     output=cfg.output.model_dump(), postprocess=cfg.postprocess,
                     storage_options=cfg.input.storage_options, embeddings_info=info)


class SlideWorker:
    """map_batches callable class on the encoder actor pool (fused shape): holds the frozen encoder;
    each row is a SlideTask (plan, encode, reduce) or a ReduceJob (stored embeddings, new prompts)."""

    def __init__(self, cfg, store, threads: int, prompts: dict):
        from ..encoders.registry import load_encoder
        from ..errors import ZeusError
        from ..storage.store import OutputStore
        work.set_threads(threads)
        self.cfg, self.prompts, self.store = cfg, prompts, OutputStore(store)
        self.error = None
        try:
            self.encoder = load_encoder(cfg.model)
        except ZeusError as e:   # raised on the first call: one line for the user, no restart loop
            self.encoder, self.error = None, e

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for cell in batch.column(REC).to_pylist():
            item = unpack(cell)
            if isinstance(item, ReduceJob):
                out.append(work.reduce_work(self.store, item))
                continue
            if self.error is not None:
                raise self.error
            try:
                out.append(run_slide(self.encoder, self.store, item, self.cfg, self.prompts))
            except Exception as e:  # noqa: BLE001 - one bad slide never stops the cohort
                f = work.failure(item.entry["slide_id"], e)
                out.append(Reduced(item.entry["slide_id"], status_row(item.entry, f["status"], f["message"],
                                                                      f["reason"])))
        return pa.table({REC: pa.array([pack(o) for o in out], pa.binary())})
