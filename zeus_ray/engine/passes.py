"""The pass engine: every slide of the cohort goes plan → pass 1 → [pass 2 …] → reduce, each slide
on its own, through one long-lived worker pool (engine/pool.py).

Full overlap is the one-pass case: `selection.PassState.select()` names every kept tile for pass 1
and nothing after. In adaptive mode a slide's next pass is selected as soon as its own pass is in,
while the pool works on other slides: no cohort-wide barrier between passes, and the encoder
actors stay up from the first tile to the last.

The driver holds, per slide in flight, only what selection needs (tile positions, and in adaptive
mode class scores); embeddings are written by the workers (engine/parts.py) and read back by the
slide's reduce. At most `ray.max_slides_in_flight` slides are in flight, so the driver's memory does
not grow with the cohort, and a huge or slow slide only ever occupies its own share of the pool.

Priorities when a worker is free: reduces, then encodes of slides already in flight (finish what is
started), then planning a new slide.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..storage.keys import FAILED, OK
from ..slides.region_reader import plan_regions
from .summary import RunSummary
from .work import failure
from ..maps.selection import PassState, Selection
from ..slides.tiling import TileGrid

log = logging.getLogger(__name__)


@dataclass
class SlideRun:
    entry: object                 # manifest.SlideEntry
    keys: object                  # keys.Keys
    grid: TileGrid
    tile_ids: np.ndarray          # sorted
    rows: np.ndarray
    cols: np.ndarray
    state: PassState
    pass_no: int = 0
    pending: int = 0              # chunks of the current pass in flight
    failed: bool = False


def chunk_target(n_tiles: int, chunk_tiles: int, workers: int, batch: int) -> int:
    """Tiles per chunk: a pass of a slide is shared by every worker when it has a batch for each
    (a slide's passes follow one another, and the cohort's last slides would otherwise leave
    workers idle), never more than `ray.chunk_tiles` per chunk."""
    return max(1, min(chunk_tiles, max(batch, -(-n_tiles // max(1, workers)))))


def chunk_jobs(run: SlideRun, todo: np.ndarray, cfg, class_matrix, workers: int = 1, batch: int = 1) -> list[dict]:
    """The selected positions as encode jobs: regions (each decoded once) grouped into chunks of
    about `chunk_target` tiles, in row-major region order."""
    rows, cols = np.nonzero(todo)
    want = rows * run.grid.n_cols + cols
    pos = np.searchsorted(run.tile_ids, want)
    regions = plan_regions({"tile_id": want, "grid_row": rows, "grid_col": cols}, run.grid,
                           cfg.tiling.region_tiles, slide_id=run.entry.slide_id)
    assert np.array_equal(run.tile_ids[pos], want), "selected a position that is not a kept tile"
    base = {"slide_id": run.entry.slide_id, "uri": run.entry.uri, "grid": run.grid, "n_cols": run.grid.n_cols,
            "pass": run.pass_no, "emb_dir": run.keys.emb_dir, "tiling_key": run.keys.tiling_key,
            "model_key": run.keys.model_key, "dtype": cfg.output.embedding_dtype,
            "direct_tiff": cfg.input.reader == "auto",
            "class_matrix": class_matrix if run.state.sel.mode == "adaptive" else None}
    target = chunk_target(len(want), cfg.ray.chunk_tiles, workers, batch)
    jobs, chunk, n = [], [], 0
    for r in regions:
        chunk.append(r)
        n += r.n_tiles
        if n >= target:
            jobs.append(base | {"regions": chunk, "n_tiles": n})
            chunk, n = [], 0
    if chunk:
        jobs.append(base | {"regions": chunk, "n_tiles": n})
    return jobs


class PassEngine:
    """Runs slides to completion into `stats` (the run's RunSummary): each slide's result or status
    row, tiles encoded, passes, per-stage timing, nodes."""

    def __init__(self, cfg, pool, prompts: dict, keys_of: dict, sources: dict, stats: RunSummary,
                 progress: bool = True):
        self.cfg, self.pool, self.prompts = cfg, pool, prompts
        self.keys_of, self.sources, self.stats, self.progress = keys_of, sources, stats, progress
        self.on_row = stats.rows.append
        self.sel = Selection.from_tiling(cfg.tiling)
        self.class_matrix = prompts["class_matrix"]
        self.runs: dict[str, SlideRun] = {}
        self.inflight: dict = {}            # ref → (kind, slide id)
        self.encode_q: deque = deque()
        self.reduce_q: deque = deque()
        self.done = 0

    # --- the loop --------------------------------------------------------------------------------
    def run(self, to_plan: list, to_reduce: list) -> RunSummary:
        import ray
        self.total = len(to_plan) + len(to_reduce)
        self.entries = {e.slide_id: e for e in [*to_plan, *to_reduce]}
        plan_q = deque(to_plan)
        self.reduce_q.extend((e, None) for e in to_reduce)
        # Enough slides in flight that a slide waiting for its own pass never leaves a worker idle.
        limit = self.cfg.ray.max_slides_in_flight or max(8, 4 * len(self.pool.actors))
        while True:
            self._dispatch(plan_q, limit)
            if not self.inflight:
                break
            ready, _ = ray.wait(list(self.inflight), num_returns=1)
            rest = [r for r in self.inflight if r not in ready]
            if rest:
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            for ref in ready:
                kind, sids = self.inflight.pop(ref)
                self.pool.release(ref)
                try:
                    recs = ray.get(ref)
                    recs = recs if isinstance(recs, list) else [recs]
                except Exception as e:  # noqa: BLE001 - a worker lost beyond its retries: these slides only
                    cause = getattr(e, "cause", None) or e
                    why = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
                    recs = [{"slide_id": sid, "status": FAILED, "reason": "worker_lost",
                             "message": f"slide {sid!r}: {kind} failed: {why}"} for sid in sids]
                for sid, rec in zip(sids, recs):
                    self._on_record(kind, sid, rec)
        return self.stats

    def _on_record(self, kind: str, sid: str, rec: dict) -> None:
        """A worker's record; one that this slide's state cannot take (stored tiles of another
        grid, ...) fails this slide in one line, never the cohort."""
        try:
            getattr(self, f"_on_{kind}")(sid, rec)
        except Exception as e:  # noqa: BLE001
            self._fail(sid, failure(sid, e))

    def _encode_now(self) -> bool:
        """Fused mode: send chunks that fill less than a batch only to a worker that would otherwise
        wait; until then small chunks (biopsies, adaptive passes) gather into fuller batches."""
        plan = self.pool.plan_
        if not plan.fused or self.pool.idle():
            return True
        return sum(j["n_tiles"] for j in self.encode_q) >= plan.batch_size

    def _take_encodes(self) -> list[dict]:
        """The next encode call's chunks: one, or in fused mode several small ones (of any slides in
        flight) up to this moment's chunk size, so their tiles share batches."""
        jobs = [self.encode_q.popleft()]
        plan = self.pool.plan_
        if not plan.fused:
            return jobs
        queued = jobs[0]["n_tiles"] + sum(j["n_tiles"] for j in self.encode_q)
        target = chunk_target(queued, self.cfg.ray.chunk_tiles, plan.n_workers, plan.batch_size)
        n = jobs[0]["n_tiles"]
        while self.encode_q and n + self.encode_q[0]["n_tiles"] <= target:
            n += self.encode_q[0]["n_tiles"]
            jobs.append(self.encode_q.popleft())
        return jobs

    def _dispatch(self, plan_q: deque, limit: int) -> None:
        while True:
            if self.reduce_q and self.pool.can_task():
                entry, info = self.reduce_q.popleft()
                self.inflight[self.pool.reduce(self._reduce_job(entry, info))] = ("reduce", (entry.slide_id,))
            elif self.encode_q and self.pool.can_encode() and self._encode_now():
                jobs = self._take_encodes()
                self.inflight[self.pool.encode(jobs)] = ("encode", tuple(j["slide_id"] for j in jobs))
            elif plan_q and len(self.runs) < limit and self.pool.can_task():
                e = plan_q.popleft()
                self.runs[e.slide_id] = None          # reserved until its plan is in
                cm = self.class_matrix if self.sel.mode == "adaptive" else None
                ref = self.pool.plan(e.as_dict(), self.keys_of[e.slide_id], self.sources[e.slide_id], cm)
                self.inflight[ref] = ("plan", (e.slide_id,))
            else:
                return

    # --- transitions -----------------------------------------------------------------------------
    def _fail(self, sid: str, rec: dict) -> None:
        run = self.runs.get(sid)
        if run is not None:
            run.failed = True
        self._row(status_row(self.entries[sid], rec.get("status", FAILED), rec.get("message"), rec.get("reason")))
        if run is None or run.pending == 0:
            self.runs.pop(sid, None)

    def _on_plan(self, sid: str, rec: dict) -> None:
        self.stats.add_timing(rec.get("timing"))
        entry = self.entries[sid]
        if rec["status"] != OK:
            self.runs.pop(sid, None)
            self._row(status_row(entry, rec["status"], rec["message"], rec.get("reason")))
            return
        grid = TileGrid.from_json(rec["grid"])
        kept = np.zeros((grid.n_rows, grid.n_cols), bool)
        kept[rec["rows"], rec["cols"]] = True
        state = PassState(kept, rec["tissue"], self.sel, len(self.prompts["class_names"]))
        ids = rec["stored_ids"]
        if len(ids):
            state.add(*np.divmod(ids, grid.n_cols), rec["stored_passes"], rec["stored_scores"])
        run = SlideRun(entry, self.keys_of[sid], grid, rec["tile_ids"], rec["rows"], rec["cols"], state)
        self.runs[sid] = run
        self._advance(run)

    def _advance(self, run: SlideRun) -> None:
        p, todo = run.state.select()
        if not todo.any():   # converged: every tile this slide needs is stored
            st = run.state
            info = {"n_tiles": st.n_encoded, "n_tiles_full": int(st.kept.sum()), "passes": st.n_passes}
            if self.sel.mode == "adaptive":
                self.stats.tiles_full += info["n_tiles_full"]
                self.stats.tiles_stored += info["n_tiles"]
            self.reduce_q.append((run.entry, info))
            return
        run.pass_no = p
        plan = self.pool.plan_
        jobs = chunk_jobs(run, todo, self.cfg, self.class_matrix, plan.n_workers, plan.batch_size)
        run.pending = len(jobs)
        self.encode_q.extend(jobs)

    def _on_encode(self, sid: str, rec: dict) -> None:
        run = self.runs.get(sid)
        self.stats.add_timing(rec.get("timing"))
        if run is None:   # the slide already failed
            return
        run.pending -= 1
        if run.failed:
            if run.pending == 0:
                self.runs.pop(sid, None)
            return
        if rec["status"] != OK:
            self._fail(sid, rec)
            return
        n = rec["n"]
        self.stats.tiles_encoded += n
        self.stats.pass_tiles[rec["pass"]] = self.stats.pass_tiles.get(rec["pass"], 0) + n
        self.stats.read_nodes.add(rec.get("read_node"))
        self.stats.encode_nodes.add(rec.get("encode_node"))
        run.state.add(*np.divmod(rec["tile_ids"], run.grid.n_cols), rec["pass"], rec.get("scores"))
        if run.pending == 0:
            self._advance(run)

    def _reduce_job(self, entry, info) -> dict:
        p = self.prompts
        return {"entry": entry.as_dict() | {"source": self.sources[entry.slide_id]},
                "keys": self.keys_of[entry.slide_id], "class_names": p["class_names"],
                "tumour_index": p["tumour_index"], "class_matrix": p["class_matrix"],
                "logit_scale": p["logit_scale"], "evaluation": self.cfg.evaluation.model_dump(),
                "output": self.cfg.output.model_dump(), "postprocess": self.cfg.postprocess,
                "storage_options": self.cfg.input.storage_options,
                "tumour_class_name": p["class_names"][p["tumour_index"]], "embeddings_info": info}

    def _on_reduce(self, sid: str, rec: dict) -> None:
        self.stats.add_timing(rec.pop("timing", None))
        self.runs.pop(sid, None)
        if rec.get("status") != OK:
            self._row(status_row(self.entries[sid], FAILED, rec.get("message"), rec.get("reason")))
            return
        self._row(rec)

    def _row(self, row: dict) -> None:
        self.done += 1
        if self.progress:
            if row["status"] == OK:
                dice = f", Dice {row['dice']:.3f}" if row.get("dice") is not None else ""
                log.info("slide %s done: %d tiles, tumour %.2f mm²%s (%d/%d)", row["slide_id"], row["n_tiles"],
                         row["tumour_area_mm2"], dice, self.done, self.total)
            else:
                log.info("slide %s %s (%d/%d)", row["slide_id"], row["status"], self.done, self.total)
        self.on_row(row)


def status_row(entry, status: str, message: str | None, reason: str | None = None) -> dict:
    """The row of a slide without results: its status, the one-line error and its reason."""
    return {"slide_id": entry.slide_id, "status": status, "error": message or None, "reason": reason,
            "n_tiles": 0, "dataset": entry.dataset, "center": entry.center, "tumour_area_mm2": None}
