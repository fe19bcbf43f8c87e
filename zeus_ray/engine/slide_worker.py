"""The fused shape's one operator: an encoder actor takes a whole slide and does everything for it,
plan → pass 1 → [later passes] → reduce, in its own process (no tile pixels, embeddings or class
scores leave it; only the slide's result row comes back).

Why a whole slide per call rather than the split shape's chunk stream (docs/ARCHITECTURE.md, Engine):
on CPU nodes the plan, read and reduce are short and the encoder holds the CPUs, so every extra
process (a plan or reduce task, an object-store copy of tiles) is paid from the encoders' time;
measured, the chunk stream with plan and reduce tasks ran at about 0.6 of this shape. A slide's
adaptive passes run back to back here, so an adaptive run is one execution with no pass boundary.
The driver sends the largest files first, so the cohort's last calls are its smallest slides.
Each worker computes the class embeddings with its own encoder and completes the slide's keys with
its model key (the driver loads no model and waits for none before the pool starts), then sees
what is stored: results of the same file → the stored row; full-overlap embeddings → the reduce.
No ray import here: this runs inside Ray Data's actors.
"""
from __future__ import annotations

import pyarrow as pa

from ..errors import ZeusError
from ..storage.keys import FAILED, OK, with_model
from . import work
from .records import REC, Reduced, ReduceJob, SlideTask, pack, status_row, unpack
from .stages import chunks_for, plan_slide

# Tries a slide gets within one run. Ray restarts a dead actor and retries its call for ever (a
# node lost mid-slide costs nothing); a slide that kills its worker every time (out of memory, a
# decoder crash) would hold the cohort up for ever: its slide worker gives it up after this many.
MAX_TRIES = 3
TRIES_DIR = "_tries"


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
    """map_batches callable class on the encoder actor pool (fused shape): holds the frozen encoder
    and the class embeddings; each row is a SlideTask whose keys lack the model (SlideWorker.slide)."""

    def __init__(self, cfg, store, threads: int, prompt_set):
        from ..encoders.registry import load_encoder
        from ..prompts import class_embeddings, prompt_key
        from ..storage.keys import run_key
        from ..storage.store import OutputStore
        work.set_threads(threads)
        self.cfg, self.store = cfg, OutputStore(store)
        self.error = None
        try:
            self.encoder = load_encoder(cfg.model)
            # Class matrix (C, D) per the paper's Eq. 1: deterministic, so every worker has the same.
            self.prompts = {"class_matrix": class_embeddings(self.encoder, prompt_set),
                            "class_names": prompt_set.class_names, "tumour_index": prompt_set.tumour_index,
                            "logit_scale": float(self.encoder.logit_scale)}
            self.pkey = run_key(prompt_key(prompt_set, self.encoder.model_key), cfg)
        except ZeusError as e:   # told on the first call: one line for the user, no restart loop
            self.encoder, self.error, self.pkey = None, e, None

    def slide(self, task: SlideTask) -> Reduced:
        """The slide's keys completed with this worker's model, then what is stored decides."""
        sid = task.entry["slide_id"]
        keys = with_model(self.store, sid, task.keys, self.encoder.model_key, self.pkey)
        task = SlideTask(task.entry, keys, task.source, task.run_id)
        done = self.store.complete(keys.res_dir)
        if done is not None and done.get("source") == task.source:
            return Reduced(sid, done, skipped=True)
        emb = self.store.complete(keys.emb_dir) if self.cfg.tiling.mode == "full" else None
        if emb is not None and emb.get("source") == task.source:
            return work.reduce_work(self.store, reduce_job(task.entry, task.source, keys, self.prompts, self.cfg,
                                                           None))
        tries = self._tries(task)
        if tries > MAX_TRIES:
            return Reduced(sid, status_row(task.entry, FAILED, (
                f"slide {sid!r}: its worker died on each of {MAX_TRIES} tries (out of memory? a decoder crash? "
                "see the Ray worker logs); re-run to try again, or leave it out of the manifest"), reason="worker_lost"))
        try:
            return run_slide(self.encoder, self.store, task, self.cfg, self.prompts)
        finally:   # the call came back (a row, even a failed one): only a dying worker leaves marks
            try:
                self.store.rm(self.store.slide_dir(sid, TRIES_DIR), recursive=True)
            except (OSError, ZeusError):
                pass   # marks left behind count only for their own run

    def _tries(self, task: SlideTask) -> int:
        """Marks this try of the slide in the output store and counts this run's tries so far
        (a dead worker's try stays marked; Ray's retries of a call that never started do not count)."""
        import uuid
        d = self.store.slide_dir(task.entry["slide_id"], TRIES_DIR, task.run_id or "run")
        self.store.write_bytes(f"{d}/{uuid.uuid4().hex}", b"")
        return len(self.store.ls(d))

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for cell in batch.column(REC).to_pylist():
            task = unpack(cell)
            if self.error is not None:   # the driver stops the run with this one line
                out.append(Reduced(task.entry["slide_id"], {}, fatal=str(self.error).splitlines()[0]))
                continue
            try:
                rec = self.slide(task)
            except Exception as e:  # noqa: BLE001 - one bad slide never stops the cohort
                f = work.failure(task.entry["slide_id"], e)
                rec = Reduced(task.entry["slide_id"], status_row(task.entry, f["status"], f["message"], f["reason"]))
            rec.prompt_key = self.pkey
            out.append(rec)
        return pa.table({REC: pa.array([pack(o) for o in out], pa.binary())})
